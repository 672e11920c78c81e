"""Per-layer budget: which attention layers lose most under DGA, measured in dense forwards.

For every attention layer of a causal LM, on windows of text that lie between the evaluation
windows (`calibration_windows`), DGA and dense attention run on the same q, k, v (those of the
dense model, so errors do not compound) and the layer's error is the relative error of its
attention output on the last half of the rows, ‖o_DGA − o_dense‖ / ‖o_dense‖, pooled over the
windows. Keeping the worst layers dense (``DGAConfig.dense_layers``) buys the most accuracy per
unit of attention cost. On SmolLM2-135M at 4K the 6 worst layers by this measure (on the same
window) were exactly the 6 that raise last-half perplexity most when DGA runs in that layer alone
(docs/ACCURACY.md, "Per-layer budget").
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..api import dynamic_group_attention
from ..config import DGAConfig
from ..integrations.transformers import hf_attention_forward, register_forward, sdpa

__all__ = ["calibration_windows", "layer_errors", "worst_layers"]


def calibration_windows(tokenizer, text: str, seq_len: int, windows: int) -> list[Tensor]:
    """[1, seq_len] token windows halfway between the ``windows`` evenly spaced evaluation windows
    of `run.token_windows` (one in the middle of the text when there is a single one)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    span = len(ids) - seq_len
    if span < 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    starts = torch.linspace(0, span, windows) if windows > 1 else torch.tensor([0.0, float(span)])
    mids = ((starts[:-1] + starts[1:]) / 2).long().tolist()
    return [ids[s:s + seq_len][None] for s in mids]


def layer_errors(model, windows: Sequence[Tensor], config: DGAConfig) -> dict[int, float]:
    """{layer_idx: relative error of DGA's attention output on the last half of the rows}."""
    dga = hf_attention_forward(lambda q, k, v, mask, causal, scale, p: dynamic_group_attention(
        q, k, v, mask, p, causal, scale, enable_gqa=q.shape[1] != k.shape[1], config=config))
    dense = hf_attention_forward(sdpa)
    sums: dict[int, list[float]] = {}

    def forward(module, *args, **kwargs):
        exact, _ = dense(module, *args, **kwargs)                   # [B, N, H, Dv]
        approx, _ = dga(module, *args, **kwargs)
        half = exact.shape[1] // 2
        err, ref = sums.setdefault(module.layer_idx, [0.0, 0.0]), exact[:, half:].double()
        err[0] += float(((approx[:, half:].double() - ref) ** 2).sum())
        err[1] += float((ref ** 2).sum())
        return exact, None

    model.set_attn_implementation(register_forward("dga-calibrate", forward))
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=ids)
    finally:
        model.set_attn_implementation("sdpa")
    return {layer: (e / max(r, 1e-300)) ** 0.5 for layer, (e, r) in sorted(sums.items())}


def worst_layers(errors: dict[int, float], k: int) -> tuple[int, ...]:
    """The ``k`` layers with the largest error, in layer order (a `DGAConfig.dense_layers`)."""
    return tuple(sorted(sorted(errors, key=errors.get, reverse=True)[:k]))
