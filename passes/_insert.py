"""Insertion: one ``torch.ops.dga.attention`` call in place of a matched site.

The call is built with `dga_compile.ops.OpCall` from the match's bindings: q, k, v permuted to
[B, H, N, D] where the graph holds them in another layout, a run-time scale applied to q, the
masks brought to [B, H, Nq, Nk] and combined into one, a dropout seed drawn in the graph; the
output is turned back into the anchor's layout, the anchor's uses are redirected, and the
nodes only it used are erased (`_dce`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

from ..ops import OpCall
from . import _graph as g
from ._dce import erase_dead
from ._graph import aten

__all__ = ["insert_site", "replace_backward"]


def insert_site(graph: fx.Graph, m, config) -> tuple:
    """Replaces the match ``m`` (a `_rules.Match`) by ``dga.attention``; returns the op's arguments."""
    anchor = m.anchor
    with graph.inserting_before(anchor):
        q = _operand(graph, m.q, anchor)
        for scalar, how in m.q_factors:  # scale·q·kᵀ = (s·q)·kᵀ: a run-time scale goes onto q
            q = _call(graph, aten.mul.Tensor if how == "mul" else aten.div.Tensor, (q, scalar), anchor)
        k, v = _operand(graph, m.k, anchor), _operand(graph, m.v, anchor)
        masks = [(_apply(graph, node, ops, anchor), sense) for node, sense, ops in m.masks]
        mask = _combine_masks(graph, masks, anchor)
        seed = None
        if m.dropout_p > 0:
            seed = _call(graph, aten.randint.low, (0, 2**62, []), anchor,
                         dict(dtype=torch.int64, device=g.tensor_val(m.q.node).device))
        args = OpCall(q, k, v, mask, m.dropout_p, seed, m.is_causal, m.scale, config).args()
        out = _apply(graph, _call(graph, torch.ops.dga.attention.default, args, anchor), m.out_plan, anchor)
    anchor.replace_all_uses_with(out)
    erase_dead(graph, anchor)
    return args


def replace_backward(graph: fx.Graph, m, args: tuple) -> None:
    """Joint graphs: the paired SDPA backward becomes ``dga.attention_backward`` of the same call."""
    with graph.inserting_before(m.backward):
        grads = _call(graph, torch.ops.dga.attention_backward.default, (m.grad_out,) + args, m.backward)
    m.backward.replace_all_uses_with(grads)
    erase_dead(graph, m.backward)


def _operand(graph: fx.Graph, op, like: fx.Node) -> fx.Node:
    return op.node if op.perm is None else _call(graph, aten.permute.default, (op.node, list(op.perm)), like)


def _apply(graph: fx.Graph, x, ops: list, like: fx.Node):
    """``x`` through the layout ops ``ops`` ((target, args, kwargs) from `_layout.plan` / `mask_plan`)."""
    for target, args, kwargs in ops:
        x = _call(graph, target, (x,) + tuple(args), like, kwargs)
    return x


def _combine_masks(graph: fx.Graph, masks: list, anchor: fx.Node) -> Optional[fx.Node]:
    """One mask for the op: bool masks ANDed, additive ones summed, bool-with-additive via where."""
    out = None
    for node, sense in masks:
        if sense == "fill":
            node = _call(graph, aten.logical_not.default, (node,), anchor)
        if out is None:
            out = node
            continue
        a_bool, b_bool = (g.tensor_val(x).dtype == torch.bool for x in (out, node))
        if a_bool and b_bool:
            out = _call(graph, aten.logical_and.default, (out, node), anchor)
        elif not a_bool and not b_bool:
            out = _call(graph, aten.add.Tensor, (out, node), anchor)
        else:
            cond, additive = (out, node) if a_bool else (node, out)
            out = _call(graph, aten.where.ScalarOther, (cond, additive, float("-inf")), anchor)
    return out


def _call(graph: fx.Graph, target, args: tuple, like: fx.Node, kwargs: Optional[dict] = None) -> fx.Node:
    """Inserts ``target(*args, **kwargs)`` with fake-tensor metadata and ``like``'s module stack."""
    node = graph.call_function(target, args, kwargs or {})
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    value = _fake_value(target, tree_map_only(fx.Node, g.val, (args, kwargs or {})))
    if value is not None:
        node.meta["val" if "val" in like.meta or "example_value" not in like.meta else "example_value"] = value
    return node


def _fake_value(target, fake_args: tuple):
    """``target`` run on the arguments' fake values; make_fx graphs may mix fake modes: then on
    fresh fakes of the same (static) shapes. None when that is not possible either."""
    leaves = tree_flatten(fake_args)[0]
    modes = {x.fake_mode for x in leaves if isinstance(x, FakeTensor)}
    if len(modes) == 1:
        with modes.pop():
            return target(*fake_args[0], **fake_args[1])
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if any(not all(isinstance(n, int) for n in t.shape) for t in tensors):
        return None
    mode = FakeTensorMode()
    with mode:
        fresh = tree_map_only(torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                                          device=t.device), fake_args)
        return target(*fresh[0], **fresh[1])
