"""Host side of the fused kernel: which masks it takes, the streams with their bounds, step 5′'s marks.

Steps 1–4 give a `dga_compile.selection.Selection`; this file turns it into the arrays
`attention._fwd_kernel` streams (docs/dga.md "Cost"):
per (batch, kv head, query block [i0, i1)), the focus prefix with position ≤ i1 − 1, the
group prefix with anchor ≤ i1 − 1 − w, and the raw slice of the non-focus order from the
first group not complete for i0 to the last position ≤ i1 − 1. With step 5′, `mark_expansion`
adds which groups each step-5′ block of b rows expands and, per query block, the list of the
groups whose members the kernel gathers.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dga_compile._validation import causal_like, mask_4d, visible_rows
from dga_compile.config import DGAConfig
from dga_compile.selection import Selection, tau_sets

from ._runtime import LOG2E

__all__ = ["BIG", "MaskPlan", "Streams", "mark_expansion", "plan_mask", "prepare_streams"]

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
    [B, Hkv, NB, 4] int32 = (f_end, g_end, r_start, r_end) per query block. Step 5′ only (else
    empty): xmark [B, Hq, NBE, G] int8, 1 where a step-5′ block expands a group; xgroups
    [B, Hq, NB, 1 + L] int32, per query block the number of groups whose members it gathers, then
    those groups (padded to the longest list)."""

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
    xmark: Tensor
    xgroups: Tensor


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
    none = torch.empty(0, dtype=torch.int8, device=dev)
    return Streams(eff(sel.focus, fvis), cast(sel.kf), cast(sel.vf), eff(sel.anchors, gvis), cast(sel.kbar),
                   cast(sel.vbar), eff(sel.nonfocus, nvis), cast(sel.kn), cast(sel.vn), bounds, none,
                   none.int())


#: Elements of one chunk of step 5′'s row estimate [B, Hq, rows, G] (float32).
_ESTIMATE_CHUNK = 2 ** 24


def mark_expansion(q: Tensor, st: Streams, lse: Tensor, causal: bool, scale: float, cfg: DGAConfig,
                   block_m: int) -> Streams:
    """Step 5′'s choice for ``st`` (docs/dga.md): ``st`` with ``xmark`` and ``xgroups`` filled in.

    q [B, Hq, Nq, D]; lse float32 [B, Hq, Nq], the fused kernel's row log2-sum-exp over the base
    candidates with group logits βe·log m. Row i's estimate M_i[g] = 2^(logit − lse_i) on each
    group complete for i (0 for a row whose lse is not finite), `selection.tau_sets`, their union
    per step-5′ block of b = ``cfg.query_block`` rows and the dense ceiling (a dense block marks
    every group), as `selection.block_expansion` defines them; the estimate runs in chunks of
    rows, so memory stays O(N) per group. No gradient.
    """
    B, Hq, Nq, _ = q.shape
    Hkv, G = st.gpos.shape[1], st.gpos.shape[-1]
    b = min(cfg.query_block, Nq)
    n_blocks = -(-Nq // b)
    dev = q.device
    anchors = st.gpos.repeat_interleave(Hq // Hkv, 1)[:, :, None, :]               # [B, Hq, 1, G]

    def complete(rows: Tensor) -> Tensor:
        """bool [B, Hq, len(rows), G]: the groups complete for each of the query rows ``rows``."""
        lim = rows - cfg.window if causal else torch.full_like(rows, BIG - 1)
        return anchors <= lim[:, None]

    with torch.no_grad():
        kg = st.kg.float().transpose(-1, -2)
        bias = cfg.expand_bias * math.log(cfg.group_size) * LOG2E
        chosen = torch.zeros(B, Hq, n_blocks, G, dtype=torch.int32, device=dev)
        chunk = max(1, _ESTIMATE_CHUNK // (B * Hq * G))
        for c0 in range(0, Nq, chunk):
            rows = torch.arange(c0, min(c0 + chunk, Nq), device=dev)
            row_lse = lse[:, :, c0:c0 + rows.numel(), None]
            mass = torch.exp2(scale * LOG2E * (q[:, :, c0:c0 + rows.numel()].float() @ kg) + bias - row_lse)
            mass = mass.masked_fill(~complete(rows) | ~row_lse.isfinite(), 0.0).nan_to_num(0.0, 0.0, 0.0)
            chosen.index_add_(2, rows // b, tau_sets(mass, cfg.expand_mass).int())
        expand = chosen > 0
        last = (torch.arange(1, n_blocks + 1, device=dev) * b).clamp(max=Nq) - 1
        dense = expand.sum(-1) > cfg.expand_max * complete(last).sum(-1)
        xmark = expand | dense[..., None]
        # Per query block [i0, i1) of the kernel: the groups some row of it expands (its step-5′
        # blocks s0 … s1 − 1), limited to those complete for its last row.
        i0 = torch.arange(0, Nq, block_m, device=dev)
        i1 = (i0 + block_m).clamp(max=Nq)
        marked = F.pad(xmark.int().cumsum(2), (0, 0, 1, 0))
        union = (marked[:, :, (i1 - 1) // b + 1] > marked[:, :, i0 // b]) & complete(i1 - 1)
        count = union.sum(-1, keepdim=True)
        groups = (~union).to(torch.uint8).argsort(dim=-1, stable=True)[..., :int(count.max())]
        return st._replace(xmark=xmark.to(torch.int8).contiguous(),
                           xgroups=torch.cat([count, groups], -1).to(torch.int32).contiguous())
