"""The attention rules: each finds one family of spellings and binds it as a `Match`.

A rule has three parts (the onnxscript rewriter's shape): ``pattern(node)`` returns None when
``node`` is not its anchor, else a `Match` (named bindings; a near miss carries a ``reason``:
it is data, not an exception); ``check(match)`` adds the rule's own reasons; ``rewrite``
inserts the op (`_insert.insert_site`). The checks every site shares live in `_checks.py`, the
policy in `dga_compile/policy.py`, the driver in `_driver.py`.

Rules (one per spelling family, variants as tags):
- `SdpaRule`: one fused call; tags name the target (``torch``, ``aten``, ``aten:flash_cpu`` …).
- `MatmulSoftmaxRule`: softmax(q·kᵀ·s + mask)·v written out, the products as matmul, bmm on
  [B·H, N, D] views (``3d``) or einsum (``einsum``) in any layout (``layout:bshd`` …); tags name
  the scale form, the mask form, casts and dropout.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional

import torch
from torch import fx

from . import _graph as g
from ._graph import aten
from ._insert import insert_site, replace_backward
from ._layout import Layout, Operand, apply, bind, contract, einsum_operands, layout_step, mask_plan, plan, \
    subscripts, trace
from ._walk import MANY_USERS, Stop, Walker

__all__ = ["Match", "MatmulSoftmaxRule", "Rule", "SdpaRule", "RULES"]


@dataclasses.dataclass
class Match:
    """Named bindings of one attention site.

    ``anchor`` is the node whose uses the DGA output replaces; ``out_plan`` the ops that turn the
    op's [B, Hq, Nq, Dv] into the anchor's layout. ``q``/``k``/``v`` are `Operand` s ([B, H, N, D]).
    ``masks`` lists (node, sense, plan): sense ``"attend"`` (bool True = attend, or additive float)
    or ``"fill"`` (bool True = masked, as masked_fill takes it), plan the ops that make the mask
    broadcast to [B, H, Nq, Nk]; they are ANDed. ``scale`` None means the SDPA default 1/sqrt(D).
    """

    rule: str
    anchor: fx.Node
    q: Optional[Operand] = None
    k: Optional[Operand] = None
    v: Optional[Operand] = None
    masks: list = dataclasses.field(default_factory=list)
    is_causal: bool = False
    scale: Optional[float] = None
    dropout_p: float = 0.0
    q_factors: list = dataclasses.field(default_factory=list)  # (scalar node, "mul"|"div"): a run-time scale on q
    out_plan: list = dataclasses.field(default_factory=list)
    backward: Optional[fx.Node] = None  # the paired ATen backward of a joint (forward + backward) graph
    grad_out: Optional[fx.Node] = None
    tags: list = dataclasses.field(default_factory=list)
    reason: Optional[str] = None
    weights_used: bool = False  # the attention probabilities have other users (the policy keeps it dense)


class Rule:
    """One attention spelling family: ``pattern`` binds, ``check`` vetoes, ``rewrite`` inserts."""

    name = ""

    def pattern(self, node: fx.Node) -> Optional[Match]:
        raise NotImplementedError

    def check(self, m: Match) -> Optional[str]:
        return m.reason

    def rewrite(self, graph: fx.Graph, m: Match, config) -> tuple:
        """Inserts ``dga.attention`` for ``m``; returns the op's arguments."""
        return insert_site(graph, m, config)


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

#: the ATen SDPA ops: (op name, tag, name of the mask argument, returns a tuple)
_ATEN_SDPA = (
    ("scaled_dot_product_attention", "aten", "attn_mask", False),                     # the composite op
    ("_scaled_dot_product_flash_attention_for_cpu", "aten:flash_cpu", "attn_mask", True),  # CPU flash kernel
    ("_scaled_dot_product_flash_attention", "aten:flash", None, True),                # CUDA flash (no mask)
    ("_scaled_dot_product_efficient_attention", "aten:efficient", "attn_bias", True),  # memory-efficient
    ("_scaled_dot_product_cudnn_attention", "aten:cudnn", "attn_bias", True),         # cuDNN
    ("_scaled_dot_product_attention_math", "aten:math", "attn_mask", True),           # the math fallback
    ("_scaled_dot_product_fused_attention_overrideable", "aten:overrideable", "attn_bias", True),  # backends
)


def _sdpa_variants() -> dict:
    table = {torch._C._nn.scaled_dot_product_attention: _SdpaVariant("torch", _TORCH_SDPA, "attn_mask", False)}
    for name, tag, mask, tuple_out in _ATEN_SDPA:
        op = getattr(aten, name, None)
        if op is not None:
            table[op.default] = _SdpaVariant(tag, _schema_params(op.default), mask, tuple_out)
    return table


class SdpaRule(Rule):
    """A fused scaled-dot-product-attention call, in any argument spelling.

    Pattern: ``sdpa(q, k, v, [mask], dropout_p, is_causal, scale=…, enable_gqa=…)`` at torch
    level or one of the ATen ops (tuple outputs: only ``[0]`` may have users).
    Check: constant dropout_p / is_causal; math variant without an explicit dropout mask. A scale
    known only at run time (a graph scalar) is applied to q, and the op gets scale 1. GQA
    ``repeat_kv`` copies of k/v are dropped (tag ``gqa:repeat_kv``): the op takes Hq ≠ Hkv.
    """

    name = "sdpa"

    def __init__(self):
        self.variants = _sdpa_variants()

    def pattern(self, node: fx.Node) -> Optional[Match]:
        variant = self.variants.get(node.target) if node.op == "call_function" else None
        if variant is None:
            return None
        a = _bind(node, variant.params)
        m = Match(self.name, node, Operand(a["query"]), Operand(a["key"]), Operand(a["value"]), tags=[variant.tag])
        mask = a.get(variant.mask) if variant.mask else None
        if mask is not None:
            m.masks.append((mask, "attend", []))
        m.scale = a.get("scale")
        if variant.tuple_out:
            m.anchor, m.reason = _first_output(node)
            if m.reason and variant.tag == "aten:flash_cpu":
                self._pair_backward(node, a, m)
        if a.get("dropout_mask") is not None:
            m.reason = "an explicit dropout_mask is passed"
        if isinstance(m.scale, fx.Node):  # scale·q·kᵀ = (scale·q)·kᵀ: a run-time scale goes onto q
            m.q_factors.append((m.scale, "mul"))
            m.scale = 1.0
            m.tags.append("scale:runtime")
        for name in ("dropout_p", "is_causal"):
            if isinstance(a.get(name), fx.Node):
                m.reason = f"{name} is computed in the graph, not a constant"
        if m.reason is None:
            m.dropout_p, m.is_causal = float(a.get("dropout_p") or 0.0), bool(a.get("is_causal"))
        if m.backward is None:  # the backward's dk, dv have the repeated shape
            _strip_repeat_kv(m, Walker())
        return m

    def rewrite(self, graph: fx.Graph, m: Match, config) -> tuple:
        args = insert_site(graph, m, config)
        if m.backward is not None:
            replace_backward(graph, m, args)
        return args

    @staticmethod
    def _pair_backward(node: fx.Node, a: dict, m: Match) -> None:
        """Joint graphs (forward + backward in one graph): logsumexp feeds only the matching
        ``_scaled_dot_product_flash_attention_for_cpu_backward``, which the rewrite replaces by
        ``dga.attention_backward`` (tag ``joint``)."""
        lse = [u for u in node.users if u.target is operator.getitem and u.args[1] == 1]
        if len(lse) != 1 or len(lse[0].users) != 1 or any(
                u.target is not operator.getitem or u.args[1] not in (0, 1) for u in node.users):
            return
        (bwd,) = lse[0].users
        bwd_op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        if bwd.target is not bwd_op:
            return
        b = _bind(bwd, _schema_params(bwd_op))
        same = (b["query"], b["key"], b["value"], b["logsumexp"], b["is_causal"], b["dropout_p"], b["attn_mask"],
                b["scale"]) == (a["query"], a["key"], a["value"], lse[0], a["is_causal"], a["dropout_p"],
                                a["attn_mask"], a["scale"])
        if same:
            m.backward, m.grad_out, m.reason = bwd, b["grad_out"], None
            m.tags.append("joint")


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


def _strip_repeat_kv(m: Match, walker: Walker) -> None:
    """k = reshape(expand(k0[:, :, None], (B, Hkv, n, N, D)), (B, Hkv·n, N, D)) -> k0 (same for v):
    the heads dim of both is a kv-head atom followed by broadcast atoms."""
    bound = []
    for op in (m.k, m.v):
        tr = trace(op.node, walker) if isinstance(op.node, fx.Node) else None
        dims = tr.layout.dims if tr is not None else ()
        if len(dims) != 4 or any(len(d) > 1 or set(d) & tr.layout.broadcast for d in (dims[0], dims[2], dims[3])):
            return
        real = [a for a in dims[1] if a not in tr.layout.broadcast]
        if len(real) > 1 or len(real) == len(dims[1]) or dims[1][:len(real)] != tuple(real):
            return
        roles = [d[0] if d else None for d in dims]
        roles[1] = real[0] if real else None
        bound.append(bind(tr, roles))
    k, v = bound
    if k is not None and v is not None and g.known_equal(k.shape[1], v.shape[1]):
        m.k, m.v = k, v
        m.tags.append("gqa:repeat_kv")


# ---------------------------------------------------------------------------------------------
# MatmulSoftmaxRule: hand-written attention
# ---------------------------------------------------------------------------------------------

class _Scores:
    """softmax's input walked back to the score product q·kᵀ (a matmul, bmm or einsum).

    ``steps`` records, from the softmax side, ``("layout", node)`` and ``("mask", node, sense)``;
    the scale, run-time factors and tags go onto the match. With ``probe`` nothing is recorded:
    the walk only says whether the chain leads back to a product (tells scores from a mask)."""

    def __init__(self, walker: Walker, m: Match, probe: bool = False):
        self.walker, self.m, self.probe = walker, m, probe
        self.steps, self.scale, self.forms = [], 1.0, []
        #: the ops between q·kᵀ and the softmax: (family, handler(node) -> next node or Stop)
        self.table = (
            (g.MATMUL | g.EINSUM, lambda n: Stop(n)),  # q·kᵀ: the walk's goal
            (g.CAST, lambda n: n.args[0]),             # casts (an fp32 softmax): same values, same layout
            (g.MUL | g.DIV, self._scaled),             # s·c, s/c: the scale (a graph scalar goes onto q)
            (g.ADD, self._added),                      # s + mask: an additive mask
            (g.MASKED_FILL, self._filled),             # masked_fill(s, m, −∞): a bool mask, True = masked
            (g.WHERE, self._where),                    # where(m, s, −∞) / where(m, −∞, s): a bool mask
        )

    def run(self, x: Any) -> Optional[fx.Node]:
        """The product node the chain from ``x`` leads back to, or None."""
        end = self.walker.up(x, self._step).value
        return end if isinstance(end, fx.Node) else None

    def _step(self, n: fx.Node):
        if not self.probe:
            users = [u for u in n.users if not g.is_op(u, g.META_ONLY)]
            if len(users) != 1 and not all(g.is_op(u, g.SOFTMAX) or _is_inf_test(u) for u in users):
                self.m.reason = self.m.reason or "attention scores have other users"
        if layout_step(n) is not None:
            self.steps.append(("layout", n))
            return n.args[0]
        for fam, handler in self.table:
            if g.is_op(n, fam):
                return handler(n)
        return Stop()

    def _reaches(self, x: Any) -> bool:
        return _Scores(self.walker, self.m, probe=True).run(x) is not None

    def _scaled(self, n: fx.Node):
        a, b = n.args[0], n.args[1]
        is_mul = g.is_op(n, g.MUL)
        c, other = (g.constant(b), a) if g.constant(b) is not None else (g.constant(a), b)
        if c is None or (not is_mul and other is not a):
            scalar, other = _runtime_factor(n, self._reaches)
            if scalar is None:
                return Stop()
            if not self.probe:
                self.m.q_factors.append((scalar, "mul" if is_mul else "div"))
            self.forms.append("scale:runtime")
            return other
        self.scale = self.scale * c if is_mul else self.scale / c
        self.forms.append("scale:mul" if is_mul else "scale:div")
        return other

    def _added(self, n: fx.Node):
        for scores, mask in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
            if self._reaches(scores):
                self.steps.append(("mask", mask, "attend"))
                self.forms.append("mask:add")
                return scores
        return Stop()

    def _filled(self, n: fx.Node):
        fill = g.constant(g.arg(n, 2, "value"))
        if not g.is_masked_value(fill) and not self.probe:
            self.m.reason = self.m.reason or f"masked_fill with the finite value {fill} (a bias, not a mask)"
        self.steps.append(("mask", g.arg(n, 1, "mask"), "fill"))
        self.forms.append("mask:masked_fill")
        return n.args[0]

    def _where(self, n: fx.Node):
        if len(n.args) != 3:
            return Stop()
        cond, a, b = n.args
        if self._reaches(a) and g.is_masked_value(g.constant(b)):
            self.steps.append(("mask", cond, "attend"))
        elif self._reaches(b) and g.is_masked_value(g.constant(a)):
            self.steps.append(("mask", cond, "fill"))
            a = b
        else:
            return Stop()
        self.forms.append("mask:where")
        return a


class MatmulSoftmaxRule(Rule):
    """softmax(q·kᵀ·scale + mask)·v written out.

    Pattern (anchor = the softmax): backwards from the softmax input through casts, ``mul``/
    ``div`` by a constant (``scale:mul``/``scale:div``), ``add`` of a mask (``mask:add``),
    ``masked_fill``/``where`` with a masked fill value (``mask:masked_fill``, ``mask:where``) and
    layout ops, to the score product; forwards through casts, layout ops and ``dropout`` to the
    output product. Each product is a matmul, a bmm or an einsum (``einsum``), read as an einsum
    over the dims of q, k and v (`_layout`): any layout of q/k/v (``layout:bshd``), kᵀ by
    transpose/permute/mT, 3-D [B·H, N, D] operands when the graph shows the split of B·H (``3d``),
    GQA ``repeat_kv`` / MQA broadcasts of k/v (dropped: ``gqa:repeat_kv``).
    Check: every intermediate (scores, weights) has no other user; softmax over the key dim;
    constant scale (none: 1.0, as written; a graph scalar goes onto q: ``scale:runtime``); fill
    values are masked (≤ −1e4).
    """

    name = "matmul-softmax"

    def pattern(self, node: fx.Node) -> Optional[Match]:
        if not g.is_op(node, g.SOFTMAX):
            return None
        walker, m = Walker(), Match(self.name, node)
        scores = _Scores(walker, m)
        qk = scores.run(node.args[0])
        pv = self._weights(node, walker, m)
        if qk is None and pv is None:
            return None
        if m.weights_used:
            return m
        if qk is None:
            m.reason = m.reason or "the softmax input is not a product q·kᵀ (matmul, bmm or einsum)"
            return m
        if pv is None:
            m.reason = m.reason or "the attention weights do not feed a product with v (matmul, bmm or einsum)"
            return m
        m.scale = scores.scale
        m.tags.extend(scores.forms or ["scale:none"])
        dim = g.arg(node, 1, "dim")
        rank = len(g.shape(node) or ())
        if dim not in (-1, rank - 1):
            m.reason = m.reason or f"softmax over dim {dim}, not the key dim"
            return m
        m.reason = m.reason or self._bind(m, walker, qk, scores.steps, *pv)
        return m

    def _weights(self, softmax: fx.Node, walker: Walker, m: Match) -> Optional[tuple]:
        """Walks softmax -> casts / dropout / layout ops -> the product with v; returns
        (product, index of the weights among its operands, the layout ops on the way)."""
        layout_ops = []

        def step(user, x):
            if g.is_op(user, g.MATMUL) and user.args[0] is x:
                return Stop((user, 0))
            if g.is_op(user, g.EINSUM) and x in einsum_operands(user):
                return Stop((user, einsum_operands(user).index(x)))
            if g.is_op(user, g.WHERE) and _zero_rows(user, x):
                m.tags.append("rows:zeroed")
                return user
            if user.args[0] is not x:
                return Stop()
            if layout_step(user) is not None:
                layout_ops.append(user)
                return user
            if g.is_op(user, g.CAST):
                return user
            if g.is_op(user, g.DROPOUT):
                self._dropout(user, m)
                return next(iter(user.users), user) if user.target is aten.native_dropout.default else user
            return Stop()

        trail = walker.down(softmax, step)
        if trail.value == MANY_USERS:
            m.weights_used = True
            return None
        return trail.value + (layout_ops,) if isinstance(trail.value, tuple) else None

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

    def _bind(self, m: Match, walker: Walker, qk: fx.Node, steps: list, pv: fx.Node, p_index: int,
              p_layout_ops: list) -> Optional[str]:
        """Binds q, k, v, the masks and the anchor from the two products; returns a reason or None."""
        sub = subscripts(qk)
        if sub is None:
            return f"the score product {qk.name} is not a two-operand contraction over one dim"
        xs, ys, zs, xo, yo = sub
        tx, ty = trace(xo, walker), trace(yo, walker)
        if tx is None or ty is None:
            return "no shape metadata on the score product's operands"
        read = _read_scores(xs, ys, zs, tx, ty, steps)
        if read is not None and read[0].free[0] != read[1].dims[-2]:  # k·qᵀ: the second operand is q
            read, (tx, ty) = _read_scores(ys, xs, zs, ty, tx, steps), (ty, tx)
        if read is None or read[1].dims[-2:] != (read[0].free[0], read[0].free[1]):
            return "the softmax is not over the keys of a product q·kᵀ with one contracted dim"
        c, s_layout, masks_at = read
        roles = _roles(s_layout, c.repeat)
        if isinstance(roles, str):
            return roles
        b, h = roles
        if len(c.free[0]) > 1 or len(c.free[1]) > 1 or len(c.summed[0]) > 1 or c.repeat.get(b):
            return "q or k merges several dims into its length or head dim"
        i, j, d = (grp[0] if grp else None for grp in (c.free[0], c.free[1], c.summed[0]))
        m.q = bind(tx, (b, h, i, d))
        m.k = bind(ty, (c.partner.get(b), c.partner.get(h), j, c.partner.get(d)))
        rep_k = c.repeat.get(h, 1)
        # the output product: weights (in the scores' atoms) × v
        p_lay = s_layout
        for n in p_layout_ops:
            p_lay = apply(p_lay, n)
        osub = subscripts(pv)
        v_node = None if osub is None else osub[4 - p_index]
        tv = trace(v_node, walker) if isinstance(v_node, fx.Node) else None
        if p_lay is None or osub is None or tv is None:
            return "the weights·v product is not a two-operand contraction over the keys"
        xs2, ys2, zs2 = osub[:3]
        c2 = contract(xs2, ys2, zs2, p_lay, tv.layout) if p_index == 0 else contract(ys2, xs2, zs2, p_lay, tv.layout)
        if c2 is None or c2.summed[0] != ((j,) if j else ()) or c2.free[0] != ((i,) if i else ()) or \
                len(c2.free[1]) > 1 or c2.repeat.get(b):
            return "the weights·v product does not contract the keys of the scores"
        dv = c2.free[1][0] if c2.free[1] else None
        m.v = bind(tv, (c2.partner.get(b), c2.partner.get(h), c2.partner.get(j), dv))
        if c2.repeat.get(h, 1) != rep_k:
            return "k and v repeat their heads differently"
        if None in (m.q, m.k, m.v):
            return "q, k or v is not a 4-D [B, H, N, D] tensor in the graph (a permutation of one)"
        m.anchor, m.out_plan = _anchor(pv, c2.layout, (b, h, i, dv), walker)
        if m.out_plan is None:
            return "the attention output's layout is not a permutation or merge of [B, H, Nq, Dv]"
        for mask, sense, at in masks_at:
            mp = mask_plan(g.shape(mask), at, (b, h, i, j)) if isinstance(mask, fx.Node) else []
            if mp is None:
                return "a mask is applied to scores whose layout is not [B, H, Nq, Nk] or [B·H, Nq, Nk]"
            m.masks.append((mask, sense, mp))
        m.scale *= tx.factor * ty.factor
        q_roles = (b, h, i, d)
        src_dims = tuple(a[1] for a in q_roles) if all(a is not None and a[0] is tx.source for a in q_roles) else None
        self._tag(m, qk, pv, s_layout, rep_k, tx.factor * ty.factor, src_dims)
        return None

    @staticmethod
    def _tag(m: Match, qk: fx.Node, pv: fx.Node, s_layout: Layout, rep: int, factor: float,
             src_dims: Optional[tuple]) -> None:
        """Variant tags; ``src_dims``: where q's source holds B, H, N, D ((0, 2, 1, 3): BSHD)."""
        tags = []
        if g.is_op(qk, g.EINSUM) or g.is_op(pv, g.EINSUM):
            tags.append("einsum")
        if len(s_layout.dims) == 3:
            tags.append("3d")
        if src_dims == (0, 2, 1, 3):
            tags.append("layout:bshd")
        elif src_dims not in ((0, 1, 2, 3), None):
            tags.append(f"layout:{''.join(map(str, src_dims))}")
        m.tags[:0] = tags
        if factor != 1.0:
            m.tags.append("scale:qk")
        if rep > 1:
            m.tags.append("gqa:repeat_kv")


def _read_scores(xs, ys, zs, tx, ty, steps) -> Optional[tuple]:
    """(contraction with the first operand primary, the softmax input's layout, [(mask, sense,
    layout of the scores where it applies)]), or None."""
    c = contract(xs, ys, zs, tx.layout, ty.layout)
    if c is None:
        return None
    lay, masks_at = c.layout, []
    for step in reversed(steps):
        if step[0] == "layout":
            lay = apply(lay, step[1])
            if lay is None:
                return None
        else:
            masks_at.append((step[1], step[2], lay))
    return c, lay, masks_at


def _roles(s: Layout, repeat: dict):
    """(B atom, H atom) from the dims of the scores before [Nq, Nk], or a reason. Merged
    [B·H, Nq, Nk] scores show the split when q is a reshape of a 4-D tensor: two atoms, or one
    beside a size-1 dim (B = 1 or H = 1; the one that repeats on the k side is H)."""
    lead = s.dims[:-2]
    if len(lead) == 2 and all(len(d) <= 1 for d in lead):
        return tuple(d[0] if d else None for d in lead)
    if len(lead) == 1 and len(lead[0]) == 2:
        return lead[0]
    if len(lead) == 1 and len(lead[0]) == 1 and len(g.shape(lead[0][0][0])) == 4:
        (a,) = lead[0]
        src = g.shape(a[0])
        size_one_before = any(g.known_equal(src[d], 1) for d in range(a[1]))
        return (None, a) if size_one_before or repeat.get(a) else (a, None)
    if len(lead) == 1 and len(lead[0]) == 1:
        return ("3-D [B·H, N, D] attention whose split of B·H into batch and heads the graph does not show "
                "(q/k/v are not reshapes of [B, H, N, D] tensors): reshape them from [B, H, N, D], or call "
                "F.scaled_dot_product_attention")
    if len(lead) == 1 and not lead[0]:
        return None, None
    return f"scores of rank {len(s.dims)} are not [B, H, Nq, Nk] or [B·H, Nq, Nk]"


def _anchor(pv: fx.Node, lay: Layout, roles: tuple, walker: Walker) -> tuple:
    """The node the DGA output replaces: the last node of pv's chain of layout users that is
    [B, H, Nq, Dv] as it is, else pv itself with the plan that makes its layout."""
    def step(user, x):
        return user if layout_step(user) is not None and user.args[0] is x else Stop()

    want = tuple(() if a is None else (a,) for a in roles)
    best, layouts = None, [(pv, lay)]
    for n in walker.down(pv, step).path:
        layouts.append((n, apply(layouts[-1][1], n)))
        if layouts[-1][1] is None:
            layouts.pop()
            break
    for n, lo in layouts:
        if lo.dims == want:
            best = n
    if best is not None:
        return best, []
    return pv, plan(lay, roles)


def _runtime_factor(x: fx.Node, reaches) -> tuple:
    """(scalar, scores) for scores·s or scores/s with s a graph scalar (a SymFloat, or a 0-d tensor
    such as Dynamo's lifted ``self.scaling`` under dynamic=True), else (None, None)."""
    a, b = x.args[0], x.args[1]
    pairs = [(b, a)] if g.is_op(x, g.DIV) else [(b, a), (a, b)]
    for scalar, scores in pairs:
        v = g.val(scalar)
        is_scalar = isinstance(v, (torch.SymFloat, torch.SymInt)) or (isinstance(v, torch.Tensor) and v.dim() == 0)
        if isinstance(scalar, fx.Node) and is_scalar and reaches(scores):
            return scalar, scores
    return None, None


def _zero_rows(where: fx.Node, p: fx.Node) -> bool:
    """where(row_fully_masked, 0, p): SDPA's (and the op's) output 0 for rows with no visible key."""
    if len(where.args) != 3:
        return False
    _, a, b = where.args
    return (b is p and g.is_zero(g.constant(a))) or (a is p and g.is_zero(g.constant(b)))


def _is_inf_test(node: fx.Node) -> bool:
    """scores == -inf: the start of the fully-masked-row test of decomposed SDPA."""
    return g.is_op(node, g.EQ) and g.constant(node.args[1]) == float("-inf")


RULES = (SdpaRule(), MatmulSoftmaxRule())
