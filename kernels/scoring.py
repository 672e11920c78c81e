"""DGA step 1 (importance scores) in two Triton passes. Paired reference:
`dga_compile.reference.importance_scores`. Tests: tests/test_kernels_select.py.

For kv head g the R = (Hq/Hkv)·r probe rows are the last r query rows of every query head
reading g. Pass 1 (`_probe_lse_kernel`) streams all keys once per block of probe rows and
keeps each row's log-sum-exp; pass 2 (`_column_sum_kernel`) streams the probe rows once per
block of keys and sums exp(logit − lse) down the rows:
    s[b, g, j] = Σ_rows softmax_j(scale·q_row·k_j | Visible(row, j)).
Visible is the causal rule (j ≤ the row's position) and/or key visibility, as in
`streams.MaskPlan`. Rows that see no key contribute 0, and so do rows with a NaN or +inf logit
(their sum is NaN, so their lse is −inf), as in the reference. Deterministic (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import interpreting
from ._runtime import LOG2E, head_block, tl, triton

__all__ = ["importance_scores_triton"]


@triton.jit
def _probe_rows(Q, offs_r, b, g, R, r, Nq, REP, sq_b, sq_h, sq_n, sq_d, offs_d, D: tl.constexpr):
    """Probe rows offs_r of kv head g: (their q tile [BLOCK_R, BLOCK_D], their query positions)."""
    h = g * REP + offs_r // r
    qpos = Nq - r + offs_r % r
    ok = offs_r < R
    q = tl.load(Q + b * sq_b + h[:, None] * sq_h + qpos[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return q, qpos


@triton.jit
def _logits(q, K, KVIS, b, offs_k, qpos, Nk, sk_n, sk_d, offs_d, qk_scale, D: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_KVIS: tl.constexpr, DOT_FP32: tl.constexpr):
    """Base-2 logits [rows, keys] of q against keys offs_k, −inf where not visible."""
    kok = offs_k < Nk
    k = tl.load(K + offs_k[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    ok = kok[None, :]
    if CAUSAL:
        ok = ok & (offs_k[None, :] <= qpos[:, None])
    if HAS_KVIS:
        ok = ok & (tl.load(KVIS + b * Nk + offs_k, mask=kok, other=0) != 0)[None, :]
    return tl.where(ok, s * qk_scale, float("-inf"))


@triton.jit
def _probe_lse_kernel(Q, K, KVIS, LSE, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale,
                      Hkv, R, r, Nq, Nk, REP, D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVIS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """LSE[b, g, row] = log2 Σ_j 2^logit(row, j) over visible keys (−inf if none)."""
    bg = tl.program_id(1)
    b = bg // Hkv
    g = bg % Hkv
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    q, qpos = _probe_rows(Q, offs_r, b, g, R, r, Nq, REP, sq_b, sq_h, sq_n, sq_d, offs_d, D)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    kbase = K + b * sk_b + g * sk_h
    for start in range(0, Nk, BLOCK_K):
        s = _logits(q, kbase, KVIS, b, start + tl.arange(0, BLOCK_K), qpos, Nk, sk_n, sk_d, offs_d, qk_scale,
                    D, CAUSAL, HAS_KVIS, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE + bg * R + offs_r, lse, mask=offs_r < R)


@triton.jit
def _column_sum_kernel(Q, K, KVIS, LSE, S, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, qk_scale,
                       Hkv, R, r, Nq, Nk, REP, D: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVIS: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """S[b, g, j] = Σ_rows 2^(logit(row, j) − LSE[row]) for the keys j of this block."""
    bg = tl.program_id(1)
    b = bg // Hkv
    g = bg % Hkv
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    col = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, R, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        q, qpos = _probe_rows(Q, offs_r, b, g, R, r, Nq, REP, sq_b, sq_h, sq_n, sq_d, offs_d, D)
        lse = tl.load(LSE + bg * R + offs_r, mask=offs_r < R, other=float("-inf"))
        s = _logits(q, K + b * sk_b + g * sk_h, KVIS, b, offs_k, qpos, Nk, sk_n, sk_d, offs_d, qk_scale,
                    D, CAUSAL, HAS_KVIS, DOT_FP32)
        live = lse != float("-inf")
        p = tl.where(live[:, None], tl.exp2(s - tl.where(live, lse, 0.0)[:, None]), 0.0)
        col += tl.sum(p, 0)
    tl.store(S + bg * Nk + offs_k, col, mask=offs_k < Nk)


def importance_scores_triton(q: Tensor, k: Tensor, key_visible: Optional[Tensor], causal: bool, scale: float,
                             num_probe: int, out: Optional[Tensor] = None) -> Tensor:
    """Step 1 on q [B, Hq, Nq, D], k [B, Hkv, Nk, D] (any strides), key_visible [B, Nk] bool or
    None -> float32 [B, Hkv, Nk] (into ``out`` when given)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    r = min(num_probe, Nq)
    R = (Hq // Hkv) * r
    lse = torch.empty(B * Hkv, R, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty(B, Hkv, Nk, dtype=torch.float32, device=q.device)
    kvis = q.new_zeros(1, dtype=torch.int8) if key_visible is None else key_visible.to(torch.int8).contiguous()
    interp = interpreting()
    block_r, block_k = (16, 16) if interp else (64, 64)
    args = (q, k, kvis, lse)
    rest = (*q.stride(), *k.stride(), scale * LOG2E, Hkv, R, r, Nq, Nk, Hq // Hkv)
    meta = dict(D=D, CAUSAL=causal, HAS_KVIS=key_visible is not None, BLOCK_R=block_r, BLOCK_K=block_k,
                BLOCK_D=head_block(D), DOT_FP32=interp or q.dtype == torch.float32)
    _probe_lse_kernel[(triton.cdiv(R, block_r), B * Hkv)](*args, *rest, **meta)
    _column_sum_kernel[(triton.cdiv(Nk, block_k), B * Hkv)](*args, out, *rest, **meta)
    return out
