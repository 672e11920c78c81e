"""Backward of the fused DGA step 5 (`attention.py`): dq and the gradients of the three streams
(with step 5′, the expanded members' gradients go to the raw stream's rows they are gathered from).

Paired reference: autograd through `dga_compile.blocked.blocked_attention`. Tests:
tests/test_kernels_attention.py (``test_*grad*``), tests/test_kernels_expand.py.

Per (query block, batch, query head), the program revisits the keys its forward streamed,
recomputes p = 2^(s − LSE) from the saved row log-sum-exp, and with δ_i = Σ dO_i·O_i:
    dS = p ∘ (dO·Vᵀ − δ),   dQ = scale·dS·K,   dK += scale·dSᵀ·Q,   dV += pᵀ·dO.
dK/dV of a stream row are shared by the query blocks (and, for focus/raw keys, the query heads
of a kv head) that see it, so they are accumulated with fp32 atomics. The gradients of the
stream arrays flow on to q, k, v through the torch gathers and the group aggregation (autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import interpreting
from ._runtime import LOG2E, head_block, tl, triton
from .attention import _block, _dot, _nonempty, _tile, expansion_sizes
from .streams import BIG, Streams

__all__ = ["fused_backward"]


@triton.jit
def _stream_bwd(dq, q, do, lse, delta, K, V, POS, DK, DVAL, lo, hi, lim, bias, GPOS, lim_grp, NG, XMARK, XLIST, sb,
                qk_scale, scale, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                KIND: tl.constexpr, EXPAND: tl.constexpr, BLOCK_N: tl.constexpr, BIG_POS: tl.constexpr,
                DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """Adds this stream's keys [lo, hi) (`attention._tile`) to dq and (atomically) to DK/DVAL."""
    live = lse != float("-inf")
    lse_safe = tl.where(live, lse, 0.0)
    for start in range(lo, hi, BLOCK_N):
        offs, valid, k, v, s = _tile(q, K, V, POS, start, hi, lim, bias, GPOS, lim_grp, NG, XMARK, XLIST, sb,
                                     qk_scale, offs_d, offs_dv, D, DV, M, KIND, EXPAND, BLOCK_N, BIG_POS, DOT_FP32,
                                     IN_PREC)
        p = tl.where(live[:, None], tl.exp2(s - lse_safe[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), DOT_FP32, IN_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_FP32, IN_PREC)
        dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, IN_PREC) * scale
        dv = _dot(tl.trans(p.to(do.dtype)), do, DOT_FP32, IN_PREC)
        tl.atomic_add(DK + offs[:, None] * D + offs_d[None, :], dk, mask=valid[:, None] & (offs_d[None, :] < D))
        tl.atomic_add(DVAL + offs[:, None] * DV + offs_dv[None, :], dv, mask=valid[:, None] & (offs_dv[None, :] < DV))
    return dq


@triton.jit
def _bwd_kernel(Q, FPOS, KF, VF, GPOS, KG, VG, NPOS, KN, VN, BOUNDS, XMARK, XGROUPS, DO, LSE, DELTA,
                DQ, DKF, DVF, DKG, DVG, DKN, DVN,
                sq_b, sq_h, sq_n, sq_d, qk_scale, scale, group_logit, Hq, Hkv, Nq, NF, NG, NN, NB, window,
                NBE, XW, qblock, CAUSAL: tl.constexpr, M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                EXPAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, BIG_POS: tl.constexpr, DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """DQ[b, h, block] and this block's share of every stream gradient (module docstring)."""
    bh, bg, offs_m, row_ok, q, lim_tok, lim_grp, bnd, xmark, sb, xg = _block(
        Q, BOUNDS, XMARK, XGROUPS, sq_b, sq_h, sq_n, sq_d, Hq, Hkv, Nq, NB, window, NG, NBE, XW, qblock,
        CAUSAL, D, BLOCK_M, BLOCK_D, BIG_POS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = bh * Nq + offs_m
    do = tl.load(DO + rows[:, None] * DV + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    gpos = GPOS + bg * NG
    kn, vn, npos = KN + bg * NN * D, VN + bg * NN * DV, NPOS + bg * NN
    dkn, dvn = DKN + bg * NN * D, DVN + bg * NN * DV
    dq = _stream_bwd(dq, q, do, lse, delta, KF + bg * NF * D, VF + bg * NF * DV, FPOS + bg * NF,
                     DKF + bg * NF * D, DVF + bg * NF * DV, 0, tl.load(bnd), lim_tok, 0.0, gpos, lim_grp, NG,
                     xmark, xg, sb, qk_scale, scale, offs_d, offs_dv, D, DV, M, 0, EXPAND, BLOCK_N, BIG_POS,
                     DOT_FP32, IN_PREC)
    dq = _stream_bwd(dq, q, do, lse, delta, KG + bh * NG * D, VG + bh * NG * DV, gpos,
                     DKG + bh * NG * D, DVG + bh * NG * DV, 0, tl.load(bnd + 1), lim_grp, group_logit, gpos,
                     lim_grp, NG, xmark, xg, sb, qk_scale, scale, offs_d, offs_dv, D, DV, M, 1, EXPAND, BLOCK_N,
                     BIG_POS, DOT_FP32, IN_PREC)
    dq = _stream_bwd(dq, q, do, lse, delta, kn, vn, npos, dkn, dvn, tl.load(bnd + 2), tl.load(bnd + 3), lim_tok,
                     0.0, gpos, lim_grp, NG, xmark, xg, sb, qk_scale, scale, offs_d, offs_dv, D, DV, M, 2, EXPAND,
                     BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    if EXPAND:
        dq = _stream_bwd(dq, q, do, lse, delta, kn, vn, npos, dkn, dvn, 0, tl.load(xg) * M, lim_tok, 0.0, gpos,
                         lim_grp, NG, xmark, xg + 1, sb, qk_scale, scale, offs_d, offs_dv, D, DV, M, 3, EXPAND,
                         BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    tl.store(DQ + rows[:, None] * D + offs_d[None, :], dq * scale, mask=row_ok[:, None] & (offs_d[None, :] < D))


def fused_backward(q: Tensor, st: Streams, out: Tensor, lse: Tensor, grad_out: Tensor, *, causal: bool, scale: float,
                   group_logit: float, group_size: int, window: int, block_m: int,
                   query_block: int = 0) -> tuple[Tensor, Streams]:
    """Gradients (dq, d`Streams`) of `attention.fused_forward`, each shaped and typed like its
    input (None for the positions and bounds); ``out``/``lse`` are that forward's outputs."""
    B, Hq, Nq, D = q.shape
    Hkv, NF, DV = st.kf.shape[1], st.kf.shape[2], st.vf.shape[-1]
    NG, NN, NB = st.gpos.shape[-1], st.npos.shape[-1], st.bounds.shape[2]
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty(B, Hq, Nq, D, dtype=torch.float32, device=q.device)
    srcs = (st.kf, st.vf, st.kg, st.vg, st.kn, st.vn)
    dstreams = [torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in srcs]
    interp = interpreting()
    _bwd_kernel[(NB, B * Hq)](
        q, *(_nonempty(t) for t in st), grad_out, lse, delta, dq, *(_nonempty(t) for t in dstreams), *q.stride(),
        scale * LOG2E, scale, group_logit * LOG2E, Hq, Hkv, Nq, NF, NG, NN, NB, window,
        *expansion_sizes(st, query_block), CAUSAL=causal, M=group_size, D=D, DV=DV, EXPAND=query_block > 0,
        BLOCK_M=block_m, BLOCK_N=16 if interp else 32,
        BLOCK_D=head_block(D), BLOCK_DV=head_block(DV), BIG_POS=BIG, DOT_FP32=interp or q.dtype == torch.float32,
        IN_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    dkf, dvf, dkg, dvg, dkn, dvn = (g.to(t.dtype) for g, t in zip(dstreams, srcs))
    return dq.to(q.dtype), Streams(None, dkf, dvf, None, dkg, dvg, None, dkn, dvn, None, None, None)
