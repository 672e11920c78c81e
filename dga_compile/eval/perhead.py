"""The per-head baseline (DuoAttention-like): calibrate which kv heads are local, then keep
the least local ones dense and give the others sinks + a recent window, at a given cost.

`head_locality` runs dense forwards over calibration text (windows that never overlap the
evaluation's: `run.token_windows` with ``between=True``) and measures, per layer and kv head,
the share of attention mass its queries (last half of each window) put on the ``sinks`` first
tokens and the last ``recent`` ones. `plan_for_cost` keeps the most local heads local and
chooses how many stay dense so that the whole model costs a target fraction of dense attention.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .._validation import visible_4d
from .calibrate import run_windows
from .cost import SiteProfile, solve_increasing, span_entries
from .methods import current_site, register_method

__all__ = ["head_locality", "plan_for_cost"]

_QUERY_BLOCK = 256


def head_locality(model, windows: Sequence[Tensor], sinks: int = 4, recent: int = 256) -> dict[tuple[int, int], float]:
    """{(layer, kv head): share of attention mass on sinks + recent keys, mean over the query
    heads reading that kv head and the last half of each window's queries} (1.0: purely local)."""
    sums: dict[tuple[int, int], list[float]] = {}

    def attend(q, k, v, attn_mask, is_causal, scale, dropout_p):
        B, Hq, nq, D = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        vis = visible_4d(attn_mask, is_causal, nq, nk, q.device)
        kh = k.repeat_interleave(Hq // hkv, 1).float()
        j = torch.arange(nk, device=q.device)
        local_mass = torch.zeros(Hq, dtype=torch.float64)
        for i0 in range(nq // 2, nq, _QUERY_BLOCK):
            i1 = min(i0 + _QUERY_BLOCK, nq)
            logits = (scale or D ** -0.5) * q[:, :, i0:i1].float() @ kh.transpose(-1, -2)
            if vis is not None:
                logits = logits.masked_fill(~(vis if vis.shape[-2] == 1 else vis[..., i0:i1, :]), float("-inf"))
            probs = logits.softmax(-1).nan_to_num(0.0)
            i = torch.arange(i0, i1, device=q.device)[:, None]
            local = ((i - j < recent) & (j <= i)) | (j < sinks)
            local_mass += (probs * local).sum(dim=(0, 2, 3)).double().cpu()
        rows = B * (nq - nq // 2)
        for h in range(Hq):
            acc = sums.setdefault((current_site().layer, h // (Hq // hkv)), [0.0, 0.0])
            acc[0] += float(local_mass[h])
            acc[1] += rows
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                                scale=scale, enable_gqa=Hq != hkv)

    run_windows(model, register_method("dga-calibrate-heads", attend, attend), windows)
    return {head: mass / max(n, 1.0) for head, (mass, n) in sorted(sums.items())}


def plan_for_cost(locality: Mapping[tuple[int, int], float], profiles: Mapping[Optional[int], SiteProfile],
                  fraction: float, sinks: int = 4, recent: int = 256) -> tuple[frozenset, int]:
    """(dense kv heads, recent window) at which the per-head baseline costs ``fraction`` of dense
    over the sites of ``profiles``: as many of the least local heads dense as fit with a
    ``recent``-token window for the others, then the window widened to spend the rest (or,
    when no head fits, narrowed as in StreamingLLM)."""
    kv_heads = {layer: sum(1 for (site, _) in locality if site == layer) for layer in profiles}
    total = sum(p.dense for p in profiles.values())
    order = sorted((h for h in locality if h[0] in profiles), key=lambda h: (locality[h], h))   # least local first

    def cost(n_dense: int, window: int) -> float:
        dense = set(order[:n_dense])
        out = 0.0
        for layer, p in profiles.items():
            share = p.heads / max(kv_heads[layer], 1)                # query heads per kv head
            n = sum(1 for h in dense if h[0] == layer)
            local = float(span_entries(p.visible, sinks, window).sum())
            out += share * (n * float(p.visible.sum()) + (kv_heads[layer] - n) * local)
        return out

    target = fraction * total
    n_dense = max((n for n in range(len(order) + 1) if cost(n, recent) <= target), default=0)
    n = max((p.visible.shape[-1] for p in profiles.values()), default=1)
    window = solve_increasing(lambda w: cost(n_dense, w), target, 1, n)
    return frozenset(order[:n_dense]), window
