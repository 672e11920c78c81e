"""Input checks and mask normalisation shared by every DGA implementation.

Each ``_validate_*`` raises `ValueError` (a bad value) or `TypeError` (a wrong type, as
`F.scaled_dot_product_attention` does) naming what it saw and the fix.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .config import DGAConfig

#: Additive mask entries at or below this count as "masked" (HF writes ``finfo.min``).
MASKED_BELOW = -1e4


def validate_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                    is_causal: bool, scale: Optional[float], enable_gqa: bool) -> float:
    """Checks an SDPA-shaped call and returns the effective softmax scale."""
    _validate_types(dropout_p, is_causal, scale, enable_gqa)
    _validate_ranks(q, k, v)
    _validate_dtypes_devices(q, k, v, attn_mask)
    _validate_shapes(q, k, v, enable_gqa)
    if attn_mask is not None:
        _validate_mask_shape(attn_mask, q, k)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(D)), got {scale!r}")
    return float(scale)


def validate_config(config: Optional[DGAConfig]) -> DGAConfig:
    """``config``, or the default `DGAConfig` for None; anything else raises `TypeError`."""
    if config is None:
        return DGAConfig()
    if not isinstance(config, DGAConfig):
        raise TypeError(f"config must be a DGAConfig or None, got {type(config).__name__} {config!r}; "
                        f"use e.g. DGAConfig(focus_ratio=0.1) or DGAConfig(**options)")
    return config


def _is_number(x) -> bool:
    return isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(x, bool)


def _validate_types(dropout_p, is_causal, scale, enable_gqa):
    """The argument types `F.scaled_dot_product_attention` accepts (it raises TypeError too)."""
    for name, value in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(value, (bool, torch.SymBool)):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}; pass True or False")
    if not _is_number(dropout_p):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__} {dropout_p!r}")
    if scale is not None and not _is_number(scale):
        raise TypeError(f"scale must be a float or None (1/sqrt(D)), got {type(scale).__name__} {scale!r}")


def _validate_ranks(q, k, v):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D] (4 dims), got {tuple(t.shape)}; "
                             f"add a batch/head dim with unsqueeze or reshape")


def _validate_dtypes_devices(q, k, v, attn_mask):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"query must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key, value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one")
    if not (q.device == k.device == v.device):
        raise ValueError(f"query, key, value must be on one device, got {q.device}, {k.device}, {v.device}")
    if attn_mask is not None:
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {q.device}; move it with .to(q.device)")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"attn_mask must be bool (True = may attend) or float (additive), got {attn_mask.dtype}")


def _validate_shapes(q, k, v, enable_gqa):
    (B, Hq, _, D), (Bk, Hkv, Nk, Dk), (Bv, Hv, Nv, Dv) = q.shape, k.shape, v.shape
    for name, size, shape in (("query heads Hq", Hq, q.shape), ("key/value heads Hkv", Hkv, k.shape),
                              ("head dim D", D, q.shape), ("value head dim Dv", Dv, v.shape)):
        if size == 0:
            raise ValueError(f"{name} is 0 (shape {tuple(shape)}); attention needs at least one head "
                             f"and a head dim ≥ 1")
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Dk != D:
        raise ValueError(f"query and key head dims differ: query D={D}, key D={Dk}")
    if (Hv, Nv) != (Hkv, Nk):
        raise ValueError(f"key and value must agree on heads and length, got key {tuple(k.shape)}, value {tuple(v.shape)}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(f"got Hq={Hq} query heads and Hkv={Hkv} key/value heads; "
                             f"pass enable_gqa=True for grouped-query attention")
        if Hq % Hkv != 0:
            raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}; GQA needs Hq % Hkv == 0")


def _validate_mask_shape(attn_mask, q, k):
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"[B, Hq, Nq, Nk] = {list(target)}")


def finite_bias(attn_mask: Tensor) -> Tensor:
    """Bool, same shape: entries of an additive mask that are neither 0 nor masked (NaN included)."""
    return (attn_mask != 0) & ~(attn_mask <= MASKED_BELOW)


def mask_to_visible(attn_mask: Tensor) -> Tensor:
    """Bool view of a mask (True = may attend), same shape.

    Additive float masks may only hold 0 or masked entries (≤ −1e4 or −inf); finite biases
    such as ALiBi or T5 buckets are not DGA-compatible and raise.
    """
    if attn_mask.dtype == torch.bool:
        return attn_mask
    bias = finite_bias(attn_mask)
    if bool(bias.any()):
        bad = attn_mask[bias].flatten()[:3].tolist()
        raise ValueError(f"attn_mask holds finite additive biases such as {bad}; DGA accepts only 0 "
                         f"(attend) or ≤ {MASKED_BELOW:g}/-inf (masked) entries. Position biases like "
                         f"ALiBi or T5 buckets change the scores and are not DGA-compatible: keep such "
                         f"attention dense (F.scaled_dot_product_attention)")
    return attn_mask == 0


def mask_4d(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask's Visible part as bool [Bm, Hm, Nq|1, Nk] (Bm, Hm ∈ {1, B/Hq}), or None."""
    if attn_mask is None:
        return None
    vis = mask_to_visible(attn_mask)
    return vis.reshape((1,) * (4 - vis.dim()) + tuple(vis.shape))


def visible_rows(mask: Optional[Tensor], is_causal: bool, start: int, stop: int, nk: int, device) -> Optional[Tensor]:
    """Visible(i, j) for query rows start ≤ i < stop: bool broadcastable to [B, Hq, stop−start, Nk],
    or None when everything is visible. ``mask`` comes from `mask_4d`."""
    vis = None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., start:stop, :])
    if is_causal:
        causal = torch.arange(nk, device=device) <= torch.arange(start, stop, device=device)[:, None]
        vis = causal[None, None] if vis is None else vis & causal
    return vis


def visible_4d(attn_mask: Optional[Tensor], is_causal: bool, nq: int, nk: int, device) -> Optional[Tensor]:
    """Visible(i, j) as a bool tensor broadcastable to [B, Hq, Nq, Nk], or None if all is visible."""
    return visible_rows(mask_4d(attn_mask), is_causal, 0, nq, nk, device)


def causal_like(vis: Optional[Tensor], is_causal: bool) -> bool:
    """Whether the local window applies: the site is causal, or its mask hides every j > i.

    (Our reading, docs/dga.md: HF models pass causality as a mask when a batch is padded.)
    """
    if is_causal:
        return True
    if vis is None or vis.shape[-2] == 1:
        return False
    nq, nk = vis.shape[-2:]
    future = torch.ones(nq, nk, dtype=torch.bool, device=vis.device).triu(1)
    return not bool((vis & future).any())


def dga_applies(nq: int, nk: int, min_seq_len: int) -> bool:
    """DGA runs only for self-attention prefill of at least ``min_seq_len`` keys."""
    return nq == nk and nk >= max(min_seq_len, 1)
