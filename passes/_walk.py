"""The one graph walker of the passes, the one list of ops it steps over, and its limit.

Every analysis walks the graph through a `Walker`: from a node to its producer (`Walker.up`)
or to its one value user (`Walker.down`), a node at a time. At each node the caller's ``step``
is asked first (rule tables claim the ops they understand); a node no rule claims is stepped
over when it is in `PASS_THROUGH` and ends the walk otherwise. Walks made through one `Walker`
share its budget of `MAX_NODES` nodes, so one site's analysis is bounded however the graph is
built; a walk that runs out of budget ends as a failed match.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from torch import fx

from . import _graph as g

__all__ = ["MANY_USERS", "MAX_NODES", "PASS_THROUGH", "Stop", "Trail", "Walker", "value_users"]

#: Ops whose output holds their first argument's values in another dtype, shape or layout
#: (casts, views, copies, broadcasts, slices): a walk steps over them unless ``step`` claims them.
PASS_THROUGH = g.CAST | g.LAYOUT

#: Nodes one site's analysis may visit, all walks together. The chains it walks are short (HF
#: eager attention: 7 nodes from the score matmul to the output matmul; a decomposed einsum: 5
#: layout nodes per operand; an HF padded sliding-window mask: about 20 nodes); the budget only
#: stops runaway walks on unusual graphs.
MAX_NODES = 512


@dataclasses.dataclass(frozen=True)
class Stop:
    """Returned by a ``step``: end the walk here with ``value``."""

    value: Any = None


@dataclasses.dataclass
class Trail:
    """Where a walk went: ``path`` the nodes it stepped over or through (in walk order), ``end``
    the node it stopped at (None: it left the graph or ran out of budget), ``value`` what the
    last ``step`` returned in its `Stop` (None when no step stopped it)."""

    path: list
    end: Optional[fx.Node]
    value: Any = None


def value_users(x: fx.Node) -> list:
    """The users of ``x`` that read its values (not only its shape or dtype)."""
    return [u for u in x.users if not (g.is_op(u, g.META_ONLY) or _reads_shape_only(u))]


def _reads_shape_only(node: fx.Node) -> bool:
    """zeros_like(p) and friends read only p's shape."""
    return g.is_op(node, g.FILL_CONST) and g.is_zero(g.constant(node))


class Walker:
    """Walks producers (`up`) or value users (`down`); all walks share ``limit`` nodes."""

    def __init__(self, limit: int = MAX_NODES):
        self.left = limit

    def _spend(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def up(self, x: Any, step: Callable[[fx.Node], Any]) -> Trail:
        """From ``x`` towards its producers. ``step(node)`` returns a node to continue at (the
        node counts as consumed), a `Stop`, or None (step over a `PASS_THROUGH` op to its first
        argument, else end there)."""
        path = []
        while isinstance(x, fx.Node) and self._spend():
            r = step(x)
            if isinstance(r, Stop):
                return Trail(path, x, r.value)
            if r is None and not g.is_op(x, PASS_THROUGH):
                return Trail(path, x)
            path.append(x)
            x = x.args[0] if r is None else r
        return Trail(path, None)

    def down(self, x: fx.Node, step: Callable[[fx.Node, fx.Node], Any]) -> Trail:
        """From ``x`` to its one value user, and on. ``step(user, x)`` returns a node to continue
        at, a `Stop`, or None (step over a `PASS_THROUGH` user that reads ``x`` as its first
        argument, else end at ``x``). Ends at ``x`` with value `MANY_USERS` when ``x`` has
        several value users (or none)."""
        path = []
        while self._spend():
            users = value_users(x)
            if len(users) != 1:
                return Trail(path, x, MANY_USERS)
            (user,) = users
            r = step(user, x)
            if isinstance(r, Stop):
                return Trail(path, user, r.value)
            if r is None and not (g.is_op(user, PASS_THROUGH) and user.args[0] is x):
                return Trail(path, x)
            path.append(user)
            x = user if r is None else r
        return Trail(path, None)


#: `Trail.value` of a `Walker.down` walk that found several value users
MANY_USERS = "several users"
