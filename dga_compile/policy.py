"""The site policy: whether one attention site becomes DGA, and why not; and the record of it.

One decision for every entry point: the rewrite (``torch.compile(backend="dga")``,
`dga_compile.rewrite`, ONNX export) asks `decide` for each attention site of a graph, the
Hugging Face integration (``attn_implementation="dga"``) for each layer call, each with what it
knows about the site (`SiteFacts`): the graph proves a sliding window from the mask it builds,
HF states it in the layer's ``sliding_window``. The knobs are `DGAConfig.dense_layers`,
`DGAConfig.plan` (per site "dense" or its own parameters: `DGAConfig.for_site`) and
`DGAConfig.min_saving`. A rewritten site runs `Decision.config`, the site's own config.
Exactness (γ = 1, Nk < min_seq_len) is the op's business, not policy.

Each entry point records its decisions as `Site` s in a `RewriteReport` (the rewrite's report,
``dga_compile.integrations.transformers.last_report`` for HF layers). The module sits below
``passes/`` and ``integrations/`` so that both ask the same function.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from ._validation import dga_applies
from .config import DGAConfig
from .errors import RewriteError

__all__ = ["Decision", "RewriteReport", "Site", "SiteFacts", "decide", "kept_fraction"]

log = logging.getLogger("dga_compile.passes")

WEIGHTS_USED = "attention weights have other users (e.g. output_attentions): they need dense attention"
CROSS = ("q and k/v come from different inputs (cross-attention): DGA weighs each group's keys with the "
         "query at the group's last key position and counts its window back from the query's own position, "
         "both defined for self-attention only; kept dense")
NOT_CAUSAL_UNKNOWN = ("not causal, and the graph does not show that q and k/v come from one sequence: if this "
                      "is cross-attention, keep it dense with DGAConfig.dense_layers")
NOT_CAUSAL = "bidirectional self-attention: DGA's window does not apply"


@dataclasses.dataclass(frozen=True)
class SiteFacts:
    """What an entry point knows about one attention site (None: not known).

    Attributes:
        position: the site's place in model order: the HF layer index (``layer_idx``, or the
            number in the module path such as ``model.layers.3.self_attn``), else its order
            among the graph's attention sites.
        nq, nk: query and key lengths when they are static.
        window: the mask limits each query to at most this many keys (a sliding window); it
            counts only when it is shorter than Nk (or Nk is not static).
        causal: True for ``is_causal`` or a causal mask, False when neither applies, None when a
            mask decides at run time.
        same_sequence: True when q and k/v are shown to come from one input (self-attention),
            False when from two (cross-attention), None when not shown.
        weights_used: the attention probabilities have other users (``output_attentions``).
    """

    position: Optional[int] = None
    nq: Optional[int] = None
    nk: Optional[int] = None
    window: Optional[int] = None
    causal: Optional[bool] = None
    same_sequence: Optional[bool] = None
    weights_used: bool = False


@dataclasses.dataclass(frozen=True)
class Decision:
    """``rewrite``: the site becomes DGA; ``reason``: why not, or notes for a rewritten site ("" if none);
    ``config``: what a rewritten site runs (`DGAConfig.for_site`), None for a dense one;
    ``uncalibrated``: a rewritten site runs approximate parameters that no plan entry set."""

    rewrite: bool
    reason: str = ""
    config: Optional[DGAConfig] = None
    uncalibrated: bool = False


def kept_fraction(config: DGAConfig, window: int) -> float:
    """The fraction of a ``window``-key sliding window DGA would attend: γ + 1/m + (w + m)/W, at most 1."""
    return min(1.0, config.focus_ratio + 1.0 / config.group_size + (config.window + config.group_size) / window)


def decide(facts: SiteFacts, config: DGAConfig) -> Decision:
    """Rewrite or keep dense, with the reason; the checks run in this order (first reason wins)."""
    if facts.weights_used:
        return Decision(False, WEIGHTS_USED)
    if None not in (facts.nq, facts.nk) and facts.nq != facts.nk:
        return Decision(False, f"Nq={facts.nq} ≠ Nk={facts.nk} (cross-attention or decode): DGA would compute "
                               f"dense attention anyway")
    if facts.same_sequence is False:
        return Decision(False, CROSS)
    if facts.position is not None and facts.position in config.dense_layers:
        return Decision(False, f"attention site {facts.position} is in DGAConfig.dense_layers="
                               f"{config.dense_layers}: kept dense")
    site = config.for_site(facts.position)
    if site is None:
        return Decision(False, f"plan {config.plan.name}: site {facts.position} dense")
    if facts.window and (facts.nk is None or facts.window < facts.nk):  # a window ≥ Nk limits nothing
        kept = kept_fraction(site, facts.window)
        if 1.0 - kept < site.min_saving:
            return Decision(False, f"the mask limits each query to a sliding window of {facts.window} keys: DGA "
                                   f"would attend ≈{kept:.0%} of them, saving less than "
                                   f"min_saving={site.min_saving:g}")
    planned = config.plan is not None and config.plan.entry(facts.position) is not None
    loose = not planned and not _exact(site, facts.nk)
    if facts.causal is False:
        return Decision(True, NOT_CAUSAL if facts.same_sequence else NOT_CAUSAL_UNKNOWN, site, loose)
    return Decision(True, "", site, loose)


def _exact(config: DGAConfig, nk: Optional[int]) -> bool:
    """γ = 1, m = 1, or a static key length the op computes densely (`dga_applies`): dense attention exactly."""
    return config.focus_ratio >= 1.0 or config.group_size == 1 or (
        nk is not None and not dga_applies(nk, nk, config.min_seq_len))


UNCALIBRATED = ("{n} of {total} DGA site(s) run parameters no calibration chose ({example}): on the real "
                "models measured, uncalibrated DGA raised last-half perplexity by more than 5% (SmolLM2-135M "
                "at 4K: defaults +9%; Gemma 3 270M with sliding-window layers: +24%; docs/ACCURACY.md), "
                "because one focus set and fixed budgets miss what some heads attend to. Measure this model "
                "with `dga-compile eval MODEL`; bound the loss with `dga-compile calibrate MODEL "
                "--max-increase 2%` and DGAConfig(plan=...) (backend: options={{'plan': PATH}})")


# ---------------------------------------------------------------------------- the record

@dataclasses.dataclass(frozen=True)
class Site:
    """One attention site (or near miss) in a graph.

    Attributes:
        rule: the rule family that saw it: ``"sdpa"`` (a fused SDPA call) or ``"matmul-softmax"``.
        tags: the variant, e.g. ``("aten:flash_cpu",)`` or ``("kT:transpose", "scale:div", "mask:add")``.
        module: module path from ``nn_module_stack`` ("" when unknown).
        q_shape, k_shape, v_shape: shapes from ``meta["val"]`` (symbols print as names).
        mask: ``"none"``, ``"bool"``, ``"additive"`` (proven 0 / masked), ``"input"`` (a graph
            input the op checks at run time) or ``"bias"`` (finite biases: not DGA-compatible).
        causal: ``"yes"`` (is_causal), ``"no"``, or ``"mask"`` (whatever the mask says).
        rewritten: whether the site now calls ``torch.ops.dga.attention``.
        reason: why not (or, for rewritten sites, notes such as the derived scale).
        node: name of the graph node that anchors the site.
        position: the site's place in model order, as `SiteFacts.position` (the layer
            index for HF models); what `DGAConfig.dense_layers` and `DGAConfig.plan` name.
        budget: a rewritten site's parameters (`DGAConfig.budget`), "" for a dense one.
        uncalibrated: rewritten with approximate parameters no plan entry set (`RewriteReport.warnings`).
    """

    rule: str
    tags: tuple[str, ...]
    module: str
    q_shape: Optional[tuple]
    k_shape: Optional[tuple]
    v_shape: Optional[tuple]
    mask: str
    causal: str
    rewritten: bool
    reason: str
    node: str
    position: Optional[int] = None
    budget: str = ""
    uncalibrated: bool = False

    def describe(self) -> str:
        where = self.module or self.node
        state = (f"rewritten ({self.budget})" if self.budget else "rewritten") if self.rewritten else \
            f"left dense: {self.reason}"
        return f"{where} [{self.rule} {'/'.join(self.tags)}] q{_shape(self.q_shape)} mask={self.mask} " \
               f"causal={self.causal}: {state}"


def _shape(s: Optional[tuple]) -> str:
    return "?" if s is None else "[" + ", ".join(str(d) for d in s) + "]"


@dataclasses.dataclass
class RewriteReport:
    """The sites of one or more graphs (the backend appends one graph after another)."""

    sites: list[Site] = dataclasses.field(default_factory=list)

    @property
    def num_rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def dense(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]

    def extend(self, other: "RewriteReport") -> None:
        self.sites.extend(other.sites)

    def summary(self) -> str:
        return f"{self.num_rewritten} of {len(self.sites)} attention sites rewritten into DGA"

    @property
    def warnings(self) -> list[str]:
        """What may cost this model accuracy, each with why and what to do: rewritten sites whose
        approximate parameters no plan set (`UNCALIBRATED`)."""
        loose = [s for s in self.sites if s.rewritten and s.uncalibrated]
        if not loose:
            return []
        total = sum(s.rewritten for s in self.sites)
        return [UNCALIBRATED.format(n=len(loose), total=total, example=loose[0].budget)]

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  " + s.describe() for s in self.sites]
                         + [f"warning: {w}" for w in self.warnings])

    def log(self) -> None:
        """Logs one line per site on the ``dga_compile.passes`` logger (dense sites and `warnings` at WARNING)."""
        log.info(self.summary())
        for s in self.sites:
            (log.info if s.rewritten else log.warning)("dga: %s", s.describe())
        for w in self.warnings:
            log.warning("dga: %s", w)

    def table(self):
        """The report as a `rich.table.Table`."""
        from rich.table import Table

        t = Table(title=f"dga-compile: {self.summary()}")
        for col in ("module", "rule", "q / k / v", "mask", "causal", "rewritten", "budget", "reason"):
            t.add_column(col, overflow="fold")
        for s in self.sites:
            shapes = " ".join(_shape(x) for x in (s.q_shape, s.k_shape, s.v_shape))
            t.add_row(s.module or s.node, f"{s.rule} {'/'.join(s.tags)}", shapes, s.mask, s.causal,
                      "yes" if s.rewritten else "no", s.budget, s.reason)
        if self.warnings:
            t.caption = "\n".join(f"warning: {w}" for w in self.warnings)
        return t

    def print(self, console=None) -> None:
        """Prints `table` with rich (to stderr unless a console is given)."""
        from rich.console import Console

        (console or Console(stderr=True)).print(self.table())

    def raise_if_dense(self) -> None:
        if self.dense:
            lines = "\n".join("  " + s.describe() for s in self.dense)
            raise RewriteError(f"{len(self.dense)} attention site(s) could not be rewritten into DGA "
                               f"(DGAConfig(strict=True)):\n{lines}")
