"""`DGACache` / `DGALayer`: the incremental cache equals the decode reference; HF generate() with it."""

import pytest
import torch

from decode_cases import SMALL, drive_layer, history
from dga_compile.cache import DGACache, DGALayer
from dga_compile.decode_reference import decode_reference
from dga_compile.errors import CacheError

CONFIGS = {
    "small": SMALL,
    "w0": SMALL.replace(window=0),
    "w3-m5-g0": SMALL.replace(window=3, group_size=5, focus_ratio=0.0),
    "w30-r100": SMALL.replace(window=30, num_probe=100),
    "m1": SMALL.replace(group_size=1),
    "g1": SMALL.replace(focus_ratio=1.0),
    "beta0.25": SMALL.replace(group_bias=0.25),
    "sinks3": SMALL.replace(sinks=3),
    "sinks5-g0": SMALL.replace(sinks=5, focus_ratio=0.0),
}
SHAPES = [
    pytest.param(1, 2, 2, 70, 40, (), id="B1-H2-KV2-T70-N40"),
    pytest.param(2, 4, 2, 91, 50, (0, 7), id="B2-H4-KV2-T91-N50-pad7"),
    pytest.param(3, 3, 1, 66, 37, (0, 20, 36), id="B3-H3-KV1-T66-N37-pad"),
]


CASES = [pytest.param("small", *shape.values, steps, id=f"small-{shape.id}-{steps}")
         for shape in SHAPES for steps in ("single", "chunked")]
CASES += [pytest.param(cfg, *SHAPES[1].values, steps, id=f"{cfg}-{SHAPES[1].id}-{steps}")
          for cfg in CONFIGS if cfg != "small" for steps in ("single", "chunked")]


@pytest.mark.parametrize("cfg, B, Hq, Hkv, T, N, pads, steps", CASES)
def test_layer_equals_reference_fp64(cfg, B, Hq, Hkv, T, N, pads, steps):
    """Prefill compression, block formation at the anchor, activation w positions later, chunked
    steps judged at their first query: the layer's outputs are the reference's, step by step."""
    config = CONFIGS[cfg]
    q, k, v, real = history(B, Hq, Hkv, T, 8, pads=pads, seed=T + len(cfg))
    plan = None if steps == "single" else [3, 1, 9, 2, T - N - 15]
    want = decode_reference(q, k, v, N, real, config, steps=plan)
    got = drive_layer(DGALayer(config, 0), q, k, v, real, N, plan, impl="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("B, Hq, Hkv, T, N, pads", SHAPES)
def test_layer_fp32_against_fp64_reference(B, Hq, Hkv, T, N, pads, impl):
    """float32 cache (native kernel under "auto" when built) vs the float64 reference on the same history."""
    q, k, v, real = history(B, Hq, Hkv, T, 16, pads=pads, seed=3 * T)
    want = decode_reference(q, k, v, N, real, SMALL)
    got = drive_layer(DGALayer(SMALL, 0), q.float(), k.float(), v.float(), real, N, impl=impl)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_mask_only_at_prefill_is_enough():
    """HF skips the mask when a decode step has no padding: the cache still knows the row's padding."""
    q, k, v, real = history(2, 4, 2, 70, 8, pads=(0, 11), seed=9)
    want = decode_reference(q, k, v, 40, real, SMALL)
    got = drive_layer(DGALayer(SMALL, 0), q, k, v, real, 40, mask_every_step=False, impl="reference")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_cache_is_smaller_than_dense_and_counts_its_slots():
    q, k, v, real = history(1, 4, 2, 400, 8, dtype=torch.float32, seed=2)
    cfg = SMALL.replace(group_size=8, window=32, focus_ratio=0.05)
    layer = DGALayer(cfg, 0)
    drive_layer(layer, q, k, v, real, 300)
    # focus 15, blocks 0 … (399 − 32 + 1)//8 − 1 = 45 + the pending ones, recent from position 46·8
    assert layer.num_slots() == len(layer.packed) + len(layer.recent) < 120
    dense = 400 * 2 * (8 + 8) * 4
    assert layer.nbytes() < dense / 3


def test_slots_at_predicts_the_layer_size():
    """`DGALayer.slots_at` (the eval's budget for the baselines) is the size single-token steps reach."""
    q, k, v, real = history(1, 4, 2, 120, 8, seed=8)
    layer = DGALayer(SMALL, 0)
    drive_layer(layer, q[:, :, :60], k[:, :, :60], v[:, :, :60], real, 60)
    sizes = []
    for i in range(60, 120):
        layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        layer.attend(q[:, :, i:i + 1], None, 0.3, dense=None)
        sizes.append((layer.num_slots(), layer.slots_at(i + 1)))
    assert all(a == b for a, b in sizes)


def test_short_prefill_stays_dense():
    q, k, v, real = history(1, 2, 2, 30, 8, seed=1)
    layer = DGALayer(SMALL.replace(min_seq_len=100), 0)
    layer.update(k, v)
    layer.attend(q, None, 8 ** -0.5, dense=lambda: torch.zeros(1))
    assert not layer.compressed and layer.get_seq_length() == 30


def test_attention_that_does_not_drive_the_layer_raises():
    q, k, v, real = history(1, 2, 2, 30, 8, seed=1)
    layer = DGALayer(SMALL, 3)
    layer.update(k[:, :, :20], v[:, :, :20])           # the prefill: its attention never calls attend
    with pytest.raises(CacheError, match="layer 3: the attention of the last forward did not read the DGA cache"):
        layer.update(k[:, :, 20:21], v[:, :, 20:21])


def test_sliding_window_attention_raises():
    q, k, v, _ = history(1, 2, 2, 30, 8, seed=1)
    layer = DGALayer(SMALL, 0)
    layer.update(k, v)
    with pytest.raises(ValueError, match="sliding-window layer .* DGACache\\(config, model.config\\)"):
        layer.attend(q, None, 0.3, dense=lambda: None, sliding_window=16)


def test_crop_raises():
    with pytest.raises(ValueError, match="NYI: a DGA cache cannot be cropped"):
        DGALayer(SMALL, 0).crop(-2)


def test_config_type_is_checked():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="model configs go in model_config="):
        DGACache(transformers.LlamaConfig())


# ---- transformers generate() -------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from dga_compile.integrations.transformers import register, register_attention, sdpa  # noqa: E402


def _tiny(kind: str = "llama", attn: str = "sdpa"):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common),
           "qwen2": lambda: transformers.Qwen2Config(**common),
           "mistral-sw8": lambda: transformers.MistralConfig(sliding_window=8, **common),
           "qwen2-sw8-mixed": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=8,
                                                               layer_types=["sliding_attention", "full_attention"],
                                                               **common)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def _prompt(B=2, N=60, pad=9):
    ids = torch.randint(0, 97, (B, N), generator=torch.Generator().manual_seed(N))
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    return ids, mask


EXACT = SMALL.replace(group_size=1)              # m = 1: DGA decoding is exact


@pytest.mark.parametrize("kind", ["llama", "qwen2-sw8-mixed"])
def test_generate_with_exact_config_equals_dynamic_cache(kind):
    """m = 1 with a dense prefill: greedy generation through DGACache equals DynamicCache's, with
    left padding, GQA, and (Qwen2 mixed) a sliding-window layer that keeps its own window cache."""
    model = _tiny(kind)
    ids, mask = _prompt()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    model.set_attn_implementation(register_attention("dga-test-dense-prefill", sdpa))
    cache = DGACache(EXACT, model.config)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, cache=cache)
    assert torch.equal(got, want)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == (["DGALayer"] * 2 if kind == "llama" else ["DynamicSlidingWindowLayer", "DGALayer"])
    assert all(layer.compressed for layer in cache.layers if isinstance(layer, DGALayer))


def test_generate_beam_search_with_exact_config_equals_dynamic_cache():
    model = _tiny()
    ids, mask = _prompt()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False)
    model.set_attn_implementation(register_attention("dga-test-dense-prefill", sdpa))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False,
                         cache=DGACache(EXACT, model.config))
    assert torch.equal(got, want)


def test_generate_with_dga_prefill_streams_and_stops():
    """register() models: DGA prefill + DGA cache; a streamer sees every token, a stopping criterion stops."""
    model = _tiny(attn=register(SMALL, name="dga-test-cache"))
    ids, mask = _prompt(B=1)
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.reshape(-1).tolist())

        def end(self):
            seen.append("end")

    class StopAt(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 70, dtype=torch.bool)

    cache = DGACache(SMALL, model.config)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, cache=cache,
                         streamer=Streamer(), stopping_criteria=transformers.StoppingCriteriaList([StopAt()]))
    assert out.shape[1] == 70 and seen[-1] == "end"
    assert [t for s in seen[1:-1] for t in s] == out[0, 60:].tolist()
    assert cache.get_seq_length() == 69 and cache.nbytes() < cache.dense_nbytes()


def test_sampling_runs():
    model = _tiny(attn=register(SMALL, name="dga-test-cache"))
    ids, mask = _prompt()
    torch.manual_seed(1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=5,
                         cache=DGACache(SMALL, model.config))
    assert out.shape == (2, 76)


def test_sdpa_model_with_dga_cache_raises():
    """An attention that does not know the cache never silently decodes from it."""
    model = _tiny()
    ids, mask = _prompt()
    with pytest.raises(CacheError, match="attn_implementation=dga_compile.integrations.transformers.register"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, cache=DGACache(SMALL, model.config))


def test_sliding_window_model_without_model_config_raises():
    model = _tiny("mistral-sw8", attn=register(SMALL, name="dga-test-cache"))
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="sliding-window layer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, cache=DGACache(SMALL))


def test_dense_layers_keep_a_dynamic_layer():
    model = _tiny(attn=register(SMALL, name="dga-test-cache"))
    ids, mask = _prompt()
    cache = DGACache(SMALL.replace(dense_layers=(1,)), model.config)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, cache=cache)
    assert isinstance(cache.layers[0], DGALayer) and type(cache.layers[1]) is transformers.DynamicLayer


@pytest.mark.slow
def test_compiled_decode_does_not_recompile_per_step():
    """torch.compile(model.forward, backend="dga") with a DGACache: after one short generation has
    compiled every graph, a longer one (new cache, same prompt length) compiles nothing new, and
    both give eager's tokens. (Recompiles that remain are bounded: prefill vs decode, the steps
    that form or complete a block.)"""
    from torch._dynamo.utils import counters

    model = _tiny(attn=register(SMALL, name="dga-test-cache"))
    ids, _ = _prompt(B=1)
    want = model.generate(ids, max_new_tokens=30, do_sample=False, cache=DGACache(SMALL, model.config))
    model.forward = torch.compile(model.forward, backend="dga")
    torch._dynamo.reset()
    counters.clear()
    model.generate(ids, max_new_tokens=12, do_sample=False, cache=DGACache(SMALL, model.config))
    graphs = counters["stats"]["unique_graphs"]
    got = model.generate(ids, max_new_tokens=30, do_sample=False, cache=DGACache(SMALL, model.config))
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == graphs


def test_export_refuses_a_dga_cache_input():
    """docs/dga.md (Decoding, ONNX): no exported graph reads a DGA cache; torch.export refuses one as input."""
    model = _tiny(attn=register(SMALL, name="dga-test-cache"))
    ids, _ = _prompt(B=1)
    cache = DGACache(SMALL, model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="Unsupported input type .*DGACache"):
        torch.export.export(model, (ids[:, :1],), {"cache": cache, "use_cache": True})


def test_cache_refuses_step_5_prime():
    """The decode semantics have no step 5′: the cache says so instead of ignoring it."""
    with pytest.raises(ValueError, match=r"NYI: the DGA cache does not implement step 5′ \(expand_mass=0.8\)"):
        DGACache(SMALL.replace(expand_mass=0.8))


def test_plan_sets_each_layers_cache(tmp_path):
    """A plan's "dense" site keeps a DynamicLayer, its entries set their layer's parameters, others the base's."""
    from transformers.cache_utils import DynamicLayer

    from dga_compile.plan import Plan

    cache = DGACache(SMALL.replace(plan=Plan({0: "dense", 1: {"focus_ratio": 0.3, "sinks": 2}})))
    layers = [cache._new_layer(i) for i in range(3)]
    assert isinstance(layers[0], DynamicLayer) and not isinstance(layers[0], DGALayer)
    assert (layers[1].config.focus_ratio, layers[1].config.sinks) == (0.3, 2)
    assert layers[2].config == SMALL
    with pytest.raises(ValueError, match=r"NYI: .*step 5′ \(expand_mass=0.5 \(layer 1's plan entry\)\)"):
        DGACache(SMALL.replace(plan=Plan({1: {"expand_mass": 0.5}})))._new_layer(1)
