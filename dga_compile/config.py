"""`DGAConfig`: the one options object of dga-compile (see docs/dga.md for the semantics)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Literal, Optional, Union

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["DGAConfig", "IMPLEMENTATIONS", "INT64_MAX", "MAX_GROUP_BIAS", "MAX_GROUP_SIZE", "OP_FIELDS"]

#: Values of `DGAConfig.impl`: "auto" or the name of an entry of `dga_compile.dispatch.TABLE`.
IMPLEMENTATIONS = ("auto", "reference", "blocked", "cpp", "triton")

#: The `DGAConfig` fields the op ``torch.ops.dga.attention`` carries as arguments, in argument
#: order (`dga_compile.ops.OpCall` builds and parses them); the other fields are rewrite policy.
OP_FIELDS = ("focus_ratio", "group_size", "num_probe", "window", "group_bias", "min_seq_len", "sinks", "expand_mass",
             "expand_bias", "query_block", "expand_max", "impl")

#: Largest integer an op field may hold: the op's schema types them int64.
INT64_MAX = 2**63 - 1
#: Largest group size: the kernels index groups with int32 (an m beyond N only means no group).
MAX_GROUP_SIZE = 2**31 - 1
#: Largest β: β·log m stays below float16's maximum (65504) for every int64 m (log m < 43.7).
MAX_GROUP_BIAS = 1000.0


@dataclasses.dataclass(frozen=True)
class DGAConfig:
    """Parameters of Dynamic Group Attention and of the rewrite that inserts it.

    Every field is validated on construction (`ValueError` naming the value and the fix); the
    integer fields the op carries are at most 2**63 − 1 (its schema is int64).

    Attributes:
        focus_ratio: γ, the fraction of keys kept as focus tokens, ``n_f = ceil(γ·Nk)``; in [0, 1].
            ``1.0`` gives exact dense attention.
        group_size: m, non-focus tokens aggregated into one key/value pair; in [1, 2**31 − 1].
            ``1`` gives exact dense attention.
        num_probe: r, how many of the last query rows score key importance; ≥ 1.
        window: w, a group is used by query i only if its anchor ≤ i − w (causal sites only);
            younger groups stay raw. ≥ 0.
        group_bias: β in [0, 1000], added as β·log(m) to every group logit (β = 1: a group stands
            for the mass of its m members; β = 0: the plain reading). 0.25 measured best on a
            pretrained model without fine-tuning (docs/ACCURACY.md). The bound keeps β·log m
            finite even in float16 for any int64 m.
        min_seq_len: below this key length the op computes exact dense attention; ≥ 0.
        sinks: s, the first s positions are always focus tokens, besides the ceil(γ·Nk) chosen by
            score (``n_f = min(Nk, s + ceil(γ·Nk))``); ≥ 0.
        expand_mass: τ in [0, 1), step 5′ (docs/dga.md): per query block and query head, the
            groups that carry all but 1 − τ of some row's estimated group mass are expanded
            (their members attend raw). ``0`` turns the step off (the paper's DGA).
        expand_bias: βe in [0, 1000], the group bias of step 5′'s estimate (βe·log m).
        query_block: b ≥ 1, the query rows per block of step 5′ ([0, b), [b, 2b), …).
        expand_max: in (0, 1]; a (block, head) whose expansion E exceeds this share of the
            groups complete for the block's last row attends densely.
        impl: which implementation runs the op (`dga_compile.dispatch`): ``"auto"`` (the first
            that applies: Triton on CUDA, the C++ kernel for CPU inference, else blocked),
            ``"reference"`` (the spec in plain PyTorch), ``"blocked"`` (the blocked PyTorch
            algorithm), ``"cpp"`` (the C++ CPU kernel) or ``"triton"``. A named implementation
            that cannot take a call falls back to "auto"'s choice with one ``NYI:`` warning.
        min_saving: rewrite policy; a site is rewritten only when DGA would attend to at most
            ``1 - min_saving`` of the keys dense attention attends to (judged from what the
            graph proves about the mask, e.g. a sliding window). In [0, 1).
        dense_layers: rewrite policy; attention sites kept dense, by position in model order
            (the HF layer index; in a traced graph, the order of its attention sites). Which
            layers lose most under DGA is model-specific: ``dga-compile eval MODEL --calibrate K``
            measures it and prints the K worst (docs/ACCURACY.md, "Per-layer budget").
        plan: rewrite policy; a `dga_compile.plan.Plan` (or the path of a plan file, loaded on
            construction): per site, "dense" or its own op parameters (``dga-compile calibrate``
            measures one). `for_site` applies it; a site in ``dense_layers`` stays dense.
        strict: raise `dga_compile.RewriteError` when an attention site cannot be rewritten.
        report: print the rewrite report (a rich table) when the backend compiles a graph.
    """

    focus_ratio: float = 0.1
    group_size: int = 16
    num_probe: int = 128
    window: int = 256
    group_bias: float = 0.25
    min_seq_len: int = 1024
    impl: Literal["auto", "reference", "blocked", "cpp", "triton"] = "auto"
    sinks: int = 0
    expand_mass: float = 0.0
    expand_bias: float = 1.0
    query_block: int = 64
    expand_max: float = 1.0
    min_saving: float = 0.25
    dense_layers: tuple[int, ...] = ()
    plan: Optional["Plan"] = None
    strict: bool = False
    report: bool = False

    def __post_init__(self) -> None:
        _validate_range("focus_ratio", self.focus_ratio, 0.0, 1.0, "a fraction such as 0.1")
        _validate_int("group_size", self.group_size, 1, "e.g. 16 (1 means dense)", MAX_GROUP_SIZE)
        _validate_int("num_probe", self.num_probe, 1, "e.g. 128")
        _validate_int("window", self.window, 0, "e.g. 256 (0 disables the local window)")
        _validate_range("group_bias", self.group_bias, 0.0, MAX_GROUP_BIAS, "0.0 or 1.0")
        _validate_int("min_seq_len", self.min_seq_len, 0, "e.g. 1024 (0 applies DGA always)")
        _validate_int("sinks", self.sinks, 0, "e.g. 4 (0: no sinks)")
        _validate_range("expand_mass", self.expand_mass, 0.0, 1.0, "e.g. 0.8 (0 turns expansion off)", hi_open=True)
        _validate_range("expand_bias", self.expand_bias, 0.0, MAX_GROUP_BIAS, "e.g. 1.0")
        _validate_int("query_block", self.query_block, 1, "e.g. 64")
        _validate_range("expand_max", self.expand_max, 0.0, 1.0, "e.g. 1.0 (0.5: dense above half)", lo_open=True)
        _validate_range("min_saving", self.min_saving, 0.0, 1.0, "e.g. 0.25", hi_open=True)
        layers = self.dense_layers
        if not isinstance(layers, (tuple, list)) or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise ValueError(f"DGAConfig.dense_layers must be a tuple of layer indices ≥ 0, got {layers!r}; "
                             f"use e.g. (0, 7, 18)")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"DGAConfig.impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        for name in ("strict", "report"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DGAConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.plan is not None:
            object.__setattr__(self, "plan", _validate_plan(self.plan))

    def replace(self, **changes) -> "DGAConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def for_site(self, position: Optional[int]) -> Optional["DGAConfig"]:
        """What the attention site at ``position`` (model order, as `dense_layers`) runs: None when
        it is kept dense (in `dense_layers`, or "dense" in the plan), else its config: the plan's
        values for the site's op fields, no plan. An unknown position (None) runs this config."""
        if position is not None and position in self.dense_layers:
            return None
        return self if self.plan is None else self.plan.site_config(position, self)

    def budget(self) -> str:
        """The op parameters in short, e.g. ``"γ=0.1 m=16 w=256 β=0.25 r=128"`` (sinks and step 5′ when on)."""
        sinks = f" s={self.sinks}" if self.sinks else ""
        expand = (f" τ={self.expand_mass:g} βe={self.expand_bias:g} b={self.query_block} max={self.expand_max:g}"
                  if self.expand_mass else "")
        return (f"γ={self.focus_ratio:g} m={self.group_size} w={self.window} β={self.group_bias:g} "
                f"r={self.num_probe}{sinks}{expand}")


def _validate_plan(plan: Union["Plan", str, os.PathLike]) -> "Plan":
    from .plan import Plan

    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"DGAConfig.plan must be a dga_compile.plan.Plan or the path of a plan file, got "
                        f"{type(plan).__name__} {plan!r}; use e.g. DGAConfig(plan='plan.json') (written by "
                        f"`dga-compile calibrate MODEL`)")
    return plan


def _validate_range(name, value, lo, hi, example, hi_open=False, lo_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"DGAConfig.{name} must be a number in {interval}, got {value!r}; use {example}")


def _validate_int(name, value, lo, example, hi=INT64_MAX):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"DGAConfig.{name} must be an integer in [{lo}, {hi}], got {value!r}; use {example}")
