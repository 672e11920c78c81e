"""The decode spec's exact cases and invariants, on `dga_compile.decode_reference` (docs/dga.md, "Decoding")."""

import math

import pytest
import torch

from decode_cases import SMALL, dense_decode, history
from dga_compile import DGAConfig
from dga_compile.decode_reference import (complete_blocks, decode_reference, focus_mask, group_log_weight,
                                          slot_attention)

SHAPES = [
    pytest.param(1, 2, 2, 45, 30, (), id="B1-H2-KV2-T45-N30"),
    pytest.param(2, 4, 2, 73, 41, (0, 9), id="B2-H4-KV2-T73-N41-pad9"),
    pytest.param(3, 3, 1, 57, 33, (5, 0, 31), id="B3-H3-KV1-T57-N33-pad"),
]


@pytest.mark.parametrize("steps", ["single", "chunked"])
@pytest.mark.parametrize("B, Hq, Hkv, T, N, pads", SHAPES)
def test_m1_decodes_exactly(B, Hq, Hkv, T, N, pads, steps):
    """m = 1: every block is one token with λ = 0, so decoding is exact attention over the real keys."""
    q, k, v, real = history(B, Hq, Hkv, T, 8, pads=pads, seed=T)
    plan = None if steps == "single" else [3, 1, T - N - 4]
    got = decode_reference(q, k, v, N, real, SMALL.replace(group_size=1), steps=plan)
    torch.testing.assert_close(got, dense_decode(q, k, v, real, N), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("window", [0, 3, 8])
@pytest.mark.parametrize("B, Hq, Hkv, T, N, pads", SHAPES)
def test_every_real_token_counted_once(B, Hq, Hkv, T, N, pads, window):
    """q = 0 and β = 1: each slot's logit is log(members), so DGA decoding equals dense attention
    exactly iff every visible real token is a focus token, inside one complete block, or raw."""
    q, k, v, real = history(B, Hq, Hkv, T, 8, pads=pads, seed=2 * T + window)
    got = decode_reference(torch.zeros_like(q), k, v, N, real, SMALL.replace(window=window))
    torch.testing.assert_close(got, dense_decode(torch.zeros_like(q), k, v, real, N), atol=1e-12, rtol=1e-12)


def test_short_prefill_keeps_a_dense_cache():
    q, k, v, real = history(2, 4, 2, 50, 8, pads=(0, 4), seed=1)
    got = decode_reference(q, k, v, 30, real, SMALL.replace(min_seq_len=31))
    torch.testing.assert_close(got, dense_decode(q, k, v, real, 30), atol=1e-12, rtol=1e-12)


def test_default_like_config_is_really_approximate():
    """Negative control for the exact cases above: with groups in use, decoding is not dense."""
    q, k, v, real = history(1, 4, 2, 80, 8, seed=4)
    got = decode_reference(q, k, v, 50, real, SMALL)
    assert (got - dense_decode(q, k, v, real, 50)).abs().max() > 1e-2


def test_per_query_head_aggregation_equals_kv_aggregation_without_gqa():
    """With one query head per kv head the mean anchor query is that head's own query."""
    q, k, v, real = history(2, 2, 2, 60, 8, pads=(0, 3), seed=5)
    a = decode_reference(q, k, v, 40, real, SMALL)
    b = decode_reference(q, k, v, 40, real, SMALL, per_query_head=True)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_focus_mask_counts_real_tokens_only():
    """Row b keeps ceil(γ·n_b) focus tokens, none of them padding."""
    q, k, _, real = history(3, 4, 2, 40, 8, pads=(0, 7, 39), seed=6)
    cfg = SMALL.replace(focus_ratio=0.25)
    f = focus_mask(q, k, real, 8 ** -0.5, cfg)
    assert f.shape == (3, 2, 40)
    assert not (f & ~real[:, None, :]).any()
    assert f.sum(-1).tolist() == [[10, 10], [9, 9], [1, 1]]


def test_focus_mask_sinks_are_each_rows_first_real_tokens():
    """sinks = s: a row's first s real tokens are focus (after its left padding), beside ceil(γ·n_b) scored ones."""
    q, k, _, real = history(3, 4, 2, 40, 8, pads=(0, 7, 38), seed=6)
    f = focus_mask(q, k, real, 8 ** -0.5, SMALL.replace(focus_ratio=0.0, sinks=3))
    assert f.sum(-1).tolist() == [[3, 3], [3, 3], [2, 2]]
    assert f[0, :, :3].all() and f[1, :, 7:10].all() and f[2, :, 38:].all()
    scored = focus_mask(q, k, real, 8 ** -0.5, SMALL.replace(focus_ratio=0.25))
    both = focus_mask(q, k, real, 8 ** -0.5, SMALL.replace(focus_ratio=0.25, sinks=3))
    assert both.sum(-1).tolist() == [[13, 13], [12, 12], [2, 2]]
    assert not (scored & ~both).any() and not (both & ~real[:, None, :]).any()


@pytest.mark.parametrize("i, w, m, want", [(0, 0, 4, 0), (3, 0, 4, 1), (10, 8, 4, 0), (11, 8, 4, 1), (14, 8, 4, 1),
                                          (15, 8, 4, 2), (5, 9, 4, 0)])
def test_complete_blocks(i, w, m, want):
    """Block k is complete for query i iff its anchor (k+1)·m − 1 ≤ i − w."""
    assert complete_blocks(i, DGAConfig(window=w, group_size=m)) == want


def test_group_log_weight():
    lam = group_log_weight(torch.tensor([0, 1, 4]), 0.5, torch.float64)
    assert lam[0] == float("-inf") and lam[1] == 0
    assert lam[2].item() == pytest.approx(0.5 * math.log(4), rel=1e-15)


def test_slot_attention_empty_row_gives_zero():
    q = torch.randn(1, 2, 1, 4)
    pk, pv = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    pl = torch.full((1, 1, 3), float("-inf"))
    rk, rv = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    out = slot_attention(q, pk, pv, pl, rk, rv, torch.full((1, 1, 1), float("-inf")), 0.5)
    assert torch.equal(out, torch.zeros(1, 2, 1, 4))


def test_bad_steps_raise():
    q, k, v, real = history(1, 2, 2, 20, 4)
    with pytest.raises(ValueError, match="summing to T − n_prefill = 8"):
        decode_reference(q, k, v, 12, real, SMALL, steps=[3, 3])
