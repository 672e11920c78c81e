"""Sinks and step 5′ (query-aware expansion, docs/dga.md): the reference and the blocked path
against hand-computed cases, dense attention, today's op, and each other."""

import logging
import math
import warnings

import pytest
import torch

from dga_cases import EXPAND, PATHS, SMALL, TOL, check_blocked, make_mask, max_err, qkv, sdpa_golden
from dga_compile import DGAConfig, dispatch, dynamic_group_attention, reference_attention
from dga_compile.blocked import blocked_attention, expanded_counts
from dga_compile.ops import OpCall
from dga_compile.selection import (aggregate_groups, block_expansion, focus_split, group_mass, num_focus, split_focus,
                                   tau_sets)

#: The paths that compute step 5′ in every dtype ("public-auto" runs the C++ kernel for fp32 inference).
STEP5_PATHS = {name: PATHS[name] for name in ("reference", "blocked", "public-auto")}
#: Every visible key raw: τ → 1 with expand_max = 1 expands every complete group.
ALL = dict(expand_mass=1 - 1e-12, expand_max=1.0)


def _sizes():
    """(N, query_block) with odd sizes and blocks that do not divide N."""
    return [pytest.param(n, b, id=f"N{n}-b{b}") for n, b in ((1, 64), (63, 16), (65, 16), (130, 7), (301, 64))]


# ---------------------------------------------------------------------------- τ = 0 and τ → 1

@pytest.mark.parametrize("mask", ["none", "pad_left", "bool"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", list(STEP5_PATHS))
@pytest.mark.parametrize("n", [1, 63, 130], ids=lambda n: f"N{n}")
def test_tau0_ignores_the_other_expansion_fields_bit_for_bit(n, path, causal, mask):
    """τ = 0 is today's op: βe, b and expand_max change nothing, not even a rounding."""
    q, k, v = qkv(2, 4, 2, n, n, 8, torch.float32, seed=n)
    attn_mask = make_mask(mask, 2, 4, n, n, torch.float32, seed=n)
    fn = STEP5_PATHS[path]
    want = fn(q, k, v, attn_mask, causal, None, SMALL)
    got = fn(q, k, v, attn_mask, causal, None, SMALL.replace(expand_bias=3.0, query_block=5, expand_max=0.2))
    assert torch.equal(got, want)


@pytest.mark.parametrize("mask", ["none", "pad_right", "bool", "additive_finfo"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["H4-KV1", "H2-KV2"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n", [63, 65], ids=lambda n: f"N{n}")
def test_tau_to_one_is_dense_attention(n, dtype, causal, heads, mask):
    """An exact case (docs/dga.md): every complete group expanded, every visible key raw."""
    Hq, Hkv = heads
    q, k, v = qkv(2, Hq, Hkv, n, n, 8, dtype, seed=n + causal)
    attn_mask = make_mask(mask, 2, Hq, n, n, dtype, seed=n)
    want = sdpa_golden(q, k, v, attn_mask, causal)
    for name, fn in STEP5_PATHS.items():
        got = fn(q, k, v, attn_mask, causal, None, EXPAND.replace(**ALL))
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    # Not vacuous: at the same config without expansion DGA is not dense attention.
    assert max_err(reference_attention(q, k, v, attn_mask, causal, None, EXPAND.replace(expand_mass=0.0)), want) > 1e-3


# ---------------------------------------------------------------------------- a case by hand

#: N = 12, D = 1, scale 1, causal, γ = 0, m = 2 (groups g0 = {0, 1} … g5 = {10, 11}, anchors 1, 3, …),
#: w = 0, b = 4, τ = 0.6, βe = 1, β = ½. k_j = ln c_j with c = 1, 6, 1, 2, 1, 1 per group (both
#: members alike, so K̄_g = ln c_g whatever the anchor's query), v_j = j², q_i = 1 except q_7 = 0.
HAND = DGAConfig(focus_ratio=0.0, group_size=2, num_probe=1, window=0, group_bias=0.5, min_seq_len=0,
                 expand_mass=0.6, expand_bias=1.0, query_block=4)
_C = torch.tensor([1.0, 6, 1, 2, 1, 1], dtype=torch.float64).repeat_interleave(2)


def _hand_inputs():
    q = torch.ones(1, 1, 12, 1, dtype=torch.float64)
    q[0, 0, 7] = 0.0
    return q, _C.log().view(1, 1, 12, 1), torch.arange(12.0, dtype=torch.float64).square().view(1, 1, 12, 1)


def test_expansion_by_hand_N12_m2_b4():
    """Block 1 (rows 4–7). Estimate weights e^logit: a complete group 2·c_g (βe = 1, m = 2), a raw
    key c_j; row 7 (q = 0) weighs every complete group 2.
    - row 4: g0 2, g1 12, raw 4: 1 -> M = (2, 12)/15; g1 leaves 2/15 ≤ 0.4: E_4 = {g1};
    - row 5: g0 2, g1 12, g2 2 -> E_5 = {g1} (leaves 4/16); row 6 (+ raw 6: 2) -> E_6 = {g1};
    - row 7: g0 … g3 at ¼ each: g0, g1 leave ½, g2 leaves ¼ ≤ 0.4: E_7 = {g0, g1, g2} (ties: smaller index).
    E = {g0, g1, g2}: 3 ≤ 1.0 × 4 groups complete for row 7, so not dense; with expand_max = ½ it is.
    Outputs (β = ½): rows 4–6 see every key raw (each complete group of theirs is in E): dense
    attention. Row 7 takes raw 0–5 (weight 1) and g3 (weight √2, V̄ = (36 + 49)/2).
    Block 2 (rows 8–11, q = 1): E_8 = {g1}, E_9 = E_10 = E_11 = {g1, g3}: E = {g1, g3}, 2 ≤ ½ × 6."""
    q, k, v = _hand_inputs()
    rows = [[2, 12, 0, 0], [2, 12, 2, 0], [2, 12, 2, 0], [2, 2, 2, 2]]          # e^logit of g0..g3, rows 4–7
    raw = [1, 0, 2, 0]
    logits = torch.tensor([[math.log(w) if w else -math.inf for w in r] + [math.log(x) if x else -math.inf]
                           for r, x in zip(rows, raw)], dtype=torch.float64)
    mass = group_mass(logits, 0, 4)
    torch.testing.assert_close(mass[0], torch.tensor([2, 12, 0, 0], dtype=torch.float64) / 15)
    assert tau_sets(mass, 0.6).tolist() == [[False, True, False, False]] * 3 + [[True, True, True, False]]
    complete = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    expand, dense = block_expansion(mass, complete, HAND)
    assert expand.tolist() == [True, True, True, False] and not dense
    assert block_expansion(mass, complete, HAND.replace(expand_max=0.5))[1]

    r2 = math.sqrt(2)
    dense_row = lambda i: float((_C[:i + 1] * v.flatten()[:i + 1]).sum() / _C[:i + 1].sum())
    want = {4: dense_row(4), 5: dense_row(5), 6: dense_row(6), 7: (55 + r2 * 42.5) / (6 + r2),
            11: (204 * r2 + 248) / (16 + 4 * r2)}
    for name, fn in STEP5_PATHS.items():
        out = fn(q, k, v, None, True, 1.0, HAND)[0, 0, :, 0]
        for i, w in want.items():
            assert abs(out[i].item() - w) < 1e-9 * w, (name, i, out[i].item(), w)
        dense_block = fn(q, k, v, None, True, 1.0, HAND.replace(expand_max=0.5))[0, 0, :, 0]
        assert abs(dense_block[7].item() - 17.5) < 1e-9 and abs(dense_block[11].item() - want[11]) < 1e-9   # q_7 = 0
    without = reference_attention(q, k, v, None, True, 1.0, HAND.replace(expand_mass=0.0))[0, 0, 7, 0].item()
    assert abs(without - want[7]) > 1.0 and abs(17.5 - want[7]) > 1.0
    # e_i, the expanded complete groups per row (the cost's count): block 0 has E = {g0, g1}.
    assert expanded_counts(q, k, v, None, True, 1.0, HAND)[0, 0].tolist() == [0, 1, 1, 2, 2, 3, 3, 3, 2, 2, 2, 2]


# ---------------------------------------------------------------------------- sinks

@pytest.mark.parametrize("focus_ratio, sinks, want", [
    pytest.param(0.0, 3, [0, 1, 2], id="gamma0-s3"),
    pytest.param(0.1, 2, [0, 1, 7, 9], id="gamma0.1-s2"),      # ceil(0.1 · 20) = 2 by score, besides the sinks
    pytest.param(0.1, 25, list(range(20)), id="s-above-N"),
])
def test_sinks_are_focus_besides_the_scored_keys(focus_ratio, sinks, want):
    scores = torch.zeros(1, 1, 20)
    scores[0, 0, [7, 9, 1]] = torch.tensor([3.0, 2.0, 5.0])                  # 1 is a sink already
    q, k, _ = qkv(1, 1, 1, 20, 20, 4)
    focus, nonfocus = split_focus(scores, num_focus(focus_ratio, 20, sinks), sinks)
    assert focus[0, 0].tolist() == want and sorted(focus[0, 0].tolist() + nonfocus[0, 0].tolist()) == list(range(20))
    if focus_ratio == 0:    # nothing scored: the groups are consecutive runs after the sinks
        cfg = DGAConfig(focus_ratio=0.0, sinks=sinks, group_size=4, min_seq_len=0)
        focus, nonfocus = focus_split(q, k, None, True, 0.5, cfg)
        assert focus[0, 0].tolist() == want
        members = aggregate_groups(q, k, k, nonfocus, 0.5, 4).members[0, 0].tolist()
        assert members == [list(range(a, a + 4)) for a in range(3, 19, 4)]


# ---------------------------------------------------------------------------- blocked vs reference
# (every mask kind: `test_blocked.py::test_masks_B3_N300_D16[expand-…]`)

@pytest.mark.parametrize("mask", ["none", "pad_left"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("n, b", _sizes())
def test_sizes_B2_H4_KV2_D8(n, b, causal, mask):
    q, k, v = qkv(2, 4, 2, n, n, 8, seed=n)
    check_blocked(q, k, v, make_mask(mask, 2, 4, n, n, seed=n), causal, EXPAND.replace(query_block=b))


@pytest.mark.parametrize("cfg", [
    pytest.param(EXPAND.replace(focus_ratio=0.0, sinks=4), id="gamma0-s4"),
    pytest.param(EXPAND.replace(expand_max=0.3), id="ceiling0.3"),
    pytest.param(EXPAND.replace(expand_mass=0.95, expand_bias=0.0), id="tau0.95-betae0"),
    pytest.param(EXPAND.replace(group_size=7, window=0, query_block=33), id="m7-w0-b33"),
    pytest.param(EXPAND.replace(expand_mass=0.0, sinks=5), id="tau0-s5"),     # sinks alone (the fast route too)
])
@pytest.mark.parametrize("mask", ["none", "bool"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_configs_B2_H4_KV2_N211_D8(cfg, causal, mask):
    q, k, v = qkv(2, 4, 2, 211, 211, 8, seed=2)
    check_blocked(q, k, v, make_mask(mask, 2, 4, 211, 211, seed=2), causal, cfg)


@pytest.mark.parametrize("mask", ["none", "additive_finfo"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dtypes_B2_H4_KV1_N150_D16(dtype, causal, mask):
    q, k, v = qkv(2, 4, 1, 150, 150, 16, dtype, seed=4)
    check_blocked(q, k, v, make_mask(mask, 2, 4, 150, 150, dtype, seed=4), causal, EXPAND)


@pytest.mark.parametrize("causal, tau, ceiling", [(False, 0.3, 0.5), (True, 0.7, 0.35)], ids=["full", "causal"])
def test_dense_ceiling_takes_some_heads_dense_B2_H4_KV2_N160_D8(causal, tau, ceiling):
    """Under a low ceiling some (block, head) pairs attend densely, exactly, and others do not
    (random inputs are diffuse: without causality a block's union saturates quickly)."""
    n, b = 160, 16
    q, k, v = qkv(2, 4, 2, n, n, 8, seed=6)
    cfg = EXPAND.replace(expand_mass=tau, expand_max=ceiling, query_block=b)
    got = check_blocked(q, k, v, None, causal, cfg)
    per_block = (got - sdpa_golden(q, k, v, None, causal)).abs().view(2, 4, n // b, b, 8).amax((-1, -2))
    is_dense = per_block < 1e-12
    assert is_dense[:, :, 1:].any() and not is_dense.all()


# ---------------------------------------------------------------------------- every key once, gradients

@pytest.mark.parametrize("mask", ["none", "pad_right", "bool", "additive_finfo", "causal_mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", list(STEP5_PATHS))
def test_every_visible_token_counted_once_with_expansion(path, causal, mask):
    """As `test_reference.py::test_every_visible_token_counted_once`, with step 5′ (q = 0 makes the
    estimate uniform, so E holds about 1 − τ of each row's groups) and a low ceiling."""
    _, k, v = qkv(2, 4, 2, 97, 97, 8, seed=5)
    q = torch.zeros(2, 4, 97, 8, dtype=torch.float64)
    attn_mask = make_mask(mask, 2, 4, 97, 97, seed=5)
    want = sdpa_golden(q, k, v, attn_mask, causal)
    fn = STEP5_PATHS[path]
    for cfg in (EXPAND.replace(group_bias=1.0, expand_mass=0.5), EXPAND.replace(group_bias=1.0, expand_max=0.4)):
        torch.testing.assert_close(fn(q, k, v, attn_mask, causal, None, cfg), want, **TOL[torch.float64])
    # β = 0 undercounts the groups that stay merged: the identity is not that of dense attention.
    assert max_err(fn(q, k, v, attn_mask, causal, None, cfg.replace(group_bias=0.0, expand_max=1.0)), want) > 1e-3


def _op(q, k, v, attn_mask, causal, cfg):
    return torch.ops.dga.attention(*OpCall(q, k, v, attn_mask, 0.0, None, causal, 1.0 / math.sqrt(q.shape[-1]),
                                           cfg.replace(impl="blocked")).args())


@pytest.mark.parametrize("mask", ["none", "pad_left", "bool"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradcheck_B2_H2_KV1_N24_D4(causal, mask):
    cfg = DGAConfig(focus_ratio=0.1, group_size=3, num_probe=4, window=2, min_seq_len=0, sinks=1, expand_mass=0.6,
                    query_block=5)
    q, k, v = (x.requires_grad_() for x in qkv(2, 2, 1, 24, 24, 4, seed=3))
    attn_mask = make_mask(mask, 2, 2, 24, 24, seed=3)
    assert torch.autograd.gradcheck(lambda q, k, v: _op(q, k, v, attn_mask, causal, cfg), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("cfg", [EXPAND, EXPAND.replace(expand_max=0.35)], ids=["expand", "ceiling0.35"])
@pytest.mark.parametrize("mask", ["none", "pad_left", "additive_finfo"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_op_grads_match_reference_autograd_B2_H4_KV2_N100_D8(dtype, causal, mask, cfg):
    inputs = qkv(2, 4, 2, 100, 100, 8, dtype, seed=2)
    attn_mask = make_mask(mask, 2, 4, 100, 100, dtype)
    cot = torch.randn(2, 4, 100, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    grads = []
    for fn in (lambda *a: _op(*a, attn_mask, causal, cfg), lambda *a: reference_attention(*a, attn_mask, causal, None, cfg)):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*leaves)
        grads.append((out.detach(), *torch.autograd.grad(out, leaves, cot)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), *grads):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------- dependence, dispatch

@pytest.mark.parametrize("path", ["reference", "blocked"])
@pytest.mark.parametrize("t", [32, 45, 63], ids=lambda t: f"t{t}")
def test_later_tokens_do_not_reach_the_block(path, t):
    """With γ = 0 (focus = sinks), perturbing token t (its q, k, v) leaves every row of every block
    ending at or before t unchanged: E depends on the block's own rows, nothing on later ones.
    (With γ > 0 F depends on the last r queries, so on every token: docs/dga.md.)"""
    n, b = 64, 16
    cfg = EXPAND.replace(focus_ratio=0.0, sinks=3, query_block=b, window=4)
    q, k, v = qkv(1, 4, 2, n, n, 8, seed=t)
    fn = STEP5_PATHS[path]
    before = fn(q, k, v, None, True, None, cfg)
    for x in (q, k, v):
        x[:, :, t] += 3.0
    after = fn(q, k, v, None, True, None, cfg)
    safe = t // b * b                                              # the rows of blocks ending at or before t
    torch.testing.assert_close(after[:, :, :safe], before[:, :, :safe], atol=1e-13, rtol=0)
    assert max_err(after[:, :, t:], before[:, :, t:]) > 1e-3


def test_cpp_and_auto_run_the_kernel_for_step5(caplog):
    """The C++ kernel computes sinks and step 5′: "auto" and a named "cpp" run it for CPU
    inference, with no NYI fallback, and agree with the reference."""
    if "cpp" not in PATHS:
        pytest.skip("the C++ extension is not built")
    q, k, v = qkv(1, 4, 2, 70, 70, 8, torch.float32, seed=7)
    want = reference_attention(q, k, v, None, True, None, EXPAND)
    for impl in ("auto", "cpp"):
        caplog.clear()
        with dispatch.recording() as ran, caplog.at_level(logging.INFO, logger="dga_compile.dispatch"), \
                warnings.catch_warnings():
            warnings.simplefilter("error")
            got = dynamic_group_attention(q, k, v, is_causal=True, enable_gqa=True, config=EXPAND.replace(impl=impl))
        assert ran == ["cpp"] and "NYI" not in caplog.text
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    call = OpCall(q, k, v, None, 0.0, None, True, 0.35, EXPAND)
    assert dispatch._cpp_applies(call) is None


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_finite_input_expands_the_same_groups_B1_H4_KV2_N70_D8(causal, where):
    """A NaN at position 20 of kv head 0 / query head 0 (docs/dga.md, "Contract"): rows whose
    estimate is not finite add nothing to E, so blocked and reference agree wherever both are
    finite; the rows that see it are NaN in both, the other kv head is finite. (Rows that do
    not see it may be NaN in one of them: 0·NaN in the reference's dense P·V.)"""
    q, k, v = qkv(1, 4, 2, 70, 70, 8, seed=8)
    {"q": q, "k": k, "v": v}[where][0, 0, 20, 1] = float("nan")
    got = blocked_attention(q, k, v, None, causal, None, EXPAND)
    want = reference_attention(q, k, v, None, causal, None, EXPAND)
    # A NaN query: its own row; a NaN key or value: every row that sees it, in both query heads.
    sees = (0, 20) if where == "q" else (slice(0, 2), slice(20, None) if causal else slice(None))
    for out in (got, want):
        assert not out[0][sees].isfinite().all(-1).any() and out[:, 2:].isfinite().all()
    both = got.isfinite() & want.isfinite()
    torch.testing.assert_close(got[both], want[both], **TOL[torch.float64])
