"""The ONNX function body of ``ai.dga::DynamicGroupAttention``: the spec (docs/dga.md) in standard
ONNX ops, so that any ONNX Runtime runs an exported model without the custom-op library.

Written with onnxscript's graph builder (``op.MatMul(a, b)`` returns a typed `onnx_ir.Value`),
one function per step of `dga_compile.reference` / `dga_compile.blocked`: steps 1–4 once
(`_importance_scores`, `_split_focus`, `_aggregate_groups`), then a ``Loop`` over query blocks of
`BLOCK_SIZE` rows whose candidate keys are the visible focus prefix, the complete-group prefix and
the raw non-focus tokens the block needs, with one softmax per block (`_attend_block`). No Nq×Nk
float matrix is built on the DGA path. An ``If`` takes exact dense attention when Nq ≠ Nk or
Nk < max(min_seq_len, 1). Computes in float32 (float64 inputs too); output in q's dtype.
Non-finite inputs propagate as in SDPA: a row that sees a NaN logit or value is NaN; a row that
sees no key is 0.

Ties in the focus selection go to the smaller position: the n_f-th largest score t comes
from TopK *values* (order-free); positions with s > t are focus, and of those with s == t the
first n_f − #{s > t} by position (CumSum rank). Every other sort uses distinct integer keys.

ONNX Runtime constraint (issue #13): no ``Loop`` body reads a value of an enclosing graph
(`_close_loop_bodies` copies constants in and makes the rest loop-carried). With static shapes
every ``If`` condition and shape scalar is constant, and ONNX Runtime 1.32's constant folding,
inlining the nested branches around a Loop whose body reads an outer constant, crashes (SIGSEGV
when the session is created).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import onnx
import onnx_ir as ir
from onnxscript import build_function

from ._schema import ATTRIBUTES, DOMAIN, OP_TYPE

__all__ = ["function_proto", "BLOCK_SIZE"]

#: Query rows per Loop iteration of the function body.
BLOCK_SIZE = 128
_F32, _I64, _BOOL, _U8 = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL, ir.DataType.UINT8
_NO_GROUP = 2**62  # the anchor of the tail run (no group): never ≤ i − w
V = ir.Value  # every value below is one; shapes are in the comments


# ---------------------------------------------------------------- small vocabulary

def _attribute(op, name: str) -> V:
    """A scalar tensor holding the function attribute ``name`` (float32 or int64)."""
    kind = next(a.type for a in ATTRIBUTES if a.name == name)
    field, dtype, attr_type = (("value_float", _F32, ir.AttributeType.FLOAT) if kind is float
                               else ("value_int", _I64, ir.AttributeType.INT))
    out = op.Constant(**{field: ir.RefAttr(field, name, attr_type)})
    out.type, out.shape = ir.TensorType(dtype), ir.Shape([])  # the builder cannot infer through a reference
    return out


def _dim(op, x: V, i: int) -> V:
    return op.Gather(op.Shape(x), i, axis=0)


def _vec(op, *dims) -> V:
    """A 1-D int64 shape from int64 scalars and ints."""
    return op.Concat(*([d] if isinstance(d, int) else op.Unsqueeze(d, [0]) for d in dims), axis=0)


def _reshape(op, x: V, *dims) -> V:
    return op.Reshape(x, _vec(op, *dims), allowzero=1)


def _slice(op, x: V, start, stop, axis: int) -> V:
    return op.Slice(x, _vec(op, start), _vec(op, stop), [axis])


def _any(op, x: V, axes, keepdims: int = 0) -> V:
    """OR of bool ``x`` over ``axes`` (through uint8: ReduceMax takes no bool before opset 20)."""
    return op.Cast(op.ReduceMax(op.Cast(x, to=_U8), list(axes), keepdims=keepdims), to=_BOOL)


def _all(op, x: V, axes) -> V:
    return op.Cast(op.ReduceMin(op.Cast(x, to=_U8), list(axes), keepdims=0), to=_BOOL)


def _count(op, x: V, axes, keepdims: int = 0) -> V:
    return op.ReduceSum(op.Cast(x, to=_I64), list(axes), keepdims=keepdims)


def _rows(op, x: V, idx: V) -> V:
    """x [B, H, N, E], idx [B, H, L] -> rows [B, H, L, E]."""
    return op.GatherElements(x, op.Expand(op.Unsqueeze(idx, [-1]), _vec(op, *(_dim(op, idx, i) for i in range(3)),
                                                                         _dim(op, x, 3))), axis=2)


def _by_position(op, first: V, n: V, count: V) -> V:
    """Indices [.., count] of the last axis (length ``n``): entries with ``first`` (int64 0/1) set
    come first, each part by increasing index (TopK over distinct keys)."""
    key = op.Add(op.Mul(first, n), op.Sub(op.Sub(n, 1), op.Range(0, n, 1)))
    return op.TopK(op.Cast(key, to=_F32), _vec(op, count), axis=-1, _outputs=2)[1]


def _attend(op, ok: V, logits: V, values: V) -> V:
    """softmax(logits | ok) @ values over the last axis of ``logits``; rows with nothing ok give 0.
    NaN logits or values that a row sees make it NaN (as SDPA); masked ones do not."""
    probs = op.Softmax(op.Where(ok, logits, float("-inf")), axis=-1)
    return op.Where(_any(op, ok, [-1], keepdims=1), op.MatMul(probs, values), 0.0)


# ---------------------------------------------------------------- the call

class _Call(NamedTuple):
    """One call's inputs (float32) and sizes, in the function's top graph."""

    qv: V        # [B, Hkv, rep, Nq, D]: query heads grouped by the kv head they read
    k: V         # [B, Hkv, Nk, D]
    v: V         # [B, Hkv, Nk, Dv]
    k5: V        # [B, Hkv, 1, Nk, D] (v5 likewise): broadcast over rep
    v5: V
    mask: V      # bool [Bm, h1, h2, Nm, Nk]: (h1, h2) = (Hkv, rep) for a per-head mask, else (1, 1)
    B: V
    Hq: V
    Hkv: V
    rep: V
    Nq: V
    Nk: V
    D: V
    Dv: V
    Nm: V        # mask rows: 1 or Nq
    h2: V
    jk: V        # [Nk] key positions
    scale: V     # float32
    causal: V    # bool: is_causal


def _read_call(op, q: V, k: V, v: V, attn_mask: V) -> _Call:
    q, k, v = (op.Cast(x, to=_F32) for x in (q, k, v))
    B, Hq, Nq, D = (_dim(op, q, i) for i in range(4))
    Hkv, Nk, Dv = _dim(op, k, 1), _dim(op, k, 2), _dim(op, v, 3)
    rep = op.Div(Hq, Hkv)
    mask = op.Expand(attn_mask, _vec(op, 1, 1, 1, Nk))
    Nm, hm = _dim(op, mask, 2), _dim(op, mask, 1)
    h1 = op.Max(op.Div(hm, rep), 1)
    h2 = op.Div(hm, h1)
    return _Call(qv=_reshape(op, q, B, Hkv, rep, Nq, D), k=k, v=v, k5=op.Unsqueeze(k, [2]), v5=op.Unsqueeze(v, [2]),
                 mask=_reshape(op, mask, _dim(op, mask, 0), h1, h2, Nm, Nk), B=B, Hq=Hq, Hkv=Hkv, rep=rep, Nq=Nq,
                 Nk=Nk, D=D, Dv=Dv, Nm=Nm, h2=h2, jk=op.Range(0, Nk, 1), scale=_attribute(op, "scale"),
                 causal=op.Cast(_attribute(op, "is_causal"), to=_BOOL))


def _visible(op, c: _Call, start: V, stop: V) -> V:
    """Visible(i, j) for the query rows start ≤ i < stop: bool [Bm, h1, h2, stop − start, Nk]."""
    one_row = op.Equal(c.Nm, 1)
    rows = _slice(op, c.mask, op.Where(one_row, 0, start), op.Where(one_row, 1, stop), 3)
    i = op.Unsqueeze(op.Range(start, stop, 1), [1])
    return op.And(rows, op.Or(op.LessOrEqual(c.jk, i), op.Not(c.causal)))


def _logits(op, c: _Call, q5: V, keys: V) -> V:
    """scale · q5 @ keysᵀ over the last two axes."""
    return op.Mul(op.MatMul(q5, op.Transpose(keys, perm=[0, 1, 2, 4, 3])), c.scale)


def _dense_attention(op, c: _Call) -> V:
    """Exact attention, SDPA's semantics: [B, Hq, Nq, Dv]."""
    out = _attend(op, _visible(op, c, 0, c.Nq), _logits(op, c, c.qv, c.k5), c.v5)
    return _reshape(op, out, c.B, c.Hq, c.Nq, c.Dv)


# ---------------------------------------------------------------- steps 1–4

def _window_applies(op, c: _Call) -> V:
    """`_validation.causal_like`: is_causal, or a full-row mask that hides every j > i."""
    last_visible = op.ReduceMax(op.Where(c.mask, c.jk, -1), [-1], keepdims=0)        # [Bm, h1, h2, Nm]
    sees_future = _any(op, op.Greater(last_visible, op.Range(0, c.Nm, 1)), [0, 1, 2, 3])
    return op.Or(c.causal, op.And(op.Greater(c.Nm, 1), op.Not(sees_future)))


def _importance_scores(op, c: _Call) -> V:
    """Step 1 (`reference.importance_scores`): [B, Hkv, N], from the last r query rows."""
    N = c.Nk
    p0 = op.Sub(N, op.Min(_attribute(op, "num_probe"), N))
    probes = _slice(op, c.qv, p0, N, 3)                                                   # [B, Hkv, rep, r, D]
    logits = op.Where(_visible(op, c, p0, N), _logits(op, c, probes, c.k5), float("-inf"))
    probs = op.Softmax(logits, axis=-1)
    return op.ReduceSum(op.Where(op.IsNaN(probs), 0.0, probs), [2, 3], keepdims=0)       # nan_to_num, as the reference


def _num_focus(op, N: V) -> V:
    """n_f = ceil(γ·N) from the float32 γ, lowered by a relative 2⁻²³ so that γ·N landing on an
    integer is not pushed up (`reference.num_focus`)."""
    real = op.Mul(op.Mul(_attribute(op, "focus_ratio"), op.Cast(N, to=_F32)), 1 - 2.0**-23)
    return op.Min(op.Cast(op.Ceil(real), to=_I64), N)


def _split_focus(op, scores: V, n_f: V, N: V) -> tuple[V, V]:
    """Step 2 (`reference.split_focus`): focus [B, Hkv, n_f] and non-focus [B, Hkv, N − n_f]
    positions, each increasing; ties go to the smaller position."""
    kth = op.Max(n_f, 1)
    top = op.TopK(scores, _vec(op, kth), axis=-1, _outputs=2)[0]
    t = _slice(op, top, op.Sub(kth, 1), kth, 2)                                           # [B, Hkv, 1]
    above, tie = op.Greater(scores, t), op.Equal(scores, t)
    tie_rank = op.CumSum(op.Cast(tie, to=_I64), -1)
    room = op.Sub(n_f, _count(op, above, [-1], keepdims=1))
    is_focus = op.Or(above, op.And(tie, op.LessOrEqual(tie_rank, room)))
    order = _by_position(op, op.Cast(is_focus, to=_I64), N, N)
    return _slice(op, order, 0, n_f, 2), _slice(op, order, n_f, N, 2)


class _Groups(NamedTuple):
    """Steps 3–4 (`reference.Groups`)."""

    kbar: V      # [B, Hkv, rep, G, D]
    vbar: V      # [B, Hkv, rep, G, Dv]
    anchors: V   # [B, Hkv, G]


def _aggregate_groups(op, c: _Call, members: V, G: V, m: V) -> _Groups:
    """Steps 3–4 (`reference.aggregate_groups`): per query head and group, softmax weights of the
    anchor's query over the members' keys. ``members`` [B, Hkv, G·m], runs of m increasing positions."""
    B, Hkv = c.B, c.Hkv
    anchors = _reshape(op, _slice(op, _reshape(op, members, B, Hkv, G, m), op.Sub(m, 1), m, 3), B, Hkv, G)
    km = op.Unsqueeze(_reshape(op, _rows(op, c.k, members), B, Hkv, G, m, c.D), [2])     # [B, Hkv, 1, G, m, D]
    vm = op.Unsqueeze(_reshape(op, _rows(op, c.v, members), B, Hkv, G, m, c.Dv), [2])
    at_anchor = op.Expand(op.Unsqueeze(anchors, [2, 4]), _vec(op, B, Hkv, c.rep, G, c.D))
    qa = op.Unsqueeze(op.GatherElements(c.qv, at_anchor, axis=3), [4])                    # [B, Hkv, rep, G, 1, D]
    w = op.Softmax(op.Mul(op.MatMul(qa, op.Transpose(km, perm=[0, 1, 2, 3, 5, 4])), c.scale), axis=-1)
    return _Groups(op.Squeeze(op.MatMul(w, km), [4]), op.Squeeze(op.MatMul(w, vm), [4]), anchors)


class _Selection(NamedTuple):
    """Steps 1–4 of one call (`blocked._Selection`): what every query block reads."""

    focus: V        # [B, Hkv, n_f] positions, increasing
    nonfocus: V     # [B, Hkv, Nn] positions, increasing
    anchors: V      # [B, Hkv, G]
    kf: V           # [B, Hkv, n_f, D] focus keys (vf likewise)
    vf: V
    kbar: V         # [B, Hkv, rep, G, D] aggregated keys (vbar likewise)
    vbar: V
    Nn: V           # N − n_f
    G: V            # complete groups, Nn // m
    m: V
    w: V
    group_logit: V  # β·log m
    window: V       # bool: the window rule applies


def _select(op, c: _Call) -> _Selection:
    N, m = c.Nk, _attribute(op, "group_size")
    focus, nonfocus = _split_focus(op, _importance_scores(op, c), _num_focus(op, N), N)
    Nn = _dim(op, nonfocus, 2)
    G = op.Div(Nn, m)
    groups = _aggregate_groups(op, c, _slice(op, nonfocus, 0, op.Mul(G, m), 2), G, m)
    return _Selection(focus, nonfocus, groups.anchors, _rows(op, c.k, focus), _rows(op, c.v, focus), groups.kbar,
                      groups.vbar, Nn, G, m, _attribute(op, "window"),
                      op.Mul(_attribute(op, "group_bias"), op.Log(op.Cast(m, to=_F32))), _window_applies(op, c))


# ---------------------------------------------------------------- step 5: blocks

class _Candidates(NamedTuple):
    """Keys of one block (`blocked._Candidates`): focus prefix (n_f), group prefix (n_g) and raw
    non-focus indices (n_r), each with a bool permission broadcastable to [B, Hkv, rep, b, n_*]."""

    n_f: V
    focus_ok: V
    n_g: V
    group_ok: V
    raw_idx: V   # [B, Hkv, n_r] indices into the non-focus order
    n_r: V
    raw_ok: V


def _prefix_len(op, ok: V, n: V) -> V:
    """1 + the last index (of ``n``, last axis of ``ok``) that any row allows; 0 if none."""
    any_ok = op.Cast(_any(op, ok, [0, 1, 2, 3]), to=_I64)
    return op.ReduceMax(op.Concat([0], op.Mul(any_ok, op.Range(1, op.Add(n, 1), 1)), axis=0), [0], keepdims=0)


def _raw_selection(op, sel: _Selection, needed: V) -> tuple[V, V, V]:
    """needed [B, Hkv, Nn] (int64 0/1) -> (the needed non-focus indices first, by position
    [B, Hkv, n_r], n_r = the most any (b, kv head) needs, valid [B, Hkv, n_r])."""
    n_r = op.ReduceMax(op.ReduceSum(needed, [-1], keepdims=0), [0, 1], keepdims=0)
    raw_idx = _by_position(op, needed, sel.Nn, n_r)
    return raw_idx, n_r, op.Cast(op.GatherElements(needed, raw_idx, axis=-1), to=_BOOL)


class _Keys(NamedTuple):
    """The positional path's per-call tables: Visible(i, j) = key_ok(j) ∧ (j ≤ i if causal)."""

    causal: V         # bool: is_causal, or the mask is "keys ∧ causal"
    focus_ok: V       # [B, Hkv, n_f] key_ok at the focus positions
    nonfocus_ok: V    # [B, Hkv, Nn]
    group_ok: V       # [B, Hkv, G]: every member's key_ok
    anchor_of: V      # [B, Hkv, Nn] per non-focus index: its group's anchor (the tail: _NO_GROUP)
    group_ok_of: V    # [B, Hkv, Nn]: its group's group_ok (the tail: False)


def _key_tables(op, c: _Call, sel: _Selection, causal: V) -> _Keys:
    B, Hkv, N = c.B, c.Hkv, c.Nk
    last_row = _slice(op, c.mask, op.Sub(c.Nm, 1), c.Nm, 3)                              # [Bm, h1, 1, 1, N]
    key_ok = _reshape(op, op.Expand(last_row, _vec(op, B, Hkv, 1, 1, N)), B, Hkv, N)
    nonfocus_ok = op.GatherElements(key_ok, sel.nonfocus, axis=2)
    members_ok = _reshape(op, _slice(op, nonfocus_ok, 0, op.Mul(sel.G, sel.m), 2), B, Hkv, sel.G, sel.m)
    group_ok = _all(op, members_ok, [-1])
    group = op.Min(op.Div(op.Range(0, sel.Nn, 1), sel.m), sel.G)                         # the tail -> G
    pad = lambda x, value: op.Concat(x, op.Expand([value], _vec(op, B, Hkv, 1)), axis=2)
    return _Keys(causal, op.GatherElements(key_ok, sel.focus, axis=2), nonfocus_ok, group_ok,
                 op.Gather(pad(sel.anchors, _NO_GROUP), group, axis=2), op.Gather(pad(group_ok, False), group, axis=2))


def _positional_candidates(op, c: _Call, sel: _Selection, keys: _Keys, i0: V, i1: V) -> _Candidates:
    """`blocked._candidates_unmasked` with key padding: everything follows from positions."""
    not_causal, not_window = op.Not(keys.causal), op.Not(sel.window)
    i = op.Unsqueeze(op.Range(i0, i1, 1), [1])                                            # [b, 1]
    at = lambda x: op.Unsqueeze(x, [2, 3])                                                # [B, Hkv, L] -> [B, Hkv, 1, 1, L]

    def complete(anchor, group_ok, row):  # a group is complete for ``row``
        old = op.Or(not_window, op.LessOrEqual(anchor, op.Sub(row, sel.w)))
        return op.And(group_ok, op.And(old, op.Or(not_causal, op.LessOrEqual(anchor, row))))

    last = op.Where(keys.causal, op.Sub(i1, 1), op.Sub(c.Nk, 1))
    n_f = op.ReduceMax(_count(op, op.LessOrEqual(sel.focus, last), [-1]), [0, 1], keepdims=0)
    focus_ok = op.And(at(_slice(op, keys.focus_ok, 0, n_f, 2)),
                      op.Or(not_causal, op.LessOrEqual(at(_slice(op, sel.focus, 0, n_f, 2)), i)))
    group_ok = complete(at(sel.anchors), at(keys.group_ok), i)                           # [B, Hkv, 1, b, G]
    n_g = _prefix_len(op, group_ok, sel.G)
    # Raw tokens needed ⊆ visible to the last row ∧ group not complete for the first row (both monotone in i).
    seen = op.And(keys.nonfocus_ok, op.Or(not_causal, op.LessOrEqual(sel.nonfocus, op.Sub(i1, 1))))
    needed = op.Cast(op.And(seen, op.Not(complete(keys.anchor_of, keys.group_ok_of, i0))), to=_I64)
    raw_idx, n_r, valid = _raw_selection(op, sel, needed)
    take = lambda x: at(op.GatherElements(x, raw_idx, axis=-1))
    visible = op.And(op.And(take(keys.nonfocus_ok), at(valid)), op.Or(not_causal, op.LessOrEqual(take(sel.nonfocus), i)))
    raw_ok = op.And(visible, op.Not(complete(take(keys.anchor_of), take(keys.group_ok_of), i)))
    return _Candidates(n_f, focus_ok, n_g, _slice(op, group_ok, 0, n_g, 4), raw_idx, n_r, raw_ok)


def _masked_candidates(op, c: _Call, sel: _Selection, i0: V, i1: V) -> _Candidates:
    """`blocked._candidates_masked`: completeness read off the block's mask rows (O(b·N) booleans)."""
    B, Hkv, h2, b = c.B, c.Hkv, c.h2, op.Sub(i1, i0)
    vis_rows = _visible(op, c, i0, i1)                                                    # [Bm, h1, h2, b, N]
    vis = op.Expand(vis_rows, _vec(op, B, Hkv, 1, b, c.Nk))                               # [B, Hkv, h2, b, N]

    def vis_at(pos):                                                                      # pos [B, Hkv, L]
        return op.GatherElements(vis, op.Expand(op.Unsqueeze(pos, [2, 3]), _vec(op, B, Hkv, h2, b, _dim(op, pos, 2))),
                                 axis=4)

    # Focus prefix: positions up to the last key any row of the block sees.
    last = op.ReduceMax(op.Where(vis_rows, c.jk, -1), [0, 1, 2, 3, 4], keepdims=0)
    n_f = op.ReduceMax(_count(op, op.LessOrEqual(sel.focus, last), [-1]), [0, 1], keepdims=0)
    focus_ok = vis_at(_slice(op, sel.focus, 0, n_f, 2))
    # Complete groups: every member visible and, under the window rule, anchor ≤ i − w.
    Gm = op.Mul(sel.G, sel.m)
    member_vis = vis_at(sel.nonfocus)                                                     # [B, Hkv, h2, b, Nn]
    complete = _all(op, _reshape(op, _slice(op, member_vis, 0, Gm, 4), B, Hkv, h2, b, sel.G, sel.m), [-1])
    i_minus_w = op.Unsqueeze(op.Sub(op.Range(i0, i1, 1), sel.w), [1])
    old = op.LessOrEqual(op.Unsqueeze(sel.anchors, [2, 3]), i_minus_w)
    complete = op.And(complete, op.Or(old, op.Not(sel.window)))                          # [B, Hkv, h2, b, G]
    n_g = _prefix_len(op, complete, sel.G)
    # Raw tokens: visible non-focus members of groups not complete for the row (the tail too).
    in_complete = _reshape(op, op.Expand(op.Unsqueeze(complete, [-1]), _vec(op, B, Hkv, h2, b, sel.G, sel.m)),
                           B, Hkv, h2, b, Gm)
    tail = op.Expand([False], _vec(op, B, Hkv, h2, b, op.Sub(sel.Nn, Gm)))
    need = op.And(member_vis, op.Not(op.Concat(in_complete, tail, axis=4)))
    raw_idx, n_r, valid = _raw_selection(op, sel, op.Cast(_any(op, need, [2, 3]), to=_I64))
    raw_ok = op.And(op.GatherElements(need, op.Expand(op.Unsqueeze(raw_idx, [2, 3]), _vec(op, B, Hkv, h2, b, n_r)),
                                      axis=4), op.Unsqueeze(valid, [2, 3]))
    return _Candidates(n_f, focus_ok, n_g, _slice(op, complete, 0, n_g, 4), raw_idx, n_r, raw_ok)


def _attend_block(op, c: _Call, sel: _Selection, cand: _Candidates, i0: V, i1: V) -> V:
    """`blocked._attend_block`: the block's rows [B, Hkv, rep, b, Dv] over its candidates, one softmax."""
    B, Hkv, rep, b = c.B, c.Hkv, c.rep, op.Sub(i1, i0)
    per_q = lambda x, n, e: op.Expand(op.Unsqueeze(x, [2]), _vec(op, B, Hkv, rep, n, e))  # kv head -> q heads
    raw_pos = op.GatherElements(sel.nonfocus, cand.raw_idx, axis=-1)
    keys = op.Concat(per_q(_slice(op, sel.kf, 0, cand.n_f, 2), cand.n_f, c.D), _slice(op, sel.kbar, 0, cand.n_g, 3),
                     per_q(_rows(op, c.k, raw_pos), cand.n_r, c.D), axis=3)
    values = op.Concat(per_q(_slice(op, sel.vf, 0, cand.n_f, 2), cand.n_f, c.Dv), _slice(op, sel.vbar, 0, cand.n_g, 3),
                       per_q(_rows(op, c.v, raw_pos), cand.n_r, c.Dv), axis=3)
    full = lambda x, n: op.Expand(x, _vec(op, B, Hkv, rep, b, n))
    ok = op.Concat(full(cand.focus_ok, cand.n_f), full(cand.group_ok, cand.n_g), full(cand.raw_ok, cand.n_r), axis=4)
    bias = op.Concat(op.Expand(0.0, _vec(op, cand.n_f)), op.Expand(sel.group_logit, _vec(op, cand.n_g)),
                     op.Expand(0.0, _vec(op, cand.n_r)), axis=0)
    return _attend(op, ok, op.Add(_logits(op, c, _slice(op, c.qv, i0, i1, 3), keys), bias), values)


def _for_each_block(op, c: _Call, block: Callable[..., V]) -> V:
    """[B, Hkv, rep, N, Dv]: ``block(op, i0, i1)`` -> rows [B, Hkv, rep, i1 − i0, Dv] for each
    block [i0, i1) of `BLOCK_SIZE` query rows, in one ``Loop`` (`_close_loop_bodies` makes its body
    closed)."""
    N = c.Nk
    trips = op.Div(op.Add(N, BLOCK_SIZE - 1), BLOCK_SIZE)
    acc0 = op.ConstantOfShape(_vec(op, c.B, c.Hkv, c.rep, 0, c.Dv), value=ir.tensor([0.0], dtype=_F32))

    def body(op, it, cond, acc):
        i0 = op.Mul(it, BLOCK_SIZE)
        return op.Identity(cond), op.Concat(acc, block(op, i0, op.Min(op.Add(i0, BLOCK_SIZE), N)), axis=3)

    inputs = [ir.val("it", _I64, []), ir.val("cond", _BOOL, []), ir.Value(name="acc", type=acc0.type)]
    graph = op.builder.subgraph(body, inputs, [ir.Value(name="cond_out"), ir.Value(name="acc_out")], name="dga_block")
    return op.Loop(trips, None, acc0, body=graph)


def _mask_is_keys_and_causal(op, c: _Call) -> V:
    """Whether the full-row mask equals (its last row) ∧ (j ≤ i): key padding and causality. O(N²), once."""
    keys = _slice(op, c.mask, op.Sub(c.Nm, 1), c.Nm, 3)                                  # [Bm, h1, h2, 1, N]
    causal = op.LessOrEqual(c.jk, op.Unsqueeze(op.Range(0, c.Nk, 1), [1]))
    return _all(op, op.Equal(c.mask, op.And(keys, causal)), [0, 1, 2, 3, 4])


def _if(op, cond: V, then: Callable[..., V], otherwise: Callable[..., V], name: str) -> V:
    branch = lambda fn, tag: op.builder.subgraph(fn, [], [ir.Value(name=f"{name}_{tag}")], name=f"{name}_{tag}")
    return op.If(cond, then_branch=branch(then, "then"), else_branch=branch(otherwise, "else"))


def _dga_attention(op, c: _Call) -> V:
    """DGA for a self-attention call of N ≥ min_seq_len: [B, Hq, N, Dv]."""
    sel = _select(op, c)
    # No mask, or a "key padding [∧ causal]" one, takes the positional path: O(b·(n_f + G + raw))
    # per block; any other mask reads its rows (O(b·N) per block).
    mask_causal = _if(op, op.And(op.Equal(c.Nm, c.Nk), op.Greater(c.Nk, 1)),
                      lambda op: _mask_is_keys_and_causal(op, c), lambda op: op.Identity(False), "mask_causal")
    positional = op.And(op.Equal(c.h2, 1), op.Or(op.Equal(c.Nm, 1), mask_causal))

    def positional_blocks(op):
        keys = _key_tables(op, c, sel, op.Or(c.causal, mask_causal))
        return _for_each_block(op, c, lambda op, i0, i1: _attend_block(
            op, c, sel, _positional_candidates(op, c, sel, keys, i0, i1), i0, i1))

    def masked_blocks(op):
        return _for_each_block(op, c, lambda op, i0, i1: _attend_block(
            op, c, sel, _masked_candidates(op, c, sel, i0, i1), i0, i1))

    out = _if(op, positional, positional_blocks, masked_blocks, "blocks")
    return _reshape(op, out, c.B, c.Hq, c.Nk, c.Dv)


# ---------------------------------------------------------------- the function

def _body(op, q: V, k: V, v: V, attn_mask: V) -> V:
    c = _read_call(op, q, k, v, attn_mask)
    applies = op.And(op.Equal(c.Nq, c.Nk), op.GreaterOrEqual(c.Nk, op.Max(_attribute(op, "min_seq_len"), 1)))
    out = _if(op, applies, lambda op: _dga_attention(op, c), lambda op: _dense_attention(op, c), "dga")
    return op.CastLike(out, q)


def _close_loop_bodies(fn: ir.Function) -> None:
    """Makes every Loop body read nothing from enclosing graphs: a constant it reads is copied
    in, any other value becomes a loop-carried pass-through (an explicit Loop input).

    ONNX Runtime 1.32 crashes (SIGSEGV creating the session, issue #13) when constant folding
    inlines nested If branches around a Loop whose body reads an outer constant, and with static
    shapes every shape scalar is one."""
    for loop in [n for n in ir.traversal.RecursiveGraphIterator(fn) if n.op_type == "Loop"]:
        body = loop.attributes["body"].value
        nodes = list(ir.traversal.RecursiveGraphIterator(body))
        inner, graphs = {id(n) for n in nodes}, {id(body)} | {id(n.graph) for n in nodes}
        outer = {id(x): x for n in nodes for x in n.inputs if x is not None and id(x.graph) not in graphs}
        for x in outer.values():
            const = x.producer()
            value = const.attributes.get("value") if const is not None and const.op_type == "Constant" else None
            if value is not None and not value.is_ref():
                inside = ir.node("Constant", [], attributes={"value": value.value})
                body.insert_before(body[0], inside)
                inside = inside.outputs[0]
            else:  # loop-carried: Loop input, body input, pass-through body output, Loop output
                if len(body.outputs) != len(loop.inputs) - 1:
                    raise NotImplementedError("_close_loop_bodies: a Loop with scan outputs")
                inside = ir.Value(name=x.name, type=x.type, shape=None if x.shape is None else ir.Shape(x.shape))
                body.inputs.append(inside)
                passthrough = ir.node("Identity", [inside])
                body.append(passthrough)
                body.outputs.append(passthrough.outputs[0])
                loop.resize_inputs(len(loop.inputs) + 1)
                loop.replace_input_with(len(loop.inputs) - 1, x)
                loop.resize_outputs(len(loop.outputs) + 1)
            for use in [u for u in x.uses() if id(u.node) in inner]:
                use.node.replace_input_with(use.idx, inside)


def _unique_names(fn: ir.Function) -> None:
    """Names every node and value of the body uniquely across all its graphs (the builder counts per graph)."""
    keep = {id(x) for x in (*fn.inputs, *fn.outputs)}
    for i, node in enumerate(ir.traversal.RecursiveGraphIterator(fn)):
        node.name = f"n{i}_{node.op_type}"
        node.metadata_props.clear()
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                for x in attr.value.inputs:
                    x.name = f"{x.name}_{i}"
        for j, x in enumerate(node.outputs):
            if id(x) not in keep:
                x.name = f"{node.op_type}_{i}_{j}"


def function_proto(opset: int) -> onnx.FunctionProto:
    """The FunctionProto of ``ai.dga::DynamicGroupAttention`` importing ONNX opset ``opset`` (≥ 18).

    Its attributes carry their defaults (`_schema.ATTRIBUTES`: `DGAConfig`'s). A fresh proto per call."""
    return onnx.FunctionProto.FromString(_function_bytes(opset))


@functools.lru_cache(maxsize=None)
def _function_bytes(opset: int) -> bytes:
    # q, k, v are typed float32 for the builder's type inference only: the FunctionProto's inputs are untyped.
    f32 = lambda name: ir.val(name, _F32)
    fn = build_function(_body, [f32("q"), f32("k"), f32("v"), ir.val("attn_mask", _BOOL)], domain=DOMAIN,
                        name=OP_TYPE, opset_imports={"": opset},
                        attributes=[ir.Attr(a.name, ir.AttributeType(a.onnx_type), a.default) for a in ATTRIBUTES])
    fn.outputs[0].name = "out"
    _close_loop_bodies(fn)
    _unique_names(fn)
    return ir.serde.serialize_function(fn, create_value_info=False).SerializeToString()
