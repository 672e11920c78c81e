"""The attention rules: each finds one family of spellings and returns a `Match` (named bindings).

A rule's ``match(node)`` returns None when ``node`` is not its anchor, else a `Match`; a match
that the rule itself cannot rewrite carries a ``reason`` (a near miss is data, not an
exception). The checks every site shares (mask kind, shapes, GQA, policy) and the rewrite live
in `_rewrite.py`.

Rules (one per spelling family, variants as tags):
- `SdpaRule`: one fused call; tags name the target (``torch``, ``aten``, ``aten:flash_cpu`` …).
- `MatmulSoftmaxRule`: softmax(q·kᵀ·s + mask)·v written out; tags name the key transpose, the
  scale form, the mask form, the casts and dropout.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch import fx

from . import _graph as g
from ._graph import aten

__all__ = ["Match", "MatmulSoftmaxRule", "SdpaRule", "RULES"]


@dataclasses.dataclass
class Match:
    """Named bindings of one attention site.

    ``anchor`` is the node whose uses the DGA output replaces ([B, Hq, Nq, Dv]). ``masks`` lists
    (node, sense) pairs, sense ``"attend"`` (bool True = attend, or additive float) or ``"fill"``
    (bool True = masked, as masked_fill takes it); they are ANDed. ``scale`` None means the
    SDPA default 1/sqrt(D).
    """

    rule: str
    anchor: fx.Node
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    v: Optional[fx.Node] = None
    masks: list = dataclasses.field(default_factory=list)
    is_causal: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    k_transposed: bool = False  # the binding ``k`` is kᵀ [B, H, D, Nk]; the rewrite transposes it back
    tags: list = dataclasses.field(default_factory=list)
    reason: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# SdpaRule: F.scaled_dot_product_attention and the ATen SDPA family
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SdpaVariant:
    tag: str
    params: tuple  # (name, default) in positional order
    mask: Optional[str]  # name of the mask argument
    tuple_out: bool  # returns (output, logsumexp, ...): the site is getitem(node, 0)


def _schema_params(op) -> tuple:
    return tuple((a.name, a.default_value if a.has_default_value() else None) for a in op._schema.arguments)


_TORCH_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
               ("is_causal", False), ("scale", None), ("enable_gqa", False))


def _sdpa_variants() -> dict:
    table = {torch._C._nn.scaled_dot_product_attention: _SdpaVariant("torch", _TORCH_SDPA, "attn_mask", False)}
    for name, tag, mask, tuple_out in [
        ("scaled_dot_product_attention", "aten", "attn_mask", False),
        ("_scaled_dot_product_flash_attention_for_cpu", "aten:flash_cpu", "attn_mask", True),
        ("_scaled_dot_product_flash_attention", "aten:flash", None, True),
        ("_scaled_dot_product_efficient_attention", "aten:efficient", "attn_bias", True),
        ("_scaled_dot_product_cudnn_attention", "aten:cudnn", "attn_bias", True),
        ("_scaled_dot_product_attention_math", "aten:math", "attn_mask", True),
        ("_scaled_dot_product_fused_attention_overrideable", "aten:overrideable", "attn_bias", True),
    ]:
        op = getattr(aten, name, None)
        if op is not None:
            table[op.default] = _SdpaVariant(tag, _schema_params(op.default), mask, tuple_out)
    return table


class SdpaRule:
    """A fused scaled-dot-product-attention call, in any argument spelling.

    Pattern: ``sdpa(q, k, v, [mask], dropout_p, is_causal, scale=…, enable_gqa=…)`` at torch
    level or one of the ATen ops (tuple outputs: only ``[0]`` may have users).
    Check: constant dropout_p / is_causal; math variant without an explicit dropout mask.
    """

    name = "sdpa"

    def __init__(self):
        self.variants = _sdpa_variants()

    def match(self, node: fx.Node) -> Optional[Match]:
        variant = self.variants.get(node.target) if node.op == "call_function" else None
        if variant is None:
            return None
        a = _bind(node, variant.params)
        m = Match(self.name, node, a["query"], a["key"], a["value"], tags=[variant.tag])
        mask = a.get(variant.mask) if variant.mask else None
        if mask is not None:
            m.masks.append((mask, "attend"))
        m.scale = a.get("scale")
        if variant.tuple_out:
            m.anchor, m.reason = _first_output(node)
        if a.get("dropout_mask") is not None:
            m.reason = "an explicit dropout_mask is passed"
        for name in ("dropout_p", "is_causal", "scale"):
            if isinstance(a.get(name), fx.Node):
                m.reason = f"{name} is computed in the graph, not a constant"
        if m.reason is None:
            m.dropout_p, m.is_causal = float(a.get("dropout_p") or 0.0), bool(a.get("is_causal"))
        return m


def _bind(node: fx.Node, params: tuple) -> dict:
    out = {name: default for name, default in params}
    for (name, _), x in zip(params, node.args):
        out[name] = x
    out.update(node.kwargs)
    return out


def _first_output(node: fx.Node) -> tuple:
    """For a tuple-returning op: (getitem(node, 0) or None, reason or None)."""
    first, others = None, []
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0:
            first = user
        elif user.users or user.target is not operator.getitem:
            others.append(user)
    if others:
        return first, (f"outputs other than the attention output are used ({', '.join(u.name for u in others)}; "
                       f"e.g. logsumexp saved for the backward: rewrite before autograd, as the dga backend does)")
    if first is None:
        return node, "the attention output is unused"
    return first, None


# ---------------------------------------------------------------------------------------------
# MatmulSoftmaxRule: hand-written attention
# ---------------------------------------------------------------------------------------------

class MatmulSoftmaxRule:
    """softmax(q·kᵀ·scale + mask)·v written out with matmul/bmm.

    Pattern (anchor = the softmax), walking backwards from the softmax input through any order of
    ``cast`` (upcast), ``mul``/``div`` by a constant (``scale:mul``/``scale:div``), ``add`` of a mask
    (``mask:add``), ``masked_fill``/``where`` with a masked fill value (``mask:masked_fill``,
    ``mask:where``), down to ``matmul(q, kᵀ)`` with kᵀ a ``transpose``/``permute`` of k
    (``kT:transpose``/``kT:permute``/``kT:other``); forwards through casts and ``dropout`` to
    ``matmul(p, v)``. ATen ``bmm`` with its expand/view wrappers is read as the 4-D matmul.
    Check: every intermediate (scores, weights) has no other user; softmax over the last dim;
    constant scale (none: 1.0, as written); fill values are masked (≤ −1e4).
    """

    name = "matmul-softmax"

    def match(self, node: fx.Node) -> Optional[Match]:
        if not g.is_op(node, g.SOFTMAX):
            return None
        m = Match(self.name, node)
        pv = self._forward(node, m)
        qk = self._backward(node.args[0], m)
        if pv is None or qk is None:
            near = pv is not None or qk is not None
            return m if near and m.reason else None
        m.anchor = _out_4d(pv)
        m.q, cq = _unscale(_in_4d(qk.args[0]))
        m.v = _in_4d(pv.args[1])
        ck = self._bind_k(qk.args[1], m)
        if cq * ck != 1.0:
            m.scale *= cq * ck
            m.tags.append("scale:qk")
        rank = len(g.shape(node) or ())
        dim = g.arg(node, 1, "dim")
        if dim not in (-1, rank - 1):
            m.reason = m.reason or f"softmax over dim {dim}, not the key dim"
        if m.anchor is None or any(x is None for x in (m.q, m.k, m.v)):
            m.reason = m.reason or "q, k or v is not a 4-D [B, H, N, D] tensor (NYI: 3-D [B·H, N, D] attention)"
        return m

    def _forward(self, softmax: fx.Node, m: Match) -> Optional[fx.Node]:
        """Walks softmax -> casts / dropout / layout -> matmul(p, v); returns that matmul."""
        x = softmax
        for _ in range(8):
            users = [u for u in x.users if not _zeros_like(u)]  # zeros_like(p) reads only p's shape
            if len(users) != 1:
                m.reason = m.reason or "attention weights have other users (e.g. output_attentions)"
                return None
            (user,) = users
            if g.is_op(user, g.MATMUL) and user.args[0] is x:
                return user
            if g.is_op(user, g.CAST | g.LAYOUT) and user.args[0] is x:
                x = user
            elif g.is_op(user, g.WHERE) and _zero_rows(user, x):
                m.tags.append("rows:zeroed")
                x = user
            elif g.is_op(user, g.DROPOUT):
                self._dropout(user, m)
                x = user
                if user.target is aten.native_dropout.default:
                    x = next(iter(user.users), user)  # getitem(…, 0)
            else:
                return None
        return None

    @staticmethod
    def _dropout(node: fx.Node, m: Match) -> None:
        p = g.constant(g.arg(node, 1, "p", 0.5))
        train = g.arg(node, 2, "train" if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                      else "training", True)
        if p is None or isinstance(train, fx.Node):
            m.reason = m.reason or "dropout probability or training flag is computed in the graph"
            return
        m.dropout_p = p if train else 0.0
        m.tags.append("dropout")

    def _backward(self, x: Any, m: Match) -> Optional[fx.Node]:
        """Walks the softmax input back to matmul(q, kᵀ), collecting scale and masks."""
        scale = 1.0
        forms = []
        for _ in range(12):
            if not isinstance(x, fx.Node):
                return None
            if len(x.users) != 1 and not all(g.is_op(u, g.SOFTMAX) or _is_inf_test(u) for u in x.users):
                m.reason = m.reason or "attention scores have other users"
            if g.is_op(x, g.MATMUL):
                m.scale = scale
                m.tags.extend(forms or ["scale:none"])
                return x
            if g.is_op(x, g.CAST | g.LAYOUT):
                x = x.args[0]
            elif g.is_op(x, g.MUL | g.DIV):
                a, b = x.args[0], x.args[1]
                c, other = (g.constant(b), a) if g.constant(b) is not None else (g.constant(a), b)
                if c is None or (g.is_op(x, g.DIV) and other is not a):
                    return None
                scale = scale * c if g.is_op(x, g.MUL) else scale / c
                forms.append("scale:mul" if g.is_op(x, g.MUL) else "scale:div")
                x = other
            elif g.is_op(x, g.ADD):
                scores, mask = _split_add(x)
                if scores is None:
                    return None
                m.masks.append((mask, "attend"))
                forms.append("mask:add")
                x = scores
            elif g.is_op(x, g.MASKED_FILL):
                fill = g.constant(g.arg(x, 2, "value"))
                if not g.is_masked_value(fill):
                    m.reason = m.reason or f"masked_fill with the finite value {fill} (a bias, not a mask)"
                m.masks.append((g.arg(x, 1, "mask"), "fill"))
                forms.append("mask:masked_fill")
                x = x.args[0]
            elif g.is_op(x, g.WHERE) and len(x.args) == 3:
                cond, a, b = x.args
                if _reaches_matmul(a) and g.is_masked_value(g.constant(b)):
                    m.masks.append((cond, "attend"))
                    x = a
                elif _reaches_matmul(b) and g.is_masked_value(g.constant(a)):
                    m.masks.append((cond, "fill"))
                    x = b
                else:
                    return None
                forms.append("mask:where")
            else:
                return None
        return None

    @staticmethod
    def _bind_k(kt: Any, m: Match) -> float:
        """Binds k from kᵀ: the input of a last-two-dims transpose/permute, else kᵀ transposed back.
        Returns the constant kᵀ was multiplied by (1.0 if none)."""
        kt4, c = _unscale(_in_4d(kt))
        if kt4 is None:
            return c
        if g.is_op(kt4, g.TRANSPOSE) and _last_two(kt4.args[1:3], 4):
            m.k, form = kt4.args[0], "kT:transpose"
        elif g.is_op(kt4, g.PERMUTE) and list(_dims(kt4)) in ([0, 1, 3, 2], [0, 1, -1, -2]):
            m.k, form = kt4.args[0], "kT:permute"
        else:
            m.k, m.k_transposed, form = kt4, True, "kT:other"
        m.tags.insert(0, form)
        m.k, ck = _unscale(m.k)
        return c * ck


def _unscale(x: Any) -> tuple:
    """(y, c) for x = y·c with a constant c and x used once, else (x, 1.0)."""
    if g.is_op(x, g.MUL) and len(x.users) == 1:
        for a, b in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            c = g.constant(b)
            if c is not None and isinstance(a, fx.Node):
                return a, c
    return x, 1.0


def _zero_rows(where: fx.Node, p: fx.Node) -> bool:
    """where(row_fully_masked, 0, p): SDPA's (and the op's) output 0 for rows with no visible key."""
    _, a, b = where.args
    return (b is p and g.is_zero(g.constant(a))) or (a is p and g.is_zero(g.constant(b)))


def _zeros_like(node: fx.Node) -> bool:
    return g.is_op(node, g.FILL_CONST) and g.is_zero(g.constant(node))


def _is_inf_test(node: fx.Node) -> bool:
    """scores == -inf: the start of the fully-masked-row test of decomposed SDPA."""
    return g.is_op(node, g.family(aten.eq, operator.eq, "eq", "__eq__")) and g.constant(node.args[1]) == float("-inf")


def _dims(node: fx.Node) -> tuple:
    dims = node.args[1:] if node.op == "call_method" and not isinstance(node.args[1], (list, tuple)) else node.args[1]
    return tuple(dims)


def _last_two(dims, rank: int) -> bool:
    return len(dims) == 2 and {d % rank for d in dims if isinstance(d, int)} == {rank - 2, rank - 1}


def _reaches_matmul(x: Any, depth: int = 8) -> bool:
    """Whether the score chain from ``x`` leads back to a matmul (tells scores from the mask)."""
    for _ in range(depth):
        if not isinstance(x, fx.Node):
            return False
        if g.is_op(x, g.MATMUL):
            return True
        if g.is_op(x, g.CAST | g.LAYOUT | g.MUL | g.DIV | g.ADD | g.MASKED_FILL):
            x = x.args[0]
        elif g.is_op(x, g.WHERE) and len(x.args) == 3:
            return _reaches_matmul(x.args[1], depth - 1) or _reaches_matmul(x.args[2], depth - 1)
        else:
            return False
    return False


def _split_add(node: fx.Node) -> tuple:
    """(scores, mask) of ``scores + mask`` (either order), or (None, None)."""
    a, b = node.args[0], node.args[1]
    if _reaches_matmul(a):
        return a, b
    if _reaches_matmul(b):
        return b, a
    return None, None


# 3-D bmm operands are views of 4-D tensors: [B, H, N, D] -expand-> -view-> [B·H, N, D]
_TO_3D = g.family("view", "reshape", aten.view, aten.reshape, aten._unsafe_view)
_SAME = g.family("expand", "clone", "contiguous", aten.expand, aten.clone, aten.contiguous)


def _in_4d(x: Any) -> Optional[fx.Node]:
    """The 4-D tensor a matmul operand is a (3-D view of a) no-op expand/clone of, or None."""
    if not isinstance(x, fx.Node):
        return None
    for _ in range(6):
        s = g.shape(x)
        if s is None:
            return None
        if len(s) == 4:
            while g.is_op(x, _SAME) and g.shape(x.args[0]) is not None and len(g.shape(x.args[0])) == 4:
                x = x.args[0]  # an expand that broadcasts heads (MQA) keeps the smaller tensor: the op handles Hq ≠ Hkv
            return x
        if len(s) == 3 and g.is_op(x, _TO_3D | _SAME):
            x = x.args[0]
        else:
            return None
    return None


def _out_4d(matmul: fx.Node) -> Optional[fx.Node]:
    """The 4-D [B, H, Nq, Dv] node of an attention output matmul (the matmul or its view)."""
    s = g.shape(matmul)
    if s is not None and len(s) == 4:
        return matmul
    if len(matmul.users) == 1:
        (user,) = matmul.users
        if g.is_op(user, _TO_3D) and len(g.shape(user) or ()) == 4:
            return user
    return None


RULES = (SdpaRule(), MatmulSoftmaxRule())
