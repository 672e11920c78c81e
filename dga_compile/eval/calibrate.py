"""Per-site budgets: which attention layers lose most under DGA, and the cheapest plan that meets a target.

**Measuring a site.** For every attention layer of a causal LM, on windows of text that lie
between the evaluation windows (`run.token_windows` with ``between=True``), DGA and dense
attention run on the same q, k, v (those of the dense model, so errors do not compound). A
site's error at a config is the relative error of its attention output on the last half of the
rows, ‖o_DGA − o_dense‖ / ‖o_dense‖, pooled over the windows; its cost is every score entry DGA
computes there (`methods.dga_cost`: probes, aggregation, step 5's candidates, step 5′'s
expansion). `site_table` measures every config of a ladder in ONE dense forward per window: each
layer computes dense once and each rung's DGA on the same q, k, v. `layer_errors` (one config)
ranks the layers for ``dga-compile eval --calibrate K``: on SmolLM2-135M at 4K the 6 worst layers
by this measure (on the same window) were exactly the 6 that raise last-half perplexity most
when DGA runs in that layer alone (docs/ACCURACY.md, "Per-layer budget").

**A calibrated plan** (``dga-compile calibrate MODEL --max-increase 2%``, `calibrate`):

1. The ladder (`ladder`): per site the same short list of candidate configs, derived from the
   base config and ending with dense: half the base's budgets (γ/2, r/2 probes, w/2, and with
   step 5′ on twice the mass 1 − τ its expansion leaves to groups: for sites that tolerate
   less); the base; the base with twice the focus ratio γ (more keys chosen by score; with
   step 5′, half of 1 − τ); the base with twice the window w (at least 512: more recent keys
   raw); both; dense. With step 5′ on, the same five rungs of the base without it (τ = 0, γ at
   least the default's) join them: a diffuse site expands nearly every group, and fixed focus
   sets serve it cheaper. Each rung buys accuracy with cost in a different way, so a site takes
   the one that pays most for it; all the DGA rungs (five, or ten) share one dense pass.
2. The chooser (`choose`): for a multiplier λ, each site takes the rung minimising
   cost + λ·error² (a Lagrangian of total cost subject to total squared error; error² since
   perplexity responds to the output error roughly quadratically for small errors). λ = 0 gives
   every site its cheapest rung, λ → ∞ its most accurate (dense). `plan_path` lists the distinct
   plans as λ grows: each costs more and errs less than the one before.
3. The search (`cheapest_meeting`): bisection over that path, each step one full-model DGA
   forward per calibration window with the candidate plan (`Evaluation` with ``between=True``,
   through the HF attention hook, every entry counted), for the first (cheapest) plan whose
   measured last-half perplexity increase over dense on the calibration windows is ≤ the target:
   1 + ⌈log2(len(path) − 1)⌉ evaluations (≈ 8 for 30 sites). If only the all-dense plan meets it,
   `calibrate` says so (the least dense plan on the path was measured and failed).

Nothing here is tuned to one model: the ladder is relative to the base, the chooser and the
search use only what is measured. Out of scope: entries per kv head (the op takes one config per call).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..config import DGAConfig
from ..integrations.transformers import dga_attend, sdpa
from ..plan import DENSE, PLAN_FIELDS, Plan
from .._validation import dga_applies
from .methods import Call, Method, current_site, dga_cost, register_method

__all__ = ["SiteTable", "Calibration", "layer_errors", "worst_layers", "run_windows", "site_table", "ladder",
           "choose", "plan_path", "cheapest_meeting", "plan_of", "calibrate"]

#: A rung of the ladder: a config, or None for dense attention.
Rung = Optional[DGAConfig]


@dataclasses.dataclass
class SiteTable:
    """Per site (HF layer index) and rung: the pooled squared error of the attention output on the
    last half of the rows and its reference, and the score entries; per site the dense entries."""

    rungs: tuple
    sq: dict = dataclasses.field(default_factory=dict)        # layer -> [[Σ err², Σ ref²] per rung]
    entries: dict = dataclasses.field(default_factory=dict)   # layer -> [entries per rung]
    dense: dict = dataclasses.field(default_factory=dict)     # layer -> dense entries

    def add(self, call: Call, exact: Tensor, outs: Sequence[Tensor]) -> None:
        """One layer call: ``exact`` and each rung's output [B, Hq, Nq, Dv]."""
        layer, nq, nk = call.site.layer, call.shape[3], call.shape[4]
        sq = self.sq.setdefault(layer, [[0.0, 0.0] for _ in self.rungs])
        entries = self.entries.setdefault(layer, [0.0] * len(self.rungs))
        dense = float(call.visible.sum())
        self.dense[layer] = self.dense.get(layer, 0.0) + dense
        ref = exact[:, :, nq // 2:].double()
        for i, (cfg, out) in enumerate(zip(self.rungs, outs)):
            sq[i][0] += float(((out[:, :, nq // 2:].double() - ref) ** 2).sum())
            sq[i][1] += float((ref ** 2).sum())
            if cfg is None or not dga_applies(nq, nk, cfg.min_seq_len):
                entries[i] += dense
            else:
                cost = dga_cost(call, cfg)
                entries[i] += float(cost.attention.double().sum()) + sum(cost.extra.values())

    def errors(self) -> dict[int, list[float]]:
        """layer -> relative error per rung."""
        return {layer: [(e / max(r, 1e-300)) ** 0.5 for e, r in rows] for layer, rows in sorted(self.sq.items())}

    def costs(self) -> dict[int, list[float]]:
        """layer -> entries per rung, relative to the dense entries of all sites (they add up to a plan's cost)."""
        total = max(sum(self.dense.values()), 1.0)
        return {layer: [e / total for e in rows] for layer, rows in sorted(self.entries.items())}


def site_table(model, windows: Sequence[Tensor], rungs: Sequence[Rung]) -> SiteTable:
    """Every rung at every attention layer of ``model`` over ``windows``, in one dense forward per
    window (the model's outputs stay dense: errors do not compound)."""
    table = SiteTable(tuple(rungs))
    attends = [None if cfg is None else dga_attend(cfg) for cfg in rungs]

    def attend(q, k, v, attn_mask, is_causal, scale, dropout_p):
        exact = sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p)
        outs = [exact if a is None else a(q, k, v, attn_mask, is_causal, scale, dropout_p) for a in attends]
        table.add(Call(q, k, v, attn_mask, is_causal, scale, dropout_p, current_site()), exact, outs)
        return exact

    run_windows(model, register_method("dga-calibrate", attend, sdpa), windows)
    return table


def layer_errors(model, windows: Sequence[Tensor], config: DGAConfig) -> dict[int, float]:
    """{layer_idx: relative error of DGA's attention output on the last half of the rows}."""
    return {layer: e[0] for layer, e in site_table(model, windows, [config]).errors().items()}


def run_windows(model, attn_implementation: str, windows: Sequence[Tensor]) -> None:
    """Dense-model forwards over ``windows`` with the HF attention ``attn_implementation`` (a
    measuring hook), then back to SDPA."""
    model.set_attn_implementation(attn_implementation)
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=ids)
    finally:
        model.set_attn_implementation("sdpa")


def worst_layers(errors: dict[int, float], k: int) -> tuple[int, ...]:
    """The ``k`` layers with the largest error, in layer order (a `DGAConfig.dense_layers`)."""
    return tuple(sorted(sorted(errors, key=errors.get, reverse=True)[:k]))


# ------------------------------------------------------------------------- the plan

def ladder(base: DGAConfig) -> tuple[Rung, ...]:
    """The candidate settings of every site (module docstring, step 1): the base's family, and
    with step 5′ on also the family of the same base without it (τ = 0, γ at least the default's:
    a diffuse site, whose expansion takes nearly every group, is cheaper with fixed focus sets);
    dense (None) last. Rungs equal to an earlier one are dropped."""
    families = [base]
    if base.expand_mass:
        families.append(base.replace(expand_mass=0.0, focus_ratio=max(base.focus_ratio, DGAConfig().focus_ratio)))
    rungs = [r.replace(plan=None, dense_layers=()) for family in families for r in _family(family)]
    return tuple(dict.fromkeys(rungs)) + (None,)


def _family(base: DGAConfig) -> list[DGAConfig]:
    """Half focus r/2 w/2; base; focus×2; w×2 (≥ 512); both. "Focus×2" doubles γ and, with step
    5′ on, halves the mass 1 − τ that expansion leaves out (τ = 0.8 → 0.9; half: 0.6)."""
    tau = base.expand_mass
    focus = {"focus_ratio": min(1.0, 2 * base.focus_ratio), "expand_mass": 1 - (1 - tau) / 2 if tau else 0.0}
    less = {"focus_ratio": base.focus_ratio / 2, "expand_mass": max(0.0, 1 - 2 * (1 - tau)) if tau else 0.0}
    window = max(2 * base.window, 512)
    half = base.replace(**less, num_probe=max(1, base.num_probe // 2), window=base.window // 2)
    return [half, base, base.replace(**focus), base.replace(window=window), base.replace(**focus, window=window)]


def choose(errors: Mapping[int, Sequence[float]], costs: Mapping[int, Sequence[float]], lam: float) -> dict[int, int]:
    """Per site, the rung minimising cost + λ·error² (ties: the smaller error, then the earlier rung)."""
    return {s: min(range(len(c)), key=lambda j: (c[j] + lam * errors[s][j] ** 2, errors[s][j], j))
            for s, c in costs.items()}


def plan_path(errors: Mapping[int, Sequence[float]], costs: Mapping[int, Sequence[float]]) -> list[dict[int, int]]:
    """The distinct `choose` results as λ grows from 0 to past the last point where a choice changes:
    from the cheapest rung of each site to its most accurate."""
    breaks = sorted({(c[k] - c[j]) / (errors[s][j] ** 2 - errors[s][k] ** 2)
                     for s, c in costs.items() for j in range(len(c)) for k in range(len(c))
                     if errors[s][j] > errors[s][k] and c[k] > c[j]})
    lams = [0.0] + [(a + b) / 2 for a, b in zip(breaks, breaks[1:])] + ([2 * breaks[-1]] if breaks else [])
    path: list[dict[int, int]] = []
    for lam in lams:
        chosen = choose(errors, costs, lam)
        if not path or chosen != path[-1]:
            path.append(chosen)
    return path


def cheapest_meeting(n: int, increase: Callable[[int], float], target: float) -> int:
    """Bisection over a path of ``n`` plans whose increase falls along it (the last meets any target
    ≥ 0: it is not measured): the first index ``i`` with ``increase(i) ≤ target``; plan i − 1 was
    measured and failed (or i = 0)."""
    if n < 1:
        raise ValueError("the path has no plan")
    if n == 1 or increase(0) <= target:
        return 0
    lo, hi = 0, n - 1                  # increase(lo) > target; hi meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if increase(mid) <= target else (mid, hi)
    return hi


def plan_of(chosen: Mapping[int, int], rungs: Sequence[Rung], base: DGAConfig,
            measured: Optional[dict] = None) -> Plan:
    """The `Plan` of a `choose` result: per site "dense" or the rung's op fields that differ from
    ``DGAConfig()`` or in which ``base`` does (so the site runs its rung over ``base`` and over
    the defaults alike; min_seq_len, when DGA applies, stays the user's)."""
    default = DGAConfig()
    fields = [f for f in PLAN_FIELDS if f != "min_seq_len"]
    own = {f for f in fields if getattr(base, f) != getattr(default, f)}
    entries = {}
    for site, j in chosen.items():
        cfg = rungs[j]
        entries[site] = DENSE if cfg is None else {f: getattr(cfg, f) for f in fields
                                                   if f in own or getattr(cfg, f) != getattr(default, f)}
    return Plan(entries, measured or {})


@dataclasses.dataclass
class Calibration:
    """What `calibrate` found: ``plan`` (None when only all-dense meets the target), the measured
    ``increase`` and ``cost`` of the plan chosen (or of the least dense plan tried, when none met
    it), the site ``table`` and every plan ``tried`` (path index, increase, cost)."""

    plan: Optional[Plan]
    increase: float
    cost: float
    table: SiteTable
    chosen: dict
    tried: list
    sites: list                # per site, as `cost.CostMeter.site_report` measured it for the plan chosen
    seconds: float


def calibrate(ev, base: DGAConfig, target: float, progress: Callable = lambda description: contextlib.nullcontext(),
              info: Optional[dict] = None) -> Calibration:
    """The cheapest plan whose measured last-half perplexity increase on ``ev``'s windows (an
    `Evaluation` built with ``between=True``: the calibration windows) is ≤ ``target`` (module
    docstring). ``progress(description)``: a context manager around the site measurement (the
    search shows ``ev``'s own progress); ``info``: more metadata for the plan file (model, text, ...)."""
    start = time.perf_counter()
    rungs = ladder(base)
    with progress(f"Measuring {len(rungs)} rungs at every site (one dense pass per window)"):
        table = site_table(ev.model, ev.task.items, rungs)
    errors, costs = table.errors(), table.costs()
    errors.pop(None, None), costs.pop(None, None)         # a layer without an index runs the base config
    path = plan_path(errors, costs)
    tried: dict[int, dict] = {}

    def measure(i: int) -> float:
        res = ev.run(Method("dga", base.replace(plan=plan_of(path[i], rungs, base))))
        tried[i] = {"index": i, "increase": res.delta_last_half, "cost": res.cost, "sites": res.sites}
        return res.delta_last_half

    best = cheapest_meeting(len(path), measure, target)      # ev's own progress bars show each run
    if best not in tried and not all(rungs[j] is None for j in path[best].values()):
        measure(best)                                          # the path ends in a plan with DGA sites
    met = best in tried and tried[best]["increase"] <= target
    got = tried.get(best) or tried.get(best - 1) or {"increase": 0.0, "cost": 1.0, "sites": []}
    runs = sorted(tried.values(), key=lambda t: t["index"])
    measured = {**(info or {}), "target": target, "increase": got["increase"], "cost": got["cost"],
                "base": base.budget(), "ladder": _names(rungs),
                "tried": [{k: v for k, v in t.items() if k != "sites"} for t in runs],
                "errors": {str(s): dict(zip(_names(rungs), e)) for s, e in errors.items()},
                "seconds": round(time.perf_counter() - start, 1)}
    plan = plan_of(path[best], rungs, base, measured) if met else None
    return Calibration(plan, got["increase"], got["cost"], table, path[best], runs, got["sites"],
                       measured["seconds"])


def _names(rungs: Sequence[Rung]) -> list[str]:
    return [DENSE if r is None else r.budget() for r in rungs]
