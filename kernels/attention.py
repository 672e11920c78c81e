"""Fused DGA step 5 (docs/dga.md "Attention"): one online softmax per query block over four streams.

Paired reference: `dga_compile.blocked.blocked_attention` (same candidates per block) and, at
the end, `dga_compile.reference.reference_attention`. Its stream arguments come in `Streams` order. Tests:
tests/test_kernels_attention.py, tests/test_kernels_expand.py (sinks, step 5′).

Per (query block, batch, query head) the kernel streams
  1. focus keys [0, f_end) of the kv head, logit scale·q·k, allowed iff pos ≤ lim_tok(i);
  2. group pairs [0, g_end) of the query head, logit scale·q·K̄ + β·log m, allowed iff the
     anchor ≤ lim_grp(i) (complete for i) and, with step 5′, the group is not expanded for i;
  3. raw non-focus keys [r_start, r_end) in non-focus order, allowed iff pos ≤ lim_tok(i)
     and their group is not complete for i;
  4. with step 5′ (``EXPAND``): the members of the groups this block's rows expand, gathered
     from the non-focus order through the block's group list (`Streams.xgroups`), allowed iff
     their group is complete for i and expanded for i's step-5′ block (`Streams.xmark`);
and skips every other key. Causal: lim_tok(i) = i, lim_grp(i) = i − w; otherwise both are
``BIG − 1``. Invisible keys (key padding) carry position ``BIG``, groups with an invisible
member anchor ``BIG``: never allowed, never complete. Stream bounds come from the host
(`streams.prepare_streams`), one row of 4 int32 per (batch, kv head, query block); which groups
step 5′ expands too (`streams.mark_expansion`, from this kernel's log-sum-exp with βe).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import interpreting
from ._runtime import LOG2E, head_block, tl, triton
from .streams import BIG, Streams

__all__ = ["expansion_sizes", "fits_shared_memory", "fused_forward"]


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """a @ b with fp32 accumulation; fp32 operands when DOT_FP32 (the interpreter's bf16 dot is wrong)."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=IN_PREC)
    else:
        out = tl.dot(a, b.to(a.dtype), input_precision=IN_PREC)
    return out


@triton.jit
def _tile(q, K, V, POS, start, hi, lim, bias, GPOS, lim_grp, NG, XMARK, XLIST, sb, qk_scale, offs_d, offs_dv,
          D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, KIND: tl.constexpr, EXPAND: tl.constexpr,
          BLOCK_N: tl.constexpr, BIG_POS: tl.constexpr, DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """One tile of a stream (KIND 0 focus, 1 groups, 2 raw, 3 expanded members): (offs, valid, k, v, s).

    offs are the rows of K, V (for KIND 3 the slots [start, start+BLOCK_N) < hi of the group list
    XLIST, m slots per group, mapped to their members' rows of the non-focus order).
    s = qk_scale·q·k + bias (base-2 units), −inf where not allowed: allowed iff POS[j] ≤ lim[i];
    for the raw stream also iff j's group (j // M < NG) is not complete for i: GPOS[j // M] >
    lim_grp[i]; with EXPAND, for groups iff not marked in XMARK for row i's step-5′ block sb[i],
    for expanded members iff their group is complete for i and marked.
    """
    slots = start + tl.arange(0, BLOCK_N)
    valid = slots < hi
    if KIND == 3:
        grp = tl.load(XLIST + slots // M, mask=valid, other=0)
        offs = grp * M + slots % M
    else:
        offs = slots
    pos = tl.load(POS + offs, mask=valid, other=BIG_POS)
    k = tl.load(K + offs[:, None] * D + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + offs[:, None] * DV + offs_dv[None, :], mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    ok = pos[None, :] <= lim[:, None]
    if KIND == 2:
        in_grp = valid & (offs < NG * M)
        anchor = tl.load(GPOS + offs // M, mask=in_grp, other=BIG_POS)
        ok = ok & (anchor[None, :] > lim_grp[:, None])
    if EXPAND:
        if KIND == 1:
            mark = tl.load(XMARK + sb[:, None] * NG + offs[None, :], mask=valid[None, :], other=0)
            ok = ok & (mark == 0)
        if KIND == 3:
            anchor = tl.load(GPOS + grp, mask=valid, other=BIG_POS)
            mark = tl.load(XMARK + sb[:, None] * NG + grp[None, :], mask=valid[None, :], other=0)
            ok = ok & (anchor[None, :] <= lim_grp[:, None]) & (mark != 0)
    s = _dot(q, tl.trans(k), DOT_FP32, IN_PREC) * qk_scale + bias
    return offs, valid, k, v, tl.where(ok, s, float("-inf"))


@triton.jit
def _stream(acc, m_i, l_i, q, K, V, POS, lo, hi, lim, bias, GPOS, lim_grp, NG, XMARK, XLIST, sb,
            qk_scale, offs_d, offs_dv, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
            KIND: tl.constexpr, EXPAND: tl.constexpr, BLOCK_N: tl.constexpr, BIG_POS: tl.constexpr,
            DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with the keys [lo, hi) of one stream (`_tile`)."""
    for start in range(lo, hi, BLOCK_N):
        offs, valid, k, v, s = _tile(q, K, V, POS, start, hi, lim, bias, GPOS, lim_grp, NG, XMARK, XLIST, sb,
                                     qk_scale, offs_d, offs_dv, D, DV, M, KIND, EXPAND, BLOCK_N, BIG_POS, DOT_FP32,
                                     IN_PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, IN_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _block(Q, BOUNDS, XMARK, XGROUPS, sq_b, sq_h, sq_n, sq_d, Hq, Hkv, Nq, NB, window, NG, NBE, XW, qblock,
           CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
           BIG_POS: tl.constexpr):
    """This program's query block: (bh, bg, offs_m, row_ok, q tile, lim_tok, lim_grp, bounds row,
    step 5′'s marks of this head, each row's step-5′ block, this block's expanded-group list)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    bg = b * Hkv + h // (Hq // Hkv)
    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if CAUSAL:
        lim_tok = offs_m
        lim_grp = offs_m - window
    else:
        lim_tok = tl.full([BLOCK_M], BIG_POS - 1, tl.int32)
        lim_grp = lim_tok
    sb = tl.minimum(offs_m // qblock, NBE - 1)
    xmark = XMARK + bh.to(tl.int64) * NBE * NG              # NBE·G per head: b = 1 at long N passes 2**31
    return bh, bg, offs_m, row_ok, q, lim_tok, lim_grp, BOUNDS + (bg * NB + blk) * 4, xmark, sb, XGROUPS + (bh * NB + blk) * XW


@triton.jit
def _fwd_kernel(Q, FPOS, KF, VF, GPOS, KG, VG, NPOS, KN, VN, BOUNDS, XMARK, XGROUPS, OUT, LSE,
                sq_b, sq_h, sq_n, sq_d, qk_scale, group_logit, Hq, Hkv, Nq, NF, NG, NN, NB, window, NBE, XW, qblock,
                CAUSAL: tl.constexpr, M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, EXPAND: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BIG_POS: tl.constexpr, DOT_FP32: tl.constexpr, IN_PREC: tl.constexpr):
    """OUT[b, h, i] = Σ softmax(logits)·values over the streams (module docstring);
    LSE[b, h, i] = log2 Σ 2^logit (−inf for rows with no candidate), for the backward."""
    bh, bg, offs_m, row_ok, q, lim_tok, lim_grp, bnd, xmark, sb, xg = _block(
        Q, BOUNDS, XMARK, XGROUPS, sq_b, sq_h, sq_n, sq_d, Hq, Hkv, Nq, NB, window, NG, NBE, XW, qblock,
        CAUSAL, D, BLOCK_M, BLOCK_D, BIG_POS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    gpos = GPOS + bg * NG
    kn, vn, npos = KN + bg * NN * D, VN + bg * NN * DV, NPOS + bg * NN
    acc, m_i, l_i = _stream(acc, m_i, l_i, q, KF + bg * NF * D, VF + bg * NF * DV, FPOS + bg * NF, 0, tl.load(bnd),
                            lim_tok, 0.0, gpos, lim_grp, NG, xmark, xg, sb, qk_scale, offs_d, offs_dv, D, DV, M,
                            0, EXPAND, BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    acc, m_i, l_i = _stream(acc, m_i, l_i, q, KG + bh * NG * D, VG + bh * NG * DV, gpos, 0, tl.load(bnd + 1),
                            lim_grp, group_logit, gpos, lim_grp, NG, xmark, xg, sb, qk_scale, offs_d, offs_dv, D, DV,
                            M, 1, EXPAND, BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    acc, m_i, l_i = _stream(acc, m_i, l_i, q, kn, vn, npos, tl.load(bnd + 2), tl.load(bnd + 3),
                            lim_tok, 0.0, gpos, lim_grp, NG, xmark, xg, sb, qk_scale, offs_d, offs_dv, D, DV, M,
                            2, EXPAND, BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    if EXPAND:
        acc, m_i, l_i = _stream(acc, m_i, l_i, q, kn, vn, npos, 0, tl.load(xg) * M, lim_tok, 0.0, gpos,
                                lim_grp, NG, xmark, xg + 1, sb, qk_scale, offs_d, offs_dv, D, DV, M,
                                3, EXPAND, BLOCK_N, BIG_POS, DOT_FP32, IN_PREC)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(OUT + (bh * Nq + offs_m[:, None]) * DV + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bh * Nq + offs_m, lse, mask=row_ok)


def fits_shared_memory(configs, named_args, **kwargs):
    """Autotune prune predicate: drop configs whose K/V tiles (× stages) exceed ~160 KB of shared memory."""
    args = {**named_args, **kwargs}
    width = args["BLOCK_D"] + args["BLOCK_DV"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] * width * 2 * max(c.num_stages, 1) <= 160 * 1024]
    return kept or configs[:1]


_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)] if triton is not None else []
_fwd_tuned = triton.autotune(_CONFIGS, key=["D", "DV", "BLOCK_M", "CAUSAL", "M", "EXPAND"],
                             prune_configs_by={"early_config_prune": fits_shared_memory})(_fwd_kernel)


def block_m_for(head_dim: int) -> int:
    """Query rows per program: the unit the host computes stream bounds for."""
    if interpreting():
        return 32
    return 128 if head_dim <= 128 else 64


def fused_forward(q: Tensor, st: Streams, *, causal: bool, scale: float, group_logit: float, group_size: int,
                  window: int, block_m: int, query_block: int = 0, out: Optional[Tensor] = None,
                  lse: Optional[Tensor] = None) -> Tensor:
    """q [B, Hq, Nq, D] (any strides) + prepared streams -> contiguous [B, Hq, Nq, Dv] in q's dtype,
    written into ``out`` when given (tests pass it poisoned); row log2-sum-exp into ``lse``
    (float32 [B, Hq, Nq]) when given. ``query_block`` > 0: step 5′ with blocks of that many rows,
    as ``st.xmark`` / ``st.xgroups`` mark it (`streams.mark_expansion`); 0: no step 5′."""
    B, Hq, Nq, D = q.shape
    Hkv, NF, DV = st.kf.shape[1], st.kf.shape[2], st.vf.shape[-1]
    NG, NN, NB = st.gpos.shape[-1], st.npos.shape[-1], st.bounds.shape[2]
    if out is None:
        out = torch.empty(B, Hq, Nq, DV, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    interp = interpreting()
    args = (q, *(_nonempty(t) for t in st), out, lse, *q.stride(), scale * LOG2E, group_logit * LOG2E, Hq, Hkv, Nq,
            NF, NG, NN, NB, window, *expansion_sizes(st, query_block))
    meta = dict(CAUSAL=causal, M=group_size, D=D, DV=DV, EXPAND=query_block > 0, BLOCK_M=block_m,
                BLOCK_D=head_block(D), BLOCK_DV=head_block(DV),
                BIG_POS=BIG, DOT_FP32=interp or q.dtype == torch.float32,
                IN_PREC="ieee" if q.dtype == torch.float32 else "tf32")
    grid = (NB, B * Hq)
    if interp:
        _fwd_kernel[grid](*args, BLOCK_N=16, **meta)
    else:  # wrap_triton makes the launch visible to Inductor inside the triton op (dispatch.py)
        torch.library.wrap_triton(_fwd_tuned)[grid](*args, **meta)
    return out


def expansion_sizes(st: Streams, query_block: int) -> tuple[int, int, int]:
    """The kernels' step-5′ sizes (NBE, XW, qblock): step-5′ blocks, the width of a group list
    (count + groups), and the rows per step-5′ block (1, 1, 1 when ``query_block`` is 0: unused)."""
    if query_block == 0:
        return 1, 1, 1
    return st.xmark.shape[2], st.xgroups.shape[-1], query_block


def _nonempty(t: Tensor) -> Tensor:
    """Triton cannot take a 0-element tensor's pointer; loops never read it, so any 1 element does."""
    return t if t.numel() else t.new_zeros(1)

