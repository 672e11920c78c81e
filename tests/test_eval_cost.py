"""Honest cost: every score entry each method computes, checked against brute-force counts from
the spec (docs/dga.md) and the methods' definitions; the equal-cost solves hit their targets."""

import pytest
import torch
import torch.nn.functional as F

from dga_compile import DGAConfig
from dga_compile.eval.cost import CostMeter, Site, SiteProfile, recent_for_cost, span_entries
from dga_compile.eval.methods import Call, Method, attend_fn
from dga_compile.blocked import expanded_counts
from dga_compile.eval.perhead import plan_for_cost
from dga_compile.selection import aggregate_groups, importance_scores, num_focus, split_focus
from dga_compile._validation import causal_like, visible_4d

SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, min_seq_len=0)


def _qkv(n, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
            torch.randn(1, hkv, n, d, generator=g))


def _mask(kind: str, n: int):
    """(attn_mask, is_causal) of a mask family."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    if kind == "causal":
        return None, True
    if kind == "sliding":                                  # HF sliding-window layers: a bool mask, causal inside
        return ((j <= i) & (i - j < 19))[None, None], False
    if kind == "padding":                                  # left padding of 5 tokens + causality
        return (j >= 5).expand(n, n)[None, None], True
    if kind == "random":                                   # not one run of keys per query: the general count
        g = torch.Generator().manual_seed(1)
        return ((torch.rand(n, n, generator=g) < 0.7) & (j <= i) | (i == j))[None, None], False
    return None, False                                     # "bidirectional"


def _brute_force(q, k, v, attn_mask, is_causal, cfg):
    """Per query head and query the spec's step-5 candidates; step 1 and step 4 entries."""
    n, m, hq, rep = k.shape[2], cfg.group_size, q.shape[1], q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    vis = visible_4d(attn_mask, is_causal, n, n, q.device)
    full = torch.ones(n, n, dtype=torch.bool) if vis is None else vis[0, 0]
    window = causal_like(vis, is_causal)
    focus, nonfocus = split_focus(importance_scores(q, k, vis, scale, cfg.num_probe),
                                  num_focus(cfg.focus_ratio, n, cfg.sinks), cfg.sinks)
    grp = aggregate_groups(q, k, v, nonfocus, scale, m)
    attention, n_complete = torch.zeros(1, hq, n), torch.zeros(1, hq, n)
    for h in range(hq):
        focus_h = set(focus[0, h // rep].tolist())
        groups = grp.members[0, h // rep].tolist()
        for i in range(n):
            seen = {j for j in range(n) if full[i, j]}
            complete = [g for g in groups if set(g) <= seen and (not window or g[-1] <= i - cfg.window)]
            grouped = {j for g in complete for j in g}
            attention[0, h, i] = len(seen & focus_h) + len(complete) + len(seen - focus_h - grouped)
            n_complete[0, h, i] = len(complete)
    probes = hq * sum(int(full[p].sum()) for p in range(n - min(cfg.num_probe, n), n))
    probes = probes if num_focus(cfg.focus_ratio, n) else 0          # nothing scored: step 1 is skipped
    return attention, probes, hq * len(groups) * m, n_complete


@pytest.mark.parametrize("mask", ["causal", "sliding", "padding", "random", "bidirectional"])
@pytest.mark.parametrize("n", [53, 61], ids=lambda n: f"N{n}")
def test_dga_counts_every_entry(mask, n):
    q, k, v = _qkv(n)
    attn_mask, is_causal = _mask(mask, n)
    with CostMeter() as meter:
        attend_fn(Method("dga", SMALL))(q, k, v, attn_mask, is_causal, None, 0.0)
    attention, probes, aggregation, _ = _brute_force(q, k, v, attn_mask, is_causal, SMALL)
    assert meter.terms == pytest.approx({"attention": float(attention.sum()), "probes": probes,
                                         "aggregation": aggregation})
    assert meter.keys_at_last == pytest.approx(float(attention[..., -1].mean()))
    assert (Call(q, k, v, attn_mask, is_causal, None, 0.0).spans is None) == (mask == "random")


@pytest.mark.parametrize("cfg", [
    pytest.param(SMALL.replace(sinks=3, expand_mass=1 - 1e-12, query_block=16), id="all-expanded"),
    pytest.param(SMALL.replace(focus_ratio=0.0, sinks=4, expand_mass=1 - 1e-12, query_block=7), id="gamma0-all"),
    pytest.param(SMALL.replace(expand_mass=1 - 1e-12, expand_max=1e-9, query_block=16), id="all-dense"),
])
@pytest.mark.parametrize("mask", ["causal", "sliding", "padding", "random", "bidirectional"])
def test_dga_counts_expanded_members_N61(mask, cfg):
    """Step 5′ (docs/dga.md, "Cost"): a row scores the m members of each group it expands while
    the group's own logit stays counted; here every complete group is expanded (τ → 1, or every
    (block, head) over the ceiling): visible + complete per row. No probes when γ = 0."""
    q, k, v = _qkv(61)
    attn_mask, is_causal = _mask(mask, 61)
    with CostMeter() as meter:
        attend_fn(Method("dga", cfg))(q, k, v, attn_mask, is_causal, None, 0.0)
    attention, probes, aggregation, n_complete = _brute_force(q, k, v, attn_mask, is_causal, cfg)
    assert n_complete.sum() > 0
    assert meter.terms == pytest.approx({"attention": float((attention + cfg.group_size * n_complete).sum()),
                                         "probes": probes, "aggregation": aggregation})
    assert (probes == 0) == (cfg.focus_ratio == 0)


def test_dga_cost_of_a_partial_expansion_is_between_N90():
    """τ = 0.6: some complete groups expanded, not all; the count is the op's own choice."""
    q, k, v = _qkv(90)
    cfg = SMALL.replace(expand_mass=0.6, query_block=16)
    with CostMeter() as meter:
        attend_fn(Method("dga", cfg))(q, k, v, None, True, None, 0.0)
    attention, _, _, n_complete = _brute_force(q, k, v, None, True, cfg)
    expanded = expanded_counts(q, k, v, None, True, None, cfg).float()
    assert 0 < expanded.sum() < n_complete.sum() and (expanded <= n_complete).all()
    assert meter.terms["attention"] == pytest.approx(float((attention + cfg.group_size * expanded).sum()))


@pytest.mark.parametrize("recent,sinks", [(1, 0), (7, 3), (19, 4), (60, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("window", [None, 13], ids=["causal", "sliding13"])
def test_span_entries_counts_sinks_and_recent(recent, sinks, window):
    n = 41
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    visible = (j <= i) & ((i - j < window) if window else True)
    kept = visible & ((i - j < recent) | (j < sinks))
    got = span_entries(visible.sum(-1).double(), sinks, recent)
    assert torch.equal(got, kept.sum(-1).double())


def test_topk_solves_its_window_to_the_cost_target():
    q, k, v = _qkv(300)
    with CostMeter() as meter:
        attend_fn(Method("topk", SMALL, cost_target=0.4))(q, k, v, None, True, None, 0.0)
    assert meter.terms["probes"] > 0 and abs(meter.fraction - 0.4) < 0.01
    assert len(meter.recents) == 1 and 1 < meter.recents[0] < 300


def test_perhead_dense_heads_are_dense_and_local_heads_stream():
    q, k, v = _qkv(120)
    method = Method("perhead", SMALL, sinks=3, recent=10, dense_heads=frozenset({(None, 1)}))
    with CostMeter() as meter:
        out = attend_fn(method)(q, k, v, None, True, None, 0.0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    i, j = torch.arange(120)[:, None], torch.arange(120)[None]
    local = (j <= i) & ((i - j < 10) | (j < 3))
    stream = F.scaled_dot_product_attention(q, k, v, attn_mask=local, enable_gqa=True)
    torch.testing.assert_close(out[:, 2:], dense[:, 2:], rtol=1e-5, atol=1e-5)     # kv head 1: query heads 2, 3
    torch.testing.assert_close(out[:, :2], stream[:, :2], rtol=1e-5, atol=1e-5)
    assert meter.entries == 2 * float(local.sum()) + 2 * 120 * 121 / 2


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.7], ids=lambda f: f"C{f}")
def test_plan_for_cost_hits_the_target(fraction):
    n, layers = 200, 4
    profiles = {layer: SiteProfile(4, torch.arange(1, n + 1, dtype=torch.float64)) for layer in range(layers)}
    locality = {(layer, h): (layer * 2 + h) / 10 for layer in range(layers) for h in range(2)}
    heads, recent = plan_for_cost(locality, profiles, fraction, sinks=4, recent=32)
    local = float(span_entries(profiles[0].visible, 4, recent).sum())
    cost = sum(2 * (float(profiles[0].visible.sum()) if (layer, h) in heads else local)
               for layer in range(layers) for h in range(2))
    assert abs(cost / sum(p.dense for p in profiles.values()) - fraction) < 0.01
    assert all(locality[h] <= min(locality[o] for o in locality if o not in heads) for h in heads)  # least local
    assert (len(heads) == 0) == (fraction < float(span_entries(profiles[0].visible, 4, 32).sum()) / (n * (n + 1) / 2))


def test_recent_for_cost_on_sliding_window_sites():
    """A sliding-window site (window 50) costs its own visible keys, not N(N+1)/2."""
    n = 300
    i = torch.arange(n, dtype=torch.float64)
    profiles = {0: SiteProfile(1, i + 1), 1: SiteProfile(1, (i + 1).clamp(max=50))}
    recent = recent_for_cost(0.5, profiles)
    cost = sum(float(span_entries(p.visible, 4, recent).sum()) for p in profiles.values())
    assert abs(cost / sum(p.dense for p in profiles.values()) - 0.5) < 0.01


def test_site_report_names_what_ran_where():
    q, k, v = _qkv(40)
    with CostMeter() as meter:
        attend_fn(Method("dga", SMALL))(q, k, v, None, True, None, 0.0)
        meter.add(_dense_cost(q), Site(3, 512), "dense", "dense_layers")
    report = {s["layer"]: s for s in meter.site_report()}
    assert report[None]["ran"] == "dga" and report[None]["cost"] < 1.5
    assert report[3] == {"layer": 3, "ran": "dense", "reason": "dense_layers", "sliding_window": 512, "cost": 1.0}
    assert set(meter.profiles()) == {None, 3}


def _dense_cost(q):
    from dga_compile.eval.cost import Cost

    visible = torch.arange(1, q.shape[2] + 1, dtype=torch.float32).expand(1, q.shape[1], -1)
    return Cost(visible, visible)
