"""Steps 1–4 and 5′ of docs/dga.md (which keys each query sees), shared by every implementation.

`importance_scores` (step 1), `split_focus` (step 2, with the sinks), `aggregate_groups` (steps
3–4), `complete_groups` (step 5's group rule) and `group_mass`, `tau_sets`, `block_expansion`
(step 5′: the row mass estimate, the per-row τ-set, the block's union and its dense ceiling) are
the spec's; `select` runs steps 1–4 for one call and
gathers the result into a `Selection`, the layout the blocked path and the Triton kernels slice
(the Triton path builds the same `Selection` from its own scoring and aggregation kernels).
Steps 1–4 cost O(r·N·D + N·m·D): they are not what the fast paths need to be fast at.

Non-finite inputs: a probe row whose softmax is not finite (a NaN or inf in its query, or in a
key it sees) adds nothing to the scores, so every implementation picks the same focus set; the
output rows that involve the non-finite value still come out non-finite (docs/dga.md, "Contract").
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validation import visible_rows
from .config import DGAConfig

__all__ = ["Groups", "Selection", "aggregate_groups", "block_expansion", "complete_groups", "focus_split",
           "gather_rows", "group_mass", "importance_scores", "num_focus", "select", "split_focus", "tau_sets",
           "working_dtype"]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision every implementation computes in: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_focus(focus_ratio: float, nk: int, sinks: int = 0) -> int:
    """n_f = min(Nk, sinks + ceil(γ·Nk)), computed so that γ·Nk landing on an integer is not pushed
    up by rounding (``sinks=0``: the keys chosen by score alone)."""
    return min(nk, sinks + math.ceil(round(focus_ratio * nk, 9)))


def _kv_view(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, Hq/Hkv, ...]: query heads grouped by the kv head they read."""
    return x.view(x.shape[0], hkv, x.shape[1] // hkv, *x.shape[2:])


def importance_scores(q: Tensor, k: Tensor, vis: Optional[Tensor], scale: float, num_probe: int) -> Tensor:
    """Step 1. s[b, g, j] = Σ_{h∈g} Σ_{p∈P} softmax_j(scale·q[h,p]·k[g,j] | Visible(p, j)).

    q [B, Hq, Nq, D], k [B, Hkv, Nk, D]; vis: None (all visible) or bool whose last rows are
    the probe rows, broadcastable to [B, Hq, ≥r, Nk] (full [.., Nq, Nk] masks work as is).
    Returns [B, Hkv, Nk] in q's dtype. P is the last ``num_probe`` query rows; a probe row that
    sees no key, or whose softmax is not finite, adds 0.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    r = min(num_probe, Nq)
    probes = _kv_view(q[:, :, Nq - r:], Hkv).reshape(B, Hkv, -1, D)          # [B, Hkv, rep*r, D]
    logits = scale * probes @ k.transpose(-1, -2)                              # [B, Hkv, rep*r, Nk]
    if vis is not None:
        pvis = vis[..., -r:, :].expand(B, Hq, r, Nk).reshape(B, Hkv, -1, Nk)
        logits = logits.masked_fill(~pvis, float("-inf"))
    # torch's softmax makes a whole row NaN when it is empty or holds a NaN/inf logit.
    return logits.softmax(-1).nan_to_num(0.0).sum(-2)


def split_focus(scores: Tensor, n_focus: int, sinks: int = 0) -> tuple[Tensor, Tensor]:
    """Step 2. The first ``sinks`` positions and the highest-scoring others, ``n_focus`` in all
    (ties: smaller position first).

    scores [B, Hkv, Nk] -> (focus positions [B, Hkv, n_f], non-focus positions
    [B, Hkv, Nk − n_f]), each sorted by position, int64.
    """
    nk = scores.shape[-1]
    if sinks:
        scores = scores.clone()
        scores[..., :sinks] = float("inf")
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


def group_mass(logits: Tensor, first: int, count: int) -> Tensor:
    """Step 5′'s row estimate. logits [..., L]: each row's base candidates (group columns with
    βe·log m; −inf where not a candidate) -> [..., count], the softmax's mass on the group columns
    [first, first + count). A row with no candidate, or whose softmax is not finite, gives 0."""
    return logits.softmax(-1)[..., first:first + count].nan_to_num(0.0, 0.0, 0.0)


def tau_sets(mass: Tensor, tau: float) -> Tensor:
    """Step 5′'s per-row set E_i. mass [..., G] (0 on groups not complete for the row) -> bool
    [..., G]: the smallest set, taken in decreasing mass (ties: smaller index), leaving at most
    1 − τ of mass on the other groups; i.e. g ∈ E_i iff its mass plus that of every group ranked
    after it exceeds 1 − τ."""
    ranked = mass.sort(dim=-1, descending=True, stable=True)
    left = ranked.values.flip(-1).cumsum(-1).flip(-1)        # mass of this group and those after it
    return torch.zeros_like(left, dtype=torch.bool).scatter_(-1, ranked.indices, left > 1.0 - tau)


def block_expansion(mass: Tensor, complete: Tensor, cfg: DGAConfig) -> tuple[Tensor, Tensor]:
    """Step 5′ for one query block: mass [..., b, G] from `group_mass`, complete bool [..., b, G]
    (the groups complete for each row) -> (E bool [..., G], the union of the rows' `tau_sets`;
    dense bool [...], |E| > expand_max × the groups complete for the block's last row)."""
    expand = tau_sets(mass, cfg.expand_mass).any(-2)
    dense = expand.sum(-1) > cfg.expand_max * complete[..., -1, :].sum(-1)
    return expand, dense


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, H, N, D], idx [B, H, L] -> [B, H, L, D]."""
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


class Selection(NamedTuple):
    """Steps 1–4 for one call, gathered into the orders step 5 slices."""

    focus: Tensor      # [B, Hkv, n_f] positions, increasing
    nonfocus: Tensor   # [B, Hkv, Nn] positions, increasing
    anchors: Tensor    # [B, Hkv, G]
    kf: Tensor         # [B, Hkv, n_f, D] focus keys (vf likewise)
    vf: Tensor
    kn: Tensor         # [B, Hkv, Nn, D] non-focus keys in non-focus order (vn likewise)
    vn: Tensor
    kbar: Tensor       # [B, Hq, G, D] aggregated keys (vbar likewise)
    vbar: Tensor

    @classmethod
    def gather(cls, k: Tensor, v: Tensor, focus: Tensor, nonfocus: Tensor, anchors: Tensor, kbar: Tensor,
               vbar: Tensor) -> "Selection":
        """The selection of positions ``focus`` / ``nonfocus`` with the rows of k [B, Hkv, Nk, D]
        and v [B, Hkv, Nk, Dv] gathered in their orders."""
        return cls(focus, nonfocus, anchors, gather_rows(k, focus), gather_rows(v, focus), gather_rows(k, nonfocus),
                   gather_rows(v, nonfocus), kbar, vbar)


def focus_split(q: Tensor, k: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
                cfg: DGAConfig) -> tuple[Tensor, Tensor]:
    """Steps 1–2 without gradient: (focus [B, Hkv, n_f], non-focus [B, Hkv, Nk − n_f]) positions.
    ``mask`` comes from `_validation.mask_4d`. When no key is chosen by score (ceil(γ·Nk) = 0)
    step 1 is skipped: the focus set is the sinks."""
    nq, nk = q.shape[2], k.shape[2]
    r = min(cfg.num_probe, nq)
    with torch.no_grad():
        if num_focus(cfg.focus_ratio, nk) == 0:
            scores = k.new_zeros(k.shape[:3])
        else:
            scores = importance_scores(q, k, visible_rows(mask, is_causal, nq - r, nq, nk, q.device), scale,
                                       cfg.num_probe)
        return split_focus(scores, num_focus(cfg.focus_ratio, nk, cfg.sinks), cfg.sinks)


def select(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
           cfg: DGAConfig) -> Selection:
    """Steps 1–4 of one call in q's dtype (differentiable through the aggregation)."""
    focus, nonfocus = focus_split(q, k, mask, is_causal, scale, cfg)
    grp = aggregate_groups(q, k, v, nonfocus, scale, cfg.group_size)
    return Selection.gather(k, v, focus, nonfocus, grp.anchors, grp.keys, grp.values)
