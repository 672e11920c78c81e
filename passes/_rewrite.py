"""`rewrite`: runs the rules over a graph, applies the shared checks, inserts ``dga.attention``.

Requires: a `torch.fx.GraphModule` (Dynamo torch-level or ATen-level) or a
`torch.export.ExportedProgram`, with ``meta["val"]`` / ``meta["example_value"]`` on the nodes.
Ensures: the input is not mutated; each rewritten site computes ``torch.ops.dga.attention`` on
the site's own q, k, v, mask, is_causal, scale and dropout (GQA ``repeat_kv`` copies are
dropped: the op takes Hq ≠ Hkv); every other site is unchanged and listed with its reason.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any, Optional, Union

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten, tree_map_only

from .._validation import finite_bias
from ..config import DGAConfig
from ..ops import OpCall
from . import _graph as g
from ._graph import aten
from ._report import RewriteReport, Site
from ._rules import RULES, Match

__all__ = ["rewrite", "rewrite_graph_module"]

Program = Union[fx.GraphModule, "torch.export.ExportedProgram"]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_ORDER = ("none", "bool", "additive", "input", "bias")  # worst last


def rewrite(program: Program, config: Optional[DGAConfig] = None) -> tuple[Program, RewriteReport]:
    """Rewrites every attention site of ``program`` into ``torch.ops.dga.attention``.

    Args:
        program: a `torch.fx.GraphModule` (torch- or ATen-level) or a `torch.export.ExportedProgram`.
            It is not mutated: the rewrite works on a deep copy.
        config: `DGAConfig` baked into the inserted calls (default ``DGAConfig()``); with
            ``strict=True`` a site that stays dense raises `RewriteError`.

    Returns:
        (rewritten copy of the same kind, `RewriteReport` listing every site and near miss).
    """
    cfg = config or DGAConfig()
    if isinstance(program, torch.export.ExportedProgram):
        out = copy.deepcopy(program)
        report = rewrite_graph_module(out.graph_module, cfg, _program_constants(out))
    elif isinstance(program, fx.GraphModule):
        out = copy.deepcopy(program)
        report = rewrite_graph_module(out, cfg)
    else:
        raise TypeError(f"rewrite() takes a torch.fx.GraphModule or a torch.export.ExportedProgram, got "
                        f"{type(program).__name__}; trace a module first (torch.export.export(model, args))")
    return out, report


def rewrite_graph_module(gm: fx.GraphModule, cfg: DGAConfig, constants: Optional[dict] = None) -> RewriteReport:
    """`rewrite` in place (the backend's entry: Dynamo hands over a fresh graph). ``constants``
    maps placeholder names to the tensors they stand for (lifted buffers of an ExportedProgram)."""
    consts = dict(constants or {})
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _get_attr(gm, node.target)
            if isinstance(t, torch.Tensor):
                consts[node.name] = t
    for node in gm.graph.nodes:
        t = consts.get(node.name)
        if t is not None and t.numel() == 1 and (t.dtype.is_floating_point or t.dtype == torch.bool):
            node.meta[g.CONSTANT_KEY] = float(t)
    report = RewriteReport()
    for node in list(gm.graph.nodes):
        for rule in RULES:
            m = rule.match(node)
            if m is not None:
                report.sites.append(_apply(gm.graph, m, cfg, consts, len(report.sites)))
    if report.num_rewritten:
        gm.graph.lint()
        gm.recompile()
    report.log()
    if cfg.strict:
        report.raise_if_dense()
    return report


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _program_constants(ep) -> dict:
    sig = ep.graph_signature
    named = {**ep.state_dict, **ep.constants}
    lifted = {**sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    return {node: named[fqn] for node, fqn in lifted.items() if fqn in named}


# ---------------------------------------------------------------------------------------------
# shared checks
# ---------------------------------------------------------------------------------------------

def _apply(graph: fx.Graph, m: Match, cfg: DGAConfig, consts: dict, index: int) -> Site:
    """Rewrites the match unless a check or the policy keeps it dense; ``index``: the site's position
    among the graph's attention sites."""
    mask_kind = _combined_mask_kind(m.masks, consts)
    reason = m.reason or _check(m, mask_kind) or _policy(m, cfg, index)
    if reason is None:
        _strip_repeat_kv(m)
        if m.scale is None:
            m.scale = 1.0 / math.sqrt(g.shape(m.q)[-1])
        else:
            _tag_scale(m)
        _insert(graph, m, cfg)
    k_shape = g.shape(m.k)
    if k_shape is not None and m.k_transposed:
        k_shape = k_shape[:2] + (k_shape[3], k_shape[2])
    return Site(m.rule, tuple(m.tags), g.module_path(m.anchor), g.shape(m.q), k_shape, g.shape(m.v), mask_kind,
                "yes" if m.is_causal else ("mask" if m.masks else "no"), reason is None,
                reason or _notes(m), m.anchor.name)


def _check(m: Match, mask_kind: str) -> Optional[str]:
    """Why the site must stay dense, or None."""
    shapes = [g.shape(x) for x in (m.q, m.k, m.v)]
    if any(s is None for s in shapes):
        return "no shape metadata on q/k/v (meta['val']); trace with torch.export, make_fx or Dynamo"
    if any(len(s) != 4 for s in shapes):
        return f"q/k/v are not 4-D [B, H, N, D]: {shapes}"
    (_, hq, nq, d), (_, hkv, *kdims), _ = shapes
    nk = kdims[1] if m.k_transposed else kdims[0]
    dtypes = {g.tensor_val(x).dtype for x in (m.q, m.k, m.v)}
    if len(dtypes) != 1 or not dtypes <= set(_FLOATS):
        return f"q/k/v dtypes {sorted(map(str, dtypes))} are not one floating type"
    anchor = g.tensor_val(m.anchor)
    if anchor is not None and anchor.dtype != g.tensor_val(m.q).dtype:
        return f"the attention output is {anchor.dtype} but q is {g.tensor_val(m.q).dtype}"
    if mask_kind == "bias":
        return "the mask holds finite additive biases (ALiBi / T5-style position bias?): not DGA-compatible"
    if None not in (g.static_int(nq), g.static_int(nk)) and nq != nk:
        return f"Nq={nq} ≠ Nk={nk} (cross-attention or decode): DGA would compute dense attention anyway"
    if None not in (g.static_int(hq), g.static_int(hkv)) and hq % hkv:
        return f"Hq={hq} is not a multiple of Hkv={hkv}"
    if m.scale is None and g.static_int(d) is None:
        return f"the head dim {d} is dynamic, so the default scale 1/sqrt(D) is not a constant"
    return None


# policy: a mask that bounds each query's keys (sliding window) leaves DGA little to save

_AND = g.family(operator.and_, torch.logical_and, torch.bitwise_and, "__and__", "logical_and", "bitwise_and",
                aten.logical_and, aten.bitwise_and, aten.__and__)
_GT = g.family(operator.gt, operator.ge, torch.gt, torch.ge, "gt", "ge", "__gt__", "__ge__", aten.gt, aten.ge)
_LT = g.family(operator.lt, operator.le, torch.lt, torch.le, "lt", "le", "__lt__", "__le__", aten.lt, aten.le)


def _policy(m: Match, cfg: DGAConfig, index: int) -> Optional[str]:
    """Why DGA is not wanted here (``cfg.dense_layers``) or not worth it (``cfg.min_saving``, when
    the graph proves it), else None."""
    if index in cfg.dense_layers:
        return f"attention site {index} is in DGAConfig.dense_layers={cfg.dense_layers}: kept dense"
    windows = [w for node, sense in m.masks if sense == "attend" for w in [_window(node, 16)] if w]
    if not windows:
        return None
    w_keys = min(windows)
    kept = min(1.0, cfg.focus_ratio + 1.0 / cfg.group_size + (cfg.window + cfg.group_size) / w_keys)
    if 1.0 - kept >= cfg.min_saving:
        return None
    return (f"the mask limits each query to a sliding window of {w_keys} keys: DGA would attend ≈{kept:.0%} of "
            f"them, saving less than min_saving={cfg.min_saving:g}")


def _window(x: Any, depth: int) -> Optional[int]:
    """W when ``x`` ANDs in ``kv > q − W`` (or ``q − kv < W``), as HF sliding-window masks do."""
    if not isinstance(x, fx.Node) or depth == 0:
        return None
    if g.is_op(x, g.CAST | g.LAYOUT):
        return _window(x.args[0], depth - 1)
    if g.is_op(x, _AND):
        found = [w for a in x.args[:2] for w in [_window(a, depth - 1)] if w]
        return min(found) if found else None
    if g.is_op(x, g.WHERE) and len(x.args) == 3 and g.is_masked_value(g.constant(x.args[2])):
        return _window(x.args[0], depth - 1)
    lower, upper = (x.args[0], x.args[1]) if g.is_op(x, _LT) else (x.args[1], x.args[0]) if g.is_op(x, _GT) \
        else (None, None)
    c_upper = g.constant(upper)
    if g.is_op(lower, g.SUB) and c_upper is not None and c_upper > 0:  # q − kv < W
        return int(c_upper)
    c_sub = g.constant(lower.args[1]) if g.is_op(lower, g.SUB) else None
    if isinstance(upper, fx.Node) and c_sub is not None and c_sub > 0:  # kv > q − W
        return int(c_sub)
    return None


def _tag_scale(m: Match) -> None:
    default = 1.0 / math.sqrt(g.shape(m.q)[-1]) if g.static_int(g.shape(m.q)[-1]) else None
    if m.rule != "sdpa":
        m.tags.append("scale=1/sqrt(D)" if default and math.isclose(m.scale, default, rel_tol=1e-6)
                      else f"scale={m.scale:.6g}")


def _notes(m: Match) -> str:
    return f"scale={m.scale:.6g}" + (f", dropout_p={m.dropout_p:g}" if m.dropout_p else "")


# mask provenance: a float mask is DGA-compatible when every entry is 0 or masked (≤ −1e4)

def _combined_mask_kind(masks: list, consts: dict) -> str:
    kinds = ["none"] + [_mask_kind(node, consts, 12) if sense == "attend" else "bool" for node, sense in masks]
    return max(kinds, key=_MASK_ORDER.index)


def _mask_kind(x: Any, consts: dict, depth: int) -> str:
    """"bool", "additive" (0 / masked), "input" (a graph input) or "bias" for a mask operand."""
    if not isinstance(x, fx.Node):
        c = g.constant(x)
        return "additive" if g.is_zero(c) or g.is_masked_value(c) else "bias"
    v = g.tensor_val(x)
    if v is not None and v.dtype == torch.bool:
        return "bool"
    if x.name in consts:
        t = consts[x.name]
        return "bool" if t.dtype == torch.bool else ("bias" if bool(finite_bias(t).any()) else "additive")
    if x.op == "placeholder":
        return "input"
    c = g.constant(x)
    if c is not None:
        return "additive" if g.is_zero(c) or g.is_masked_value(c) else "bias"
    if depth == 0:
        return "bias"
    worst = lambda *xs: max((_mask_kind(a, consts, depth - 1) for a in xs), key=_MASK_ORDER.index)
    if g.is_op(x, g.CAST | g.LAYOUT):
        return worst(x.args[0])
    if g.is_op(x, g.ADD):
        return worst(x.args[0], x.args[1])
    if g.is_op(x, g.WHERE) and len(x.args) == 3:
        return worst(x.args[1], x.args[2])
    if g.is_op(x, g.MASKED_FILL):
        return worst(x.args[0], g.arg(x, 2, "value"))
    if g.is_op(x, g.MUL):  # (1 − m)·finfo.min with m ∈ {0, 1}: the classic extended attention mask
        a, b = x.args[0], x.args[1]
        c, other = (g.constant(b), a) if g.constant(b) is not None else (g.constant(a), b)
        if g.is_masked_value(c) and _binary(other, depth):
            return "additive"
    return "bias"


def _binary(x: Any, depth: int) -> bool:
    """Whether every entry of ``x`` is 0 or 1 (a bool, or 1 − such a tensor, in any float type)."""
    for _ in range(depth):
        v = g.tensor_val(x)
        if v is not None and v.dtype == torch.bool:
            return True
        if g.is_op(x, g.CAST | g.LAYOUT):
            x = x.args[0]
        elif g.is_op(x, g.SUB) and g.constant(x.args[0]) == 1.0:
            x = x.args[1]
        elif g.is_op(x, g.SUB) and g.constant(x.args[1]) == 1.0 and "rsub" in str(x.target):
            x = x.args[0]
        else:
            return False
    return False


_UNSQUEEZE = g.family("unsqueeze", torch.unsqueeze, aten.unsqueeze, operator.getitem, "__getitem__")


def _strip_repeat_kv(m: Match) -> None:
    """k = reshape(expand(k0[:, :, None], (B, Hkv, n, N, D)), (B, Hkv·n, N, D)) -> k0 (same for v)."""
    if m.k_transposed or m.backward is not None:  # the backward's dk, dv have the repeated shape
        return
    k0, v0 = _repeat_source(m.k), _repeat_source(m.v)
    if k0 is not None and v0 is not None and g.shape(k0)[1] == g.shape(v0)[1]:
        m.k, m.v = k0, v0
        m.tags.append("gqa:repeat_kv")


def _repeat_source(x: fx.Node) -> Optional[fx.Node]:
    s = g.shape(x)
    while g.is_op(x, g.family("reshape", "view", "clone", "contiguous", aten.view, aten.reshape, aten._unsafe_view,
                              aten.clone)):
        x = x.args[0]
    if not g.is_op(x, g.family("expand", aten.expand)) or len(g.shape(x) or ()) != 5:
        return None
    src = x.args[0]
    if g.is_op(src, _UNSQUEEZE) and len(g.shape(src) or ()) == 5:
        src = src.args[0]
    s0 = g.shape(src)
    if s0 is None or len(s0) != 4 or s0[0] != s[0] or s0[2:] != s[2:]:
        return None
    return src


# ---------------------------------------------------------------------------------------------
# the rewrite
# ---------------------------------------------------------------------------------------------

def _insert(graph: fx.Graph, m: Match, cfg: DGAConfig) -> None:
    anchor = m.anchor
    with graph.inserting_before(anchor):
        q = m.q
        for scalar, how in m.q_factors:  # scale·q·kᵀ = (s·q)·kᵀ: a run-time scale goes onto q
            q = _call(graph, aten.mul.Tensor if how == "mul" else aten.div.Tensor, (q, scalar), anchor)
        k = _call(graph, aten.transpose.int, (m.k, -2, -1), anchor) if m.k_transposed else m.k
        mask = _combine_masks(graph, m.masks, anchor)
        seed = None
        if m.dropout_p > 0:
            seed = _call(graph, aten.randint.low, (0, 2**62, []), anchor,
                         dict(dtype=torch.int64, device=g.tensor_val(m.q).device))
        args = OpCall(q, k, m.v, mask, m.dropout_p, seed, m.is_causal, m.scale, cfg).args()
        out = _call(graph, torch.ops.dga.attention.default, args, anchor)
    anchor.replace_all_uses_with(out)
    if m.backward is not None:
        with graph.inserting_before(m.backward):
            grads = _call(graph, torch.ops.dga.attention_backward.default, (m.grad_out,) + args, m.backward)
        m.backward.replace_all_uses_with(grads)
        _erase_dead(graph, m.backward)
    _erase_dead(graph, anchor)


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
    fake_args = tree_map_only(fx.Node, g.val, (args, kwargs or {}))
    modes = {x.fake_mode for x in tree_flatten(fake_args)[0] if isinstance(x, FakeTensor)}
    if len(modes) == 1:  # make_fx graphs may mix modes: the node then goes without "val"
        with modes.pop():
            value = target(*fake_args[0], **fake_args[1])
        node.meta["val" if "val" in like.meta or "example_value" not in like.meta else "example_value"] = value
    return node


def _erase_dead(graph: fx.Graph, start: fx.Node) -> None:
    """Erases ``start`` and, transitively, the producers that only fed it (not impure ones)."""
    work, erased = [start], set()
    while work:
        node = work.pop()
        if node in erased or node.users or not _erasable(node):
            continue
        work.extend(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)


def _erasable(node: fx.Node) -> bool:
    """Dead and free of side effects (random ops such as dropout count as free: their result is unused)."""
    if node.op not in ("call_function", "call_method") or node.target in fx.node._side_effectful_functions:
        return False
    schema = getattr(node.target, "_schema", None)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return not (schema is not None and schema.is_mutable) and not name.endswith("_")
