"""`rewrite`: runs the rules over a graph, then per site the checks, the policy and the rewrite.

Requires: a `torch.fx.GraphModule` (Dynamo torch-level or ATen-level) or a
`torch.export.ExportedProgram`, with ``meta["val"]`` / ``meta["example_value"]`` on the nodes.
Ensures: the input is not mutated; each rewritten site computes ``torch.ops.dga.attention`` on
the site's own q, k, v, mask, is_causal, scale and dropout (GQA ``repeat_kv`` copies are
dropped: the op takes Hq ≠ Hkv); every other site is unchanged and listed with its reason.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Optional, Union

import torch
from torch import fx

from .._validation import validate_config
from ..config import DGAConfig
from .. import policy
from ..policy import RewriteReport, Site
from . import _graph as g
from ._checks import check_site
from ._masks import MaskTracer
from ._provenance import same_sequence
from ._rules import RULES, Match, Rule
from ._walk import Walker

__all__ = ["rewrite", "rewrite_graph_module"]

Program = Union[fx.GraphModule, "torch.export.ExportedProgram"]


def rewrite(program: Program, config: Optional[DGAConfig] = None) -> tuple[Program, RewriteReport]:
    """Rewrites every attention site of ``program`` into ``torch.ops.dga.attention``.

    Args:
        program: a `torch.fx.GraphModule` (torch- or ATen-level) or a `torch.export.ExportedProgram`.
            It is not mutated: the rewrite works on a deep copy.
        config: `DGAConfig` baked into the inserted calls (default ``DGAConfig()``; with a plan,
            each site's own config, `DGAConfig.for_site`); with ``strict=True`` a site that stays
            dense raises `RewriteError`.

    Returns:
        (rewritten copy of the same kind, `RewriteReport` listing every site and near miss).
    """
    cfg = validate_config(config)
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
    cfg = validate_config(cfg)
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
        if getattr(node, "_erased", False):
            continue
        for rule in RULES:
            m = rule.pattern(node)
            if m is not None:
                report.sites.append(_apply(gm.graph, rule, m, cfg, consts, len(report.sites)))
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


def layer_index(module_path: str) -> Optional[int]:
    """The layer number in a module path (``model.layers.3.self_attn`` -> 3), or None."""
    found = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", module_path)
    return int(found[-1]) if found else None


def _apply(graph: fx.Graph, rule: Rule, m: Match, cfg: DGAConfig, consts: dict, index: int) -> Site:
    """Checks the match, asks the policy, rewrites it if both agree; ``index``: the site's order
    among the graph's attention sites (its position when the module path shows no layer)."""
    walker = Walker()
    masks = MaskTracer(walker, consts).site([(node, sense) for node, sense, _ in m.masks])
    reason = rule.check(m) or (None if m.weights_used else check_site(m, masks))
    module = g.module_path(m.anchor)
    position = layer_index(module)
    facts = policy.SiteFacts(position=index if position is None else position, weights_used=m.weights_used)
    if reason is None and not m.weights_used:
        (_, _, nq, d), (_, _, nk, _) = m.q.shape, m.k.shape
        causal = m.is_causal or masks.causal
        facts = policy.SiteFacts(
            position=facts.position, nq=g.static_int(nq), nk=g.static_int(nk), window=masks.window,
            causal=True if causal else (False if not m.masks else None),
            same_sequence=same_sequence(m.q.node, m.k.node, walker))
    decision = policy.decide(facts, cfg) if reason is None else policy.Decision(False, reason)
    if decision.rewrite:
        if m.scale is None:
            m.scale = 1.0 / math.sqrt(d)
        else:
            _tag_scale(m)
        rule.rewrite(graph, m, decision.config)
    shapes = [None if x is None else x.shape for x in (m.q, m.k, m.v)]
    notes = "; ".join(x for x in (decision.reason, _notes(m)) if x) if decision.rewrite else decision.reason
    return Site(m.rule, tuple(m.tags), module, *shapes, masks.kind,
                "yes" if m.is_causal else ("mask" if m.masks else "no"), decision.rewrite, notes, m.anchor.name,
                facts.position, decision.config.budget() if decision.rewrite else "", decision.uncalibrated)


def _tag_scale(m: Match) -> None:
    d = m.q.shape[-1]
    default = 1.0 / math.sqrt(d) if g.static_int(d) else None
    if m.rule != "sdpa":
        m.tags.append("scale=1/sqrt(D)" if default and math.isclose(m.scale, default, rel_tol=1e-6)
                      else f"scale={m.scale:.6g}")


def _notes(m: Match) -> str:
    return f"scale={m.scale:.6g}" + (f", dropout_p={m.dropout_p:g}" if m.dropout_p else "")
