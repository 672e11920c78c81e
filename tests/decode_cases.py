"""Shared histories, masks and a layer driver for the decode tests (reference, cache, kernels)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from dga_compile import DGAConfig

#: A small config under which decoding really focuses, groups and windows (min_seq_len = 0).
SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, group_bias=1.0, min_seq_len=0)


def history(B: int, Hq: int, Hkv: int, T: int, D: int, dtype=torch.float64, seed: int = 0,
            pads: Sequence[int] = ()) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded standard-normal q [B, Hq, T, D], k, v [B, Hkv, T, D] and real [B, T] (row b starts
    with ``pads[b]`` padding positions: left padding)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).to(dtype) for h in (Hq, Hkv, Hkv))
    real = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        real[b, :p] = False
    return q, k, v, real


def causal_mask(real: Tensor, i0: int, i1: int) -> Tensor:
    """The bool mask HF passes for query positions i0 … i1 − 1: [B, 1, i1 − i0, i1] (causal ∧ real keys)."""
    pos = torch.arange(i1)
    return real[:, None, None, :i1] & (pos[None, :] <= pos[i0:i1, None])[None, None]


def dense_decode(q: Tensor, k: Tensor, v: Tensor, real: Tensor, n_prefill: int) -> Tensor:
    """Exact attention of the queries n_prefill … T − 1 over the real keys j ≤ i: [B, Hq, T − N, Dv]."""
    rep = q.shape[1] // k.shape[1]
    T = q.shape[2]
    vis = causal_mask(real, n_prefill, T)
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, n_prefill:], k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=vis)


def drive_layer(layer, q: Tensor, k: Tensor, v: Tensor, real: Tensor, n_prefill: int,
                steps: Optional[Sequence[int]] = None, impl: Optional[str] = None, mask_every_step: bool = True):
    """Feeds a history through a `DGALayer` as HF would (prefill, then ``steps``); returns the
    decode outputs [B, Hq, T − N, Dv]."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    layer.update(k[:, :, :n_prefill], v[:, :, :n_prefill])
    layer.attend(q[:, :, :n_prefill], causal_mask(real, 0, n_prefill), scale, dense=lambda: None)
    outs, i = [], n_prefill
    for s in steps or [1] * (T - n_prefill):
        layer.update(k[:, :, i:i + s], v[:, :, i:i + s])
        mask = causal_mask(real, i, i + s) if mask_every_step else None
        outs.append(layer.attend(q[:, :, i:i + s], mask, scale, dense=None, impl=impl))
        i += s
    return torch.cat(outs, 2) if outs else None
