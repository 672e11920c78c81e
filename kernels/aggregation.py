"""DGA steps 3–4 (group aggregation) in Triton. Paired reference:
`dga_compile.reference.aggregate_groups`. Tests: tests/test_kernels_select.py.

Per (batch, query head h, group g) with members j₁ < … < j_m (a run of the non-focus order)
and anchor a = j_m:  w = softmax_j(scale·q[h, a]·k[j]),  K̄[h, g] = Σ w·k[j],  V̄[h, g] = Σ w·v[j].
A program handles BLOCK_G groups as a [BLOCK_G, M, D] tile (m is small: no tl.dot).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._runtime import LOG2E, head_block, tl, triton

__all__ = ["aggregate_groups_triton"]


@triton.jit
def _aggregate_kernel(Q, K, V, MEM, KG, VG, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                      sv_b, sv_h, sv_n, sv_d, qk_scale, Hq, Hkv, G, NN,
                      M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_G: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """KG/VG[b, h, g] for the groups g of this program (module docstring)."""
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    kv = h // (Hq // Hkv)
    offs_g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_j = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    gok = offs_g < G
    mok = gok[:, None] & (offs_j[None, :] < M)
    mem = MEM + (b * Hkv + kv) * NN
    pos = tl.load(mem + offs_g[:, None] * M + offs_j[None, :], mask=mok, other=0)          # [G, M]
    anchor = tl.load(mem + offs_g * M + M - 1, mask=gok, other=0)                           # [G]
    qa = tl.load(Q + b * sq_b + h * sq_h + anchor[:, None] * sq_n + offs_d[None, :] * sq_d,
                 mask=gok[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32)       # [G, D]
    kmask = mok[:, :, None] & (offs_d[None, None, :] < D)
    k = tl.load(K + b * sk_b + kv * sk_h + pos[:, :, None] * sk_n + offs_d[None, None, :] * sk_d,
                mask=kmask, other=0.0).to(tl.float32)                                       # [G, M, D]
    s = tl.sum(qa[:, None, :] * k, 2) * qk_scale
    s = tl.where(mok, s, float("-inf"))
    p = tl.exp2(s - tl.where(gok, tl.max(s, 1), 0.0)[:, None])
    p = tl.where(mok, p, 0.0)
    w = p / tl.where(gok, tl.sum(p, 1), 1.0)[:, None]
    kbar = tl.sum(w[:, :, None] * k, 1)
    vmask = mok[:, :, None] & (offs_dv[None, None, :] < DV)
    v = tl.load(V + b * sv_b + kv * sv_h + pos[:, :, None] * sv_n + offs_dv[None, None, :] * sv_d,
                mask=vmask, other=0.0).to(tl.float32)
    vbar = tl.sum(w[:, :, None] * v, 1)
    rows = bh * G + offs_g
    tl.store(KG + rows[:, None] * D + offs_d[None, :], kbar.to(KG.dtype.element_ty),
             mask=gok[:, None] & (offs_d[None, :] < D))
    tl.store(VG + rows[:, None] * DV + offs_dv[None, :], vbar.to(VG.dtype.element_ty),
             mask=gok[:, None] & (offs_dv[None, :] < DV))


def aggregate_groups_triton(q: Tensor, k: Tensor, v: Tensor, nonfocus: Tensor, scale: float, group_size: int,
                            out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] (any strides), nonfocus [B, Hkv, Nn]
    increasing positions -> (K̄ [B, Hq, G, D], V̄ [B, Hq, G, Dv]) in q's dtype, G = Nn // m
    (into ``out`` when given)."""
    B, Hq, _, D = q.shape
    Hkv, Dv, Nn = k.shape[1], v.shape[-1], nonfocus.shape[-1]
    G = Nn // group_size
    kg, vg = out if out is not None else (q.new_empty(B, Hq, G, D), q.new_empty(B, Hq, G, Dv))
    if G == 0:
        return kg, vg
    bm, bd, bdv = triton.next_power_of_2(group_size), head_block(D), head_block(Dv)
    block_g = max(1, 4096 // (bm * max(bd, bdv)))
    mem = nonfocus.to(torch.int32).contiguous()
    _aggregate_kernel[(triton.cdiv(G, block_g), B * Hq)](
        q, k, v, mem, kg, vg, *q.stride(), *k.stride(), *v.stride(), scale * LOG2E, Hq, Hkv, G, Nn,
        M=group_size, D=D, DV=Dv, BLOCK_G=block_g, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv)
    return kg, vg
