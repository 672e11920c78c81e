"""``torch.ops.dga.attention``: the DGA custom op, its fake, its autograd, and its contract.

The forward runs the implementation `dga_compile.dispatch` chooses (``impl``: auto / reference /
blocked / cpp / triton). The backward is a second op, ``dga.attention_backward``, that recomputes
the forward under autograd with the implementation chosen then (for "triton": the fused kernel,
whose autograd runs the Triton backward kernel) and differentiates it; a dropout seed makes the
recomputation see the same dropout mask. Both schemas are generated from `OpCall` and
`config.OP_FIELDS`, so an op field is added in config.py alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from . import dispatch
from .config import OP_FIELDS, DGAConfig

__all__ = ["BACKWARD_SCHEMA", "SCHEMA", "OpCall", "attention", "attention_backward"]


class OpCall(NamedTuple):
    """The arguments of one ``dga.attention`` call by name: the one place that knows their order.

    The op takes ``(q, k, v, attn_mask, dropout_p, dropout_seed, is_causal, scale, *fields)``
    with ``fields`` the `DGAConfig.OP_FIELDS` values; ``dga.attention_backward`` takes
    ``grad_out`` first, then the same. Tensors may be FX nodes or ONNX values when a pass or the
    exporter builds or reads a call.
    """

    q: Any
    k: Any
    v: Any
    attn_mask: Any
    dropout_p: float
    dropout_seed: Any
    is_causal: bool
    scale: float
    config: DGAConfig

    def args(self) -> tuple:
        """The op's positional arguments."""
        c = self.config
        fields = tuple(float(v) if isinstance(v, float) else v for v in (getattr(c, f) for f in OP_FIELDS))
        return (self.q, self.k, self.v, self.attn_mask, float(self.dropout_p), self.dropout_seed,
                bool(self.is_causal), float(self.scale)) + fields

    @classmethod
    def parse(cls, args: Sequence) -> "OpCall":
        """The inverse of `args`: positional op arguments -> `OpCall` (the config validated again)."""
        n = len(cls._fields) - 1
        head, fields = args[:n], args[n:]
        if len(fields) != len(OP_FIELDS):
            raise TypeError(f"dga.attention takes {n + len(OP_FIELDS)} arguments, got {len(args)}")
        return cls(*head, DGAConfig(**dict(zip(OP_FIELDS, fields))))


#: Schema types of the `OpCall` fields before ``config``; the `OP_FIELDS` take the type of their default.
_HEAD_TYPES = dict(q="Tensor", k="Tensor", v="Tensor", attn_mask="Tensor?", dropout_p="float", dropout_seed="Tensor?",
                   is_causal="bool", scale="float")
_SCHEMA_TYPES = {bool: "bool", int: "int", float: "float", str: "str"}
_HEAD = ", ".join(f"{_HEAD_TYPES[name]} {name}" for name in OpCall._fields[:-1])
_FIELDS = ", ".join(f"{_SCHEMA_TYPES[type(getattr(DGAConfig(), f))]} {f}" for f in OP_FIELDS)
#: ``dga::attention`` and ``dga::attention_backward`` (which takes ``grad_out`` first).
SCHEMA = f"({_HEAD}, {_FIELDS}) -> Tensor"
BACKWARD_SCHEMA = f"(Tensor grad_out, {_HEAD}, {_FIELDS}) -> (Tensor, Tensor, Tensor)"

#: The arguments of ``dga.attention`` after q, k, v: no gradient flows to them.
_NUM_NON_TENSOR_GRADS = len(OpCall._fields) - 1 + len(OP_FIELDS) - 3


def _forward(call: OpCall) -> Tensor:
    """The chosen implementation's forward, under the call's dropout seed."""
    q = call.q
    with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else [], enabled=call.dropout_p > 0):
        if call.dropout_p > 0:
            torch.manual_seed(int(call.dropout_seed))
        return dispatch.run(call)


@torch.library.custom_op("dga::attention", mutates_args=(), schema=SCHEMA)
def attention(*args) -> Tensor:
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> contiguous [B, Hq, Nq, Dv]
    (arguments: `OpCall.args`)."""
    return _forward(OpCall.parse(args)).contiguous()


@attention.register_fake
def _(q, k, v, *args):
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enables autograd in a custom op's kernel, which the dispatcher runs below Autograd."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther, C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@torch.library.custom_op("dga::attention_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def attention_backward(grad_out: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention` by recomputation; each contiguous, shaped like its input."""
    call = OpCall.parse(args)
    with _autograd_inside_op():
        leaves = [x.detach().requires_grad_() for x in (call.q, call.k, call.v)]
        out = _forward(call._replace(q=leaves[0], k=leaves[1], v=leaves[2]))
        grads = torch.autograd.grad(out, leaves, grad_out, materialize_grads=True)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _(grad_out, q, k, v, *args):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    call = OpCall.parse(inputs)
    ctx.save_for_backward(call.q, call.k, call.v, call.attn_mask, call.dropout_seed)
    ctx.call = call._replace(q=None, k=None, v=None, attn_mask=None, dropout_seed=None)


def _backward(ctx, grad_out):
    q, k, v, attn_mask, dropout_seed = ctx.saved_tensors
    call = ctx.call._replace(q=q, k=k, v=v, attn_mask=attn_mask, dropout_seed=dropout_seed)
    dq, dk, dv = torch.ops.dga.attention_backward(grad_out, *call.args())
    return (dq, dk, dv) + (None,) * _NUM_NON_TENSOR_GRADS


attention.register_autograd(_backward, setup_context=_setup_context)
