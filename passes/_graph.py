"""Small FX helpers shared by the rules: op families, argument access, metadata, constants.

Graphs come at two levels: Dynamo's torch-level graphs (``call_function`` on torch functions,
``call_method`` on tensor methods, metadata under ``meta["example_value"]``) and ATen graphs
(aot_autograd, make_fx, torch.export: OpOverloads, metadata under ``meta["val"]``). An op family
is a frozenset holding the targets of both levels; method names are strings, which only
``call_method`` nodes carry.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import fx

from .._validation import MASKED_BELOW

aten = torch.ops.aten

_ATTEND = 0.0  # additive mask value that attends; ≤ MASKED_BELOW is masked


def family(*targets) -> frozenset:
    """An op family; OpOverloadPackets are expanded to all their overloads."""
    out = set()
    for t in targets:
        if isinstance(t, torch._ops.OpOverloadPacket):
            out.update(getattr(t, name) for name in t.overloads())
        else:
            out.add(t)
    return frozenset(out)


SOFTMAX = family(torch.softmax, torch.nn.functional.softmax, torch.special.softmax, "softmax",
                 aten._softmax, aten.softmax, aten._safe_softmax)  # _safe_softmax: fully masked rows -> 0, as the op
MATMUL = family(torch.matmul, operator.matmul, "matmul", "__matmul__", aten.matmul, torch.bmm, "bmm", aten.bmm)
EINSUM = family(torch.einsum, torch.functional.einsum, aten.einsum)
TRANSPOSE = family(torch.transpose, "transpose", aten.transpose, torch.swapaxes, "swapaxes", torch.swapdims,
                   "swapdims", aten.swapaxes, aten.swapdims)
PERMUTE = family(torch.permute, "permute", aten.permute)
MT = family(aten.mT)  # x.mT; in Dynamo graphs getattr(x, "mT") (see `is_mT`)
MUL = family(operator.mul, torch.mul, "mul", "__mul__", aten.mul)
DIV = family(operator.truediv, torch.div, torch.true_divide, "div", "__truediv__", "true_divide", aten.div)
ADD = family(operator.add, torch.add, "add", "__add__", aten.add)
SUB = family(operator.sub, torch.sub, "sub", "__sub__", "__rsub__", aten.sub, aten.rsub)
NEG = family(operator.neg, torch.neg, "neg", "__neg__", aten.neg)
MASKED_FILL = family(torch.masked_fill, "masked_fill", aten.masked_fill)
WHERE = family(torch.where, aten.where)
DROPOUT = family(torch.nn.functional.dropout, torch.dropout, aten.dropout, aten.native_dropout)
# dtype casts: a softmax computed in float32 and cast back is the usual mixed-precision spelling
CAST = family("to", "type", "float", "half", "bfloat16", aten._to_copy, aten.to, torch.ops.prims.convert_element_type)
# row-major reshapes (their output shape says how dims merge or split; (un)squeeze add or drop size-1 dims)
RESHAPE = family("view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", torch.reshape, torch.flatten,
                 torch.unflatten, torch.unsqueeze, torch.squeeze, aten.view, aten.reshape, aten._unsafe_view,
                 aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze)
# broadcasts: size-1 dims repeated
EXPAND = family("expand", "expand_as", aten.expand, aten.expand_copy)
# copies and aliases: same values, same shape
COPY = family("contiguous", "clone", "detach", torch.detach, torch.clone, aten.clone, aten.contiguous, aten.alias,
              aten.detach, aten.detach_)
INDEX = family(operator.getitem, "__getitem__")
# ops that keep values and only change layout or shape (slices and repeats keep some of them)
LAYOUT = RESHAPE | EXPAND | COPY | INDEX | family(aten.slice, "repeat", aten.repeat)
# users that only read metadata (shape, dtype), never values
META_ONLY = family(aten._assert_tensor_metadata, aten.sym_size, aten.sym_stride, aten.sym_numel, "size", "dim")
NOT = family(torch.logical_not, "logical_not", "__invert__", operator.invert, torch.bitwise_not, "bitwise_not",
             aten.logical_not, aten.bitwise_not)
AND = family(operator.and_, torch.logical_and, torch.bitwise_and, "__and__", "logical_and", "bitwise_and",
             aten.logical_and, aten.bitwise_and, aten.__and__)
GT = family(operator.gt, torch.gt, "gt", "__gt__", aten.gt)
GE = family(operator.ge, torch.ge, "ge", "__ge__", aten.ge)
LT = family(operator.lt, torch.lt, "lt", "__lt__", aten.lt)
LE = family(operator.le, torch.le, "le", "__le__", aten.le)
EQ = family(aten.eq, operator.eq, "eq", "__eq__")
TRIL = family(torch.tril, "tril", aten.tril)
# projections x·Wᵀ (+ b): the activation they read is argument `PROJECTION_INPUT[target]`
LINEAR = family(torch._C._nn.linear, torch.nn.functional.linear, aten.linear, aten.addmm, torch.addmm, aten.mm, torch.mm)
PROJECTION_INPUT = {t: (1 if t in family(aten.addmm, torch.addmm) else 0) for t in LINEAR}
NORM = family(torch.nn.functional.layer_norm, torch.layer_norm, aten.layer_norm, aten.native_layer_norm,
              torch.nn.functional.rms_norm, torch.rms_norm, aten.rms_norm, torch.nn.functional.group_norm)
# constant fills: target -> (index, name) of the fill value; None means the fill is 0
_FILL_ARG = {
    **{t: None for t in family(torch.zeros, torch.zeros_like, "new_zeros", "zero_", aten.zeros, aten.zeros_like,
                               aten.new_zeros)},
    **{t: (1, "fill_value") for t in family(torch.full, torch.full_like, aten.full, aten.full_like)},
    **{t: (2, "fill_value") for t in family("new_full", aten.new_full)},
    **{t: (0, "data") for t in family(torch.tensor, torch.scalar_tensor, aten.scalar_tensor, aten.lift_fresh_copy)},
}
FILL_CONST = frozenset(_FILL_ARG)


def is_op(node: Any, fam: frozenset) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in fam


def is_mT(node: Any) -> bool:
    """``x.mT``: ``aten.mT`` or, in Dynamo graphs, ``getattr(x, "mT")``."""
    return is_op(node, MT) or (isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr
                                and node.args[1:] == ("mT",))


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of ``node``, given positionally at ``index`` or as a keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def val(node: Any) -> Any:
    """The fake value of a node (``meta["val"]`` at ATen level, ``meta["example_value"]`` in Dynamo)."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def shape(node: Any) -> Optional[tuple]:
    v = tensor_val(node)
    return None if v is None else tuple(v.shape)


def static_int(x: Any) -> Optional[int]:
    """``x`` as a Python int when it is one (not a symbol), else None."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x) if x.node.is_constant() else None
        except AttributeError:  # pragma: no cover - older SymNode
            return None
    return None


def module_path(node: fx.Node) -> str:
    """The innermost module that produced ``node`` ("" at top level), from ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']", "L['args'][0].", "L['mod']."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return path.replace("._modules['", ".").replace("']", "")


#: meta key of placeholders / get_attr nodes that hold a known one-element tensor (set by the rewrite)
CONSTANT_KEY = "dga_constant"


def constant(x: Any) -> Optional[float]:
    """A Python number for ``x`` when the graph fixes it: a literal or a scalar constant tensor."""
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    if CONSTANT_KEY in x.meta:
        return x.meta[CONSTANT_KEY]
    if is_op(x, FILL_CONST):
        where = _FILL_ARG[x.target]
        return 0.0 if where is None else constant(arg(x, *where))
    v = tensor_val(x)
    if v is not None and v.numel() == 1 and is_op(x, CAST | LAYOUT):
        return constant(x.args[0])
    return None


def is_masked_value(c: Optional[float]) -> bool:
    return c is not None and c <= MASKED_BELOW


def is_zero(c: Optional[float]) -> bool:
    return c is not None and c == _ATTEND


def known_equal(a: Any, b: Any) -> bool:
    """Whether sizes ``a`` and ``b`` (ints or SymInts) are provably equal; adds no shape guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a == b)


def same_shape(a: Optional[tuple], b: Optional[tuple]) -> bool:
    """Whether two shapes are provably equal (`known_equal` per dim)."""
    return a is not None and b is not None and len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))
