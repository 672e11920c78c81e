"""The spec's exact cases and invariants, checked on every CPU path (reference, blocked, public op)."""

import math

import pytest
import torch

from dga_cases import PATHS, SMALL, TOL, make_mask, max_err, paths_for, qkv, sdpa_golden
from dga_compile import DGAConfig

# (config, Nq, Nk): each makes DGA exactly dense attention (docs/dga.md, "Exact special cases").
EXACT = {
    "gamma1": (SMALL.replace(focus_ratio=1.0), 61, 61),
    "m1": (SMALL.replace(group_size=1), 61, 61),
    "short": (DGAConfig(), 200, 200),                        # Nk < min_seq_len = 1024
    "nq<nk": (SMALL, 9, 61),                                 # decode with a KV cache
    "nq>nk": (SMALL, 61, 23),                                # cross-attention
}


@pytest.mark.parametrize("mask", ["none", "pad_left", "bool", "additive_finfo"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["H2-KV2", "H4-KV1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(EXACT))
def test_exact_cases_equal_sdpa(case, dtype, causal, heads, mask):
    cfg, nq, nk = EXACT[case]
    Hq, Hkv = heads
    q, k, v = qkv(2, Hq, Hkv, nq, nk, 8, dtype, seed=len(case) + 2 * causal)
    attn_mask = make_mask(mask, 2, Hq, nq, nk, dtype)
    want = sdpa_golden(q, k, v, attn_mask, causal)
    for name, fn in paths_for(dtype).items():
        got = fn(q, k, v, attn_mask, causal, None, cfg)
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_default_config_is_really_approximate_B1_H2_N1100_D16(causal):
    """Guards every comparison against passing vacuously: DGA with the default config is not SDPA."""
    q, k, v = qkv(1, 2, 2, 1100, 1100, 16, torch.float32, seed=3)
    want = sdpa_golden(q, k, v, None, causal)
    for name in ("reference", "blocked", "cpp"):
        if name in PATHS:
            assert max_err(PATHS[name](q, k, v, None, causal), want) > 1e-2, name


@pytest.mark.parametrize("mask", ["none", "pad_right", "pad_left", "bool", "additive_finfo", "causal_mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", [p for p in ("reference", "blocked", "cpp") if p in PATHS])
def test_every_visible_token_counted_once(path, causal, mask):
    """With q = 0 every key logit is 0 and a group's aggregate is the mean of its m members,
    so with β = 1 (logit log m) DGA equals the mean of the visible values, i.e. dense SDPA,
    iff each visible token is counted exactly once (as itself or inside one complete group).
    float64, except for the C++ kernel (float32)."""
    dtype = torch.float32 if path == "cpp" else torch.float64
    _, k, v = qkv(2, 4, 2, 97, 97, 8, dtype, seed=5)
    q = torch.zeros(2, 4, 97, 8, dtype=dtype)
    attn_mask = make_mask(mask, 2, 4, 97, 97, dtype, seed=5)
    fn = PATHS[path]
    want = sdpa_golden(q, k, v, attn_mask, causal)
    torch.testing.assert_close(fn(q, k, v, attn_mask, causal, None, SMALL), want, **TOL[dtype])
    # β = 0 undercounts grouped tokens: the identity is not an accident of q = 0.
    assert max_err(fn(q, k, v, attn_mask, causal, None, SMALL.replace(group_bias=0.0)), want) > 1e-3


@pytest.mark.parametrize("mask", ["pad_left", "bool", "additive_finfo"])
@pytest.mark.parametrize("path", list(PATHS))
def test_ones_values_give_ones_and_masked_rows_give_zero(path, mask):
    """v = 1: every row with a candidate key outputs exactly 1 (weights sum to 1); rows with no
    visible key output 0, never NaN. Left padding + causality leaves the padded rows empty."""
    n = 83
    q, k, _ = qkv(3, 4, 2, n, n, 8, torch.float32, seed=7)
    v = torch.ones(3, 2, n, 8)
    attn_mask = make_mask(mask, 3, 4, n, n, torch.float32, seed=2)
    if mask == "bool":
        attn_mask[:, :, 5] = False                                         # one fully masked row per head
    out = PATHS[path](q, k, v, attn_mask, True, None, SMALL)
    has_key = sdpa_golden(q, k, v, attn_mask, True)[..., 0] > 0.5         # [B, Hq, N]
    assert not out.isnan().any()
    assert (~has_key).any() and has_key.any()
    torch.testing.assert_close(out[has_key], torch.ones_like(out[has_key]), atol=1e-6, rtol=0)
    assert (out[~has_key] == 0).all()


@pytest.mark.parametrize("path", ["reference", "blocked"])
def test_causal_mask_reads_as_causal(path):
    """Our reading: a mask that hides every future key (HF's spelling of causality) gets the
    local window exactly as is_causal=True does."""
    n = 150
    q, k, v = qkv(1, 2, 2, n, n, 8, seed=11)
    cfg = SMALL.replace(window=20)
    fn = PATHS[path]
    as_mask = fn(q, k, v, make_mask("causal_mask", 1, 2, n, n), False, None, cfg)
    torch.testing.assert_close(as_mask, fn(q, k, v, None, True, None, cfg), **TOL[torch.float64])
    # The window matters here: without it the result differs.
    assert max_err(as_mask, fn(q, k, v, None, True, None, cfg.replace(window=0))) > 1e-3



def test_steps_by_hand_B1_H1_N8_D1():
    """Steps 1–5 on an input small enough to work out by hand (docs/dga.md, "The five steps").

    D = 1, scale 1, every q = 1, k_j = ln c_j with c = (2, 4, 1, 2, 1, 1, 2, 1), v_j = j²; causal,
    γ = 0.25 (n_f = 2), m = 3, r = 1 (the probe is row 7), w = 2, β = ½.
    1. Row 7 sees every key: s_j = c_j / Σc = c_j / 14.
    2. The largest is s_1 = 4/14; 0, 3 and 6 tie at 2/14 and the smaller position wins: F = {0, 1}.
    3. The non-focus order 2 3 4 5 6 7 cuts into groups {2, 3, 4} (anchor 4) and {5, 6, 7} (anchor 7).
    4. Weights softmax(q_a·k_j) ∝ c_j = (1, 2, 1)/4 in both: K̄ = ½ ln 2, V̄ = (9.5, 36.5).
    5. Group 0 is complete for rows i ≥ 4 + w = 6, group 1 never. Row 7's candidates, with weights
       e^logit: focus 0 (2), 1 (4); group 0 (e^{½ ln 2 + ½ ln 3} = √6); raw 5 (1), 6 (2), 7 (1).
       Row 6: the same without raw 7; row 5: focus 0, 1 and raw 2–5, exactly dense.
    """
    from dga_compile.selection import aggregate_groups, complete_groups, importance_scores, split_focus

    c = torch.tensor([2.0, 4, 1, 2, 1, 1, 2, 1], dtype=torch.float64)
    q = torch.ones(1, 1, 8, 1, dtype=torch.float64)
    k, v = c.log().view(1, 1, 8, 1), torch.arange(8.0, dtype=torch.float64).square().view(1, 1, 8, 1)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    cfg = DGAConfig(focus_ratio=0.25, group_size=3, num_probe=1, window=2, group_bias=0.5, min_seq_len=0)

    scores = importance_scores(q, k, causal, 1.0, cfg.num_probe)
    torch.testing.assert_close(scores[0, 0], c / 14)
    focus, nonfocus = split_focus(scores, 2)
    assert focus.tolist() == [[[0, 1]]] and nonfocus.tolist() == [[[2, 3, 4, 5, 6, 7]]]
    grp = aggregate_groups(q, k, v, nonfocus, 1.0, cfg.group_size)
    assert grp.members.tolist() == [[[[2, 3, 4], [5, 6, 7]]]] and grp.anchors.tolist() == [[[4, 7]]]
    torch.testing.assert_close(grp.keys.flatten(), torch.full((2,), 0.5 * math.log(2), dtype=torch.float64))
    torch.testing.assert_close(grp.values.flatten(), torch.tensor([9.5, 36.5], dtype=torch.float64))
    complete = complete_groups(causal.expand(1, 1, 8, 8), grp.members, 0, True, cfg.window)
    assert complete[0, 0].tolist() == [[False, False]] * 6 + [[True, False]] * 2

    r6 = math.sqrt(6)
    want = {5: 67 / 11, 6: (101 + 9.5 * r6) / (9 + r6), 7: (150 + 9.5 * r6) / (10 + r6)}
    for name, fn in PATHS.items():
        dtype = torch.float32 if name == "cpp" else torch.float64
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype), None, True, 1.0, cfg)[0, 0, :, 0]
        for i, w in want.items():
            assert abs(out[i].item() - w) < 1e-5 * w, (name, i, out[i].item(), w)
    dense_7 = (c * v.flatten()).sum().item() / 14
    assert abs(want[7] - dense_7) > 0.4                                   # row 7 is not dense attention
