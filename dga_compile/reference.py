"""Reference Dynamic Group Attention: ``docs/dga.md`` (the spec) literally, in plain PyTorch.

Steps 1–4 and step 5′'s decisions are `dga_compile.selection`'s (shared with every
implementation); steps 5′ and 5 are written here densely (Nq×Nk logit matrices), which is the
point of a reference. Works in float64;
fp16/bf16/fp32 inputs run in float32. `dense_attention` is the op outside DGA's domain, as the
fast implementations compute it (torch's SDPA at the input dtype).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import causal_like, dga_applies, mask_4d, validate_config, visible_4d, visible_rows
from .config import DGAConfig
from .selection import aggregate_groups, block_expansion, complete_groups, focus_split, group_mass, working_dtype

__all__ = ["dense_attention", "reference_attention"]


def _softmax_rows(logits: Tensor) -> Tensor:
    """Softmax over the last dim; as in SDPA, a row whose logits are all −inf (no candidate) gives
    0, and a row holding a NaN or +inf logit gives NaN."""
    return logits.softmax(-1).masked_fill((logits == float("-inf")).all(-1, keepdim=True), 0.0)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                        is_causal: bool = False, scale: Optional[float] = None,
                        config: Optional[DGAConfig] = None, dropout_p: float = 0.0) -> Tensor:
    """DGA per the spec. q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] -> [B, Hq, Nq, Dv].

    Hq % Hkv == 0 (GQA by head grouping); ``attn_mask`` bool (True = attend) or additive
    (0 / masked); ``is_causal`` is top-left aligned and ANDed with the mask.
    """
    cfg = validate_config(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out_dtype, wd = q.dtype, working_dtype(q.dtype)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    vis = visible_4d(attn_mask, is_causal, Nq, Nk, q.device)
    vis_full = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool, device=q.device) if vis is None else vis.expand(B, Hq, Nq, Nk)
    kh, vh = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = scale * q @ kh.transpose(-1, -2)                                     # [B, Hq, Nq, Nk]
    if not dga_applies(Nq, Nk, cfg.min_seq_len):
        probs = _softmax_rows(logits.masked_fill(~vis_full, float("-inf")))
        return (_dropout(probs, dropout_p) @ vh).to(out_dtype)

    m = cfg.group_size
    focus, nonfocus = focus_split(q, k, mask_4d(attn_mask), is_causal, scale, cfg)      # 1, 2
    grp = aggregate_groups(q, k, v, nonfocus, scale, m)                                 # 3, 4
    G = grp.anchors.shape[-1]

    # Which groups are complete for query i: all members visible, and (causal) a(g) ≤ i − w.
    complete = complete_groups(vis_full, grp.members.repeat_interleave(rep, 1), 0, causal_like(vis, is_causal),
                               cfg.window)                                         # [B, Hq, Nq, G]
    # Per token: focus, or the index of its group (−1 for the raw tail run).
    group_of = torch.full((B, Hkv, Nk), -1, dtype=torch.long, device=q.device)
    group_of.scatter_(-1, grp.members.reshape(B, Hkv, -1),
                      torch.arange(G, device=q.device).repeat_interleave(m).expand(B, Hkv, -1))
    group_of = group_of.repeat_interleave(rep, 1)[:, :, None, :].expand(B, Hq, Nq, Nk)
    is_focus = torch.zeros(B, Hkv, Nk, dtype=torch.bool, device=q.device).scatter_(-1, focus, True)
    is_focus = is_focus.repeat_interleave(rep, 1)[:, :, None, :]
    group_dot = scale * q @ grp.keys.transpose(-1, -2)                             # [B, Hq, Nq, G]

    def candidates(merged: Tensor, bias: float) -> Tensor:
        """Step 5's logits [B, Hq, Nq, Nk + G] when the groups ``merged`` [B, Hq, Nq, G] are used
        as one key each (their members are not)."""
        in_merged = (group_of >= 0) & merged.gather(-1, group_of.clamp(min=0)) if G else torch.zeros_like(vis_full)
        token_ok = vis_full & (is_focus | ~in_merged)
        return torch.cat([logits.masked_fill(~token_ok, float("-inf")),
                          (group_dot + bias).masked_fill(~merged, float("-inf"))], -1)

    if cfg.expand_mass > 0:                                                         # 5′
        with torch.no_grad():
            mass = group_mass(candidates(complete, cfg.expand_bias * math.log(m)), Nk, G)
        expanded = torch.zeros_like(complete)
        for i0 in range(0, Nq, cfg.query_block):
            i1 = min(i0 + cfg.query_block, Nq)
            rows = complete[:, :, i0:i1]
            expand, dense = block_expansion(mass[:, :, i0:i1], rows, cfg)
            expanded[:, :, i0:i1] = rows & (expand[:, :, None, :] | dense[:, :, None, None])
        complete = complete & ~expanded
    probs = _dropout(_softmax_rows(candidates(complete, cfg.group_bias * math.log(m))), dropout_p)    # 5
    return (probs[..., :Nk] @ vh + probs[..., Nk:] @ grp.values).to(out_dtype)


def _dropout(probs: Tensor, p: float) -> Tensor:
    return F.dropout(probs, p) if p else probs


def dense_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                    scale: float, dropout_p: float = 0.0) -> Tensor:
    """Exact attention as SDPA computes it (at q's dtype), with ``is_causal`` ANDed into a given
    mask and additive masks read as Visible (0 / masked): what the blocked, C++ and Triton paths
    return outside DGA's domain (`_validation.dga_applies`). Shapes as `reference_attention`."""
    if attn_mask is not None:
        attn_mask = visible_rows(mask_4d(attn_mask), is_causal, 0, q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal and attn_mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])
