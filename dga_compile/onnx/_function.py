"""The ONNX function body of ``ai.dga::DynamicGroupAttention``: the spec (docs/dga.md) in standard
ONNX ops, so that any ONNX Runtime runs an exported model without the custom-op library.

Layout follows `dga_compile.blocked`: steps 1–4 once (probe scores, focus split, group
aggregation), then a ``Loop`` over query blocks of `BLOCK_SIZE` rows whose candidate keys are
the visible focus prefix, the complete-group prefix and the raw non-focus tokens the block
needs (found from the mask rows of the block, O(b·N) booleans), with one softmax per block.
No Nq×Nk float matrix is built on the DGA path. An ``If`` takes exact dense attention when
Nq ≠ Nk or Nk < max(min_seq_len, 1). Computes in float32 (float64 inputs too); output in q's dtype.

Ties in the focus selection go to the smaller position: the n_f-th largest score t comes
from TopK *values* (order-free); positions with s > t are focus, and of those with s == t the
first n_f − #{s > t} by position (CumSum rank). Every other sort uses distinct integer keys.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._schema import ATTRIBUTES, DOMAIN, OP_TYPE

__all__ = ["function_proto", "BLOCK_SIZE"]

#: Query rows per Loop iteration of the function body.
BLOCK_SIZE = 128
_I64, _F32, _BOOL = TensorProto.INT64, TensorProto.FLOAT, TensorProto.BOOL


class _Builder:
    """Appends nodes to one graph; names are unique across the whole function (shared counter)."""

    def __init__(self, counter: list, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._counter, self._prefix = counter, prefix

    def _fresh(self, hint: str) -> str:
        self._counter[0] += 1
        return f"{self._prefix}{hint}_{self._counter[0]}"

    def __call__(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self._fresh("n" + op_type), **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", value=numpy_helper.from_array(np.array(value, dtype=dtype)))

    def attr(self, name: str) -> str:
        """A scalar tensor holding the function attribute ``name`` (int64 or float32)."""
        kind = ATTRIBUTES[name]
        out = self._fresh(name)
        node = helper.make_node("Constant", [], [out], name=self._fresh("nattr"))
        field = "value_float" if kind == onnx.AttributeProto.FLOAT else "value_int"
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=name))
        self.nodes.append(node)
        return out

    # small vocabulary ------------------------------------------------------------------
    def dim(self, x: str, i: int) -> str:
        return self("Gather", self("Shape", x), self.const(i), axis=0)

    def vec(self, *scalars: str) -> str:
        """1-D int64 shape from scalars / ints."""
        parts = [self.const([s]) if isinstance(s, int) else self("Unsqueeze", s, self.const([0])) for s in scalars]
        return self("Concat", *parts, axis=0)

    def reshape(self, x: str, *dims) -> str:
        return self("Reshape", x, self.vec(*dims), allowzero=1)

    def slice(self, x: str, start, stop, axis: int) -> str:
        return self("Slice", x, self.vec(start), self.vec(stop), self.const([axis]))

    def reduce(self, op: str, x: str, axes, keepdims=0) -> str:
        return self(op, x, self.const(list(axes)), keepdims=keepdims)

    def count(self, x: str, axes, keepdims=0) -> str:
        return self.reduce("ReduceSum", self("Cast", x, to=_I64), axes, keepdims)

    def softmax0(self, ok: str, logits: str) -> str:
        """Softmax over the last axis of ``logits`` where ``ok``; rows with nothing allowed give 0."""
        p = self("Softmax", self("Where", ok, logits, self.const(-np.inf, np.float32)), axis=-1)
        return self("Where", self("IsNaN", p), self.const(0.0, np.float32), p)

    def rows(self, x: str, idx: str, batch: str, heads: str) -> str:
        """x [B, H, N, E], idx [B, H, L] -> x rows [B, H, L, E]."""
        ix = self("Expand", self("Unsqueeze", idx, self.const([-1])),
                  self.vec(batch, heads, self.dim(idx, 2), self.dim(x, 3)))
        return self("GatherElements", x, ix, axis=2)


class _Site:
    """Shape scalars and attribute tensors of one call, named in the function's top graph."""

    def __init__(self, g: _Builder):
        self.q = g("Cast", "q", to=_F32)
        self.k = g("Cast", "k", to=_F32)
        self.v = g("Cast", "v", to=_F32)
        self.B, self.Hq, self.Nq, self.D = (g.dim("q", i) for i in range(4))
        self.Hkv, self.Nk, self.Dv = g.dim("k", 1), g.dim("k", 2), g.dim("v", 3)
        self.rep = g("Div", self.Hq, self.Hkv)
        self.scale = g.attr("scale")
        self.causal = g("Cast", g.attr("is_causal"), to=_BOOL)
        # mask -> [Bm, h1, h2, Nm, Nk] with (h1, h2) = (Hkv, rep) for per-head masks, (1, 1) otherwise.
        mask = g("Expand", "attn_mask", g.vec(1, 1, 1, self.Nk))
        self.Nm, hm = g.dim(mask, 2), g.dim(mask, 1)
        self.h1 = g("Max", g("Div", hm, self.rep), g.const(1))
        self.h2 = g("Div", hm, self.h1)
        self.mask = g.reshape(mask, g.dim(mask, 0), self.h1, self.h2, self.Nm, self.Nk)
        self.jk = g("Range", g.const(0), self.Nk, g.const(1))
        self.qv = g.reshape(self.q, self.B, self.Hkv, self.rep, self.Nq, self.D)   # [B, Hkv, rep, Nq, D]
        self.k5 = g("Unsqueeze", self.k, g.const([2]))                             # [B, Hkv, 1, Nk, D]
        self.v5 = g("Unsqueeze", self.v, g.const([2]))

    def visible(self, g: _Builder, start: str, stop: str) -> str:
        """Visible(i, j) for query rows start ≤ i < stop: bool [Bm, h1, h2, stop−start | 1, Nk]."""
        one_row = g("Equal", self.Nm, g.const(1))
        rows = g.slice(self.mask, g("Where", one_row, g.const(0), start), g("Where", one_row, g.const(1), stop), 3)
        i = g("Unsqueeze", g("Range", start, stop, g.const(1)), g.const([1]))
        causal = g("LessOrEqual", self.jk, i)                                        # [b, Nk]
        return g("And", rows, g("Or", causal, g("Not", self.causal)))

    def logits(self, g: _Builder, q5: str, keys: str) -> str:
        """scale · q5 @ keysᵀ over the last two axes."""
        return g("Mul", g("MatMul", q5, g("Transpose", keys, perm=[0, 1, 2, 4, 3])), self.scale)


def _dense_branch(counter, s: _Site) -> onnx.GraphProto:
    """Exact attention (SDPA semantics, fully masked rows -> 0)."""
    g = _Builder(counter, "dense_")
    vis = s.visible(g, g.const(0), s.Nq)
    probs = g.softmax0(vis, s.logits(g, s.qv, s.k5))
    out = g.reshape(g("MatMul", probs, s.v5), s.B, s.Hq, s.Nq, s.Dv)
    return helper.make_graph(g.nodes, "dga_dense", [], [helper.make_tensor_value_info(out, _F32, None)])


def _dga_branch(counter, s: _Site) -> onnx.GraphProto:
    g = _Builder(counter, "dga_")
    N, B, Hkv, rep, D, Dv = s.Nk, s.B, s.Hkv, s.rep, s.D, s.Dv
    m, w = g.attr("group_size"), g.attr("window")
    # Window rule: causal, or the mask hides every j > i (our reading, `_validation.causal_like`).
    last_vis = g.reduce("ReduceMax", g("Where", s.mask, s.jk, g.const(-1)), [-1])          # [Bm, h1, h2, Nm]
    hides_future = g("Not", g("Cast", g.reduce("ReduceMax", g("Cast", g(
        "Greater", last_vis, g("Range", g.const(0), s.Nm, g.const(1))), to=_I64), [0, 1, 2, 3]), to=_BOOL))
    windowed = g("Or", s.causal, g("And", g("Equal", s.Nm, N), hides_future))

    # 1. Importance scores from the last r query rows: [B, Hkv, N].
    r = g("Min", g.attr("num_probe"), N)
    p0 = g("Sub", N, r)
    probes = g.slice(s.qv, p0, N, 3)                                                        # [B, Hkv, rep, r, D]
    pprobs = g.softmax0(s.visible(g, p0, N), s.logits(g, probes, s.k5))
    scores = g.reduce("ReduceSum", pprobs, [2, 3])

    # 2. Focus split (ties: smaller position first), then positions sorted.
    nf_real = g("Mul", g("Mul", g.attr("focus_ratio"), g("Cast", N, to=_F32)), g.const(1 - 2.0 ** -23, np.float32))
    nf = g("Min", g("Cast", g("Ceil", nf_real), to=_I64), N)
    kth = g("Max", nf, g.const(1))
    top = g("TopK", scores, g.vec(kth), axis=-1, outputs=2)[0]
    t = g.slice(top, g("Sub", kth, g.const(1)), kth, 2)                                    # [B, Hkv, 1]
    above, tie = g("Greater", scores, t), g("Equal", scores, t)
    tie_rank = g("CumSum", g("Cast", tie, to=_I64), g.const(-1))
    room = g("Sub", nf, g.count(above, [-1], keepdims=1))
    is_focus = g("Or", above, g("And", tie, g("LessOrEqual", tie_rank, room)))
    key = g("Add", g("Mul", g("Cast", is_focus, to=_I64), N), g("Sub", g("Sub", N, g.const(1)), s.jk))
    order = g("TopK", g("Cast", key, to=_F32), g.vec(N), axis=-1, outputs=2)[1]            # focus first, each by position
    focus, nonfocus = g.slice(order, 0, nf, 2), g.slice(order, nf, N, 2)
    nn = g("Sub", N, nf)
    G = g("Div", nn, m)
    Gm = g("Mul", G, m)

    # 3-4. Groups: runs of m non-focus positions, aggregated with the anchor's query.
    members = g.slice(nonfocus, 0, Gm, 2)                                                   # [B, Hkv, G·m]
    anchors = g.reshape(g.slice(g.reshape(members, B, Hkv, G, m), g("Sub", m, g.const(1)), m, 3), B, Hkv, G)
    km = g("Unsqueeze", g.reshape(g.rows(s.k, members, B, Hkv), B, Hkv, G, m, D), g.const([2]))   # [B,Hkv,1,G,m,D]
    vm = g("Unsqueeze", g.reshape(g.rows(s.v, members, B, Hkv), B, Hkv, G, m, Dv), g.const([2]))
    qa_idx = g("Expand", g("Unsqueeze", anchors, g.const([2, 4])), g.vec(B, Hkv, rep, G, D))
    qa = g("Unsqueeze", g("GatherElements", s.qv, qa_idx, axis=3), g.const([4]))          # [B,Hkv,rep,G,1,D]
    wts = g("Softmax", g("Mul", g("MatMul", qa, g("Transpose", km, perm=[0, 1, 2, 3, 5, 4])), s.scale), axis=-1)
    kbar = g("Squeeze", g("MatMul", wts, km), g.const([4]))                                # [B, Hkv, rep, G, D]
    vbar = g("Squeeze", g("MatMul", wts, vm), g.const([4]))
    group_logit = g("Mul", g.attr("group_bias"), g("Log", g("Cast", m, to=_F32)))
    kf, vf = g.rows(s.k, focus, B, Hkv), g.rows(s.v, focus, B, Hkv)                         # [B, Hkv, n_f, ·]

    # 5. Loop over query blocks; the carried tensor grows by one block per iteration.
    bs = g.const(BLOCK_SIZE)
    trips = g("Div", g("Add", N, g.const(BLOCK_SIZE - 1)), bs)
    acc0 = g("ConstantOfShape", g.vec(B, Hkv, rep, 0, Dv), value=numpy_helper.from_array(np.zeros(1, np.float32)))
    body = _block_body(counter, s, dict(N=N, m=m, w=w, windowed=windowed, focus=focus, nonfocus=nonfocus, nn=nn,
                                        G=G, Gm=Gm, anchors=anchors, kbar=kbar, vbar=vbar, kf=kf, vf=vf,
                                        group_logit=group_logit, bs=bs))
    acc = g("Loop", trips, "", acc0, body=body)
    out = g.reshape(acc, B, s.Hq, N, Dv)
    return helper.make_graph(g.nodes, "dga_blocked", [], [helper.make_tensor_value_info(out, _F32, None)])


def _block_body(counter, s: _Site, c: dict) -> onnx.GraphProto:
    """One query block [i0, i1): candidates, one softmax, output appended to the carried tensor."""
    g = _Builder(counter, "blk_")
    it, cond_in, acc_in = "blk_iter", "blk_cond_in", "blk_acc_in"
    B, Hkv, rep, D, Dv, N = s.B, s.Hkv, s.rep, s.D, s.Dv, c["N"]
    i0 = g("Mul", it, c["bs"])
    i1 = g("Min", g("Add", i0, c["bs"]), N)
    b = g("Sub", i1, i0)
    vis_rows = s.visible(g, i0, i1)                                                        # [Bm, h1, h2, b|1, N]
    vis = g("Expand", vis_rows, g.vec(B, Hkv, 1, b, N))                                    # [B, Hkv, h2, b, N]

    def vis_at(pos):                                                                        # pos [B, Hkv, L]
        ix = g("Expand", g("Unsqueeze", pos, g.const([2, 3])), g.vec(B, Hkv, s.h2, b, g.dim(pos, 2)))
        return g("GatherElements", vis, ix, axis=4)

    # Focus prefix: positions up to the last key any row of the block sees.
    last = g.reduce("ReduceMax", g("Where", vis_rows, s.jk, g.const(-1)), [0, 1, 2, 3, 4])
    n_f = g.reduce("ReduceMax", g.count(g("LessOrEqual", c["focus"], last), [-1]), [0, 1])
    focus = g.slice(c["focus"], 0, n_f, 2)
    focus_ok = vis_at(focus)
    # Complete groups: every member visible and, under the window rule, anchor ≤ i − w.
    member_vis = vis_at(c["nonfocus"])                                                     # [B, Hkv, h2, b, Nn]
    grouped = g.reshape(g.slice(member_vis, 0, c["Gm"], 4), B, Hkv, s.h2, b, c["G"], c["m"])
    complete = g("Cast", g.reduce("ReduceMin", g("Cast", grouped, to=_I64), [-1]), to=_BOOL)
    i_minus_w = g("Unsqueeze", g("Sub", g("Range", i0, i1, g.const(1)), c["w"]), g.const([1]))
    old = g("LessOrEqual", g("Unsqueeze", c["anchors"], g.const([2, 3])), i_minus_w)
    complete = g("And", complete, g("Or", old, g("Not", c["windowed"])))                  # [B, Hkv, h2, b, G]
    any_complete = g("Cast", g.reduce("ReduceMax", g("Cast", complete, to=_I64), [0, 1, 2, 3]), to=_I64)
    n_g = g.reduce("ReduceMax", g("Concat", g.const([0]), g("Mul", any_complete, g(
        "Range", g.const(1), g("Add", c["G"], g.const(1)), g.const(1))), axis=0), [0])
    # Raw tokens: visible non-focus members of groups not complete for the row (incl. the tail run).
    in_complete = g.reshape(g("Expand", g("Unsqueeze", complete, g.const([-1])), g.vec(B, Hkv, s.h2, b, c["G"], c["m"])),
                            B, Hkv, s.h2, b, c["Gm"])
    tail = g("Expand", g.const(False, np.bool_), g.vec(B, Hkv, s.h2, b, g("Sub", c["nn"], c["Gm"])))
    need = g("And", member_vis, g("Not", g("Concat", in_complete, tail, axis=4)))
    needed = g("Cast", g.reduce("ReduceMax", g("Cast", need, to=_I64), [2, 3]), to=_I64)  # [B, Hkv, Nn]
    n_r = g.reduce("ReduceMax", g.reduce("ReduceSum", needed, [-1]), [0, 1])
    jn = g("Range", g.const(0), c["nn"], g.const(1))
    key = g("Add", g("Mul", needed, c["nn"]), g("Sub", g("Sub", c["nn"], g.const(1)), jn))  # needed first, by position
    raw_idx = g("TopK", g("Cast", key, to=_F32), g.vec(n_r), axis=-1, outputs=2)[1]       # [B, Hkv, R]
    valid = g("Cast", g("GatherElements", needed, raw_idx, axis=-1), to=_BOOL)
    raw_ix5 = g("Expand", g("Unsqueeze", raw_idx, g.const([2, 3])), g.vec(B, Hkv, s.h2, b, n_r))
    raw_ok = g("And", g("GatherElements", need, raw_ix5, axis=4), g("Unsqueeze", valid, g.const([2, 3])))
    raw_pos = g("GatherElements", c["nonfocus"], raw_idx, axis=-1)

    # Candidates: focus prefix | group prefix | raw; one masked softmax.
    per_q = lambda x, n, e: g("Expand", g("Unsqueeze", x, g.const([2])), g.vec(B, Hkv, rep, n, e))
    keys = g("Concat", per_q(g.slice(c["kf"], 0, n_f, 2), n_f, D), g.slice(c["kbar"], 0, n_g, 3),
             per_q(g.rows(s.k, raw_pos, B, Hkv), n_r, D), axis=3)
    vals = g("Concat", per_q(g.slice(c["vf"], 0, n_f, 2), n_f, Dv), g.slice(c["vbar"], 0, n_g, 3),
             per_q(g.rows(s.v, raw_pos, B, Hkv), n_r, Dv), axis=3)
    full = lambda x, n: g("Expand", x, g.vec(B, Hkv, rep, b, n))
    ok = g("Concat", full(focus_ok, n_f), full(g.slice(complete, 0, n_g, 4), n_g), full(raw_ok, n_r), axis=4)
    zero = g.const(0.0, np.float32)
    bias = g("Concat", g("Expand", zero, g.vec(n_f)), g("Expand", c["group_logit"], g.vec(n_g)),
             g("Expand", zero, g.vec(n_r)), axis=0)
    qb = g.slice(s.qv, i0, i1, 3)
    probs = g.softmax0(ok, g("Add", s.logits(g, qb, keys), bias))
    acc_out = g("Concat", acc_in, g("MatMul", probs, vals), axis=3)
    cond_out = g("Identity", cond_in)
    return helper.make_graph(
        g.nodes, "dga_block",
        [helper.make_tensor_value_info(it, _I64, []), helper.make_tensor_value_info(cond_in, _BOOL, []),
         helper.make_tensor_value_info(acc_in, _F32, None)],
        [helper.make_tensor_value_info(cond_out, _BOOL, []), helper.make_tensor_value_info(acc_out, _F32, None)])


def function_proto(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of ``ai.dga::DynamicGroupAttention`` importing ONNX opset ``opset`` (≥ 18)."""
    counter = [0]
    g = _Builder(counter, "")
    s = _Site(g)
    applies = g("And", g("Equal", s.Nq, s.Nk),
                g("GreaterOrEqual", s.Nk, g("Max", g.attr("min_seq_len"), g.const(1))))
    out = g("If", applies, then_branch=_dga_branch(counter, s), else_branch=_dense_branch(counter, s))
    g.nodes.append(helper.make_node("CastLike", [out, "q"], ["out"], name="cast_out"))
    return helper.make_function(DOMAIN, OP_TYPE, ["q", "k", "v", "attn_mask"], ["out"], g.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(ATTRIBUTES))
