"""Blocked DGA in PyTorch (docs/dga.md, "Cost"): the implementation ``impl="blocked"``.

Steps 1–4 are `dga_compile.selection`'s (already O(r·N·D + N·m·D)). Step 5 runs per block of
queries [i0, i1): the candidate keys are the visible focus prefix, the complete-group prefix
and the slice of raw non-focus tokens, concatenated and passed with an additive mask (0, −inf,
and β·log m on group columns) to one fused `scaled_dot_product_attention` call. No Nq×Nk
matrix is ever built: memory is O(N·(n_f + G + block)). Runs on any device, differentiable.

One route inside: calls without ``attn_mask``, dropout or autograd on the CPU take the faster
no-grad forward of `_blocked_fast` (flash-attention calls over slices, merged by log-sum-exp);
the loop here is the differentiable path and the one for masks. Which implementation runs a
call of the op is decided in `dga_compile.dispatch`, not here.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._blocked_fast import fast_attention, fast_path_applies
from ._validation import causal_like, dga_applies, mask_4d, validate_config, visible_rows
from .config import DGAConfig
from .reference import dense_attention
from .selection import Selection, aggregate_groups, focus_split, gather_rows, select, working_dtype

__all__ = ["blocked_attention", "BLOCK_SIZE"]

#: Query rows per block. Larger blocks amortise per-call overhead but widen the raw slice.
BLOCK_SIZE = 256


class _Candidates(NamedTuple):
    """Keys one query block may use, with per-(query, key) permission. ``*_ok`` are bool
    [B, Hkv, 1 or rep, b, L*]; L_f, L_g are prefix lengths, raw_idx [B, Hkv, L_r] indexes
    the non-focus order."""

    n_focus: int
    focus_ok: Tensor
    n_group: int
    group_ok: Tensor
    raw_idx: Tensor
    raw_ok: Tensor


def _prefix_len(pos: Tensor, last: int) -> int:
    """How many entries of the increasing rows of ``pos`` are ≤ ``last``, max over rows."""
    return int((pos <= last).sum(-1).max()) if pos.numel() else 0


def _candidates_unmasked(sel: Selection, i0: int, i1: int, causal: bool, cfg: DGAConfig) -> _Candidates:
    """No attn_mask: the spec's "Cost" structure, computed from positions alone."""
    m, w = cfg.group_size, cfg.window
    B, Hkv, Nn = sel.nonfocus.shape
    G = sel.anchors.shape[-1]
    dev = sel.focus.device
    i = torch.arange(i0, i1, device=dev)[:, None]                                    # [b, 1]
    if not causal:
        n_f, tail = sel.focus.shape[-1], torch.arange(G * m, Nn, device=dev).expand(B, Hkv, -1)
        b = i1 - i0
        return _Candidates(n_f, torch.ones(1, 1, 1, 1, n_f, dtype=torch.bool, device=dev), G,
                           torch.ones(1, 1, 1, 1, G, dtype=torch.bool, device=dev), tail,
                           torch.ones(1, 1, 1, b, tail.shape[-1], dtype=torch.bool, device=dev))
    n_f = _prefix_len(sel.focus, i1 - 1)
    n_g = _prefix_len(sel.anchors, i1 - 1 - w)
    focus_ok = sel.focus[..., None, None, :n_f] <= i
    anchors = sel.anchors[..., None, None, :n_g]
    group_ok = anchors <= i - w
    # Groups complete for the block's first query are complete for all: their members are never raw.
    start = (sel.anchors <= i0 - w).sum(-1, keepdim=True) * m                          # [B, Hkv, 1]
    stop = (sel.nonfocus <= i1 - 1).sum(-1, keepdim=True)
    raw_len = max(int((stop - start).max()), 0)
    raw_idx = start + torch.arange(raw_len, device=dev)
    valid = raw_idx < stop
    raw_idx = raw_idx.clamp(max=max(Nn - 1, 0))
    raw_pos = sel.nonfocus.gather(-1, raw_idx)
    raw_grp = raw_idx // m
    raw_anchor = sel.anchors.gather(-1, raw_grp.clamp(max=max(G - 1, 0))) if G else raw_pos
    young = (raw_grp >= G)[..., None, None, :] | (raw_anchor[..., None, None, :] > i - w)
    raw_ok = (raw_pos[..., None, None, :] <= i) & young & valid[..., None, None, :]
    return _Candidates(n_f, focus_ok, n_g, group_ok, raw_idx, raw_ok)


def _candidates_masked(sel: Selection, vis: Tensor, i0: int, i1: int, causal: bool, window: bool,
                       cfg: DGAConfig) -> _Candidates:
    """General mask: completeness is read off the mask rows of this block (O(b·Nk) work)."""
    m = cfg.group_size
    B, Hkv, Nn = sel.nonfocus.shape
    G = sel.anchors.shape[-1]
    Hq, b = sel.kbar.shape[1], i1 - i0
    vis = vis.expand(B, Hq, b, vis.shape[-1]).reshape(B, Hkv, Hq // Hkv, b, -1)   # [B, Hkv, rep, b, Nk]

    def vis_at(pos):                                                               # pos [B, Hkv, L]
        return vis.gather(-1, pos[:, :, None, None, :].expand(-1, -1, vis.shape[2], b, -1))

    n_f = _prefix_len(sel.focus, i1 - 1) if window else sel.focus.shape[-1]
    focus_ok = vis_at(sel.focus[..., :n_f])
    member_vis = vis_at(sel.nonfocus)                                               # [B, Hkv, rep, b, Nn]
    complete = member_vis[..., :G * m].reshape(B, Hkv, Hq // Hkv, b, G, m).all(-1)
    if window:
        i = torch.arange(i0, i1, device=vis.device)[:, None]
        complete &= sel.anchors[:, :, None, None, :] <= i - cfg.window
    n_g = int(complete.flatten(0, -2).any(0).nonzero().max()) + 1 if bool(complete.any()) else 0
    in_complete = F.pad(complete.repeat_interleave(m, -1), (0, Nn - G * m))
    need = member_vis & ~in_complete
    needed = need.flatten(2, 3).any(2)                                              # [B, Hkv, Nn]
    raw_len = int(needed.sum(-1).max())
    raw_idx = (~needed).to(torch.uint8).argsort(dim=-1, stable=True)[..., :raw_len]     # needed first, by position
    valid = needed.gather(-1, raw_idx)
    raw_ok = need.gather(-1, raw_idx[:, :, None, None, :].expand(-1, -1, need.shape[2], b, -1)) & valid[:, :, None, None, :]
    return _Candidates(n_f, focus_ok, n_g, complete[..., :n_g], raw_idx, raw_ok)


def _attend_block(qb: Tensor, sel: Selection, c: _Candidates, group_logit: float, dropout_p: float,
                  scale: float) -> Tensor:
    """qb [B, Hkv, rep, b, D] -> [B, Hkv, rep, b, Dv] over the candidate keys, one softmax."""
    B, Hkv, rep, b, D = qb.shape
    kq = lambda x: x[:, :, None].expand(-1, -1, rep, -1, -1)                          # kv head -> q heads
    grp = lambda x: x[..., :c.n_group, :].view(B, Hkv, rep, c.n_group, x.shape[-1])
    keys = torch.cat([kq(sel.kf[..., :c.n_focus, :]), grp(sel.kbar), kq(gather_rows(sel.kn, c.raw_idx))], 3)
    values = torch.cat([kq(sel.vf[..., :c.n_focus, :]), grp(sel.vbar), kq(gather_rows(sel.vn, c.raw_idx))], 3)
    ok = torch.cat([t.expand(B, Hkv, rep, b, -1) for t in (c.focus_ok, c.group_ok, c.raw_ok)], -1)
    bias = torch.zeros(ok.shape[-1], dtype=qb.dtype, device=qb.device)
    bias[c.n_focus:c.n_focus + c.n_group] = group_logit
    mask = torch.where(ok, bias, float("-inf"))
    flat = lambda x: x.reshape(B * Hkv, rep, *x.shape[3:])
    out = F.scaled_dot_product_attention(flat(qb), flat(keys), flat(values), attn_mask=flat(mask),
                                         dropout_p=dropout_p, scale=scale)
    return out.view(B, Hkv, rep, b, -1)


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      config: Optional[DGAConfig] = None, dropout_p: float = 0.0,
                      block_size: int = BLOCK_SIZE) -> Tensor:
    """DGA, blocked. Same contract as `reference_attention`; differentiable (autograd).

    Calls without a mask that need no grad take `_blocked_fast` on the CPU.
    """
    cfg = validate_config(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype, wd = q.dtype, working_dtype(q.dtype)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if not dga_applies(Nq, Nk, cfg.min_seq_len):
        return dense_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    group_logit = cfg.group_bias * math.log(cfg.group_size)
    if fast_path_applies(q, k, v, attn_mask, dropout_p):
        focus, nonfocus = focus_split(q, k, None, is_causal, scale, cfg)
        grp = aggregate_groups(q, k, v, nonfocus, scale, cfg.group_size)
        out = fast_attention(q, k, v, focus, nonfocus, grp, is_causal, scale, cfg.window, cfg.group_size,
                             group_logit, block_size)
        return out.to(out_dtype)
    mask = mask_4d(attn_mask)
    window = is_causal or causal_like(mask, False)
    sel = select(q, k, v, mask, is_causal, scale, cfg)
    qv = q.view(B, Hkv, Hq // Hkv, Nq, D)
    outs = []
    for i0 in range(0, Nq, block_size):
        i1 = min(i0 + block_size, Nq)
        if mask is None:
            cand = _candidates_unmasked(sel, i0, i1, is_causal, cfg)
        else:
            vis = visible_rows(mask, is_causal, i0, i1, Nk, q.device)
            cand = _candidates_masked(sel, vis, i0, i1, is_causal, window, cfg)
        outs.append(_attend_block(qv[:, :, :, i0:i1], sel, cand, group_logit, dropout_p, scale))
    return torch.cat(outs, 3).view(B, Hq, Nq, -1).to(out_dtype)
