"""`RewriteReport`: every attention site the passes found or nearly found, and what became of it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from ..errors import RewriteError

__all__ = ["RewriteReport", "Site"]

log = logging.getLogger("dga_compile.passes")


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
        position: the site's place in model order, as `policy.SiteFacts.position` (the layer
            index for HF models); what `DGAConfig.dense_layers` names.
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

    def describe(self) -> str:
        where = self.module or self.node
        state = "rewritten" if self.rewritten else f"left dense: {self.reason}"
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

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  " + s.describe() for s in self.sites])

    def log(self) -> None:
        """Logs one line per site on the ``dga_compile.passes`` logger (dense sites at WARNING)."""
        log.info(self.summary())
        for s in self.sites:
            (log.info if s.rewritten else log.warning)("dga: %s", s.describe())

    def table(self):
        """The report as a `rich.table.Table`."""
        from rich.table import Table

        t = Table(title=f"dga-compile: {self.summary()}")
        for col in ("module", "rule", "q / k / v", "mask", "causal", "rewritten", "reason"):
            t.add_column(col, overflow="fold")
        for s in self.sites:
            shapes = " ".join(_shape(x) for x in (s.q_shape, s.k_shape, s.v_shape))
            t.add_row(s.module or s.node, f"{s.rule} {'/'.join(s.tags)}", shapes, s.mask, s.causal,
                      "yes" if s.rewritten else "no", s.reason)
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
