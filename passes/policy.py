"""The site policy: whether one attention site becomes DGA, and why not.

One decision for every entry point: the rewrite (``torch.compile(backend="dga")``,
`dga_compile.rewrite`, ONNX export) asks `decide` for each attention site of a graph, the
Hugging Face integration (``attn_implementation="dga"``) for each layer call, each with what it
knows about the site (`SiteFacts`): the graph proves a sliding window from the mask it builds,
HF states it in the layer's ``sliding_window``. The knobs are `DGAConfig.dense_layers` and
`DGAConfig.min_saving`. Exactness (γ = 1, Nk < min_seq_len) is the op's business, not policy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import DGAConfig

__all__ = ["Decision", "SiteFacts", "decide", "kept_fraction"]

WEIGHTS_USED = "attention weights have other users (e.g. output_attentions): they need dense attention"
CROSS = ("q and k/v come from different inputs (cross-attention): DGA weighs each group's keys with the "
         "query at the group's last key position and counts its window back from the query's own position, "
         "both defined for self-attention only; kept dense")
NOT_CAUSAL_UNKNOWN = ("not causal, and the graph does not show that q and k/v come from one sequence: if this "
                      "is cross-attention, keep it dense with DGAConfig.dense_layers")
NOT_CAUSAL = "bidirectional self-attention: DGA's window does not apply"


@dataclasses.dataclass(frozen=True)
class SiteFacts:
    """What an entry point knows about one attention site (None: not known).

    Attributes:
        position: the site's place in model order: the HF layer index (``layer_idx``, or the
            number in the module path such as ``model.layers.3.self_attn``), else its order
            among the graph's attention sites.
        nq, nk: query and key lengths when they are static.
        window: the mask limits each query to at most this many keys (a sliding window); it
            counts only when it is shorter than Nk (or Nk is not static).
        causal: True for ``is_causal`` or a causal mask, False when neither applies, None when a
            mask decides at run time.
        same_sequence: True when q and k/v are shown to come from one input (self-attention),
            False when from two (cross-attention), None when not shown.
        weights_used: the attention probabilities have other users (``output_attentions``).
    """

    position: Optional[int] = None
    nq: Optional[int] = None
    nk: Optional[int] = None
    window: Optional[int] = None
    causal: Optional[bool] = None
    same_sequence: Optional[bool] = None
    weights_used: bool = False


@dataclasses.dataclass(frozen=True)
class Decision:
    """``rewrite``: the site becomes DGA; ``reason``: why not, or notes for a rewritten site ("" if none)."""

    rewrite: bool
    reason: str = ""


def kept_fraction(config: DGAConfig, window: int) -> float:
    """The fraction of a ``window``-key sliding window DGA would attend: γ + 1/m + (w + m)/W, at most 1."""
    return min(1.0, config.focus_ratio + 1.0 / config.group_size + (config.window + config.group_size) / window)


def decide(facts: SiteFacts, config: DGAConfig) -> Decision:
    """Rewrite or keep dense, with the reason; the checks run in this order (first reason wins)."""
    if facts.weights_used:
        return Decision(False, WEIGHTS_USED)
    if None not in (facts.nq, facts.nk) and facts.nq != facts.nk:
        return Decision(False, f"Nq={facts.nq} ≠ Nk={facts.nk} (cross-attention or decode): DGA would compute "
                               f"dense attention anyway")
    if facts.same_sequence is False:
        return Decision(False, CROSS)
    if facts.position is not None and facts.position in config.dense_layers:
        return Decision(False, f"attention site {facts.position} is in DGAConfig.dense_layers="
                               f"{config.dense_layers}: kept dense")
    if facts.window and (facts.nk is None or facts.window < facts.nk):  # a window ≥ Nk limits nothing
        kept = kept_fraction(config, facts.window)
        if 1.0 - kept < config.min_saving:
            return Decision(False, f"the mask limits each query to a sliding window of {facts.window} keys: DGA "
                                   f"would attend ≈{kept:.0%} of them, saving less than "
                                   f"min_saving={config.min_saving:g}")
    if facts.causal is False:
        return Decision(True, NOT_CAUSAL if facts.same_sequence else NOT_CAUSAL_UNKNOWN)
    return Decision(True)
