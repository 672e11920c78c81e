"""Reference Dynamic Group Attention: ``docs/dga.md`` (the spec) literally, in plain PyTorch.

Steps 1–4 (importance scores, focus split, group aggregation) cost O(r·N·D + N·m·D) and are
shared with the blocked path; step 5 is written here densely (an Nq×Nk logit matrix), which
is the point of a reference. Works in float64; fp16/bf16/fp32 inputs run in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .config import DGAConfig
from ._validation import causal_like, dga_applies, visible_4d

__all__ = ["reference_attention", "importance_scores", "split_focus", "aggregate_groups", "Groups",
           "complete_groups", "working_dtype", "num_focus"]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision every implementation computes in: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_focus(focus_ratio: float, nk: int) -> int:
    """n_f = ceil(γ·Nk), computed so that γ·Nk landing on an integer is not pushed up by rounding."""
    return min(nk, math.ceil(round(focus_ratio * nk, 9)))


def _kv_view(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, Hq/Hkv, ...]: query heads grouped by the kv head they read."""
    return x.view(x.shape[0], hkv, x.shape[1] // hkv, *x.shape[2:])


def importance_scores(q: Tensor, k: Tensor, vis: Optional[Tensor], scale: float, num_probe: int) -> Tensor:
    """Step 1. s[b, g, j] = Σ_{h∈g} Σ_{p∈P} softmax_j(scale·q[h,p]·k[g,j] | Visible(p, j)).

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D]; vis: None (all visible) or bool whose last rows are
    the probe rows, broadcastable to [B, Hq, ≥r, Nk] (full [.., Nq, Nk] masks work as is).
    Returns [B, Hkv, Nk] in q's dtype. P is the last ``num_probe`` query rows.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    r = min(num_probe, Nq)
    probes = _kv_view(q[:, :, Nq - r:], Hkv).reshape(B, Hkv, -1, D)          # [B, Hkv, rep*r, D]
    logits = scale * probes @ k.transpose(-1, -2)                              # [B, Hkv, rep*r, Nk]
    if vis is not None:
        pvis = vis[..., -r:, :].expand(B, Hq, r, Nk).reshape(B, Hkv, -1, Nk)
        logits = logits.masked_fill(~pvis, float("-inf"))
    return logits.softmax(-1).nan_to_num(0.0).sum(-2)


def split_focus(scores: Tensor, n_focus: int) -> tuple[Tensor, Tensor]:
    """Step 2. The ``n_focus`` highest-scoring positions (ties: smaller position first).

    scores [B, Hkv, Nk] -> (focus positions [B, Hkv, n_f], non-focus positions
    [B, Hkv, Nk − n_f]), each sorted by position, int64.
    """
    nk = scores.shape[-1]
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    is_focus = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :n_focus], True)
    pos = torch.arange(nk, device=scores.device)
    by_kind = (is_focus.long() * nk + pos).argsort(-1)          # non-focus first, each by position
    return by_kind[..., nk - n_focus:], by_kind[..., :nk - n_focus]


class Groups(NamedTuple):
    """Step 3–4 result. G = (Nk − n_f) // m complete runs of the non-focus order."""

    keys: Tensor      # K̄ [B, Hq, G, D]
    values: Tensor    # V̄ [B, Hq, G, Dv]
    members: Tensor   # [B, Hkv, G, m] positions, increasing
    anchors: Tensor   # [B, Hkv, G] = members[..., -1]


def aggregate_groups(q: Tensor, k: Tensor, v: Tensor, nonfocus: Tensor, scale: float, group_size: int) -> Groups:
    """Steps 3–4. Cut the non-focus order into runs of m; per query head h and group g:
    w = softmax_{j∈g}(scale·q[h, a(g)]·k[j]), K̄ = Σ w·k[j], V̄ = Σ w·v[j]. Differentiable.
    """
    B, Hq, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = nonfocus.shape[-1] // group_size
    members = nonfocus[..., :G * group_size].reshape(B, Hkv, G, group_size)
    anchors = members[..., -1]
    flat = members.reshape(B, Hkv, G * group_size, 1)
    km = k.gather(2, flat.expand(-1, -1, -1, D)).view(B, Hkv, G, group_size, D)
    vm = v.gather(2, flat.expand(-1, -1, -1, Dv)).view(B, Hkv, G, group_size, Dv)
    qv = _kv_view(q, Hkv)                                                          # [B, Hkv, rep, Nq, D]
    qa = qv.gather(3, anchors[:, :, None, :, None].expand(-1, -1, qv.shape[2], -1, D))  # [B, Hkv, rep, G, D]
    w = (scale * torch.einsum("bkrgd,bkgmd->bkrgm", qa, km)).softmax(-1)
    kbar = torch.einsum("bkrgm,bkgmd->bkrgd", w, km).reshape(B, Hq, G, D)
    vbar = torch.einsum("bkrgm,bkgmd->bkrgd", w, vm).reshape(B, Hq, G, Dv)
    return Groups(kbar, vbar, members, anchors)


def complete_groups(vis_rows: Tensor, members: Tensor, first_row: int, causal: bool, window: int) -> Tensor:
    """Step 5's group rule for the query rows first_row, first_row + 1, …: group g is complete
    for query i when all its members are visible to i and (causal) its anchor a(g) ≤ i − w.

    vis_rows: bool [B, Hq, n, Nk], the visibility of those n rows; members: [B, Hq, G, m]
    positions per query head, increasing (the anchor is the last). Returns bool [B, Hq, n, G].
    """
    B, Hq, n, _ = vis_rows.shape
    G, m = members.shape[-2:]
    idx = members.reshape(B, Hq, 1, G * m).expand(B, Hq, n, G * m)
    complete = vis_rows.gather(-1, idx).view(B, Hq, n, G, m).all(-1)
    if causal:
        i = torch.arange(first_row, first_row + n, device=vis_rows.device)[:, None]
        complete &= members[..., -1][:, :, None, :] <= i - window
    return complete


def _softmax_rows(logits: Tensor) -> Tensor:
    """Softmax over the last dim; rows with no finite logit give 0 (as SDPA does)."""
    return logits.softmax(-1).nan_to_num(0.0)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None,
                        config: Optional[DGAConfig] = None, dropout_p: float = 0.0) -> Tensor:
    """DGA per the spec. q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv].

    Hq % Hkv == 0 (GQA by head grouping); ``attn_mask`` bool (True = attend) or additive
    (0 / masked); ``is_causal`` is top-left aligned and ANDed with the mask.
    """
    cfg = config or DGAConfig()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype, wd = q.dtype, working_dtype(q.dtype)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    vis = visible_4d(attn_mask, is_causal, Nq, Nk, q.device)
    vis_full = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool, device=q.device) if vis is None else vis.expand(B, Hq, Nq, Nk)
    kh, vh = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = scale * q @ kh.transpose(-1, -2)                                     # [B, Hq, Nq, Nk]
    if not dga_applies(Nq, Nk, cfg.min_seq_len):
        probs = _softmax_rows(logits.masked_fill(~vis_full, float("-inf")))
        return (_dropout(probs, dropout_p) @ vh).to(out_dtype)

    m = cfg.group_size
    scores = importance_scores(q, k, vis, scale, cfg.num_probe)                   # 1
    focus, nonfocus = split_focus(scores, num_focus(cfg.focus_ratio, Nk))           # 2
    grp = aggregate_groups(q, k, v, nonfocus, scale, m)                             # 3, 4
    G = grp.anchors.shape[-1]

    # 5. Which groups are complete for query i: all members visible, and (causal) a(g) ≤ i − w.
    complete = complete_groups(vis_full, grp.members.repeat_interleave(rep, 1), 0, causal_like(vis, is_causal),
                               cfg.window)                                         # [B, Hq, Nq, G]
    # Per token: focus, or the index of its group (−1 for the raw tail run).
    group_of = torch.full((B, Hkv, Nk), -1, dtype=torch.long, device=q.device)
    group_of.scatter_(-1, grp.members.reshape(B, Hkv, -1),
                      torch.arange(G, device=q.device).repeat_interleave(m).expand(B, Hkv, -1))
    group_of = group_of.repeat_interleave(rep, 1)[:, :, None, :].expand(B, Hq, Nq, Nk)
    in_complete_group = (group_of >= 0) & complete.gather(-1, group_of.clamp(min=0)) if G else torch.zeros_like(vis_full)
    is_focus = torch.zeros(B, Hkv, Nk, dtype=torch.bool, device=q.device).scatter_(-1, focus, True)
    token_ok = vis_full & (is_focus.repeat_interleave(rep, 1)[:, :, None, :] | ~in_complete_group)

    token_logits = logits.masked_fill(~token_ok, float("-inf"))
    group_logits = (scale * q @ grp.keys.transpose(-1, -2) + cfg.group_bias * math.log(m)).masked_fill(~complete, float("-inf"))
    probs = _dropout(_softmax_rows(torch.cat([token_logits, group_logits], -1)), dropout_p)
    return (probs[..., :Nk] @ vh + probs[..., Nk:] @ grp.values).to(out_dtype)


def _dropout(probs: Tensor, p: float) -> Tensor:
    return torch.nn.functional.dropout(probs, p) if p else probs
