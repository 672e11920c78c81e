"""Hugging Face transformers integration: ``attn_implementation="dga"``.

    from dga_compile.integrations.transformers import register
    register(DGAConfig(focus_ratio=0.1))           # once; returns "dga"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="dga")

`register` adds an attention function to `transformers.AttentionInterface` and gives it the
mask builder of "sdpa" in `AttentionMaskInterface`, so every layer gets exactly the mask SDPA
would get: None for plain causal/bidirectional layers (the function then passes
``is_causal``), a bool [B, 1, Nq, Nk] mask for padding and sliding-window layers (their window
is kept). Each call asks the site policy (`dga_compile.policy`, the same decision
``torch.compile(backend="dga")``, `dga_compile.rewrite` and ONNX export make) whether the layer
runs DGA, and with which config: layers in ``DGAConfig.dense_layers`` or dense in
``DGAConfig.plan``, sliding-window layers whose window leaves DGA
less than ``DGAConfig.min_saving`` to save, and decode steps (Nq ≠ Nk) run SDPA. `last_report`
lists each layer's decision and reason.

``output_attentions=True`` needs the attention weights, which DGA never forms: such calls run
dense eager attention and return its weights, with a warning that DGA was not used for them
(as the backend keeps a site dense when its weights have other users).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import validate_config
from ..api import dynamic_group_attention
from ..cache import CACHE_LAYER_KEY
from ..config import DGAConfig
from .. import policy
from ..policy import RewriteReport, Site

__all__ = ["register", "register_attention", "register_forward", "hf_attention_forward", "dga_attend", "sdpa",
           "eager_attention", "last_report", "Attend"]

#: ``attend(q [B,Hq,Nq,D], k [B,Hkv,Nk,D], v, attn_mask, is_causal, scale, dropout_p) -> [B,Hq,Nq,Dv]``
#: with GQA allowed (Hq % Hkv == 0): the SDPA contract with ``enable_gqa=True``.
Attend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool, Optional[float], float], Tensor]

#: registered name -> {layer position: `Site`}: the decision of each layer's last prefill call
_DECISIONS: dict = {}


def register(config: Optional[DGAConfig] = None, name: str = "dga") -> str:
    """Registers DGA with ``config`` (default ``DGAConfig()``) as HF attention ``name``; returns ``name``.

    Registering again under the same name replaces the config (models look the function up
    by name at every forward) and clears `last_report`. With ``config.plan`` each layer runs its
    own config (`DGAConfig.for_site`), its attend built once per layer.
    """
    cfg = validate_config(config)
    return register_attention(name, dga_attend(cfg), config=cfg, site_attend=dga_attend)


def last_report(name: str = "dga") -> RewriteReport:
    """The decision of every layer (in layer order) that attention ``name`` has run for: rewritten
    into DGA, or dense and why (the reasons of `dga_compile.policy`)."""
    sites = _DECISIONS.get(name, {})
    return RewriteReport([sites[k] for k in sorted(sites, key=lambda p: (p is None, p if p is not None else 0))])


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


def eager_attention(q, k, v, attn_mask, is_causal, scale, dropout_p) -> tuple[Tensor, Tensor]:
    """Dense attention written out, as HF's eager attention: (output [B, Hq, Nq, Dv], weights
    [B, Hq, Nq, Nk]); masked entries take ``finfo.min``, the softmax runs in float32."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    low = torch.finfo(scores.dtype).min
    if is_causal:
        nq, nk = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(), low)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, low) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = F.dropout(scores.float().softmax(-1).to(q.dtype), dropout_p) if dropout_p else \
        scores.float().softmax(-1).to(q.dtype)
    return weights @ v, weights


def register_attention(name: str, attend: Attend, dense: Attend = sdpa, dense_layers: Sequence[int] = (),
                       config: Optional[DGAConfig] = None,
                       site_attend: Optional[Callable[[DGAConfig], Attend]] = None) -> str:
    """Registers any SDPA-contract function ``attend`` as HF attention ``name`` (with SDPA's masks).

    Layers the site policy keeps dense call ``dense``: with ``config``, its `DGAConfig` decides
    (dense_layers, plan, min_saving against a layer's sliding window); without, only ``dense_layers``
    and decode steps do (for attention functions other than DGA, e.g. evaluation baselines).
    ``site_attend`` (with ``config``): builds a rewritten layer's attend from its own config
    (`policy.Decision.config`) instead of ``attend``, once per layer.
    """
    _DECISIONS[name] = {}
    return register_forward(name, hf_attention_forward(attend, dense, dense_layers, config, _DECISIONS[name],
                                                       site_attend))


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


def hf_attention_forward(attend: Attend, dense: Attend = sdpa, dense_layers: Sequence[int] = (),
                         config: Optional[DGAConfig] = None, decisions: Optional[dict] = None,
                         site_attend: Optional[Callable[[DGAConfig], Attend]] = None) -> Callable:
    """Wraps ``attend`` in the signature HF attention modules call (mirrors ``sdpa_attention_forward``);
    layers the site policy keeps dense (see `register_attention`) call ``dense``, and calls with
    ``output_attentions=True`` run `eager_attention` and return its weights. ``decisions``, when
    given, receives each layer's `Site` (`last_report`); ``site_attend``: see `register_attention`.

    The HF function receives q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] and returns ([B, Nq, Hq, Dv], weights or None).
    """
    cfg = config or DGAConfig(dense_layers=tuple(dense_layers))
    attends: dict = {}                                # layer position -> its attend (site_attend)

    def rewritten(position, decision) -> Attend:
        if site_attend is None:
            return attend
        if position not in attends:
            attends[position] = site_attend(decision.config)
        return attends[position]

    def forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                position_bias: Optional[Tensor] = None, **kwargs) -> tuple[Tensor, Optional[Tensor]]:
        _validate_hf_kwargs(position_bias, kwargs)
        cache_layer = kwargs.pop(CACHE_LAYER_KEY, None)          # a DGACache layer: it reads its own slots
        nq = query.shape[2]
        declared = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        causal = bool(nq > 1 and attention_mask is None and declared)
        if causal and key.shape[2] > nq:      # prefill into an empty static cache: drop the unused slots
            key, value = key[:, :, :nq], value[:, :, :nq]
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))  # HF passes the layer's window
        window = window if config is not None and attention_mask is not None else None
        cross = getattr(module, "is_cross_attention", False)  # HF's flag on modules that read encoder states
        facts = policy.SiteFacts(position=getattr(module, "layer_idx", None), nq=nq, nk=key.shape[2],
                                 window=window, causal=declared, same_sequence=False if cross else None,
                                 weights_used=bool(kwargs.get("output_attentions")))
        decision = policy.decide(facts, cfg)
        if decisions is not None and (nq > 1 or facts.position not in decisions):
            decisions[facts.position] = _site(module, facts, decision, query, key, value, attention_mask, causal)
        if facts.weights_used:
            warnings.warn(f"DGA was not used for this call (output_attentions=True): {decision.reason}; the "
                          f"output and the weights returned are dense eager attention's", stacklevel=2)
            out, weights = eager_attention(query, key, value, attention_mask, causal, scaling, float(dropout))
            return out.transpose(1, 2).contiguous(), weights
        fn = rewritten(facts.position, decision) if decision.rewrite else dense
        if cache_layer is not None:
            out = cache_layer.attend(query, attention_mask, scaling or query.shape[-1] ** -0.5,
                                     lambda: fn(query, key, value, attention_mask, causal, scaling, float(dropout)),
                                     kwargs.get("sliding_window"))
        else:
            out = fn(query, key, value, attention_mask, causal, scaling, float(dropout))
        return out.transpose(1, 2).contiguous(), None

    return forward


def _site(module, facts, decision, q, k, v, mask, causal) -> Site:
    kind = "none" if mask is None else ("bool" if mask.dtype == torch.bool else "additive")
    where = type(module).__name__ + ("" if facts.position is None else f" (layer {facts.position})")
    return Site("hf-attention", (), where, tuple(q.shape), tuple(k.shape), tuple(v.shape), kind,
                "yes" if causal else ("mask" if mask is not None else "no"), decision.rewrite, decision.reason, "",
                facts.position, decision.config.budget() if decision.rewrite else "", decision.uncalibrated)


def _validate_hf_kwargs(position_bias, kwargs) -> None:
    if position_bias is not None:
        raise ValueError("DGA cannot take a position_bias (T5-style relative attention bias); "
                         "load this model with attn_implementation='sdpa'")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"DGA does not support attention logit softcapping (softcap={kwargs['softcap']}); "
                         "load this model with attn_implementation='eager'")
