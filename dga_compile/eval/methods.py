"""Attention methods compared by the evaluation, each with its attention cost counted.

Every method is an SDPA-contract function (see `dga_compile.integrations.transformers.Attend`)
registered as a Hugging Face attention implementation. Cost = score entries computed, summed
over all queries and heads (the compute DGA exists to save); dense causal attention at N keys
costs N(N+1)/2 per head. Methods:

- ``dense``: SDPA.
- ``dga``: `dynamic_group_attention` with a `DGAConfig`; per query i it scores the visible
  focus tokens, the complete groups and the raw rest: (#visible) − (m − 1)·(#complete groups).
- ``streaming`` (StreamingLLM, Xiao et al. 2023): ``sinks`` first tokens + the last ``recent`` ones.
- ``topk``: DGA's focus set (top γ·N keys by the last r queries' scores) + the last ``recent``
  tokens, no groups ("focus tokens without groups").

Sites where DGA does not apply (Nq ≠ Nk, short inputs) are dense for every method.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import dynamic_group_attention
from ..config import DGAConfig
from ..reference import complete_groups, importance_scores, num_focus, split_focus
from .._validation import causal_like, dga_applies, visible_4d

__all__ = ["Method", "CostMeter", "attend_fn", "recent_for_cost"]

_QUERY_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class Method:
    """One line of the comparison. ``kind``: "dense" | "dga" | "streaming" | "topk".

    ``config`` sets DGA's γ, m, r, w, β (and the top-k focus ratio / probes); ``sinks`` and
    ``recent`` set the baselines' kept tokens.
    """

    kind: str
    config: DGAConfig = DGAConfig(min_seq_len=0)
    sinks: int = 4
    recent: int = 256

    def __post_init__(self):
        if self.kind not in ("dense", "dga", "streaming", "topk"):
            raise ValueError(f"Method.kind must be dense, dga, streaming or topk, got {self.kind!r}")

    @property
    def label(self) -> str:
        c = self.config
        dense = f", layers {','.join(map(str, c.dense_layers))} dense" if c.dense_layers else ""
        if self.kind == "dga":
            return f"DGA γ={c.focus_ratio:g} m={c.group_size} w={c.window} β={c.group_bias:g} r={c.num_probe}{dense}"
        if self.kind == "streaming":
            return f"StreamingLLM {self.sinks} sinks + {self.recent} recent{dense}"
        if self.kind == "topk":
            return f"top-k γ={c.focus_ratio:g} + {self.recent} recent{dense}"
        return "dense"


class CostMeter:
    """Accumulates attention cost over every attention call while active (``with meter:``)."""

    active: Optional["CostMeter"] = None

    def __init__(self):
        self.entries = 0.0          # Σ over calls, heads, queries of keys scored
        self.dense_entries = 0.0    # the same for dense attention
        self.last = 0.0             # Σ over calls, heads of keys scored by the last query
        self.dense_last = 0.0
        self.rows = 0               # (call, batch, head) triples seen

    def __enter__(self):
        CostMeter.active = self
        return self

    def __exit__(self, *exc):
        CostMeter.active = None

    def add(self, per_query: Tensor, dense_per_query: Tensor) -> None:
        """per_query, dense_per_query: [B, H, Nq] keys scored by each query."""
        self.entries += float(per_query.sum())
        self.dense_entries += float(dense_per_query.sum())
        self.last += float(per_query[..., -1].sum())
        self.dense_last += float(dense_per_query[..., -1].sum())
        self.rows += per_query[..., -1].numel()

    @property
    def fraction(self) -> float:
        """Attention cost relative to dense."""
        return self.entries / max(self.dense_entries, 1.0)

    @property
    def keys_at_last(self) -> float:
        """Mean keys scored by the last query, per call and head."""
        return self.last / max(self.rows, 1)


def attend_fn(method: Method):
    """The SDPA-contract function (q, k, v, attn_mask, is_causal, scale, dropout_p) for ``method``."""

    def attend(q, k, v, attn_mask, is_causal, scale, dropout_p):
        vis = visible_4d(attn_mask, is_causal, q.shape[2], k.shape[2], q.device)
        applies = method.kind != "dense" and dga_applies(q.shape[2], k.shape[2], method.config.min_seq_len)
        if method.kind == "dga" and applies:
            if CostMeter.active is not None:
                CostMeter.active.add(*_dga_cost(q, k, vis, is_causal, scale, method.config))
            return dynamic_group_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                           scale=scale, enable_gqa=q.shape[1] != k.shape[1], config=method.config)
        if applies:
            keep = _kept_keys(method, q, k, vis, is_causal, scale)
            return _masked_sdpa(q, k, v, vis, keep, scale)
        if CostMeter.active is not None:
            dense = _visible_counts(vis, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            CostMeter.active.add(dense, dense)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    return attend


def _visible_counts(vis: Optional[Tensor], B: int, H: int, nq: int, nk: int) -> Tensor:
    """[B, H, Nq] number of visible keys per query."""
    if vis is None:
        return torch.full((B, H, nq), float(nk))
    return vis.expand(B, H, nq, nk).sum(-1).float().cpu()


def _kv_rep(x: Tensor, rep: int) -> Tensor:
    return x.repeat_interleave(rep, 1) if rep > 1 else x


def _focus_split(q, k, vis, scale, cfg: DGAConfig) -> tuple[Tensor, Tensor]:
    """The op's steps 1–2 in float32: (focus, non-focus) positions [B, Hkv, ·]."""
    scores = importance_scores(q.float(), k.float(), vis, scale or q.shape[-1] ** -0.5, cfg.num_probe)
    return split_focus(scores, num_focus(cfg.focus_ratio, k.shape[2]))


def _dga_cost(q, k, vis, is_causal, scale, cfg: DGAConfig) -> tuple[Tensor, Tensor]:
    """([B, Hq, Nq] keys DGA scores per query, [B, Hq, Nq] dense), from the same focus split as the op."""
    B, Hq, nq, _ = q.shape
    hkv, nk, m = k.shape[1], k.shape[2], cfg.group_size
    dense = _visible_counts(vis, B, Hq, nq, nk)
    _, nonfocus = _focus_split(q, k, vis, scale, cfg)
    G = nonfocus.shape[-1] // m
    members = nonfocus[..., :G * m].reshape(B, hkv, G, m)
    complete = torch.zeros(B, Hq, nq)
    vis_full = torch.ones(B, Hq, nq, nk, dtype=torch.bool) if vis is None else vis.expand(B, Hq, nq, nk).cpu()
    members_q = _kv_rep(members, Hq // hkv).cpu()
    causal = causal_like(vis, is_causal)
    for i0 in range(0, nq, _QUERY_BLOCK):
        rows = vis_full[:, :, i0:i0 + _QUERY_BLOCK]
        complete[:, :, i0:i0 + rows.shape[2]] = complete_groups(rows, members_q, i0, causal, cfg.window).sum(-1).float()
    return dense - (m - 1) * complete, dense


def _kept_keys(method: Method, q, k, vis, is_causal, scale) -> Tensor:
    """Bool [B, Hq or 1, Nq, Nk]: keys the baseline keeps (before the visibility mask)."""
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    keep = (i - j < method.recent) & (j <= i) if causal_like(vis, is_causal) else (j - i).abs() < method.recent
    if method.kind == "streaming":
        return (keep | (j < method.sinks))[None, None]
    cfg = method.config
    focus, _ = _focus_split(q, k, vis, scale, cfg)
    is_focus = torch.zeros(k.shape[0], k.shape[1], nk, dtype=torch.bool, device=q.device).scatter_(-1, focus, True)
    return keep[None, None] | _kv_rep(is_focus, q.shape[1] // k.shape[1])[:, :, None, :]


def _masked_sdpa(q, k, v, vis, keep, scale) -> Tensor:
    """SDPA restricted to ``vis ∧ keep``, one query block at a time (bounded memory); counts the cost."""
    B, Hq, nq, _ = q.shape
    nk = k.shape[2]
    allowed = keep if vis is None else keep & vis
    rep = Hq // k.shape[1]
    kh, vh = _kv_rep(k, rep), _kv_rep(v, rep)
    out = torch.empty(B, Hq, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    for i0 in range(0, nq, _QUERY_BLOCK):
        rows = allowed[:, :, i0:i0 + _QUERY_BLOCK]
        out[:, :, i0:i0 + rows.shape[2]] = F.scaled_dot_product_attention(q[:, :, i0:i0 + rows.shape[2]], kh, vh,
                                                                          attn_mask=rows, scale=scale)
    if CostMeter.active is not None:
        CostMeter.active.add(allowed.expand(B, Hq, nq, nk).sum(-1).float().cpu(),
                             _visible_counts(vis, B, Hq, nq, nk))
    return out


def recent_for_cost(method: Method, fraction: float, n: int, num_layers: int = 1) -> int:
    """The ``recent`` window at which the baseline ``method`` costs about ``fraction`` of dense
    causal attention at N = n over ``num_layers`` layers, of which ``method.config.dense_layers``
    are dense (top-k assumes its focus tokens spread evenly; the meter reports the cost actually
    paid)."""
    n_dense = sum(layer < num_layers for layer in method.config.dense_layers)
    fraction = (fraction * num_layers - n_dense) / max(num_layers - n_dense, 1)
    i = torch.arange(n, dtype=torch.float64)
    dense = float((i + 1).sum())

    def cost(recent: int) -> float:
        older = (i + 1 - recent).clamp(min=0)
        extra = older.clamp(max=method.sinks) if method.kind == "streaming" else older * method.config.focus_ratio
        return float(((i + 1).clamp(max=recent) + extra).sum()) / dense

    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if cost(mid) < fraction else (lo, mid)
    return lo
