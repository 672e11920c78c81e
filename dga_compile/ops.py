"""``torch.ops.dga.attention``: the DGA custom op, its fake, its autograd, and dispatch.

The forward runs one implementation chosen by ``impl`` (reference / blocked / triton / auto).
The backward is a second op, ``dga.attention_backward``, that recomputes the forward of the
same implementation under autograd (for "triton": the fused kernel, whose autograd runs the
Triton backward kernel) and differentiates it; a dropout seed makes the recomputation see the
same dropout mask.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .blocked import blocked_attention
from .config import DGAConfig
from .reference import reference_attention

__all__ = ["attention", "attention_backward", "resolve_impl"]


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


def _config(focus_ratio, group_size, num_probe, window, group_bias, min_seq_len, impl) -> DGAConfig:
    return DGAConfig(focus_ratio=focus_ratio, group_size=group_size, num_probe=num_probe, window=window,
                     group_bias=group_bias, min_seq_len=min_seq_len, impl=impl)


@torch.library.custom_op("dga::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
              dropout_seed: Optional[Tensor], is_causal: bool, scale: float, focus_ratio: float,
              group_size: int, num_probe: int, window: int, group_bias: float, min_seq_len: int,
              impl: str) -> Tensor:
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> contiguous [B, Hq, Nq, Dv]."""
    cfg = _config(focus_ratio, group_size, num_probe, window, group_bias, min_seq_len, impl)
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
    cfg = _config(focus_ratio, group_size, num_probe, window, group_bias, min_seq_len, impl)
    with _autograd_inside_op():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _forward(*leaves, attn_mask, dropout_p, dropout_seed, is_causal, scale, cfg)
        grads = torch.autograd.grad(out, leaves, grad_out, materialize_grads=True)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _(grad_out, q, k, v, *args):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, dropout_seed, *params = inputs
    ctx.save_for_backward(q, k, v, attn_mask, dropout_seed)
    ctx.params = (dropout_p, *params)


def _backward(ctx, grad_out):
    q, k, v, attn_mask, dropout_seed = ctx.saved_tensors
    dropout_p, *params = ctx.params
    dq, dk, dv = torch.ops.dga.attention_backward(grad_out, q, k, v, attn_mask, dropout_p, dropout_seed, *params)
    return (dq, dk, dv) + (None,) * 12


attention.register_autograd(_backward, setup_context=_setup_context)
