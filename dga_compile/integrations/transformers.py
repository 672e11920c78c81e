"""Hugging Face transformers integration: ``attn_implementation="dga"``.

    from dga_compile.integrations.transformers import register
    register(DGAConfig(focus_ratio=0.1))           # once; returns "dga"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dga")

`register` adds an attention function to `transformers.AttentionInterface` and gives it the
mask builder of "sdpa" in `AttentionMaskInterface`, so every layer gets exactly the mask SDPA
would get: None for plain causal/bidirectional layers (the function then passes
``is_causal``), a bool [B, 1, Nq, Nk] mask for padding and sliding-window layers (their window
is kept). Decode steps (one query, a KV cache) have Nq ≠ Nk, where the op is exactly dense.
Layers whose ``layer_idx`` is in ``DGAConfig.dense_layers`` run SDPA.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import dynamic_group_attention
from ..cache import CACHE_LAYER_KEY
from ..config import DGAConfig

__all__ = ["register", "register_attention", "register_forward", "hf_attention_forward", "dga_attend", "sdpa",
           "Attend"]

#: ``attend(q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v, attn_mask, is_causal, scale, dropout_p) -> [B,Hq,Nq,Dv]``
#: with GQA allowed (Hq % Hkv == 0): the SDPA contract with ``enable_gqa=True``.
Attend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool, Optional[float], float], Tensor]


def register(config: Optional[DGAConfig] = None, name: str = "dga") -> str:
    """Registers DGA with ``config`` (default ``DGAConfig()``) as HF attention ``name``; returns ``name``.

    Registering again under the same name replaces the config (models look the function up
    by name at every forward).
    """
    cfg = config or DGAConfig()
    if not isinstance(cfg, DGAConfig):
        raise ValueError(f"config must be a DGAConfig or None, got {type(cfg).__name__}")
    return register_attention(name, dga_attend(cfg), dense_layers=cfg.dense_layers)


def dga_attend(config: DGAConfig) -> Attend:
    """The `Attend` of DGA at ``config``: `dynamic_group_attention` with GQA."""

    def attend(q, k, v, attn_mask, is_causal, scale, dropout_p):
        return dynamic_group_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1], config=config)

    return attend


def sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p) -> Tensor:
    """The `Attend` of dense attention: `F.scaled_dot_product_attention` with GQA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def register_attention(name: str, attend: Attend, dense: Attend = sdpa, dense_layers: Sequence[int] = ()) -> str:
    """Registers any SDPA-contract function ``attend`` as HF attention ``name`` (with SDPA's masks);
    layers whose ``layer_idx`` is in ``dense_layers`` call ``dense`` instead."""
    return register_forward(name, hf_attention_forward(attend, dense, dense_layers))


def register_forward(name: str, forward: Callable) -> str:
    """Registers an HF attention function ``forward(module, query, key, value, attention_mask, ...)``
    (the signature `hf_attention_forward` returns) as attention ``name``, with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not isinstance(name, str) or not name or name in ("sdpa", "eager") or name.startswith("flash"):
        raise ValueError(f"name must be a new attention implementation name such as 'dga', got {name!r}")
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def hf_attention_forward(attend: Attend, dense: Attend = sdpa, dense_layers: Sequence[int] = ()) -> Callable:
    """Wraps ``attend`` in the signature HF attention modules call (mirrors ``sdpa_attention_forward``);
    modules whose ``layer_idx`` is in ``dense_layers`` call ``dense``.

    The HF function receives q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] and returns ([B, Nq, Hq, Dv], None).
    """
    dense_layers = frozenset(dense_layers)

    def forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                position_bias: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, None]:
        _validate_hf_kwargs(position_bias, kwargs)
        cache_layer = kwargs.pop(CACHE_LAYER_KEY, None)          # a DGACache layer: it reads its own slots
        nq = query.shape[2]
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(nq > 1 and attention_mask is None and causal)
        if causal and key.shape[2] > nq:      # prefill into an empty static cache: drop the unused slots
            key, value = key[:, :, :nq], value[:, :, :nq]
        fn = dense if getattr(module, "layer_idx", None) in dense_layers else attend
        if cache_layer is not None:
            out = cache_layer.attend(query, attention_mask, scaling or query.shape[-1] ** -0.5,
                                     lambda: fn(query, key, value, attention_mask, causal, scaling, float(dropout)),
                                     kwargs.get("sliding_window"))
        else:
            out = fn(query, key, value, attention_mask, causal, scaling, float(dropout))
        return out.transpose(1, 2).contiguous(), None

    return forward


def _validate_hf_kwargs(position_bias, kwargs) -> None:
    if position_bias is not None:
        raise ValueError("DGA cannot take a position_bias (T5-style relative attention bias); "
                         "load this model with attn_implementation='sdpa'")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"DGA does not support attention logit softcapping (softcap={kwargs['softcap']}); "
                         "load this model with attn_implementation='eager'")
