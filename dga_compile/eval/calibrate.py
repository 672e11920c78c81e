"""Per-layer budget: which attention layers lose most under DGA, measured in dense forwards.

For every attention layer of a causal LM, on windows of text that lie between the evaluation
windows (`run.token_windows` with ``between=True``), DGA and dense attention run on the same q, k, v (those of the
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

from ..config import DGAConfig
from ..integrations.transformers import dga_attend, hf_attention_forward, register_forward, sdpa

__all__ = ["layer_errors", "worst_layers", "run_windows"]


def layer_errors(model, windows: Sequence[Tensor], config: DGAConfig) -> dict[int, float]:
    """{layer_idx: relative error of DGA's attention output on the last half of the rows}."""
    dga, dense = hf_attention_forward(dga_attend(config)), hf_attention_forward(sdpa)
    sums: dict[int, list[float]] = {}

    def forward(module, *args, **kwargs):
        exact, _ = dense(module, *args, **kwargs)                   # [B, N, H, Dv]
        approx, _ = dga(module, *args, **kwargs)
        half = exact.shape[1] // 2
        err, ref = sums.setdefault(module.layer_idx, [0.0, 0.0]), exact[:, half:].double()
        err[0] += float(((approx[:, half:].double() - ref) ** 2).sum())
        err[1] += float((ref ** 2).sum())
        return exact, None

    run_windows(model, register_forward("dga-calibrate", forward), windows)
    return {layer: (e / max(r, 1e-300)) ** 0.5 for layer, (e, r) in sorted(sums.items())}


def run_windows(model, attn_implementation: str, windows: Sequence[Tensor]) -> None:
    """Dense-model forwards over ``windows`` with the HF attention ``attn_implementation`` (a
    measuring hook), then back to SDPA."""
    model.set_attn_implementation(attn_implementation)
    try:
        with torch.no_grad():
            for ids in windows:
                model(input_ids=ids)
    finally:
        model.set_attn_implementation("sdpa")


def worst_layers(errors: dict[int, float], k: int) -> tuple[int, ...]:
    """The ``k`` layers with the largest error, in layer order (a `DGAConfig.dense_layers`)."""
    return tuple(sorted(sorted(errors, key=errors.get, reverse=True)[:k]))
