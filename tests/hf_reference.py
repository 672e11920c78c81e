"""An HF attention function that runs `reference_attention` on what HF hands each layer (tests only).

It mirrors HF's ``sdpa_attention_forward`` (causal when Nq > 1, no mask is passed and the
module is causal) and none of dga_compile's integration glue, so a test can compare an entry
point at γ < 1 with the spec applied to every layer's own q / k / v: a rewrite or a glue that
drops the causal flag, the mask or the GQA grouping is exact at γ = 1 but differs here.
"""

from __future__ import annotations

from dga_compile import DGAConfig, reference_attention
from dga_compile.integrations.transformers import register_forward


def register_reference(config: DGAConfig, name: str = "dga-reference") -> str:
    """Registers `reference_attention` at ``config`` as HF attention ``name`` (with SDPA's masks)."""
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = query.shape[2] > 1 and attention_mask is None and causal
        out = reference_attention(query, key, value, attention_mask, causal, scaling, config)
        return out.transpose(1, 2).contiguous(), None

    return register_forward(name, forward)
