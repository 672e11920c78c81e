"""Shared inputs, masks, golden SDPA and tolerances for the DGA op tests."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dga_compile import DGAConfig, _extension, dynamic_group_attention, reference_attention
from dga_compile.blocked import BLOCK_SIZE, blocked_attention

#: Mask spellings a model passes to SDPA (see `make_mask`).
MASK_KINDS = ("none", "pad_right", "pad_left", "bool", "additive_inf", "additive_finfo", "causal_mask")

#: Per-dtype tolerances of one DGA implementation vs another at the same dtype (both compute in
#: the same working precision, so they differ only by summation order and the final rounding).
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

#: A small-N config under which DGA really groups, windows and probes (min_seq_len=0).
SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, group_bias=1.0, min_seq_len=0)
#: SMALL with sinks and step 5′ on (blocks of 16 query rows, a τ that expands some groups of most rows).
EXPAND = SMALL.replace(sinks=2, expand_mass=0.7, query_block=16, group_bias=0.25)


def qkv(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, dtype=torch.float64, seed: int = 0,
        Dv: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh standard-normal q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv or D))
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes)


def make_mask(kind: str, B: int, Hq: int, Nq: int, Nk: int, dtype=torch.float64, seed: int = 0) -> Optional[Tensor]:
    """An ``attn_mask`` of the given kind, broadcastable to [B, Hq, Nq, Nk].

    pad_right / pad_left: bool key padding [B, 1, 1, Nk] (batch 0 unpadded when B > 1, the others
    padded by 1 to a third of Nk at the end / start); bool: random [B, Hq, Nq, Nk], 85% visible;
    additive_inf: right padding as 0/−inf in ``dtype``; additive_finfo: HF-style causal + left
    padding as 0/finfo.min [B, 1, Nq, Nk]; causal_mask: a top-left causal bool [Nq, Nk].
    """
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    if kind in ("pad_right", "pad_left", "additive_inf", "additive_finfo"):
        pad = torch.randint(1, max(Nk // 3, 1) + 1, (B,), generator=g)
        pad[0] = 0 if B > 1 else pad[0]
        pos = torch.arange(Nk)
        left = kind in ("pad_left", "additive_finfo")
        keep = pos >= pad[:, None] if left else pos < (Nk - pad)[:, None]
        keep = keep[:, None, None, :]                                          # [B, 1, 1, Nk]
        if kind == "additive_inf":
            return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
        if kind == "additive_finfo":
            keep = keep & torch.ones(Nq, Nk, dtype=torch.bool).tril()
            return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        return keep
    if kind == "bool":
        return torch.rand(B, Hq, Nq, Nk, generator=g) < 0.85
    if kind == "causal_mask":
        return torch.ones(Nq, Nk, dtype=torch.bool).tril()
    raise ValueError(f"unknown mask kind {kind!r}")


def sdpa_golden(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                scale: Optional[float] = None) -> Tensor:
    """Exact attention with torch's SDPA: masked additive entries (≤ −1e4) read as masked,
    ``is_causal`` ANDed with the mask (fully masked rows give 0, as SDPA does for bool masks)."""
    nq, nk = q.shape[2], k.shape[2]
    vis = None if attn_mask is None else (attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4)
    if is_causal:
        causal = torch.ones(nq, nk, dtype=torch.bool).tril()
        vis = causal if vis is None else vis & causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _public(impl: str) -> Callable:
    def run(q, k, v, attn_mask=None, is_causal=False, scale=None, config=None, dropout_p=0.0):
        cfg = (config or DGAConfig()).replace(impl=impl)
        return dynamic_group_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                       enable_gqa=q.shape[1] != k.shape[1], config=cfg)
    return run


#: Every way to run DGA on CPU, all with `reference_attention`'s signature: the implementations
#: themselves ("cpp", the C++ kernel, where it is built) and the public op ("auto" picks C++ for
#: fp32/fp16/bf16 when built, else blocked). `paths_for` leaves out those a dtype cannot take.
PATHS = {
    "reference": reference_attention,
    "blocked": blocked_attention,
    **({"cpp": _extension.cpp_attention} if _extension.available() else {}),
    "public-auto": _public("auto"),
    "public-reference": _public("reference"),
}


def paths_for(dtype: torch.dtype) -> dict[str, Callable]:
    """`PATHS` that take ``dtype`` (the C++ kernel takes no float64)."""
    return {name: fn for name, fn in PATHS.items() if name != "cpp" or dtype in _extension.DTYPES}


def max_err(a: Tensor, b: Tensor) -> float:
    """max |a − b| in float64."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


#: Blocked's error vs a float64 golden may be at most this many times the reference's error at
#: the same dtype, plus a floor for outputs whose rounding error is ~0.
GOLDEN_FACTOR = 2.0
GOLDEN_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def check_blocked(q, k, v, attn_mask, causal, cfg, block_size=BLOCK_SIZE, scale=None) -> Tensor:
    """blocked == reference at q's dtype; below float64 also: blocked is within GOLDEN_FACTOR×
    of the reference's own error against the reference on float64-upcast inputs. Returns blocked's output."""
    got = blocked_attention(q, k, v, attn_mask, causal, scale, cfg, block_size=block_size)
    want = reference_attention(q, k, v, attn_mask, causal, scale, cfg)
    assert got.dtype == q.dtype and got.shape == want.shape and not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[q.dtype])
    if q.dtype != torch.float64:
        up = lambda x: None if x is None or x.dtype == torch.bool else x.double()
        golden = reference_attention(*(x.double() for x in (q, k, v)), up(attn_mask), causal, scale, cfg)
        assert max_err(got, golden) <= GOLDEN_FACTOR * max_err(want, golden) + GOLDEN_FLOOR[q.dtype]
    return got
