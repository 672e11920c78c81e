"""``torch.ops.dga.attention``: the DGA custom op, its fake, its autograd, and dispatch.

The forward runs one implementation chosen by ``impl`` (reference / blocked / triton / auto).
The backward is a second op, ``dga.attention_backward``, that recomputes the forward of the
same implementation under autograd (for "triton": the fused kernel, whose autograd runs the
Triton backward kernel) and differentiates it; a dropout seed makes the recomputation see the
same dropout mask.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .blocked import blocked_attention
from .config import OP_FIELDS, DGAConfig
from .reference import reference_attention

__all__ = ["OpCall", "attention", "attention_backward", "resolve_impl"]


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
        head, fields = args[:8], args[8:]
        if len(fields) != len(OP_FIELDS):
            raise TypeError(f"dga.attention takes {8 + len(OP_FIELDS)} arguments, got {len(args)}")
        return cls(*head, DGAConfig(**dict(zip(OP_FIELDS, fields))))


#: The arguments of ``dga.attention`` after q, k, v: no gradient flows to them.
_NUM_NON_TENSOR_GRADS = 8 + len(OP_FIELDS) - 3


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA when Triton kernels are usable, else "blocked"."""
    if impl != "auto":
        return impl
    if device.type == "cuda":
        from .kernels import available
        if available():
            return "triton"
    return "blocked"


def _forward(q, k, v, attn_mask, dropout_p, dropout_seed, is_causal, scale, cfg: DGAConfig):
    impl = resolve_impl(cfg.impl, q.device)
    if impl == "triton":
        from .kernels import triton_attention
        fn = triton_attention
    elif impl == "blocked":
        fn = blocked_attention
    else:
        fn = reference_attention
    with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else [], enabled=dropout_p > 0):
        if dropout_p > 0:
            torch.manual_seed(int(dropout_seed))
        return fn(q, k, v, attn_mask, is_causal, scale, cfg, dropout_p)


@torch.library.custom_op("dga::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
              dropout_seed: Optional[Tensor], is_causal: bool, scale: float, focus_ratio: float,
              group_size: int, num_probe: int, window: int, group_bias: float, min_seq_len: int,
              impl: str) -> Tensor:
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> contiguous [B, Hq, Nq, Dv]."""
    cfg = DGAConfig(focus_ratio=focus_ratio, group_size=group_size, num_probe=num_probe, window=window,
                    group_bias=group_bias, min_seq_len=min_seq_len, impl=impl)
    return _forward(q, k, v, attn_mask, dropout_p, dropout_seed, is_causal, scale, cfg).contiguous()


@attention.register_fake
def _(q, k, v, attn_mask, dropout_p, dropout_seed, is_causal, scale, focus_ratio, group_size, num_probe,
      window, group_bias, min_seq_len, impl):
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


@torch.library.custom_op("dga::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                       dropout_p: float, dropout_seed: Optional[Tensor], is_causal: bool, scale: float,
                       focus_ratio: float, group_size: int, num_probe: int, window: int, group_bias: float,
                       min_seq_len: int, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention` by recomputation; each contiguous, shaped like its input."""
    cfg = DGAConfig(focus_ratio=focus_ratio, group_size=group_size, num_probe=num_probe, window=window,
                    group_bias=group_bias, min_seq_len=min_seq_len, impl=impl)
    with _autograd_inside_op():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _forward(*leaves, attn_mask, dropout_p, dropout_seed, is_causal, scale, cfg)
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
