"""The accuracy evaluation: cost accounting, baselines, and the API/CLI end to end on tiny random models."""

import importlib.util
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import _eval_models  # noqa: E402

from dga_compile import DGAConfig  # noqa: E402
from dga_compile.eval import CostMeter, Method, evaluate  # noqa: E402
from dga_compile.eval.cli import main as eval_main, parse_config  # noqa: E402
from dga_compile.eval.cost import SiteProfile, recent_for_cost  # noqa: E402
from dga_compile.eval.methods import attend_fn  # noqa: E402
from dga_compile.eval.run import window_starts  # noqa: E402
from dga_compile.selection import aggregate_groups, importance_scores, num_focus, split_focus  # noqa: E402

SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, min_seq_len=0)
TEXT = _eval_models.TEXT


def _qkv(n, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g),
            torch.randn(1, hkv, n, d, generator=g))


def _call(method, q, k, v):
    with CostMeter() as meter:
        out = attend_fn(method)(q, k, v, None, True, None, 0.0)
    return out, meter


def _spec_candidates(q, k, v, cfg):
    """Brute force from the spec's step 5: per query head and query, focus + complete groups + raw."""
    n, m, rep = k.shape[2], cfg.group_size, q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    vis = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    focus, nonfocus = split_focus(importance_scores(q, k, vis, scale, cfg.num_probe), num_focus(cfg.focus_ratio, n))
    grp = aggregate_groups(q, k, v, nonfocus, scale, m)
    counts = torch.zeros(1, q.shape[1], n)
    for h in range(q.shape[1]):
        members, anchors = grp.members[0, h // rep].tolist(), grp.anchors[0, h // rep].tolist()
        in_group = {j for g in members for j in g}
        for i in range(n):
            complete = [g for g, a in zip(members, anchors) if a <= i - cfg.window]
            raw = [j for j in range(i + 1) if j not in set(focus[0, h // rep].tolist())
                   and not any(j in g for g in complete)]
            counts[0, h, i] = sum(f <= i for f in focus[0, h // rep].tolist()) + len(complete) + len(raw)
            assert in_group or not complete
    return counts


def test_dga_cost_matches_spec_brute_force():
    q, k, v = _qkv(53)
    with CostMeter() as meter:
        attend_fn(Method("dga", SMALL))(q, k, v, None, True, None, 0.0)
    want = _spec_candidates(q, k, v, SMALL)
    assert meter.terms["attention"] == pytest.approx(float(want.sum()))
    assert meter.dense_entries == 4 * 53 * 54 / 2
    assert meter.keys_at_last == pytest.approx(float(want[..., -1].mean()))


@pytest.mark.parametrize("kind", ["streaming", "topk"])
def test_baseline_with_window_covering_everything_is_dense(kind):
    q, k, v = _qkv(45)
    out, meter = _call(Method(kind, SMALL, recent=45), q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert meter.breakdown["attention"] == 1.0
    # top-k pays the probe scores that pick its focus set: the last r = 8 rows × their visible keys, per head
    probes = 4 * sum(range(45 - 8 + 1, 45 + 1)) if kind == "topk" else 0
    assert meter.terms.get("probes", 0) == probes and meter.entries == 4 * 45 * 46 / 2 + probes


def test_streaming_attends_to_sinks_and_recent_only():
    q, k, v = _qkv(300)
    out, meter = _call(Method("streaming", SMALL, sinks=3, recent=20), q, k, v)
    i, j = torch.arange(300)[:, None], torch.arange(300)[None]
    mask = (j <= i) & ((i - j < 20) | (j < 3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert meter.keys_at_last == 23
    assert meter.fraction == pytest.approx(float(mask.sum()) / (300 * 301 / 2))


def _causal_profiles(n, layers=1):
    return {layer: SiteProfile(1, torch.arange(1, n + 1, dtype=torch.float64)) for layer in range(layers)}


def test_recent_for_cost_hits_the_streaming_cost():
    recent = recent_for_cost(0.3, _causal_profiles(300), sinks=4)
    _, meter = _call(Method("streaming", SMALL, sinks=4, recent=recent), *_qkv(300))
    assert abs(meter.fraction - 0.3) < 0.01




def test_evaluate_causal_lm(tiny_llama):
    res = evaluate(tiny_llama, TEXT, seq_len=96, windows=2, configs=[SMALL, SMALL.replace(group_size=1)],
                   progress=False)
    kinds = [r.kind for r in res.methods]
    assert kinds == ["dense", "dga", "streaming", "topk", "perhead", "dga", "streaming", "topk", "perhead"]
    dense, dga, _, _, _, exact = res.methods[:6]
    assert dense.delta_last_half == 0.0 and dense.cost == 1.0
    assert exact.delta_last_half == pytest.approx(0.0, abs=1e-4)                          # m = 1 is dense
    assert exact.cost_terms["attention"] == 1.0 and exact.cost > 1.0     # ... and still pays probes and aggregation
    assert dga.cost < 1.0 and dga.delta_last_half != 0.0
    assert all(r.ppl > 1 and len(r.per_window) == 2 for r in res.methods)


def test_evaluate_encoder_cosine(tiny_bert):
    res = evaluate(tiny_bert, TEXT, seq_len=64, windows=2, configs=[SMALL, SMALL.replace(focus_ratio=1.0)],
                   progress=False)
    dense, dga, exact = res.methods
    assert dense.cosine == pytest.approx(1.0) and exact.cosine == pytest.approx(1.0, abs=1e-6)
    assert dga.cosine < 1.0 and dga.cost < 1.0


def test_cli_writes_json_and_plot(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "res-b0.25"          # a prefix with a dot: PREFIX.json, not res-b0.json
    # The same config twice: equal points in the plot (they must not be compared as objects).
    assert eval_main([str(tiny_llama), "--text", str(text), "--seq-len", "64", "--windows", "1",
                      "--group-size", "4", "--num-probe", "8", "--config", "window=8", "--config", "window=8",
                      "--out", str(out), "--quiet"]) == 0
    data = json.loads((tmp_path / "res-b0.25.json").read_text())
    assert [m["kind"] for m in data["methods"]] == ["dense"] + ["dga", "streaming", "topk", "perhead"] * 2
    params = data["methods"][1]["params"]
    assert (params["group_size"], params["num_probe"], params["window"], params["min_seq_len"]) == (4, 8, 8, 0)
    if pytest.importorskip("matplotlib"):
        assert (tmp_path / "res-b0.25.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("spec", ["window", "impl=triton", "colour=3"])
def test_parse_config_rejects(spec):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_config(spec)


def test_parse_config():
    assert parse_config("window=0, group_bias=0") == DGAConfig(min_seq_len=0, window=0, group_bias=0.0)


@pytest.mark.slow
def test_smollm2_on_jargon_text():
    """Real model and text: an exact config equals dense; the defaults cost less and stay close."""
    from dga_compile.eval.fetch import jargon_text, smollm2

    model, text = _eval_models.fetched(smollm2), _eval_models.fetched(jargon_text).read_text()
    res = evaluate(model, text, seq_len=1024, windows=1, progress=False, baselines=(),
                   configs=[DGAConfig(min_seq_len=0, group_size=1), DGAConfig(min_seq_len=0)])
    dense, exact, dga = res.methods
    assert exact.ppl == pytest.approx(dense.ppl, rel=1e-4)
    assert dga.cost < 0.6 and 0.0 < dga.delta_last_half < 0.5


@pytest.mark.slow
def test_minilm_cosine():
    from dga_compile.eval.fetch import minilm

    res = evaluate(_eval_models.fetched(minilm), TEXT, seq_len=256, windows=2, progress=False, baselines=(),
                   configs=[DGAConfig(min_seq_len=0, group_size=4, num_probe=16)])
    assert res.task == "encoder"
    assert 0.9 < res.methods[1].cosine < 1.0 and res.methods[1].cost < 1.0


def _example(name: str):
    """The module examples/NAME.py."""
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_tiny_end_to_end(capsys):
    """`make demo` with the tiny random model: every stage runs and the summary is printed."""
    demo = _example("demo")
    demo.main(["--tiny", "--repeats", "1", "--tokens", "1100"])
    stages = [row[0] for row in demo.SUMMARY]
    assert stages[:3] == ["model", "text", "perplexity"] and "ONNX export + ONNX Runtime" in stages
    assert all("not available" not in row[1] for row in demo.SUMMARY)


def test_recent_for_cost_with_dense_layers():
    """With 2 of 10 layers dense, the other 8 must cost (0.5·10 − 2)/8 = 0.375 each."""
    plain = recent_for_cost(0.375, _causal_profiles(300))
    assert recent_for_cost(0.5, _causal_profiles(300, 10), dense_layers=(0, 5)) == plain


def test_calibration_windows_lie_between_evaluation_windows(tiny_llama):
    from dga_compile.eval.run import token_windows
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    evals, cals = token_windows(tok, TEXT, 32, 3), token_windows(tok, TEXT, 32, 3, between=True)
    assert len(cals) == 2 and all(c.shape == (1, 32) for c in cals)
    assert not any(torch.equal(c, e) for c in cals for e in evals)
    assert len(token_windows(tok, TEXT, 32, 1, between=True)) == 1


def test_layer_errors_and_worst_layers(tiny_llama):
    from dga_compile.eval.calibrate import layer_errors, worst_layers
    from dga_compile.eval.run import token_windows
    from dga_compile.models import load_model
    loaded = load_model(tiny_llama, tokenizer=True)
    model, tok = loaded.model, loaded.tokenizer
    wins = token_windows(tok, TEXT, 96, 1)
    errors = layer_errors(model, wins, SMALL)
    assert sorted(errors) == [0, 1] and all(0 < e < 10 for e in errors.values())
    exact = layer_errors(model, wins, SMALL.replace(group_size=1))
    assert all(e < 1e-5 for e in exact.values())                       # m = 1 is dense attention
    assert worst_layers(errors, 1) == (max(errors, key=errors.get),) and worst_layers(errors, 5) == (0, 1)
    assert model.config._attn_implementation == "sdpa"                  # restored


def test_dense_layers_in_evaluation_cost_and_labels(tiny_llama):
    res = evaluate(tiny_llama, TEXT, seq_len=96, windows=1, configs=[SMALL.replace(dense_layers=(1,))],
                   progress=False)
    dga, *baselines = res.methods[1:]
    plain = evaluate(tiny_llama, TEXT, seq_len=96, windows=1, configs=[SMALL], progress=False, baselines=())
    # layer 1 of 2 counts as dense (DGA's cost differs a little between layers: focus sets differ)
    assert plain.methods[1].cost < dga.cost < 1.0 and dga.cost == pytest.approx((plain.methods[1].cost + 1) / 2, abs=0.02)
    assert "layers 1 dense" in dga.label
    assert [("layers 1 dense" in b.label) for b in baselines] == [False, False, True, True, False]
    streaming_dense = baselines[2]
    assert abs(streaming_dense.cost - dga.cost) < 0.05


def test_cli_calibrate(tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "cal"
    assert eval_main([str(tiny_llama), "--text", str(text), "--seq-len", "48", "--windows", "2", "--group-size", "4",
                      "--num-probe", "8", "--window", "8", "--calibrate", "1", "--no-baselines", "--out", str(out),
                      "--quiet"]) == 0
    assert "Per-layer DGA error" in capsys.readouterr().out
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["methods"][1]["params"]["dense_layers"]) == 1


@pytest.mark.parametrize("num_tokens,seq_len,eval_len", [(1000, 64, 100), (20011, 512, 4096), (407269, 2048, 4096)],
                         ids=lambda v: str(v))
def test_finetune_windows_avoid_the_evaluation_windows(num_tokens, seq_len, eval_len):
    """examples/finetune_dga.py trains only on whole windows that `dga-compile eval` never scores."""
    starts = _example("finetune_dga").training_windows(num_tokens, seq_len, eval_len)
    scored = set().union(*(range(e, e + eval_len) for e in window_starts(num_tokens, eval_len, 3)))
    assert starts and all(0 <= s and s + seq_len <= num_tokens for s in starts)
    assert not any(scored.intersection(range(s, s + seq_len)) for s in starts)
    assert len(starts) >= (num_tokens - len(scored)) // seq_len - 4       # every gap is used


def test_finetune_windows_error_names_the_sizes():
    with pytest.raises(ValueError, match="no 2048-token training window .* 12288-token text"):
        _example("finetune_dga").training_windows(3 * 4096, 2048, 4096)


@pytest.mark.slow
def test_finetune_recipe_tiny(tiny_llama, tmp_path):
    """The recipe end to end: training through backend="dga" changes the weights and saves a new
    HF directory; an existing --out is refused."""
    ft, text, out = _example("finetune_dga"), tmp_path / "t.txt", tmp_path / "ft"
    text.write_text(TEXT * 4)
    args = ["--model", str(tiny_llama), "--text", str(text), "--steps", "2", "--seq-len", "32", "--eval-len", "64",
            "--lr", "1e-2", "--out", str(out)]
    ft.main(args)
    before = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit, match="exists"):
        ft.main(args)


def _result(task: str, *rows):
    from dga_compile.eval.run import EvalResult, MethodResult

    methods = [MethodResult(label, kind, {}, 1.0 if kind == "dense" else 0.3, 1.0, **fields) for label, kind, fields in rows]
    return EvalResult("m", "t", 64, 1, task, methods)


@pytest.mark.parametrize("delta, warned", [pytest.param(0.049, False, id="4.9%"), pytest.param(0.051, True, id="5.1%")])
def test_quality_warning_above_five_percent(delta, warned):
    """A DGA row more than 5% above dense perplexity is warned about, with the fix; baselines never."""
    from dga_compile.eval.report import quality_warnings

    res = _result("causal-lm", ("dense", "dense", dict(delta_last_half=0.0)), ("DGA x", "dga", dict(delta_last_half=delta)),
                  ("streaming", "streaming", dict(delta_last_half=0.3)))
    lines = quality_warnings(res)
    assert len(lines) == warned
    if warned:
        assert lines[0].startswith("DGA x: last-half perplexity +5.1%") and "dga-compile calibrate" in lines[0]


def test_quality_warning_when_passkeys_are_lost():
    from dga_compile.eval.report import quality_warnings

    res = _result("passkey", ("dense", "dense", dict(exact_match=1.0)), ("DGA a", "dga", dict(exact_match=1.0)),
                  ("DGA b", "dga", dict(exact_match=0.5)))
    assert [line.split(":")[0] for line in quality_warnings(res)] == ["DGA b"]
