"""Split-K decode attention over a DGA cache's slots (docs/dga.md "Decoding").

Paired reference: `dga_compile.decode_reference.slot_attention`. Tests: tests/test_decode_kernels.py
(Triton interpreter on CPU; real shapes on CUDA with ``make test-gpu``).

Program (bg, s) takes kv head g of batch row b and the s-th run of SPLIT slots of the
concatenation packed ‖ recent. Its rows are the Hq/Hkv·n queries that read g (row r: head
g·rep + r // n, query t = r % n). Per run it computes, for every row, an online softmax
m = max logit, l = Σ 2^(logit − m), acc = Σ 2^(logit − m)·v with
logit = (scale·q·k + λ)·log2(e), where the recent run's last n slots are causal (slot u visible
to query t iff u ≤ R − n + t) and λ = −inf hides a slot. The runs are merged on the host
(`_merge`): out = Σ_s 2^(m_s − M)·acc_s / Σ_s 2^(m_s − M)·l_s; a row with no slot gives 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import interpreting
from ._runtime import LOG2E, head_block, tl, triton
from .attention import _nonempty

__all__ = ["triton_decode_attention"]


@triton.jit
def _run(acc, m_i, l_i, q, K, V, LAM, sk, sv, sl, lo, hi, causal_from, offs_t, offs_d, offs_dv, qk_scale,
         D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online-softmax update of the rows with slots [lo, hi) of one run (K, V rows strided by sk, sv)."""
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < hi
        k = tl.load(K + offs[:, None] * sk + offs_d[None, :], mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + offs[:, None] * sv + offs_dv[None, :], mask=valid[:, None] & (offs_dv[None, :] < DV),
                    other=0.0)
        lam = tl.load(LAM + offs * sl, mask=valid, other=float("-inf")).to(tl.float32)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
        s = s * qk_scale + lam[None, :] * 1.4426950408889634
        ok = (lam[None, :] > float("-inf")) & valid[None, :]
        if CAUSAL:
            ok = ok & (offs[None, :] <= causal_from + offs_t[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(Q, PK, PV, PL, RK, RV, RL, M_OUT, L_OUT, ACC_OUT,
                   sq_b, sq_h, sq_n, spk_b, spk_h, spk_n, spv_b, spv_h, spv_n, spl_b, spl_h, spl_n,
                   srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, srl_b, srl_h, srl_n,
                   Hkv, REP, NQ, P, R, SPLITS, SPLIT, qk_scale,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_FP32: tl.constexpr):
    """Partial (m, l, acc) of the rows of kv head (b, g) over the slots [s·SPLIT, (s+1)·SPLIT) (module docstring)."""
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b = bg // Hkv
    g = bg % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = REP * NQ
    row_ok = offs_m < rows
    head = g * REP + offs_m // NQ
    offs_t = offs_m % NQ
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + offs_t[:, None] * sq_n + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    u0 = s * SPLIT
    u1 = tl.minimum(u0 + SPLIT, P + R)
    acc, m_i, l_i = _run(acc, m_i, l_i, q, PK + b * spk_b + g * spk_h, PV + b * spv_b + g * spv_h,
                         PL + b * spl_b + g * spl_h, spk_n, spv_n, spl_n, u0, tl.minimum(u1, P), 0, offs_t, offs_d,
                         offs_dv, qk_scale, D, DV, BLOCK_N, False, DOT_FP32)
    acc, m_i, l_i = _run(acc, m_i, l_i, q, RK + b * srk_b + g * srk_h, RV + b * srv_b + g * srv_h,
                         RL + b * srl_b + g * srl_h, srk_n, srv_n, srl_n, tl.maximum(u0, P) - P, u1 - P, R - NQ,
                         offs_t, offs_d, offs_dv, qk_scale, D, DV, BLOCK_N, True, DOT_FP32)
    base = bg * SPLITS + s
    tl.store(M_OUT + base * BLOCK_M + offs_m, m_i)
    tl.store(L_OUT + base * BLOCK_M + offs_m, l_i)
    tl.store(ACC_OUT + (base * BLOCK_M + offs_m[:, None]) * BLOCK_DV + offs_dv[None, :], acc)


def _merge(m: Tensor, lsum: Tensor, acc: Tensor) -> Tensor:
    """Runs -> rows: m, lsum [BG, S, M], acc [BG, S, M, Dv] (base 2) -> [BG, M, Dv]; rows without a slot give 0.
    A NaN logit makes its row NaN, as in SDPA."""
    top = m.amax(1, keepdim=True)
    w = torch.exp2(m - torch.where(top == float("-inf"), 0.0, top)).masked_fill(m == float("-inf"), 0.0)
    w = torch.where(m.isnan(), m, w)
    den = (w * lsum).sum(1)
    out = (w[..., None] * acc).sum(1)
    return torch.where(den[..., None] > 0, out / den[..., None].clamp(min=1e-30), out * 0.0)


def triton_decode_attention(q: Tensor, pk: Tensor, pv: Tensor, pl: Tensor, rk: Tensor, rv: Tensor, rl: Tensor,
                            scale: float, split: int = 0) -> Tensor:
    """q [B, Hq, n, D] over packed (pk, pv, pl) ‖ recent (rk, rv, rl) slots -> [B, Hq, n, Dv] in q's dtype
    (semantics: `slot_attention`). Views with a contiguous last dim are read in place. ``split``:
    slots per program (0: chosen from the batch, so that ≥ ~128 programs run)."""
    B, Hq, n, D = q.shape
    Hkv, P, R, DV = pk.shape[1], pk.shape[2], rk.shape[2], pv.shape[-1]
    rep = Hq // Hkv
    q, pk, pv, rk, rv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, pk, pv, rk, rv))
    interp = interpreting()
    block_n = 16 if interp else 64
    if split <= 0:
        split = max(block_n, triton.next_power_of_2(max(1, -(-(P + R) // max(1, 128 // (B * Hkv))))))
    splits = max(1, -(-(P + R) // split))
    block_m = max(16, triton.next_power_of_2(rep * n))
    bdv = head_block(DV)
    m = torch.empty(B * Hkv, splits, block_m, dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    acc = torch.empty(B * Hkv, splits, block_m, bdv, dtype=torch.float32, device=q.device)
    pk_, pv_, pl_ = (_nonempty(t) for t in (pk, pv, pl))
    _decode_kernel[(B * Hkv, splits)](
        q, pk_, pv_, pl_, rk, rv, rl, m, lsum, acc,
        *q.stride()[:3], *pk.stride()[:3], *pv.stride()[:3], *pl.stride(), *rk.stride()[:3], *rv.stride()[:3],
        *rl.stride(), Hkv, rep, n, P, R, splits, split, scale * LOG2E,
        D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_block(D), BLOCK_DV=bdv,
        DOT_FP32=interp or q.dtype == torch.float32)
    out = _merge(m, lsum, acc)[:, :rep * n, :DV]                                  # [B·Hkv, rep·n, Dv]
    return out.reshape(B, Hq, n, DV).to(q.dtype)

