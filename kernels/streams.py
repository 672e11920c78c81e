"""Host side of the fused kernel: which masks it takes, and the three streams with their bounds.

Steps 1–4 give a `dga_compile.selection.Selection`; this file turns it into the arrays
`attention._fwd_kernel` streams (docs/dga.md "Cost"):
per (batch, kv head, query block [i0, i1)), the focus prefix with position ≤ i1 − 1, the
group prefix with anchor ≤ i1 − 1 − w, and the raw slice of the non-focus order from the
first group not complete for i0 to the last position ≤ i1 − 1.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from dga_compile._validation import causal_like, mask_4d, visible_rows
from dga_compile.selection import Selection

__all__ = ["BIG", "MaskPlan", "Streams", "plan_mask", "prepare_streams"]

#: Position given to invisible keys and anchor given to groups with an invisible member.
BIG = 2 ** 30


class MaskPlan(NamedTuple):
    """How the kernel reads Visible(i, j): causal rule × key visibility. ``reason`` is set
    (and the rest unused) when the mask is not of that form."""

    key_visible: Optional[Tensor]  # [B, Nk] bool, or None when every key is visible
    causal: bool                   # the causal rule (and the window) applies
    reason: str = ""


def plan_mask(attn_mask: Optional[Tensor], is_causal: bool, batch: int, nq: int, nk: int) -> MaskPlan:
    """Reads ``attn_mask`` (+ ``is_causal``) as key padding, possibly with a causal rule.

    Accepts None, key-padding masks ([B|1, 1, 1, Nk] and lower-rank spellings) and full
    masks equal to (causal ∧ key padding) or (key padding) for every row, as Hugging Face
    builds them for padded batches. Anything else returns a plan with a ``reason``.
    """
    if attn_mask is None:
        return MaskPlan(None, is_causal)
    mask = mask_4d(attn_mask)
    if mask.shape[1] != 1:
        return MaskPlan(None, False, f"per-head mask of shape {tuple(attn_mask.shape)}")
    if mask.shape[2] == 1:
        return MaskPlan(mask[:, 0, 0, :].expand(batch, nk), is_causal)
    vis = visible_rows(mask, is_causal, 0, nq, nk, mask.device).expand(-1, 1, nq, nk)
    causal = causal_like(vis, is_causal)
    keys = vis[:, 0, -1, :]                                 # last row: every key it may see, if causal
    expected = keys[:, None, :]
    if causal:
        expected = expected & torch.ones(nq, nk, dtype=torch.bool, device=vis.device).tril()
    if not torch.equal(vis[:, 0], expected.expand(vis.shape[0], nq, nk)):
        return MaskPlan(None, False, "a full mask that is not causal × key padding")
    return MaskPlan(keys.expand(batch, nk), causal)


class Streams(NamedTuple):
    """Kernel inputs, in the one order the forward and backward kernels, the autograd function and
    the triton op take them. Positions are int32 "effective" (``BIG`` when invisible); bounds
    [B, Hkv, NB, 4] int32 = (f_end, g_end, r_start, r_end) per query block."""

    fpos: Tensor   # [B, Hkv, n_f]
    kf: Tensor     # [B, Hkv, n_f, D]   (vf: Dv)
    vf: Tensor
    gpos: Tensor   # [B, Hkv, G] anchors
    kg: Tensor     # [B, Hq, G, D]      (vg: Dv)
    vg: Tensor
    npos: Tensor   # [B, Hkv, Nn]
    kn: Tensor     # [B, Hkv, Nn, D]    (vn: Dv)
    vn: Tensor
    bounds: Tensor


def _count_le(sorted_pos: Tensor, limits: Tensor) -> Tensor:
    """Per row of increasing ``sorted_pos`` [B, H, L]: how many entries are ≤ each of ``limits`` [NB]."""
    B, H = sorted_pos.shape[:2]
    return torch.searchsorted(sorted_pos.contiguous(), limits.expand(B, H, -1).contiguous(), right=True)


def prepare_streams(sel: Selection, plan: MaskPlan, nq: int, group_size: int, window: int, block_m: int,
                    dtype: torch.dtype) -> Streams:
    """Stream arrays in ``dtype`` (kernel operands) and their per-block bounds."""
    B, Hkv, n_f = sel.focus.shape
    G, Nn, m = sel.anchors.shape[-1], sel.nonfocus.shape[-1], group_size
    dev = sel.focus.device
    if plan.key_visible is None:
        fvis = nvis = gvis = None
        leading_good = torch.full((B, Hkv), G, device=dev)
    else:
        kvis = plan.key_visible[:, None, :].expand(B, Hkv, -1)
        fvis, nvis = kvis.gather(-1, sel.focus), kvis.gather(-1, sel.nonfocus)
        gvis = nvis[..., :G * m].reshape(B, Hkv, G, m).all(-1)
        leading_good = gvis.int().cumprod(-1).sum(-1)

    def eff(pos, vis):
        pos = pos.to(torch.int32)
        return (pos if vis is None else torch.where(vis, pos, BIG)).contiguous()

    i0 = torch.arange(0, nq, block_m, device=dev)
    i1 = (i0 + block_m).clamp(max=nq)
    full = lambda n: torch.full((B, Hkv, i0.numel()), n, device=dev)
    if plan.causal:
        f_end, g_end = _count_le(sel.focus, i1 - 1), _count_le(sel.anchors, i1 - 1 - window)
        lead, r_end = _count_le(sel.anchors, i0 - window), _count_le(sel.nonfocus, i1 - 1)
    else:
        f_end, g_end, lead, r_end = full(n_f), full(G), full(G), full(Nn)
    r_start = m * torch.minimum(lead, leading_good[..., None])
    bounds = torch.stack([f_end, g_end, r_start, r_end], -1).to(torch.int32).contiguous()
    cast = lambda x: x.to(dtype).contiguous()
    return Streams(eff(sel.focus, fvis), cast(sel.kf), cast(sel.vf), eff(sel.anchors, gvis), cast(sel.kbar),
                   cast(sel.vbar), eff(sel.nonfocus, nvis), cast(sel.kn), cast(sel.vn), bounds)
