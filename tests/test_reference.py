"""The spec's exact cases and invariants, checked on every CPU path (reference, blocked, public op)."""

import pytest
import torch

from dga_cases import PATHS, SMALL, TOL, make_mask, max_err, qkv, sdpa_golden
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
    for name, fn in PATHS.items():
        got = fn(q, k, v, attn_mask, causal, None, cfg)
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_default_config_is_really_approximate_B1_H2_N1100_D16(causal):
    """Guards every comparison against passing vacuously: DGA with the default config is not SDPA."""
    q, k, v = qkv(1, 2, 2, 1100, 1100, 16, torch.float32, seed=3)
    want = sdpa_golden(q, k, v, None, causal)
    for name in ("reference", "blocked"):
        assert max_err(PATHS[name](q, k, v, None, causal), want) > 1e-2, name


@pytest.mark.parametrize("mask", ["none", "pad_right", "pad_left", "bool", "additive_finfo", "causal_mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", ["reference", "blocked"])
def test_every_visible_token_counted_once(path, causal, mask):
    """With q = 0 every key logit is 0 and a group's aggregate is the mean of its m members,
    so with β = 1 (logit log m) DGA equals the mean of the visible values, i.e. dense SDPA,
    iff each visible token is counted exactly once (as itself or inside one complete group)."""
    _, k, v = qkv(2, 4, 2, 97, 97, 8, seed=5)
    q = torch.zeros(2, 4, 97, 8, dtype=torch.float64)
    attn_mask = make_mask(mask, 2, 4, 97, 97, seed=5)
    fn = PATHS[path]
    want = sdpa_golden(q, k, v, attn_mask, causal)
    torch.testing.assert_close(fn(q, k, v, attn_mask, causal, None, SMALL), want, **TOL[torch.float64])
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

