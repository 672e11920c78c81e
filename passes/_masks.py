"""Mask tracing: what the graph proves about an attention mask.

`MaskTracer.facts` folds over the ops that build a mask (`MASK_STEPS`) and returns `MaskFacts`:
its kind (a float mask is DGA-compatible when every entry is 0 or masked, ≤ −1e4), a sliding
window (each query sees at most W keys) and whether it is causal (hides every later key). A
mask is read in one of two senses: ``"attend"`` (bool True = may attend, or additive float) or
``"fill"`` (bool True = masked, as ``masked_fill`` takes it). Window and causality feed only
the site policy and the report; the op itself checks masks that are graph inputs at run time.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch import fx

from .._validation import MASKED_BELOW, causal_like, finite_bias
from . import _graph as g
from ._graph import aten
from ._walk import Stop, Walker

__all__ = ["MASK_KINDS", "MaskFacts", "MaskTracer"]

#: mask kinds, worst last: "input" is a float graph input the op checks at run time, "bias"
#: holds finite additive biases (ALiBi, T5): not DGA-compatible
MASK_KINDS = ("none", "bool", "additive", "input", "bias")

_OR = g.family(operator.or_, torch.logical_or, torch.bitwise_or, "__or__", "logical_or", "bitwise_or",
               aten.logical_or, aten.bitwise_or, aten.__or__)
_TRIU = g.family(torch.triu, "triu", aten.triu)
_TRI = g.TRIL | _TRIU
_COMPARE = g.GT | g.GE | g.LT | g.LE
# a OP b  <=>  b FLIP[OP] a
_FLIP = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
# in the fill sense (True = masked), a OP b hides what NOT(a OP b) = a NEGATE[OP] b shows
_NEGATE = {"gt": "le", "ge": "lt", "lt": "ge", "le": "gt"}


@dataclasses.dataclass(frozen=True)
class MaskFacts:
    """``kind`` (one of `MASK_KINDS`); ``window``: each query sees at most this many keys (None:
    not shown); ``causal``: the mask hides every key after the query."""

    kind: str = "none"
    window: Optional[int] = None
    causal: bool = False

    def __and__(self, other: "MaskFacts") -> "MaskFacts":
        """Both masks apply (a sum of additive masks, an AND of bool masks)."""
        windows = [w for w in (self.window, other.window) if w is not None]
        return MaskFacts(max(self.kind, other.kind, key=MASK_KINDS.index), min(windows) if windows else None,
                         self.causal or other.causal)

    def kind_only(self) -> "MaskFacts":
        return MaskFacts(self.kind)


def _op_name(node: fx.Node) -> str:
    return next(n for n, fam in (("gt", g.GT), ("ge", g.GE), ("lt", g.LT), ("le", g.LE)) if g.is_op(node, fam))


def _axis(x: Any) -> Optional[str]:
    """"kv" for an index that varies along the last dim only ([.., 1, N]), "q" for one along dim −2 ([.., N, 1])."""
    s = g.shape(x)
    if s is None or len(s) == 0:
        return None
    last_one = g.known_equal(s[-1], 1)
    second_one = len(s) < 2 or g.known_equal(s[-2], 1)
    if second_one and not last_one:
        return "kv"
    if last_one and not second_one:
        return "q"
    return None


def _offset(x: Any) -> tuple:
    """(base, c) for x = base + c with a constant c (x itself and 0 otherwise)."""
    if g.is_op(x, g.ADD | g.SUB) and g.constant(x.args[1]) is not None and isinstance(x.args[0], fx.Node):
        c = g.constant(x.args[1])
        return x.args[0], (c if g.is_op(x, g.ADD) else -c)
    return x, 0.0


def _relation(op: str, d: float) -> MaskFacts:
    """Facts of ``kv − q OP d`` as the visible set."""
    if op == "le" and d <= 0 or op == "lt" and d <= 1:
        return MaskFacts("bool", causal=True)
    if op in ("gt", "ge") and d < 0:
        return MaskFacts("bool", window=int(-d) + (op == "ge"))
    return MaskFacts("bool")


class MaskTracer:
    """Folds mask expressions through one `Walker`; ``consts`` maps node names to the constant
    tensors they stand for (buffers, lifted constants)."""

    def __init__(self, walker: Walker, consts: dict):
        self.walker, self.consts = walker, consts
        #: the ops a mask is built from: (family, handler(node, sense) -> MaskFacts or None)
        self.steps = (
            (g.CAST, self._cast),         # bool -> float gives 0 / 1 (a bias); other casts keep 0 / masked
            (g.ADD, self._add),           # m1 + m2: visible where both are
            (g.WHERE, self._where),       # where(c, 0, −∞): visible where c
            (g.MASKED_FILL, self._fill),  # masked_fill(m, c, −∞): hidden where c
            (g.MUL, self._scaled),        # (1 − b)·finfo.min with b ∈ {0, 1}: the classic extended mask
            (g.AND, self._and),           # a & b: visible where both are (in the fill sense: hidden where both)
            (_OR, self._or),              # a | b: hidden where either is (fill sense)
            (g.NOT, self._not),           # ~a: attend <-> fill
            (_COMPARE, self._compare),    # kv ≤ q: causal; kv > q − W or q − kv < W: a window of W keys
            (_TRI, self._tri),            # ones(N, N).tril() (attend), .triu(1) (fill) / of −∞ (additive): causal
        )

    def site(self, masks: list) -> MaskFacts:
        """The facts of all ``(node, sense)`` masks of a site together."""
        out = MaskFacts()
        for node, sense in masks:
            out = out & self.facts(node, sense)
        return out

    def facts(self, x: Any, sense: str = "attend") -> MaskFacts:
        def step(node):
            for fam, handler in self.steps:
                if g.is_op(node, fam):
                    r = handler(node, sense)
                    return None if r is None else Stop(r)
            return None

        if not isinstance(x, fx.Node):
            return self._constant(g.constant(x))
        trail = self.walker.up(x, step)
        return trail.value if trail.value is not None else self._leaf(trail.end)

    # leaves -------------------------------------------------------------------------------

    @staticmethod
    def _constant(c: Optional[float]) -> MaskFacts:
        return MaskFacts("additive" if g.is_zero(c) or g.is_masked_value(c) else "bias")

    def _leaf(self, x: Optional[fx.Node]) -> MaskFacts:
        if x is None:
            return MaskFacts("bias")
        v = g.tensor_val(x)
        is_bool = v is not None and v.dtype == torch.bool
        if x.name in self.consts:
            t = self.consts[x.name]
            vis = t if t.dtype == torch.bool else t > MASKED_BELOW
            causal = t.dim() >= 2 and causal_like(vis, False)
            if t.dtype == torch.bool:
                return MaskFacts("bool", causal=causal)
            return MaskFacts("bias" if bool(finite_bias(t).any()) else "additive", causal=causal)
        if is_bool:
            return MaskFacts("bool")
        if x.op == "placeholder":
            return MaskFacts("input")
        c = g.constant(x)
        return MaskFacts("bias") if c is None else self._constant(c)

    # handlers ------------------------------------------------------------------------------

    def _cast(self, x: fx.Node, sense: str) -> Optional[MaskFacts]:
        src, out = g.tensor_val(x.args[0]), g.tensor_val(x)
        if src is not None and out is not None and src.dtype == torch.bool and out.dtype != torch.bool:
            return MaskFacts("bias")  # True -> 1.0: added to the scores, a bias
        return None  # a pass-through op: the walker steps over it

    def _add(self, x: fx.Node, sense: str) -> MaskFacts:
        return self.facts(x.args[0]) & self.facts(x.args[1])

    def _where(self, x: fx.Node, sense: str) -> MaskFacts:
        if len(x.args) != 3:
            return MaskFacts("bias")
        cond, a, b = x.args
        fa, fb = self.facts(a).kind_only(), self.facts(b).kind_only()
        if g.is_masked_value(g.constant(b)):
            return fa & fb & self.facts(cond, "attend")
        if g.is_masked_value(g.constant(a)):
            return fa & fb & self.facts(cond, "fill")
        return fa & fb

    def _fill(self, x: fx.Node, sense: str) -> MaskFacts:
        value = g.arg(x, 2, "value")
        out = self.facts(x.args[0]) & self.facts(value).kind_only()
        return out & self.facts(g.arg(x, 1, "mask"), "fill") if g.is_masked_value(g.constant(value)) else out

    def _scaled(self, x: fx.Node, sense: str) -> MaskFacts:
        a, b = x.args[0], x.args[1]
        c, other = (g.constant(b), a) if g.constant(b) is not None else (g.constant(a), b)
        return MaskFacts("additive" if g.is_masked_value(c) and self._binary(other) else "bias")

    def _binary(self, x: Any) -> bool:
        """Whether every entry of ``x`` is 0 or 1 (a bool, or 1 − such a tensor, in any float type)."""
        def step(node):
            v = g.tensor_val(node)
            if v is not None and v.dtype == torch.bool:
                return Stop(True)
            if g.is_op(node, g.SUB) and g.constant(node.args[0]) == 1.0:
                return node.args[1]
            if g.is_op(node, g.SUB) and g.constant(node.args[1]) == 1.0 and "rsub" in str(node.target):
                return node.args[0]
            return None
        return bool(self.walker.up(x, step).value)

    def _and(self, x: fx.Node, sense: str) -> MaskFacts:
        if sense == "fill":
            return MaskFacts("bool")
        return self.facts(x.args[0]) & self.facts(x.args[1])

    def _or(self, x: fx.Node, sense: str) -> MaskFacts:
        if sense == "attend":
            return MaskFacts("bool")
        return self.facts(x.args[0], "fill") & self.facts(x.args[1], "fill")

    def _not(self, x: fx.Node, sense: str) -> MaskFacts:
        return self.facts(x.args[0], "fill" if sense == "attend" else "attend")

    def _compare(self, x: fx.Node, sense: str) -> MaskFacts:
        op = _op_name(x)
        if sense == "fill":
            op = _NEGATE[op]
        a, b = x.args[0], x.args[1]
        (ba, ca), (bb, cb) = _offset(a), _offset(b)
        axes = (_axis(ba), _axis(bb))
        if axes == ("kv", "q"):       # kv + ca OP q + cb  <=>  kv − q OP cb − ca
            return _relation(op, cb - ca)
        if axes == ("q", "kv"):       # q + ca OP kv + cb  <=>  kv − q FLIP[OP] ca − cb
            return _relation(_FLIP[op], ca - cb)
        for diff, c, o in ((a, g.constant(b), op), (b, g.constant(a), _FLIP[op])):  # (q − kv) OP c
            if g.is_op(diff, g.SUB) and c is not None and None not in (_axis(diff.args[0]), _axis(diff.args[1])):
                first = _axis(diff.args[0])
                return _relation(_FLIP[o], -c) if first == "q" else _relation(o, c)
        return self._unoriented(op, a, b)

    @staticmethod
    def _unoriented(op: str, a: Any, b: Any) -> MaskFacts:
        """A window comparison whose index axes the shapes do not show: ``kv > q − W`` or
        ``q − kv < W`` (the HF spellings), read as a window of W keys."""
        lower, upper = (a, b) if op in ("lt", "le") else (b, a)
        c_upper = g.constant(upper)
        if g.is_op(lower, g.SUB) and c_upper is not None and c_upper > 0:  # q − kv < W
            return MaskFacts("bool", window=int(c_upper))
        c_sub = g.constant(lower.args[1]) if g.is_op(lower, g.SUB) else None
        if isinstance(upper, fx.Node) and c_sub is not None and c_sub > 0:  # q − W < kv
            return MaskFacts("bool", window=int(c_sub))
        return MaskFacts("bool")

    def _tri(self, x: fx.Node, sense: str) -> MaskFacts:
        """tril / triu keep x below / above a diagonal and zero the rest."""
        d = g.constant(g.arg(x, 1, "diagonal", 0))
        inner = self.facts(x.args[0]).kind_only() if g.tensor_val(x).dtype != torch.bool else MaskFacts("bool")
        upper = g.is_op(x, _TRIU)
        if d is None:
            return inner
        masked_above = g.is_masked_value(g.constant(x.args[0]))  # triu(full(−∞), 1): −∞ above the diagonal
        causal = (sense == "attend" and inner.kind == "bool" and not upper and d <= 0) or \
                 (sense == "fill" and inner.kind == "bool" and upper and d >= 1) or \
                 (sense == "attend" and upper and d >= 1 and masked_above)
        return MaskFacts(inner.kind, causal=causal)
