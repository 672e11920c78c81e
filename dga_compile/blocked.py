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
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._blocked_fast import fast_attention, fast_path_applies
from ._validation import causal_like, dga_applies, mask_4d, validate_config, visible_rows
from .config import DGAConfig
from .reference import dense_attention
from .selection import (Selection, aggregate_groups, block_expansion, focus_split, gather_rows, group_mass, select,
                        working_dtype)

__all__ = ["blocked_attention", "expanded_counts", "BLOCK_SIZE"]

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


def _per_q(x: Tensor, rep: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv, rep, L, D]: a kv head's rows for each of its query heads."""
    return x[:, :, None].expand(-1, -1, rep, -1, -1)


def _gathered(sel: Selection, c: _Candidates, rep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The candidate keys and values [B, Hkv, rep, L, D] (focus prefix, group prefix, raw keys)
    and their permission ``ok`` [B, Hkv, rep, b, L]."""
    B, Hkv = sel.focus.shape[:2]
    grp = lambda x: x[..., :c.n_group, :].view(B, Hkv, rep, c.n_group, x.shape[-1])
    keys = torch.cat([_per_q(sel.kf[..., :c.n_focus, :], rep), grp(sel.kbar),
                      _per_q(gather_rows(sel.kn, c.raw_idx), rep)], 3)
    values = torch.cat([_per_q(sel.vf[..., :c.n_focus, :], rep), grp(sel.vbar),
                        _per_q(gather_rows(sel.vn, c.raw_idx), rep)], 3)
    b = c.raw_ok.shape[-2]
    ok = torch.cat([t.expand(B, Hkv, rep, b, -1) for t in (c.focus_ok, c.group_ok, c.raw_ok)], -1)
    return keys, values, ok


def _attend_block(qb: Tensor, sel: Selection, c: _Candidates, group_logit: float, dropout_p: float,
                  scale: float) -> Tensor:
    """qb [B, Hkv, rep, b, D] -> [B, Hkv, rep, b, Dv] over the candidate keys, one softmax."""
    B, Hkv, rep, b, D = qb.shape
    keys, values, ok = _gathered(sel, c, rep)
    bias = torch.zeros(ok.shape[-1], dtype=qb.dtype, device=qb.device)
    bias[c.n_focus:c.n_focus + c.n_group] = group_logit
    mask = torch.where(ok, bias, float("-inf"))
    flat = lambda x: x.reshape(B * Hkv, rep, *x.shape[3:])
    out = F.scaled_dot_product_attention(flat(qb), flat(keys), flat(values), attn_mask=flat(mask),
                                         dropout_p=dropout_p, scale=scale)
    return out.view(B, Hkv, rep, b, -1)


class _Block(NamedTuple):
    """One query block [i0, i1): its candidates, and what a dense (block, head) of step 5′ attends
    to: k/v [B, Hkv, n, D] and their visibility, bool broadcastable to [B, Hq, b, n] (None: all
    visible)."""

    i0: int
    i1: int
    cand: _Candidates
    k: Tensor
    v: Tensor
    vis: Optional[Tensor]


class _Expansion(NamedTuple):
    """Step 5′ of one block over its gathered candidates (keys, values [B, Hkv, rep, L, D], ``ok``
    [B, Hkv, rep, b, L]): the groups ``complete`` for each row [B, Hkv, rep, b, G'], E
    ``expand`` [B, Hkv, rep, G'] (empty where dense) and ``dense`` [B, Hkv, rep]."""

    keys: Tensor
    values: Tensor
    ok: Tensor
    complete: Tensor
    expand: Tensor
    dense: Tensor


def _group_columns(c: _Candidates, length: int, value: float, like: Tensor) -> Tensor:
    """[length]: ``value`` on the group columns of the candidates, 0 elsewhere."""
    bias = like.new_zeros(length)
    bias[c.n_focus:c.n_focus + c.n_group] = value
    return bias


def _expansion(qb: Tensor, sel: Selection, c: _Candidates, cfg: DGAConfig, scale: float) -> _Expansion:
    """Step 5′'s choice for one block of ``cfg.query_block`` rows, qb [B, Hkv, rep, b, D]: the
    estimate is step 5's logits over the candidates with βe on the group columns; no gradient
    flows through E."""
    B, Hkv, rep, b, D = qb.shape
    keys, values, ok = _gathered(sel, c, rep)
    complete = c.group_ok.expand(B, Hkv, rep, b, c.n_group)
    with torch.no_grad():
        bias = _group_columns(c, ok.shape[-1], cfg.expand_bias * math.log(cfg.group_size), qb)
        estimate = torch.where(ok, scale * qb @ keys.transpose(-1, -2) + bias, float("-inf"))
        expand, dense = block_expansion(group_mass(estimate, c.n_focus, c.n_group), complete, cfg)
    return _Expansion(keys, values, ok, complete, expand & ~dense[..., None], dense)


def _expanding_block(qb: Tensor, sel: Selection, blk: _Block, cfg: DGAConfig, dropout_p: float,
                     scale: float) -> Tensor:
    """Steps 5′ and 5 for one query block: qb [B, Hkv, rep, b, D] -> [B, Hkv, rep, b, Dv]. The
    members of the expanded groups are gathered from the non-focus order (each group one run of
    m) and join the candidates in one fused attention call; a dense (block, head) attends to
    every visible key."""
    B, Hkv, rep, b, D = qb.shape
    m, c = cfg.group_size, blk.cand
    x = _expansion(qb, sel, c, cfg, scale)
    with torch.no_grad():
        union = x.expand.any(2)                                                        # [B, Hkv, G']
        n_e = int(union.sum(-1).max()) if c.n_group else 0
        groups = (~union).to(torch.uint8).argsort(dim=-1, stable=True)[..., :n_e]    # expanded first
        per_q = groups[:, :, None, :].expand(-1, -1, rep, -1)
        member_ok = (x.expand.gather(-1, per_q)[..., None, :] & x.complete.gather(-1, per_q[..., None, :].expand(
            -1, -1, -1, b, -1))).repeat_interleave(m, -1)                              # [B, Hkv, rep, b, n_e·m]
        members = (groups[..., None] * m + torch.arange(m, device=qb.device)).flatten(-2)   # non-focus order
        ok = torch.cat([x.ok, member_ok], -1)
        ok[..., c.n_focus:c.n_focus + c.n_group] &= ~x.expand[..., None, :]
        bias = _group_columns(c, ok.shape[-1], cfg.group_bias * math.log(m), qb)
        mask = torch.where(ok, bias, float("-inf"))
    keys = torch.cat([x.keys, _per_q(gather_rows(sel.kn, members), rep)], 3)
    values = torch.cat([x.values, _per_q(gather_rows(sel.vn, members), rep)], 3)
    flat = lambda t: t.reshape(B * Hkv, rep, *t.shape[3:])
    out = F.scaled_dot_product_attention(flat(qb), flat(keys), flat(values), attn_mask=flat(mask),
                                         dropout_p=dropout_p, scale=scale).view(B, Hkv, rep, b, -1)
    if not bool(x.dense.any()):
        return out
    at = x.dense.nonzero(as_tuple=True)                                                # (batch, kv head, rep)
    vis = None if blk.vis is None else blk.vis.expand(B, Hkv * rep, b, blk.k.shape[2]).reshape(B, Hkv, rep, b, -1)[at]
    dense = F.scaled_dot_product_attention(qb[at], blk.k[at[:2]], blk.v[at[:2]], attn_mask=vis, dropout_p=dropout_p,
                                           scale=scale)
    return out.index_put(at, dense)


def _blocks(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, sel: Selection,
            cfg: DGAConfig, block_size: int) -> Iterator[_Block]:
    """The query blocks of step 5 (``block_size`` rows; step 5′'s ``cfg.query_block`` when τ > 0),
    each with its candidates. ``mask`` from `_validation.mask_4d`."""
    Nq, Nk = q.shape[2], k.shape[2]
    window = is_causal or causal_like(mask, False)
    block_size = cfg.query_block if cfg.expand_mass > 0 else block_size
    for i0 in range(0, Nq, block_size):
        i1 = min(i0 + block_size, Nq)
        if mask is None:
            cand = _candidates_unmasked(sel, i0, i1, is_causal, cfg)
            if is_causal:
                yield _Block(i0, i1, cand, k[:, :, :i1], v[:, :, :i1],
                             torch.ones(i1 - i0, i1, dtype=torch.bool, device=q.device).tril(i0))
            else:
                yield _Block(i0, i1, cand, k, v, None)
        else:
            vis = visible_rows(mask, is_causal, i0, i1, Nk, q.device)
            cand = _candidates_masked(sel, vis, i0, i1, is_causal, window, cfg)
            yield _Block(i0, i1, cand, k, v, vis)


def expanded_counts(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: Optional[float], config: DGAConfig) -> Tensor:
    """e_i of docs/dga.md, "Cost": for each query, how many of its complete groups step 5′ expands
    (all of them in a dense (block, head)), as `blocked_attention` decides it. Shapes as
    `reference_attention` -> [B, Hq, Nq] int64 (0 when τ = 0 or DGA does not apply)."""
    cfg = validate_config(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hq, Nq, D = q.shape
    counts = torch.zeros(B, Hq, Nq, dtype=torch.long, device=q.device)
    if cfg.expand_mass == 0 or not dga_applies(Nq, k.shape[2], cfg.min_seq_len):
        return counts
    wd = working_dtype(q.dtype)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    mask = mask_4d(attn_mask)
    with torch.no_grad():
        sel = select(q, k, v, mask, is_causal, scale, cfg)
        qv = q.view(B, k.shape[1], Hq // k.shape[1], Nq, D)
        for blk in _blocks(q, k, v, mask, is_causal, sel, cfg, cfg.query_block):
            x = _expansion(qv[:, :, :, blk.i0:blk.i1], sel, blk.cand, cfg, scale)
            chosen = x.complete & (x.expand[..., None, :] | x.dense[..., None, None])
            counts[:, :, blk.i0:blk.i1] = chosen.sum(-1).view(B, Hq, -1)
    return counts


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False, scale: Optional[float] = None,
                      config: Optional[DGAConfig] = None, dropout_p: float = 0.0,
                      block_size: int = BLOCK_SIZE) -> Tensor:
    """DGA, blocked. Same contract as `reference_attention`; differentiable (autograd).

    Calls without a mask that need no grad take `_blocked_fast` on the CPU (τ = 0 only). With
    step 5′ (``expand_mass > 0``) the query blocks are the spec's, ``config.query_block`` rows,
    and ``block_size`` is not used.
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
    if fast_path_applies(q, k, v, attn_mask, dropout_p, cfg):
        focus, nonfocus = focus_split(q, k, None, is_causal, scale, cfg)
        grp = aggregate_groups(q, k, v, nonfocus, scale, cfg.group_size)
        out = fast_attention(q, k, v, focus, nonfocus, grp, is_causal, scale, cfg.window, cfg.group_size,
                             group_logit, block_size)
        return out.to(out_dtype)
    mask = mask_4d(attn_mask)
    sel = select(q, k, v, mask, is_causal, scale, cfg)
    qv = q.view(B, Hkv, Hq // Hkv, Nq, D)
    outs = []
    for blk in _blocks(q, k, v, mask, is_causal, sel, cfg, block_size):
        qb = qv[:, :, :, blk.i0:blk.i1]
        outs.append(_expanding_block(qb, sel, blk, cfg, dropout_p, scale) if cfg.expand_mass > 0 else
                    _attend_block(qb, sel, blk.cand, group_logit, dropout_p, scale))
    return torch.cat(outs, 3).view(B, Hq, Nq, -1).to(out_dtype)
