"""`attn_implementation="dga"` in Hugging Face transformers, on tiny random models.

At γ = 1 the HF glue must equal SDPA; at γ < 1 (``ACTIVE``) it must equal the same model run
with `hf_reference.register_reference` (the spec on each layer's own q / k / v, none of the
glue), which a dropped causal flag, mask or GQA grouping would not.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dga_compile import DGAConfig  # noqa: E402
from dga_compile.integrations.transformers import last_report, register, register_attention  # noqa: E402
from dga_compile import policy  # noqa: E402
from hf_reference import register_reference  # noqa: E402

EXACT = DGAConfig(group_size=1, min_seq_len=0)
ACTIVE = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=0, min_seq_len=0)


def _tiny(kind: str, attn: str) -> torch.nn.Module:
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral-sw8": lambda: transformers.MistralConfig(sliding_window=8, **common),
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _check_against_reference(kind, ids, mask=None):
    """register(ACTIVE) equals the reference model, and both differ from SDPA by far more than the tolerance."""
    got = _logits(_tiny(kind, register(ACTIVE, name="dga-test-active")), ids, mask)
    want = _logits(_tiny(kind, register_reference(ACTIVE)), ids, mask)
    dense = _logits(_tiny(kind, "sdpa"), ids, mask)
    rows = slice(None) if mask is None else mask.bool()  # padding query rows are left out
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-4, atol=1e-5)
    assert (want - dense)[rows].abs().max() > 1e-3, "DGA equals dense here: the comparison cannot fail"


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral-sw8"])
def test_exact_config_equals_sdpa(kind):
    """γ = 1 makes DGA dense: the HF glue (GQA, causal flag, sliding-window mask) must match SDPA."""
    name = register(EXACT, name="dga-test-exact")
    ids = torch.randint(0, 97, (2, 37))
    want = _logits(_tiny(kind, "sdpa"), ids)
    got = _logits(_tiny(kind, name), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kind != "mistral-sw8":  # the 8-key window layers stay dense (test_sliding_layers_follow_the_policy)
        _check_against_reference(kind, ids)


def test_padding_mask_equals_sdpa():
    name = register(EXACT, name="dga-test-exact")
    ids = torch.randint(0, 97, (2, 29))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                     # left padding in the second row
    want = _logits(_tiny("llama", "sdpa"), ids, mask)
    got = _logits(_tiny("llama", name), ids, mask)
    torch.testing.assert_close(got[1, 5:], want[1, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    _check_against_reference("llama", ids, mask)


def test_active_config_changes_logits_and_sliding_mask_arrives():
    """Negative control: with DGA active the output differs from SDPA; the window layer sees a bool mask."""
    seen = []

    def spy(q, k, v, attn_mask, is_causal, scale, dropout_p):
        seen.append((None if attn_mask is None else attn_mask.dtype, is_causal))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                                scale=scale, enable_gqa=True)

    ids = torch.randint(0, 97, (1, 40))
    _logits(_tiny("mistral-sw8", register_attention("dga-test-spy", spy)), ids)
    assert seen and all(m == torch.bool and not c for m, c in seen)
    want = _logits(_tiny("llama", "sdpa"), ids)
    got = _logits(_tiny("llama", register(ACTIVE, name="dga-test-active")), ids)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() > 1e-4


def test_decode_step_is_dense():
    """One query against a 40-key cache (Nq ≠ Nk) takes the exact dense path, as HF's sdpa does."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    dga = AttentionInterface()[register(ACTIVE, name="dga-test-active")]
    got, _ = dga(module, q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    assert got.shape == (1, 1, 4, 8)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", ["sdpa", "", "flash_attention_2"])
def test_register_rejects_reserved_names(bad):
    with pytest.raises(ValueError, match="attention implementation name"):
        register(EXACT, name=bad)


def test_dense_layers_run_sdpa():
    """DGAConfig.dense_layers: those layer_idx run SDPA; all layers dense equals SDPA, one dense differs from both."""
    ids = torch.randint(0, 97, (1, 40))
    want = _logits(_tiny("llama", "sdpa"), ids)
    all_dense = _logits(_tiny("llama", register(ACTIVE.replace(dense_layers=(0, 1)), name="dga-test-d01")), ids)
    torch.testing.assert_close(all_dense, want, rtol=1e-5, atol=1e-5)
    one = _logits(_tiny("llama", register(ACTIVE.replace(dense_layers=(1,)), name="dga-test-d1")), ids)
    none = _logits(_tiny("llama", register(ACTIVE, name="dga-test-active")), ids)
    assert (one - want).abs().max() > 1e-4 and (one - none).abs().max() > 1e-4


def test_sliding_layers_follow_the_policy():
    """An 8-key sliding window leaves DGA less than min_saving to save: those layers run SDPA,
    and last_report says why, as the rewrite of a traced graph would."""
    ids = torch.randint(0, 97, (1, 40))
    got = _logits(_tiny("mistral-sw8", register(ACTIVE, name="dga-test-sw")), ids)
    torch.testing.assert_close(got, _logits(_tiny("mistral-sw8", "sdpa"), ids), rtol=1e-5, atol=1e-5)
    sites = last_report("dga-test-sw").sites
    assert [s.position for s in sites] == [0, 1] and not any(s.rewritten for s in sites)
    assert all(s.reason == policy.decide(policy.SiteFacts(window=8, nk=40), ACTIVE).reason for s in sites)
    assert "sliding window of 8 keys" in sites[0].reason


def test_output_attentions_returns_dense_weights_with_a_warning():
    """output_attentions=True returned empty attentions silently: it now returns eager attention's
    weights (and output), warns that DGA was not used for the call, and reports why."""
    ids = torch.randint(0, 97, (2, 23))
    name = register(ACTIVE, name="dga-test-weights")
    with torch.no_grad(), pytest.warns(UserWarning, match="DGA was not used for this call"):
        got = _tiny("llama", name)(input_ids=ids, output_attentions=True)
    with torch.no_grad():
        want = _tiny("llama", "eager")(input_ids=ids, output_attentions=True)
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert all("other users" in s.reason for s in last_report(name).sites)
