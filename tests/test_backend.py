"""The ``dga`` torch.compile backend on tiny random-weight Hugging Face models (offline).

Two ways to run a model: ``backend="dga"`` (rewrite, then Inductor: slow to compile on CPU,
so most such cases are ``slow``) and ``_rewrite_only`` (the same rewrite on Dynamo's graph,
run without Inductor: checks the rules on real model graphs in seconds).

At γ = 1 a rewritten model equals the original; at γ < 1 (``APPROX``) it equals the same
model run with `hf_reference.register_reference` (the spec on each layer's own q / k / v, no
dga_compile glue), which a dropped causal flag, mask or GQA grouping would not.
"""

import importlib.metadata

import pytest
import torch
import transformers as T

import dga_compile
from dga_compile import DGAConfig, reference_attention
from dga_compile.backend import last_report
from dga_compile.passes import rewrite_graph_module
from hf_reference import register_reference

# γ = 1 makes DGA exact; min_seq_len=0 and small groups make the DGA path really run at N=40
EXACT = DGAConfig(focus_ratio=1.0, group_size=4, window=2, num_probe=4, min_seq_len=0)
APPROX = DGAConfig(group_size=4, window=4, num_probe=8, min_seq_len=0)
OPTIONS = dict(focus_ratio=1.0, group_size=4, window=2, num_probe=4, min_seq_len=0)
LAYERS = 2


def _tiny(arch: str, impl: str):
    """A 2-layer random-weight model; hidden 32, 4 heads (GQA 2 kv heads where the family has it)."""
    torch.manual_seed(0)
    dec = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
    enc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
               num_attention_heads=4, attn_implementation=impl)
    build = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**dec, sliding_window=None)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**dec)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**{**dec, "num_key_value_heads": 1}, head_dim=8)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4,
                                                       attn_implementation=impl)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS,
                                                    ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32,
                                                    attn_implementation=impl)),
        "bert": lambda: T.BertModel(T.BertConfig(vocab_size=100, **enc)),
        "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=LAYERS, n_heads=4,
                                                                   hidden_dim=64, attn_implementation=impl)),
        "vit": lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=4, **enc)),
    }
    return build[arch]().eval()


def _inputs(arch: str, padded: bool, n: int = 40) -> dict:
    g = torch.Generator().manual_seed(1)
    if arch == "vit":  # 8x8 patches + CLS = 65 tokens
        return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))
    mask = torch.ones(2, n, dtype=torch.long)
    if padded:  # right padding: no fully masked query row (there eager softmax and SDPA differ)
        mask[1, n - 7:] = 0
    return dict(input_ids=torch.randint(1, 100, (2, n), generator=g), attention_mask=mask)


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def _rewrite_only(cfg: DGAConfig, reports: list):
    def backend(gm, example_inputs):
        reports.append(rewrite_graph_module(gm, cfg))
        return gm
    return backend


def _check_against_reference(arch: str, impl: str, x: dict, **compile_kwargs) -> None:
    """At γ < 1 the rewritten model equals the model whose attention is `reference_attention`
    (same weights), and both differ from dense by far more than the tolerance."""
    model, reports = _tiny(arch, impl), []
    torch._dynamo.reset()
    with torch.no_grad():
        got = _first(torch.compile(model, backend=_rewrite_only(APPROX, reports), **compile_kwargs)(**x))
        want = _first(_tiny(arch, register_reference(APPROX))(**x))
        dense = _first(model(**x))
    assert sum(s.rewritten for r in reports for s in r.sites) == LAYERS
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - dense).abs().max() > 1e-3, "DGA equals dense here (within 10× the tolerance): the check cannot fail"


ARCHS = ["llama", "mistral", "qwen2", "gemma", "gpt2", "opt", "bert", "distilbert", "vit"]
FAST = {("llama", "sdpa", True), ("gpt2", "eager", True), ("bert", "sdpa", False), ("distilbert", "eager", True)}
MATRIX = [pytest.param(a, i, p, id=f"{a}-{i}-{'padded' if p else 'unpadded'}",
                       marks=() if (a, i, p) in FAST else pytest.mark.slow)
          for a in ARCHS for i in ("sdpa", "eager") for p in (False, True) if not (a == "vit" and p)]


@pytest.mark.parametrize("arch, impl, padded", MATRIX)
def test_hf_rewrite_counts_and_exactness(arch, impl, padded):
    """Every attention layer is rewritten, and at γ = 1 the output equals the original (fp32)."""
    model, x, reports = _tiny(arch, impl), _inputs(arch, padded), []
    torch._dynamo.reset()
    with torch.no_grad():
        want = _first(model(**x))
        got = _first(torch.compile(model, backend=_rewrite_only(EXACT, reports), fullgraph=True)(**x))
    sites = [s for r in reports for s in r.sites]
    assert sum(s.rewritten for s in sites) == LAYERS == len(sites), "\n".join(map(str, reports))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _check_against_reference(arch, impl, x, fullgraph=True)


@pytest.fixture(scope="module")
def llama_dga():
    """Llama (sdpa) compiled once with backend="dga" (entry point + options), reused by the tests."""
    torch._dynamo.reset()
    last_report(reset=True)
    model = _tiny("llama", "sdpa")
    return model, torch.compile(model, backend="dga", options=OPTIONS)


def test_entry_point_and_inductor_end_to_end(llama_dga):
    """backend="dga" resolves without import (entry point); options reach DGAConfig; γ=1 is exact."""
    assert any(ep.name == "dga" for ep in importlib.metadata.entry_points(group="torch_dynamo_backends"))
    model, compiled = llama_dga
    x = _inputs("llama", padded=True)
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled(**x)), _first(model(**x)), rtol=1e-5, atol=1e-5)
    report = last_report()
    assert report.num_rewritten == LAYERS and all("gqa:repeat_kv" in s.tags for s in report.sites)


class _Block(torch.nn.Module):
    """One causal self-attention block, hand-written (matmul/softmax) or SDPA."""

    def __init__(self, hand_written: bool):
        super().__init__()
        self.qkv, self.out, self.hand_written = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32), hand_written

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
        if self.hand_written:
            causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
            w = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~causal, float("-inf"))
            o = torch.nn.functional.dropout(w.softmax(-1), 0.0, self.training) @ v
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, N, 32))


class _ReferenceBlock(_Block):
    """`_Block` whose attention is `reference_attention` (differentiable) at ``config``."""

    def __init__(self, block: _Block, config: DGAConfig):
        super().__init__(block.hand_written)
        self.load_state_dict(block.state_dict())
        self.config = config

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
        o = reference_attention(q, k, v, None, True, None, self.config)
        return self.out(o.transpose(1, 2).reshape(B, N, 32))


@pytest.mark.parametrize("hand_written", [False, True], ids=["sdpa", "matmul-softmax"])
def test_training_step_gradients_match_dense(hand_written):
    """A training step through backend="dga" (aot_autograd + the op's autograd) at γ = 1; at γ < 1
    the rewritten graph's gradients are those of the reference."""
    torch.manual_seed(0)
    model, x = _Block(hand_written).train(), {"x": torch.randn(2, 37, 32)}
    _check_training(model, x)
    reports, reference = [], _ReferenceBlock(model, APPROX).train()
    torch._dynamo.reset()
    model.zero_grad()
    torch.compile(model, backend=_rewrite_only(APPROX, reports))(**x).square().mean().backward()
    reference(**x).square().mean().backward()
    assert reports[0].num_rewritten == 1
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_training_step_gradients_match_dense_llama():
    _check_training(_tiny("llama", "sdpa").train(), _inputs("llama", padded=True))


def _check_training(model, x):
    torch._dynamo.reset()
    last_report(reset=True)
    compiled = dga_compile.compile(model, EXACT)
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        _first(fn(**x)).float().square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert last_report().num_rewritten >= 1, str(last_report())
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("arch, impl, padded", [m for m in MATRIX if "vit" not in m.id])
def test_hf_backend_dga_matrix(arch, impl, padded, record_property):
    """The whole pipeline (rewrite + Inductor): exact at γ = 1; finite with γ = 0.1 (error recorded)."""
    model, x = _tiny(arch, impl), _inputs(arch, padded, n=48)
    with torch.no_grad():
        want = _first(model(**x))
        for cfg in (EXACT, APPROX):
            torch._dynamo.reset()
            got = _first(dga_compile.compile(model, cfg)(**x))
            if cfg is EXACT:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            else:
                assert torch.isfinite(got).all()
                record_property("rel_err_default", float((got - want).norm() / want.norm()))
                reference = _first(_tiny(arch, register_reference(APPROX))(**x))
                torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_generate_same_tokens_as_dense():
    model = _tiny("llama", "sdpa")
    x = _inputs("llama", padded=False)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, **x)
    want = model.generate(**kw)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="dga", options=OPTIONS)
    try:
        got = model.generate(**kw)
    finally:
        del model.forward
    assert torch.equal(got, want)


@pytest.mark.slow
def test_dynamic_length_recompiles_like_inductor():
    """New sequence lengths: the dga backend compiles as many graphs as Inductor on plain SDPA."""
    from torch._dynamo.utils import counters

    model, counts = _tiny("llama", "sdpa"), {}
    for name, backend in (("inductor", "inductor"), ("dga", dga_compile.backend(EXACT))):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            for n in (40, 47, 53, 61):
                compiled(**_inputs("llama", padded=True, n=n))
        counts[name] = counters["stats"]["unique_graphs"]
    assert counts["dga"] <= counts["inductor"], counts


def test_strict_raises_and_report_prints(capsys, monkeypatch):
    """strict=True fails the compile on a dense site; DGA_REPORT=1 prints the rich table first."""
    monkeypatch.setenv("DGA_REPORT", "1")
    monkeypatch.setenv("COLUMNS", "300")  # rich folds narrow tables

    def cross(q, kv):
        return torch.nn.functional.scaled_dot_product_attention(q, kv, kv)

    torch._dynamo.reset()
    fn = torch.compile(cross, backend=dga_compile.backend(EXACT.replace(strict=True)))
    with pytest.raises(Exception, match="could not be rewritten"):
        fn(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8))
    fn = torch.compile(cross, backend=dga_compile.backend(EXACT))
    fn(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8))
    assert "Nq=5 ≠ Nk=9" in capsys.readouterr().err


@pytest.mark.parametrize("arch, impl", [("gpt2", "eager"), ("bert", "sdpa")], ids=["gpt2-eager", "bert-sdpa"])
def test_hf_dynamic_shapes_runtime_scale(arch, impl):
    """dynamic=True lifts float attributes such as ``self.scaling`` to graph inputs: the scale is
    then known only at run time and is applied to q (``scale:runtime``) instead of leaving the site dense."""
    model, x, reports = _tiny(arch, impl), _inputs(arch, padded=True, n=45), []
    torch._dynamo.reset()
    with torch.no_grad():
        got = _first(torch.compile(model, backend=_rewrite_only(EXACT, reports), dynamic=True)(**x))
        want = _first(model(**x))
    sites = [s for r in reports for s in r.sites]
    assert sum(s.rewritten for s in sites) == LAYERS and all("scale:runtime" in s.tags for s in sites)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _check_against_reference(arch, impl, x, dynamic=True)


def test_hf_negatives_stay_dense_and_reported():
    """T5: position-bias masks (finite biases) and cross-attention (Nq ≠ Nk) stay dense; GPT-2 with
    output_attentions=True: the weights have another user. Each is reported with its reason."""
    torch.manual_seed(0)
    t5 = T.T5Model(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                              num_heads=4, attn_implementation="eager")).eval()
    x = dict(input_ids=torch.randint(1, 100, (2, 20)), decoder_input_ids=torch.randint(1, 100, (2, 9)))
    gpt2, reports = _tiny("gpt2", "eager"), []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(t5, backend=_rewrite_only(EXACT, reports))(**x)
        torch.compile(gpt2, backend=_rewrite_only(EXACT, reports))(**_inputs("gpt2", True), output_attentions=True)
    sites = [s for r in reports for s in r.sites]
    assert not any(s.rewritten for s in sites)
    reasons = [s.reason for s in sites]
    assert sum("finite additive biases" in r for r in reasons) == 2  # encoder + decoder self-attention
    assert sum("Nq=9 ≠ Nk=20" in r for r in reasons) == 1  # decoder cross-attention
    assert sum("other users" in r for r in reasons) == LAYERS  # GPT-2 output_attentions


def test_training_dropout_reaches_the_op():
    """Attention dropout in training (p = 0.1) becomes the op's dropout_p with a fresh seed per call."""
    class Drop(_Block):
        def forward(self, x):
            q, k, v = self.qkv(x).view(*x.shape[:2], 3, 4, 8).permute(2, 0, 3, 1, 4)
            w = torch.nn.functional.dropout((q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1), 0.1, self.training)
            return w @ v

    torch.manual_seed(0)
    model, x, reports, graphs = Drop(True).train(), torch.randn(2, 21, 32), [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return _rewrite_only(EXACT, reports)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    out = compiled(x)
    (op,) = [n for g in graphs for n in g.graph.nodes if n.target is torch.ops.dga.attention.default]
    assert op.args[4] == pytest.approx(0.1) and op.args[5] is not None and "dropout" in reports[0].sites[0].tags
    assert torch.isfinite(out).all() and not torch.equal(out, compiled(x))  # a new dropout mask per call


def test_dense_layers_option_keeps_those_sites_dense():
    """options={"dense_layers": [...]} reaches DGAConfig; the listed sites (graph order) stay dense, with the reason."""
    def two_layers(q, k, v):
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.nn.functional.scaled_dot_product_attention(x, k, v, is_causal=True)

    torch._dynamo.reset()
    last_report(reset=True)
    fn = torch.compile(two_layers, backend="dga", options={"min_seq_len": 0, "group_size": 4, "dense_layers": [0]})
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    assert fn(q, k, v).shape == (1, 2, 40, 8)
    sites = last_report().sites
    assert [s.rewritten for s in sites] == [False, True] and "dense_layers=(0,)" in sites[0].reason


# ------------------------------------------------------------------ one site policy for every entry point

def _hybrid(arch: str, impl: str) -> torch.nn.Module:
    """4 layers: 0 and 2 sliding-window (16 keys), 1 and 3 global; GQA."""
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, attn_implementation=impl, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention"] * 2)
    build = {"gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, head_dim=8)),
             "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common, use_sliding_window=True))}
    return build[arch]().eval()


@pytest.mark.parametrize("arch", ["gemma3", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_every_entry_point_decides_the_same_per_layer(arch, monkeypatch):
    """backend="dga", rewrite(), ONNX export (its prepare: trace + rewrite) and register() keep the
    same layers dense for the same reasons: the sliding-window layers (their 16-key window leaves
    DGA less than min_saving) and the layer in dense_layers. torch.compile(backend="dga") used
    to rewrite the sliding layers while register() did not know about windows at all."""
    from dga_compile.integrations.transformers import last_report as hf_report, register
    from dga_compile.onnx.export import prepare

    cfg = DGAConfig(min_seq_len=0, group_size=4, window=4, num_probe=8, dense_layers=(3,))
    x = _inputs("llama", padded=True)
    window = "the mask limits each query to a sliding window of 16 keys: DGA would attend ≈85% of them, " \
             "saving less than min_saving=0.25"
    want = [(0, False, window), (1, True, ""), (2, False, window),
            (3, False, "attention site 3 is in DGAConfig.dense_layers=(3,): kept dense")]
    decisions = {}
    # backend="dga" with Inductor replaced by the graph itself: only the decisions are under test
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", lambda gm, example_inputs, **kw: gm.forward)
    torch._dynamo.reset()
    last_report(reset=True)
    model = _hybrid(arch, "sdpa")
    with torch.no_grad():
        torch.compile(model, backend=dga_compile.backend(cfg))(**x)
    decisions["backend"] = last_report().sites
    decisions["rewrite"] = dga_compile.rewrite(torch.export.export(model, (), dict(x, use_cache=False)), cfg)[1].sites
    decisions["onnx"] = prepare(model, (), dict(x, use_cache=False), cfg)[1].sites
    with torch.no_grad():
        _hybrid(arch, register(cfg, name="dga-hybrid"))(**x)
    decisions["register"] = hf_report("dga-hybrid").sites
    for entry, sites in decisions.items():
        got = [(s.position, s.rewritten, "" if s.rewritten else s.reason) for s in sites]
        assert got == want, f"{entry}: {got}"
