"""Fast forward of the blocked path for sites without ``attn_mask`` (docs/dga.md, "Cost").

A route inside `blocked_attention`, taken when no gradient is needed, ``dropout_p == 0`` and the
tensors are on the CPU. For a query block [i0, i1) the candidates of query i split into two parts:

- the prefix: focus tokens before lo(i0) and the groups complete for i0. Every query of the
  block sees all of them, so the call needs no per-query mask, only one row per head
  (validity, and β·log m on the group columns). Focus keys are stored reversed in front of
  the group keys, so this prefix is one contiguous slice of one buffer.
- the band: positions [lo(i0), i1) of k itself (a slice, no gather), where query i sees j iff
  j ≤ i and (j ≥ lo(i), or j is a focus token not in the prefix), plus the groups that become
  complete inside the block.

lo(i) is the first position of the first group not complete for i (at most i + 1), so every
non-focus j in [lo(i), i] is raw for i. Each part is one flash-attention call that returns its
log-sum-exp; the two are merged exactly. Nothing here is differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import DGAConfig
from .selection import Groups

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def fast_path_applies(q: Tensor, k: Tensor, v: Tensor, attn_mask, dropout_p: float, config: DGAConfig) -> bool:
    """No mask, no dropout, CPU, Dv == D (CPU flash needs it), no autograd graph to record, and
    no step 5′ (``expand_mass == 0``; sinks only change the focus split, which is given)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (attn_mask is None and dropout_p == 0 and q.device.type == "cpu" and not needs_grad
            and v.shape[-1] == q.shape[-1] and config.expand_mass == 0)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
            is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """One fused call: q [B, H, b, D], k/v [B, H, L, D],
    bias None or additive broadcastable to [B, H, b, L] -> (out [B, H, b, Dv], lse [B, H, b]);
    rows whose bias is all −inf get lse −inf."""
    out, lse = _flash(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
    if bias is None:
        return out, lse
    return out, lse.masked_fill((bias.amax(-1) == float("-inf")).expand_as(lse), float("-inf"))


def _merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Softmax over the union of disjoint key sets from their partial (out, lse) results."""
    lse = torch.stack([p[1] for p in parts])                                           # [P, B, H, b]
    top = lse.amax(0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    w = (lse - top).exp()
    total = w.sum(0)
    w = w / total.masked_fill(total == 0, 1.0)[None]                                   # rows with no candidate give 0
    out = parts[0][0] * w[0, ..., None]
    for (o, _), wp in zip(parts[1:], w[1:]):
        out.addcmul_(o, wp[..., None])
    return out


def fast_attention(q: Tensor, k: Tensor, v: Tensor, focus: Tensor, nonfocus: Tensor, grp: Groups,
                   is_causal: bool, scale: float, window: int, group_size: int, group_logit: float,
                   block_size: int) -> Tensor:
    """Step 5 without a mask.

    q [B, Hq, N, D], k/v [B, Hkv, N, D]; focus [B, Hkv, n_f], nonfocus [B, Hkv, Nn] (positions,
    increasing), grp from `aggregate_groups` -> [B, Hq, N, Dv]."""
    B, Hq, N, _ = q.shape
    rep = Hq // k.shape[1]
    per_q = (lambda x: x.repeat_interleave(rep, 1)) if rep > 1 else (lambda x: x)
    k, v, focus, nonfocus, anchors = (per_q(x).contiguous() for x in (k, v, focus, nonfocus, grp.anchors))
    n_f, G = focus.shape[-1], anchors.shape[-1]
    gather = lambda x, idx: x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))
    # Prefix buffer: focus keys reversed, then group keys; a prefix of each is one slice.
    kp = torch.cat([gather(k, focus.flip(-1)), grp.keys], 2)
    vp = torch.cat([gather(v, focus.flip(-1)), grp.values], 2)
    col_bias = torch.cat([q.new_zeros(n_f), q.new_full((G,), group_logit)])
    if not is_causal:   # all focus, all groups, raw tail: one call
        tail = nonfocus[..., G * group_size:]
        keys, values = torch.cat([kp, gather(k, tail)], 2), torch.cat([vp, gather(v, tail)], 2)
        bias = torch.cat([col_bias, q.new_zeros(tail.shape[-1])])
        return _attend(q, keys, values, bias.view(1, 1, 1, -1), scale)[0]

    i = torch.arange(N, device=q.device)
    n_done = torch.searchsorted(anchors, (i - window).expand(B, Hq, N).contiguous(), right=True)  # groups complete for i
    # First position of group g (g = G: of the tail run, or N when there is none).
    starts = torch.cat([nonfocus, nonfocus.new_full((B, Hq, 1), N)], -1)[..., ::group_size][..., :G + 1]
    lo = torch.minimum(starts.gather(-1, n_done), i + 1)                                         # [B, Hq, N]
    is_focus = torch.zeros(B, Hq, N, dtype=torch.bool, device=q.device).scatter_(-1, focus, True)
    neg_inf = q.new_tensor(float("-inf"))
    out = q.new_full((B, Hq, N, v.shape[-1]), float("nan"))   # poisoned: every block must write its rows
    for i0 in range(0, N, block_size):
        i1 = min(i0 + block_size, N)
        lo0, g0 = lo[..., i0:i0 + 1], n_done[..., i0:i0 + 1]                                   # [B, Hq, 1]
        qb, rows = q[:, :, i0:i1], i[i0:i1, None]
        # Near: positions [near, i1), open to every query i ≥ j of the block in every head (lo grows
        # with i). Without a mask when near ≤ i0: [near, i0) is open to all, [i0, i1) is causal.
        near = int(lo[..., i1 - 1].max())
        if near <= i0:
            parts = [_attend(qb, k[:, :, i0:i1], v[:, :, i0:i1], None, scale, is_causal=True)]
            if near < i0:
                parts.append(_attend(qb, k[:, :, near:i0], v[:, :, near:i0], None, scale))
        else:
            cols = torch.arange(near, i1, device=q.device)
            parts = [] if near == i1 else [_attend(qb, k[:, :, near:i1], v[:, :, near:i1],
                                                   _causal_bias(rows, cols, neg_inf), scale)]
        # Far: positions [lo_min, near) and the groups completing inside the block, masked per head.
        # Raw column j is open to query i iff j ≤ i and t_j ≥ lo(i), where t_j = j, or ∞ for a
        # focus token that is not in this head's prefix (focus tokens in the prefix are < lo(i)).
        lo_min, g_lo, g_hi = int(lo0.min()), int(g0.min()), int(n_done[..., i1 - 1].max())
        n_raw, n_grp = near - lo_min, g_hi - g_lo
        if n_raw + n_grp:
            j = torch.arange(lo_min, near, device=q.device)
            t = torch.where(is_focus[..., lo_min:near] & (j >= lo0), N, j)[..., None, :]            # [B, Hq, 1, n_raw]
            far_bias = q.new_empty(B, Hq, i1 - i0, n_raw + n_grp)
            causal = _causal_bias(rows, j, neg_inf) if near > i0 else neg_inf.new_zeros(())
            torch.where(t >= lo[..., i0:i1, None], causal, neg_inf, out=far_bias[..., :n_raw])
            g = torch.arange(g_lo, g_hi, device=q.device)
            grp_ok = (g >= g0[..., None]) & (g < n_done[..., i0:i1, None])
            torch.where(grp_ok, q.new_tensor(group_logit), neg_inf, out=far_bias[..., n_raw:])
            keys = torch.cat([k[:, :, lo_min:near], grp.keys[:, :, g_lo:g_hi]], 2)
            values = torch.cat([v[:, :, lo_min:near], grp.values[:, :, g_lo:g_hi]], 2)
            parts.append(_attend(qb, keys, values, far_bias, scale))
        # Prefix: slice [n_f − nf_max, n_f + ng_max) of the buffer; head h uses nf0[h] focus, g0[h] groups.
        nf0 = torch.searchsorted(focus, lo0.contiguous())                                         # focus < lo(i0)
        nf_max, ng_max = int(nf0.max()), int(g0.max())
        if nf_max + ng_max:
            c = torch.arange(n_f - nf_max, n_f + ng_max, device=q.device)
            pre_ok = torch.where(c < n_f, n_f - 1 - c < nf0, c - n_f < g0)[..., None, :]
            parts.append(_attend(qb, kp[:, :, n_f - nf_max:n_f + ng_max], vp[:, :, n_f - nf_max:n_f + ng_max],
                                 torch.where(pre_ok, col_bias[n_f - nf_max:n_f + ng_max], neg_inf), scale))
        out[:, :, i0:i1] = _merge(parts)
    return out


def _causal_bias(rows: Tensor, cols: Tensor, neg_inf: Tensor) -> Tensor:
    """[1, 1, b, L]: 0 where key position ≤ query position, else −inf (the same for every head)."""
    return torch.where(cols <= rows, neg_inf.new_zeros(()), neg_inf)[None, None]
