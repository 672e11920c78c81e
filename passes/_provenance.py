"""Where q and k come from: self-attention (one input sequence) or cross-attention (two).

`same_sequence` walks from q and from k up to the projections that made them (`PROJECTION`
ops), through the token-wise ops in between (views, splits of a fused qkv projection, rotary
embeddings, casts), then from each projection's input up through normalisation to the
residual stream it reads. Self-attention reads one stream; cross-attention reads two, neither
shown to be the other. When q or k is a graph input (nothing is shown) the answer is None.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx

from . import _graph as g
from ._graph import aten
from ._walk import PASS_THROUGH, Stop, Walker

__all__ = ["same_sequence"]

_SPLIT = g.family(torch.split, "split", torch.chunk, "chunk", torch.unbind, "unbind", aten.split,
                  aten.split_with_sizes, aten.chunk, aten.unbind)
_CAT = g.family(torch.cat, aten.cat)
_ELEMENTWISE = g.MUL | g.DIV | g.ADD | g.SUB
#: token-wise ops between an activation and q / k (all tensor operands of the output's shape are followed)
_TOKENWISE = PASS_THROUGH | g.PERMUTE | g.TRANSPOSE | g.MT | g.NEG | _SPLIT | _CAT | _ELEMENTWISE


def _tensor_args(x: fx.Node) -> list:
    return [a for a in x.args if isinstance(a, fx.Node) and g.tensor_val(a) is not None] + \
        [a for seq in x.args if isinstance(seq, (list, tuple)) for a in seq if isinstance(a, fx.Node)]


def same_sequence(q: fx.Node, k: fx.Node, walker: Walker) -> Optional[bool]:
    """True: q and k read one residual stream; False: two, neither the other; None: not shown."""
    sq, sk = _streams(q, walker), _streams(k, walker)
    if not sq or not sk:
        return None
    return bool(sq & sk)


def _streams(x: Any, walker: Walker) -> set:
    """The residual-stream nodes the projections that produce ``x`` read."""
    found: set = set()

    def step(n):
        if g.is_op(n, g.LINEAR):
            found.add(_stream(g.arg(n, g.PROJECTION_INPUT[n.target], "input"), walker))
            return Stop()
        if not g.is_op(n, _TOKENWISE):
            return Stop()
        if g.is_op(n, _ELEMENTWISE | _CAT):
            out = g.shape(n)
            for a in _tensor_args(n):  # broadcast operands (rotary cos / sin tables) are not followed
                if g.is_op(n, _CAT) or g.same_shape(g.shape(a), out):
                    found.update(_streams(a, walker))
            return Stop()
        return n.args[0]

    walker.up(x, step)
    return found - {None}


def _stream(x: Any, walker: Walker) -> Optional[fx.Node]:
    """The node a projection input is a normalisation of (a residual add, an embedding)."""
    def step(n):
        if g.is_op(n, g.NORM):
            return n.args[0]
        if g.is_op(n, _ELEMENTWISE):
            same = [a for a in _tensor_args(n) if g.same_shape(g.shape(a), g.shape(n))]
            return same[0] if len(same) == 1 else Stop()
        return None

    trail = walker.up(x, step)
    return trail.end
