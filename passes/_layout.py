"""Layouts: how a tensor's dims are made of other tensors' dims, through views and broadcasts.

A dim is a tuple of *atoms* merged row-major; an atom ``(node, i)`` is dim ``i`` of ``node``'s
value, of that size. Size-1 dims hold no atom (``()``): they can be added or dropped anywhere
without changing values. An atom made by ``expand`` (a size-1 dim repeated) is a *broadcast*
atom: along it the values repeat (GQA ``repeat_kv``, MQA).

- `trace` follows an operand up through layout ops and constant factors to the farthest node
  whose layout the chain expresses (`LAYOUT_STEPS`).
- `contract` reads a matmul / bmm / einsum (`subscripts`) as an einsum over atoms.
- `bind` gives the node and permutation that make an operand's role atoms [B, H, N, D];
  `plan` the ops that turn the op's [B, H, Nq, Dv] output (or a mask) into another layout.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import fx

from . import _graph as g
from ._graph import aten
from ._walk import Stop, Walker

__all__ = ["Layout", "Operand", "Traced", "Contraction", "LAYOUT_STEPS", "layout_step", "trace", "einsum_operands", "subscripts",
           "contract", "bind", "plan", "mask_plan", "identity"]

Atom = tuple  # (node, dim)


def size(atom: Atom) -> Any:
    return g.shape(atom[0])[atom[1]]


class Layout(NamedTuple):
    """``dims[i]``: the atoms merged (row-major) into dim i; ``broadcast``: atoms made by expand."""

    dims: tuple
    broadcast: frozenset = frozenset()

    def atoms(self) -> list:
        return [a for d in self.dims for a in d]


def identity(node: fx.Node) -> Optional[Layout]:
    """``node``'s own layout: one atom per dim of size ≠ 1."""
    s = g.shape(node)
    if s is None:
        return None
    return Layout(tuple(() if g.known_equal(n, 1) else ((node, i),) for i, n in enumerate(s)))


# --------------------------------------------------------------------------- layout ops

def _norm(dims: Sequence, rank: int) -> Optional[tuple]:
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % rank for d in dims) if rank else None


def _permute(lay: Layout, node: fx.Node) -> Optional[Layout]:
    dims = node.args[1:] if node.op == "call_method" and not isinstance(node.args[1], (list, tuple)) else node.args[1]
    dims = _norm(dims, len(lay.dims))
    if dims is None or sorted(dims) != list(range(len(lay.dims))):
        return None
    return Layout(tuple(lay.dims[d] for d in dims), lay.broadcast)


def _swap(lay: Layout, a: Any, b: Any) -> Optional[Layout]:
    ab = _norm((a, b), len(lay.dims))
    if ab is None:
        return None
    dims = list(lay.dims)
    dims[ab[0]], dims[ab[1]] = dims[ab[1]], dims[ab[0]]
    return Layout(tuple(dims), lay.broadcast)


def _transpose(lay: Layout, node: fx.Node) -> Optional[Layout]:
    return _swap(lay, g.arg(node, 1, "dim0"), g.arg(node, 2, "dim1"))


def _mT(lay: Layout, node: fx.Node) -> Optional[Layout]:
    return _swap(lay, -2, -1)


def _regroup(lay: Layout, node: fx.Node) -> Optional[Layout]:
    """Row-major reshape to ``node``'s output shape: consecutive atoms merge into each dim."""
    target = g.shape(node)
    if target is None:
        return None
    atoms, out, i = lay.atoms(), [], 0
    for n in target:
        group, prod = [], 1
        while not g.known_equal(prod, n):
            if i == len(atoms) or (isinstance(prod, int) and isinstance(n, int) and prod > n):
                return None  # the reshape splits an atom: not expressible from this source
            group.append(atoms[i])
            prod = prod * size(atoms[i])
            i += 1
        out.append(tuple(group))
    return Layout(tuple(out), lay.broadcast) if i == len(atoms) else None


def _expand(lay: Layout, node: fx.Node) -> Optional[Layout]:
    """expand: a size-1 dim that grows becomes a broadcast atom of ``node``."""
    target = g.shape(node)
    if target is None or len(target) < len(lay.dims):
        return None
    lead, out, made = len(target) - len(lay.dims), [], set()
    for j, n in enumerate(target):
        d = lay.dims[j - lead] if j >= lead else ()
        if d or g.known_equal(n, 1):
            out.append(d)
        else:
            made.add((node, j))
            out.append(((node, j),))
    return Layout(tuple(out), lay.broadcast | made)


def _index(lay: Layout, node: fx.Node) -> Optional[Layout]:
    """x[:, :, None]: an index of only full slices, None and ... adds size-1 dims."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    full = all(i is None or i is Ellipsis or i == slice(None) for i in idx)
    return _regroup(lay, node) if full else None


def _same(lay: Layout, node: fx.Node) -> Layout:
    return lay


#: layout ops: (op family or predicate, layout of the output from the layout of the input)
LAYOUT_STEPS = (
    (g.PERMUTE, _permute),      # permute(x, dims): dim i of the output is dim dims[i] of x
    (g.TRANSPOSE, _transpose),  # transpose(x, a, b): swaps dims a and b
    (g.is_mT, _mT),             # x.mT: swaps the last two dims
    (g.RESHAPE, _regroup),      # view / reshape / flatten / unflatten / (un)squeeze: atoms regrouped row-major
    (g.EXPAND, _expand),        # expand(x, sizes): size-1 dims repeated (broadcast atoms)
    (g.INDEX, _index),          # x[:, None]: size-1 dims added
    (g.COPY, _same),            # contiguous / clone / alias / detach: same values, same layout
)


def layout_step(node: Any):
    """The `LAYOUT_STEPS` function for ``node``'s op, or None."""
    for fam, fn in LAYOUT_STEPS:
        if (fam(node) if callable(fam) else g.is_op(node, fam)):
            return fn
    return None


def apply(lay: Optional[Layout], node: fx.Node) -> Optional[Layout]:
    fn = layout_step(node)
    return None if lay is None or fn is None else fn(lay, node)


# --------------------------------------------------------------------------- operands

def _const_factor(x: fx.Node) -> Optional[tuple]:
    """(c, y) for x = y·c with a constant c and x used once, else None."""
    if g.is_op(x, g.MUL) and len(x.users) == 1:
        for a, b in ((x.args[0], x.args[1]), (x.args[1], x.args[0])):
            c = g.constant(b)
            if c is not None and isinstance(a, fx.Node):
                return c, a
    return None


@dataclasses.dataclass
class Traced:
    """An operand read through layout ops: ``chain`` runs from ``source`` to the operand;
    ``layouts[n]`` is node n's layout in ``source``'s atoms; ``factor`` (constant factors on the
    way) multiplies the values, from ``chain[scaled_from]`` on."""

    chain: list
    layouts: dict
    factor: float
    scaled_from: int  # chain[scaled_from:] already hold a factor: not bindable on their own


    @property
    def node(self) -> fx.Node:
        return self.chain[-1]

    @property
    def source(self) -> fx.Node:
        return self.chain[0]

    @property
    def layout(self) -> Layout:
        return self.layouts[self.node]


def trace(x: fx.Node, walker: Walker) -> Optional[Traced]:
    """``x`` read through `LAYOUT_STEPS` ops and constant factors, from the farthest node whose
    layout the chain expresses (GPT-2's ``view(B, N, H, D)`` of a [B, N, C] split: the view)."""
    factors = {}

    def step(n):
        if layout_step(n) is not None:
            return n.args[0]
        cf = _const_factor(n)
        if cf is not None:
            factors[n] = cf[0]
            return cf[1]
        return Stop()

    trail = walker.up(x, step)
    chain = ([trail.end] if trail.end is not None else []) + trail.path[::-1]
    for start in range(len(chain)):
        layouts = {chain[start]: identity(chain[start])}
        lay = layouts[chain[start]]
        for n in chain[start + 1:]:
            lay = lay if n in factors else apply(lay, n)
            if lay is None:
                break
            layouts[n] = lay
        if lay is not None:
            kept = chain[start:]
            first = next((i for i, n in enumerate(kept) if n in factors), len(kept))
            return Traced(kept, layouts, math.prod(factors.get(n, 1.0) for n in kept[1:]), first)
    return None


class Operand(NamedTuple):
    """What the op reads for q, k or v: ``permute(node, perm)`` ([B, H, N, D]), or ``node`` when perm is None."""

    node: fx.Node
    perm: Optional[tuple] = None

    @property
    def shape(self) -> Optional[tuple]:
        """The [B, H, N, D] shape the op sees."""
        s = g.shape(self.node)
        return s if s is None or self.perm is None else tuple(s[p] for p in self.perm)


def bind(tr: Traced, roles: Sequence[Optional[Atom]]) -> Optional[Operand]:
    """The [B, H, N, D] tensor whose dims are the atoms ``roles`` (None: a size-1 dim): a node
    of the chain that already is it, else a permutation of the 4-D source, else None."""
    want = tuple(() if a is None else (a,) for a in roles)
    for n in reversed(tr.chain[:tr.scaled_from]):
        if tr.layouts[n].dims == want:
            return Operand(n)
    src, s = tr.source, g.shape(tr.source)
    if s is None or len(s) != 4 or any(a is not None and a[0] is not src for a in roles):
        return None
    dims = [None if a is None else a[1] for a in roles]
    spare = [d for d in range(4) if d not in dims]  # size-1 dims of the source (no atom)
    perm = tuple(d if d is not None else spare.pop(0) for d in dims)
    return Operand(src, None if perm == (0, 1, 2, 3) else perm)


# --------------------------------------------------------------------------- contractions

def einsum_operands(node: fx.Node) -> list:
    """The operands of an einsum: ``einsum(eq, a, b)`` (torch) or ``einsum(eq, [a, b])`` (ATen)."""
    ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return list(ops)


def subscripts(node: fx.Node) -> Optional[tuple]:
    """``(xs, ys, zs, x, y)`` when ``node`` computes ``einsum(f"{xs},{ys}->{zs}", x, y)``."""
    if g.is_op(node, g.MATMUL):
        x, y = node.args[0], node.args[1]
        r = len(g.shape(x) or ())
        if r < 2 or r != len(g.shape(y) or ()):
            return None
        batch = string.ascii_uppercase[:r - 2]
        return batch + "ik", batch + "kj", batch + "ij", x, y
    if g.is_op(node, g.EINSUM) and isinstance(node.args[0], str):
        ops = einsum_operands(node)
        eq = node.args[0].replace(" ", "")
        if len(ops) != 2 or "->" not in eq:
            return None
        lhs, zs = eq.split("->")
        xs, ys = lhs.split(",")
        spare = [c for c in string.ascii_uppercase if c not in eq]
        ell = {}
        for sub, op in ((xs, ops[0]), (ys, ops[1])):
            if "..." in sub:
                n = len(g.shape(op) or ()) - (len(sub) - 3)
                if ell.setdefault("n", n) != n:
                    return None
        fill = "".join(spare[:ell.get("n", 0)])
        xs, ys, zs = (s.replace("...", fill) for s in (xs, ys, zs))
        if any(len(set(s)) != len(s) for s in (xs, ys, zs)):
            return None
        return xs, ys, zs, ops[0], ops[1]
    return None


@dataclasses.dataclass
class Contraction:
    """A two-operand einsum over atoms, in the *primary* operand's atoms where both have a letter.

    ``layout``: the output's layout; ``free``: (primary, other) groups of the one letter only that
    operand has; ``summed``: (primary, other) groups of the one contracted letter; ``partner``:
    primary atom -> the other operand's atom it pairs with (None: size 1 there); ``repeat``:
    primary atom -> how often the other operand repeats its partner (a broadcast, GQA).
    """

    layout: Layout
    free: tuple
    summed: tuple
    partner: dict
    repeat: dict


def contract(xs: str, ys: str, zs: str, x: Layout, y: Layout) -> Optional[Contraction]:
    """``einsum(xs,ys->zs)`` of operands with layouts ``x`` (primary) and ``y``, or None when it is
    not one free letter per side and one summed letter, or the shared dims do not pair up."""
    if len(xs) != len(x.dims) or len(ys) != len(y.dims):
        return None
    gx, gy = dict(zip(xs, x.dims)), dict(zip(ys, y.dims))
    partner, repeat = {}, {}
    for letter in set(xs) & set(ys):
        if not _pair(gx[letter], gy[letter], x.broadcast, y.broadcast, partner, repeat):
            return None
    summed = [c for c in xs if c in ys and c not in zs]
    fx_, fy = [c for c in xs if c not in ys], [c for c in ys if c not in xs]
    if len(summed) != 1 or len(fx_) != 1 or len(fy) != 1 or any(c not in zs for c in fx_ + fy) or \
            not set(zs) <= set(xs) | set(ys):
        return None
    out = tuple(gx[c] if c in gx else gy[c] for c in zs)
    return Contraction(Layout(out, x.broadcast | (y.broadcast & set(gy[fy[0]]))), (gx[fx_[0]], gy[fy[0]]),
                       (gx[summed[0]], gy[summed[0]]), partner, repeat)


def _pair(a: tuple, b: tuple, a_bc: frozenset, b_bc: frozenset, partner: dict, repeat: dict) -> bool:
    """Pairs the primary group ``a`` with ``b`` atom by atom; trailing broadcast atoms of ``b``
    repeat its last atom (GQA: kv head h // n serves query head h)."""
    if any(t in a_bc for t in a):
        return False
    real = tuple(t for t in b if t not in b_bc)
    reps = b[len(real):]
    if b[:len(real)] != real or any(t not in b_bc for t in reps):
        return False
    if not reps:
        if len(a) != len(real) or not all(g.known_equal(size(s), size(t)) for s, t in zip(a, real)):
            return False
        partner.update(zip(a, real))
        return True
    n = math.prod(size(t) for t in reps)
    if not a or not isinstance(n, int) or len(real) not in (len(a), len(a) - 1):
        return False
    last_real = real[-1] if len(real) == len(a) else None
    lead = real[:len(a) - 1]
    if not all(g.known_equal(size(s), size(t)) for s, t in zip(a[:-1], lead)) or \
            not g.known_equal(size(a[-1]), (size(last_real) if last_real else 1) * n):
        return False
    partner.update(zip(a[:-1], lead))
    partner[a[-1]] = last_real
    repeat[a[-1]] = n
    return True


# --------------------------------------------------------------------------- layout plans

def plan(target: Layout, roles: Sequence[Optional[Atom]]) -> Optional[list]:
    """Ops ``(target, args, kwargs)`` that turn a tensor whose dims are ``roles`` in order
    (the op's [B, H, Nq, Dv] output) into ``target``'s layout: a permutation, then merges and
    size-1 dims. None when ``target`` is not made of exactly those atoms."""
    role_of = {a: i for i, a in enumerate(roles) if a is not None}
    groups = [[role_of.get(a) for a in d] for d in target.dims]
    order = [r for grp in groups for r in grp]
    if None in order or sorted(order) != sorted(role_of.values()):
        return None
    missing = [i for i, a in enumerate(roles) if a is None]
    perm = order + missing
    ops = []
    if perm != list(range(len(roles))):
        ops += [(aten.permute.default, (perm,), {}),
                (aten.clone.default, (), {"memory_format": torch.contiguous_format})]
    if missing:
        ops.append((aten.squeeze.dims, (list(range(len(order), len(perm))),), {}))
    for pos, grp in enumerate(groups):
        if not grp:
            ops.append((aten.unsqueeze.default, (pos,), {}))
        elif len(grp) > 1:
            ops.append((aten.flatten.using_ints, (pos, pos + len(grp) - 1), {}))
    return ops


def mask_plan(mask_shape: tuple, at: Layout, roles: Sequence[Optional[Atom]]) -> Optional[list]:
    """Ops that turn a mask broadcastable to scores of layout ``at`` into one broadcastable to
    [B, H, Nq, Nk] (``roles``: their atoms): splits of merged dims (3-D [B·H, Nq, Nk] scores)
    and size-1 dims. None when the scores are permuted or a split size is not known."""
    role_of = {a: i for i, a in enumerate(roles) if a is not None}
    groups = [[role_of.get(a) for a in d] for d in at.dims]
    order = [r for grp in groups for r in grp]
    if None in order or order != sorted(order):
        return None
    lead = len(groups) - len(mask_shape)
    if lead < 0:
        return None
    ops, covered = [], []
    for j in reversed(range(len(mask_shape))):  # last dim first: earlier indices stay valid
        grp, n = groups[j + lead], mask_shape[j]
        if not grp:
            ops.append((aten.squeeze.dims, ([j],), {}))
        elif len(grp) > 1 and g.known_equal(n, 1):
            ops += [(aten.unsqueeze.default, (j,), {})] * (len(grp) - 1)
        elif len(grp) > 1:
            sizes = [size(roles[r]) for r in grp]
            symbolic = [i for i, s in enumerate(sizes) if not isinstance(s, int)]
            if len(symbolic) > 1:
                return None
            ops.append((aten.unflatten.int, (j, [-1 if i in symbolic else s for i, s in enumerate(sizes)]), {}))
        covered[:0] = grp
    first = covered[0] if covered else len(roles)
    ops += [(aten.unsqueeze.default, (pos,), {}) for pos, r in enumerate(range(first, len(roles)))
            if r not in covered]
    return ops
