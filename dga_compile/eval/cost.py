"""Attention cost: every query·key score entry a method computes, counted per call.

Cost is summed over calls, batch and query heads, relative to dense attention (each query's
visible keys: N(N+1)/2 per head for causal attention). Every method kind counts all of its
entries, not only those of the attention itself:

- dense: the visible keys of each query;
- DGA (docs/dga.md): step 1's probe scores (r probe rows × their visible keys, per query head),
  step 4's aggregation scores (m per group per query head: the anchor's query against its
  members), and step 5's candidates per query (visible focus keys + complete groups + raw keys);
- top-k + window: the same probe scores (they pick its focus set) + the keys it keeps;
- StreamingLLM and the per-head baseline: the keys they keep (the per-head calibration runs
  once, offline, and is not counted).

A method kind reports one `Cost` per call (`methods.KINDS`); a new selection rule only has to
count its own entries into one (its per-query attention entries, plus named ``extra`` terms
such as block scoring). `CostMeter` pools them, per term and per attention site.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["Cost", "CostMeter", "Site", "NO_SITE", "SiteProfile", "span_entries", "recent_for_cost", "solve_increasing"]


@dataclasses.dataclass
class Cost:
    """The score entries of one attention call.

    ``attention`` [B, Hq, Nq]: keys each query scores in the attention itself (for DGA, step 5's
    focus keys, complete groups and raw keys); ``dense`` [B, Hq, Nq]: the keys dense attention
    scores (the visible ones); ``extra``: entries computed besides, by name (``"probes"``,
    ``"aggregation"``, ...), summed over the call.
    """

    attention: Tensor
    dense: Tensor
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Site:
    """Where an attention call runs: the HF layer index and its sliding window (None: global)."""

    layer: Optional[int] = None
    sliding_window: Optional[int] = None


#: The site of a call made outside a model (no layer index).
NO_SITE = Site()


@dataclasses.dataclass
class SiteProfile:
    """What dense attention sees at one site, per call: ``heads`` query heads, each query i
    seeing ``visible[i]`` keys (mean over batch and heads), the run of keys that ends at i."""

    heads: int
    visible: Tensor          # [Nq] float64

    @property
    def dense(self) -> float:
        """Dense entries of one call."""
        return self.heads * float(self.visible.sum())


@dataclasses.dataclass
class _SiteStats:
    ran: str
    reason: str
    sliding_window: Optional[int]
    entries: float = 0.0
    dense: float = 0.0
    visible: Optional[Tensor] = None       # Σ over calls of the mean visible keys per query
    calls: int = 0
    heads: int = 0


class CostMeter:
    """Pools the `Cost` of every attention call while active (``with meter:``)."""

    active: Optional["CostMeter"] = None

    def __init__(self):
        self.terms: dict[str, float] = {"attention": 0.0}   # Σ entries, by term
        self.dense_entries = 0.0
        self.last = 0.0              # Σ over calls, batch, heads of the keys the last query scores
        self.rows = 0                # (call, batch, head) triples seen
        self.recents: list[int] = []     # the recent window each baseline call used
        self.sites: dict[Optional[int], _SiteStats] = {}

    def __enter__(self):
        CostMeter.active = self
        return self

    def __exit__(self, *exc):
        CostMeter.active = None

    @staticmethod
    @contextlib.contextmanager
    def paused() -> Iterator[None]:
        """Calls made inside are not counted (decode steps after a metered prefill)."""
        meter, CostMeter.active = CostMeter.active, None
        try:
            yield
        finally:
            CostMeter.active = meter

    def add(self, cost: Cost, site: Site = NO_SITE, ran: str = "dense", reason: str = "") -> None:
        """Counts one call at ``site``; ``ran`` is the method kind that ran, ``reason`` why it fell back."""
        attention, dense = cost.attention.double(), cost.dense.double()
        entries = float(attention.sum()) + sum(cost.extra.values())
        self.terms["attention"] += float(attention.sum())
        for name, value in cost.extra.items():
            self.terms[name] = self.terms.get(name, 0.0) + float(value)
        self.dense_entries += float(dense.sum())
        self.last += float(attention[..., -1].sum())
        self.rows += attention[..., -1].numel()
        stats = self.sites.setdefault(site.layer, _SiteStats(ran, reason, site.sliding_window))
        if (stats.ran, stats.reason) != (ran, reason):
            stats.ran, stats.reason = "mixed", f"{stats.ran} and {ran}"
        stats.entries, stats.dense, stats.calls = stats.entries + entries, stats.dense + float(dense.sum()), stats.calls + 1
        profile = dense.mean(dim=(0, 1))
        same = stats.visible is not None and stats.visible.shape == profile.shape
        stats.visible = profile + stats.visible if same else profile if stats.calls == 1 else None
        stats.heads = dense.shape[1]

    @property
    def entries(self) -> float:
        """Σ every entry counted, all terms."""
        return sum(self.terms.values())

    @property
    def fraction(self) -> float:
        """Attention cost relative to dense."""
        return self.entries / max(self.dense_entries, 1.0)

    @property
    def breakdown(self) -> dict[str, float]:
        """Each term relative to dense (they add up to `fraction`)."""
        return {name: v / max(self.dense_entries, 1.0) for name, v in self.terms.items()}

    @property
    def keys_at_last(self) -> float:
        """Mean keys scored by the last query, per call and head."""
        return self.last / max(self.rows, 1)

    def profiles(self) -> dict[Optional[int], SiteProfile]:
        """Per site, what dense attention saw per call (sites whose calls all had one query count)."""
        return {layer: SiteProfile(s.heads, (s.visible / s.calls).double()) for layer, s in self.sites.items()
                if s.visible is not None}

    def site_report(self) -> list[dict]:
        """Per site: which kind ran (``"dga"``, ``"dense"``, a baseline), why it fell back, its
        sliding window and its cost relative to dense."""
        return [{"layer": layer, "ran": s.ran, "reason": s.reason, "sliding_window": s.sliding_window,
                 "cost": s.entries / max(s.dense, 1.0)} for layer, s in self.sites.items()]


def span_entries(visible: Tensor, sinks: int, recent: int) -> Tensor:
    """Keys a query keeps with ``sinks`` first tokens + the last ``recent`` tokens, when query i
    sees the ``visible[..., i]`` keys ending at i (causal attention, sliding windows). Same shape."""
    i = torch.arange(visible.shape[-1], dtype=visible.dtype, device=visible.device)
    lo = i - visible + 1                                               # first visible key
    sink = ((i - recent + 1).clamp(max=sinks) - lo.clamp(min=0)).clamp(min=0)
    return visible.clamp(max=recent) + sink


def solve_increasing(fn, target: float, lo: int, hi: int) -> int:
    """The smallest integer x in [lo, hi] with fn(x) ≥ target, for fn increasing (hi if none)."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if fn(mid) < target else (lo, mid)
    return lo


def recent_for_cost(fraction: float, profiles: Mapping[Optional[int], SiteProfile], sinks: int = 4,
                    dense_layers=()) -> int:
    """The ``recent`` window at which StreamingLLM (``sinks`` + ``recent``) costs ``fraction`` of
    dense attention over the sites of ``profiles``, those in ``dense_layers`` running dense."""
    total = sum(p.dense for p in profiles.values())
    fixed = sum(p.dense for layer, p in profiles.items() if layer in dense_layers)
    local = [p for layer, p in profiles.items() if layer not in dense_layers]
    n = max((p.visible.shape[-1] for p in local), default=1)

    def cost(recent: int) -> float:
        return fixed + sum(p.heads * float(span_entries(p.visible, sinks, recent).sum()) for p in local)

    return solve_increasing(cost, fraction * total, 1, n)
