"""Dead-code removal after a rewrite: the replaced site and the producers that only fed it."""

from __future__ import annotations

from torch import fx

__all__ = ["erase_dead"]


def erase_dead(graph: fx.Graph, start: fx.Node) -> None:
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
