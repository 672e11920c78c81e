"""Reference DGA decoding: the "Decoding" section of ``docs/dga.md`` literally, in plain PyTorch.

Given the whole history of one attention layer (every position's query, key and value), this
computes what each decode query attends to under the DGA cache, with no incremental state: the
cache (`dga_compile.cache`) and the decode kernels are tested against it. Works in float64;
fp16/bf16/fp32 inputs run in float32.

Positions are cache indices 0 … T−1 (with left padding, a row's padding positions are not
tokens: ``real`` is False there). A prefill of N positions is compressed when N ≥ min_seq_len:
focus tokens are chosen once (`focus_mask`); every other real token belongs to the block of m
positions it falls in, and a block becomes one aggregated key/value pair for every query
position i with anchor (k+1)·m − 1 ≤ i − w (`complete_blocks`, `aggregate_blocks`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import DGAConfig
from .selection import _kv_view, importance_scores, num_focus, working_dtype

__all__ = ["compresses", "focus_mask", "complete_blocks", "block_anchors", "aggregate_blocks", "group_log_weight",
           "decode_reference", "slot_attention"]


def _softmax_or_zero(logits: Tensor) -> Tensor:
    """Softmax over the last dim; a row whose every logit is −inf gives 0 (NaN inputs stay NaN, as in SDPA)."""
    return logits.softmax(-1).masked_fill((logits == float("-inf")).all(-1, keepdim=True), 0.0)


def compresses(n_prefill: int, config: DGAConfig) -> bool:
    """Whether a prefill of ``n_prefill`` positions is compressed (else the layer's cache stays dense)."""
    return n_prefill >= max(config.min_seq_len, 1)


def focus_mask(q_probe: Tensor, k: Tensor, real: Tensor, scale: float, config: DGAConfig) -> Tensor:
    """Step D1. bool [B, Hkv, N]: the focus tokens of a prefill of N positions.

    q_probe [B, Hq, r', D]: the queries of the prefill's last r' ≥ min(r, N) positions (the last r
    of them probe), k [B, Hkv, N, D], real bool [B, N]. Step 1 of the op scores the real keys
    each probe may see (causal); row b keeps its first s = ``config.sinks`` real tokens and its
    best others, n_f = min(n_b, s + ceil(γ·n_b)) in all (n_b: its real tokens; ties: the smaller
    position).
    """
    N, rows = k.shape[2], q_probe.shape[2]
    pos = torch.arange(N, device=k.device)
    vis = real[:, None, None, :] & (pos <= pos[N - rows:, None])[None, None]             # [B, 1, r', N]
    scores = importance_scores(q_probe, k, vis, scale, config.num_probe).masked_fill(~real[:, None, :], -1.0)
    sink = real & (real.cumsum(-1) <= config.sinks)                                      # [B, N]
    scores = scores.masked_fill(sink[:, None, :], float("inf"))
    n_f = torch.tensor([num_focus(config.focus_ratio, int(n), config.sinks) for n in real.sum(-1)], device=k.device)
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, pos.expand_as(order))
    return rank < n_f[:, None, None]


def complete_blocks(position: int, config: DGAConfig) -> int:
    """How many blocks are complete for query position i: blocks k with anchor (k+1)·m − 1 ≤ i − w."""
    return max(0, (position - config.window + 1) // config.group_size)


def block_anchors(first: int, stop: int, group_size: int, device=None) -> Tensor:
    """[stop − first] int64: the anchor position (k+1)·m − 1 of blocks first … stop − 1."""
    return torch.arange(first, stop, device=device) * group_size + group_size - 1


def group_log_weight(count: Tensor, group_bias: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """λ of a group slot with ``count`` members, in ``dtype``: β·log(count); −inf for an empty block (no slot)."""
    c = count.to(dtype)
    return torch.where(c > 0, group_bias * c.clamp(min=1).log(), float("-inf"))


def aggregate_blocks(q_anchor: Tensor, k: Tensor, v: Tensor, members: Tensor, scale: float,
                     per_query_head: bool = False) -> tuple[Tensor, Tensor]:
    """Step D3. (K̄, V̄) of n blocks: w = softmax_{j ∈ members}(scale·q̄·k_j), K̄ = Σ w·k_j, V̄ = Σ w·v_j.

    q_anchor [B, Hq, n, D]: the query at each block's anchor; k [B, Hkv, n·m, D], v [B, Hkv, n·m, Dv]:
    the blocks' positions; members bool [B, Hkv, n, m]. q̄ is the mean of the anchor's queries over
    the query heads that read the kv head, so K̄, V̄ are [B, Hkv, n, ·]; with ``per_query_head``
    each query head weighs with its own query instead ([B, Hq, n, ·], the op's step 4). Blocks
    with no member give zeros.
    """
    B, Hq, n, D = q_anchor.shape
    Hkv, m, Dv = k.shape[1], members.shape[-1], v.shape[-1]
    km, vm = k.reshape(B, Hkv, n, m, D), v.reshape(B, Hkv, n, m, Dv)
    qa = _kv_view(q_anchor, Hkv)                                                     # [B, Hkv, rep, n, D]
    if not per_query_head:
        qa = qa.mean(2, keepdim=True)
    logits = scale * torch.einsum("bkrnd,bknmd->bkrnm", qa, km)
    w = _softmax_or_zero(logits.masked_fill(~members[:, :, None], float("-inf")))
    kbar = torch.einsum("bkrnm,bknmd->bkrnd", w, km)
    vbar = torch.einsum("bkrnm,bknmd->bkrnd", w, vm)
    return kbar.flatten(1, 2), vbar.flatten(1, 2)


def decode_reference(q: Tensor, k: Tensor, v: Tensor, n_prefill: int, real: Optional[Tensor] = None,
                     config: Optional[DGAConfig] = None, scale: Optional[float] = None,
                     steps: Optional[Sequence[int]] = None, per_query_head: bool = False) -> Tensor:
    """The outputs of the queries at positions n_prefill … T−1 decoding from a DGA cache.

    q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]: the whole history of one layer (Hq % Hkv
    == 0); real: bool [B, T], False at padding (None: all real); ``steps``: the lengths of the
    forwards after the prefill (they sum to T − n_prefill; default one token each). A step's
    queries all see the blocks complete for its first position; query i sees raw tokens j ≤ i.
    Returns [B, Hq, T − n_prefill, Dv] in q's dtype.
    """
    cfg = config or DGAConfig()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype, wd = q.dtype, working_dtype(q.dtype)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    B, Hq, T, _ = q.shape
    Hkv, N, m = k.shape[1], n_prefill, cfg.group_size
    rep = Hq // Hkv
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if real is None else real.bool()
    steps = [1] * (T - N) if steps is None else list(steps)
    if sum(steps) != T - N or min(steps, default=1) < 1:
        raise ValueError(f"steps must be positive lengths summing to T − n_prefill = {T - N}, got {steps}")
    pos = torch.arange(T, device=q.device)
    focus = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)
    kind_ok = real[:, None, :].expand(B, Hkv, T)                     # compressed or not: real tokens only
    if compresses(N, cfg):
        focus[..., :N] = focus_mask(q[:, :, :N], k[:, :, :N], real[:, :N], scale, cfg)
    outs, i0 = [], N
    for step in steps:
        nb = complete_blocks(i0, cfg) if compresses(N, cfg) else 0
        grouped = kind_ok & ~focus & (pos < nb * m)                  # members of complete blocks
        members = grouped[..., :nb * m].reshape(B, Hkv, nb, m)
        anchors = block_anchors(0, nb, m, q.device)
        kbar, vbar = aggregate_blocks(q[:, :, anchors], k[:, :, :nb * m], v[:, :, :nb * m], members, scale,
                                      per_query_head)
        if not per_query_head:
            kbar, vbar = kbar.repeat_interleave(rep, 1), vbar.repeat_interleave(rep, 1)
        lam = group_log_weight(members.sum(-1), cfg.group_bias, wd).repeat_interleave(rep, 1)   # [B, Hq, nb]
        token_ok = (kind_ok & ~grouped).repeat_interleave(rep, 1)                                   # [B, Hq, T]
        for i in range(i0, i0 + step):
            qi = q[:, :, i]                                                                          # [B, Hq, D]
            tok = (scale * torch.einsum("bhd,bhtd->bht", qi, k.repeat_interleave(rep, 1)))
            tok = tok.masked_fill(~(token_ok & (pos <= i)), float("-inf"))
            grp = scale * torch.einsum("bhd,bhnd->bhn", qi, kbar) + lam
            p = _softmax_or_zero(torch.cat([tok, grp], -1))
            outs.append(torch.einsum("bht,bhtd->bhd", p[..., :T], v.repeat_interleave(rep, 1))
                        + torch.einsum("bhn,bhnd->bhd", p[..., T:], vbar))
        i0 += step
    return torch.stack(outs, 2).to(out_dtype) if outs else q.new_zeros(B, Hq, 0, v.shape[-1]).to(out_dtype)


def slot_attention(q: Tensor, pk: Tensor, pv: Tensor, pl: Tensor, rk: Tensor, rv: Tensor, rl: Tensor,
                   scale: float) -> Tensor:
    """Decode attention over a DGA cache's slots: out = Σ_s softmax_s(scale·q·k_s + λ_s)·v_s.

    q [B, Hq, n, D] (query head h reads kv head h // (Hq/Hkv)); the packed slots pk [B, Hkv, P, D],
    pv [B, Hkv, P, Dv], pl [B, Hkv, P] (focus 0, groups β·log c, −inf: no slot); the recent raw
    tokens rk [B, Hkv, R, D], rv, rl [B, Hkv, R] (0 or −inf), whose last n are the step's own tokens:
    query t sees those up to itself. A row with no slot gives 0. Returns [B, Hq, n, Dv] in q's dtype.
    """
    out_dtype, wd = q.dtype, working_dtype(q.dtype)
    B, Hq, n, D = q.shape
    Hkv, R = rk.shape[1], rk.shape[2]
    qv = _kv_view(q.to(wd), Hkv).reshape(B, Hkv, -1, D)                          # [B, Hkv, rep·n, D]
    causal = torch.arange(R, device=q.device) <= (R - n + torch.arange(n, device=q.device))[:, None]   # [n, R]
    rbias = rl.to(wd)[:, :, None, :].masked_fill(~causal.repeat(Hq // Hkv, 1), float("-inf"))
    logits = torch.cat([scale * qv @ pk.to(wd).transpose(-1, -2) + pl.to(wd)[:, :, None, :],
                        scale * qv @ rk.to(wd).transpose(-1, -2) + rbias], -1)
    p = _softmax_or_zero(logits)
    out = p[..., :pk.shape[2]] @ pv.to(wd) + p[..., pk.shape[2]:] @ rv.to(wd)
    return out.reshape(B, Hq, n, -1).to(out_dtype)
