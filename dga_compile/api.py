"""The public op: `dynamic_group_attention`, a drop-in for `F.scaled_dot_product_attention`."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._validation import validate_config, validate_inputs
from .config import DGAConfig
from .ops import OpCall

__all__ = ["dynamic_group_attention"]


def dynamic_group_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                            dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                            enable_gqa: bool = False, config: Optional[DGAConfig] = None) -> Tensor:
    """Dynamic Group Attention with the contract of `torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query: [B, Hq, Nq, D]. key: [B, Hkv, Nk, D]. value: [B, Hkv, Nk, Dv].
        attn_mask: None, bool (True = may attend) or additive float holding only 0 and masked
            (≤ −1e4 / −inf) entries, broadcastable to [B, Hq, Nq, Nk].
        dropout_p: dropout on the final attention probabilities (training only; 0 at inference).
        is_causal: top-left aligned causal mask, ANDed with ``attn_mask``.
        scale: softmax scale, default 1/sqrt(D).
        enable_gqa: allow Hq ≠ Hkv (Hq % Hkv == 0).
        config: `DGAConfig`; default ``DGAConfig()``.

    Returns:
        [B, Hq, Nq, Dv] in ``query``'s dtype. Exact dense attention when Nq ≠ Nk, Nk <
        ``config.min_seq_len``, γ = 1 or m = 1.

    Raises:
        TypeError: an argument of the wrong type (as SDPA), or ``config`` not a `DGAConfig`.
        ValueError: shapes, dtypes, devices or values the op cannot take (the message says why).
    """
    cfg = validate_config(config)
    scale = validate_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p > 0 else None
    return torch.ops.dga.attention(*OpCall(query, key, value, attn_mask, dropout_p, seed, is_causal, scale, cfg).args())
