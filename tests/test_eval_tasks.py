"""The passkey task, the per-head calibration and the site report, end to end on tiny random models
(the plumbing: real models and lengths run in `make accuracy`)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import _eval_models  # noqa: E402

from dga_compile import DGAConfig  # noqa: E402
from dga_compile.eval import evaluate  # noqa: E402
from dga_compile.eval.cli import main as eval_main  # noqa: E402
from dga_compile.eval.passkey import DEPTHS, NEEDLE, passkey_trials  # noqa: E402
from dga_compile.eval.perhead import head_locality  # noqa: E402
from dga_compile.eval.report import markdown_depth_table, markdown_table, site_summary  # noqa: E402
from dga_compile.eval.run import token_ids, token_windows  # noqa: E402
from dga_compile.models import load_model  # noqa: E402

SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, min_seq_len=0)
TEXT = _eval_models.TEXT




@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return transformers.AutoTokenizer.from_pretrained(tiny_llama)


def test_passkey_trials_are_seeded_and_placed(tokenizer):
    ids = token_ids(tokenizer, TEXT)
    trials = passkey_trials(tokenizer, ids, 120, 7, seed=3, avoid=[(0, 200)])
    again = passkey_trials(tokenizer, ids, 120, 7, seed=3, avoid=[(0, 200)])
    other = passkey_trials(tokenizer, ids, 120, 7, seed=4, avoid=[(0, 200)])
    assert [t.key for t in trials] == [t.key for t in again] and [t.key for t in trials] != [t.key for t in other]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(trials, again))
    assert [t.depth for t in trials] == [DEPTHS[i % len(DEPTHS)] for i in range(7)]
    for t in trials:
        needle = tokenizer(NEEDLE.format(key=t.key), add_special_tokens=False).input_ids
        assert t.ids.shape == (1, 120) and 5 <= len(t.key) <= 7 and t.key.isdigit()
        assert t.ids[0, t.position:t.position + len(needle)].tolist() == needle
        assert t.start >= 200                                          # never inside the avoided range


@pytest.mark.parametrize("seq_len,avoid,match", [(30, (), "leaves"), (120, [(0, 10 ** 6)], "avoids")],
                         ids=["too-short", "all-avoided"])
def test_passkey_trials_errors_name_the_fix(tokenizer, seq_len, avoid, match):
    with pytest.raises(ValueError, match=match):
        passkey_trials(tokenizer, token_ids(tokenizer, TEXT), seq_len, 2, avoid=avoid)


def test_evaluate_passkey(tiny_llama):
    res = evaluate(tiny_llama, TEXT, seq_len=96, windows=2, configs=[SMALL], progress=False, task="passkey", trials=2)
    assert res.task == "passkey" and res.windows == 2
    assert [r.kind for r in res.methods] == ["dense", "dga", "streaming", "topk", "perhead"]
    dense, dga = res.methods[:2]
    assert dense.delta_logprob == 0.0 and dense.cost == 1.0 and dga.cost < 1.0
    assert all(len(r.per_window) == 2 and r.answer_logprob < 0 and r.exact_match in (0.0, 0.5, 1.0)
               for r in res.methods)
    # DGA ran only in the prefill: the generation and the teacher-forced key (Nq ≠ Nk) are not metered
    assert {s["ran"] for s in dga.sites} == {"dga"}
    assert all(abs(r.cost - dga.cost) < 0.05 for r in res.methods[2:])            # equal cost
    assert "depth 10%" in markdown_depth_table(res) and "exact match" in markdown_table(res)


def test_cli_passkey_two_lengths(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert eval_main([str(tiny_llama), "--text", str(text), "--task", "passkey", "--seq-len", "96,112", "--trials", "2",
                      "--group-size", "4", "--num-probe", "8", "--window", "8", "--baselines", "streaming",
                      "--out", str(tmp_path / "pk"), "--quiet"]) == 0
    for n in (96, 112):
        data = json.loads((tmp_path / f"pk-{n}.json").read_text())
        assert data["seq_len"] == n and [m["kind"] for m in data["methods"]] == ["dense", "dga", "streaming"]


def test_head_locality_is_a_mass_share(tiny_llama):
    loaded = load_model(tiny_llama, tokenizer=True)
    model, tok = loaded.model, loaded.tokenizer
    wins = token_windows(tok, TEXT, 96, 2, between=True)
    local = head_locality(model, wins, sinks=2, recent=8)
    assert sorted(local) == [(layer, h) for layer in range(2) for h in range(2)]
    assert all(0 < v < 1 for v in local.values())
    assert all(v == pytest.approx(1.0) for v in head_locality(model, wins, sinks=0, recent=96).values())
    assert model.config._attn_implementation == "sdpa"                  # restored


def test_sites_report_sliding_window_layers(tiny_gemma3):
    """Gemma 3 alternates sliding-window and global layers: the report says where DGA ran."""
    res = evaluate(tiny_gemma3, TEXT, seq_len=64, windows=1, configs=[SMALL, SMALL.replace(dense_layers=(2,))],
                   progress=False, baselines=("streaming",))
    dga, streaming, dga_dense = res.methods[1], res.methods[2], res.methods[3]
    assert [(s["layer"], s["ran"], s["sliding_window"]) for s in dga.sites] == [(0, "dga", 16), (1, "dga", 16),
                                                                               (2, "dga", None)]
    assert [(s["ran"], s["reason"]) for s in dga_dense.sites][2] == ("dense", "dense_layers")
    assert dga.sites[0]["cost"] > dga.sites[2]["cost"] * 0.5                    # a window of 16 leaves little to save
    summary = site_summary(res)
    assert "DGA ran at 3 of 3 sites (2 of them sliding-window layers, window 16)" in summary
    assert "layers 2 dense: dense_layers" in summary and "StreamingLLM" in summary
    assert abs(streaming.cost - dga.cost) < 0.03                   # solved against each site's own visible keys


@pytest.mark.slow
def test_gemma3_reports_its_sliding_window_sites():
    """Gemma 3 270M: 15 of its 18 layers have a 512-token window; the report says DGA ran in all 18."""
    from dga_compile.eval.fetch import gemma3, jargon_text

    model, text = _eval_models.fetched(gemma3), _eval_models.fetched(jargon_text).read_text()
    res = evaluate(model, text, seq_len=1024, windows=1, progress=False, baselines=("streaming",))
    dense, dga, streaming = res.methods
    assert [s["sliding_window"] for s in dga.sites] == [None if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert {s["ran"] for s in dga.sites} == {"dga"} and 0 < dga.delta_last_half < 1.0
    assert "DGA ran at 18 of 18 sites (15 of them sliding-window layers, window 512)" in site_summary(res)
    assert abs(streaming.cost - dga.cost) < 0.02


@pytest.mark.slow
def test_smollm2_passkey_dense_retrieves():
    """SmolLM2-135M finds the key at 1K tokens when dense; DGA's cost counts only its prefill, probes
    included (a quarter of dense at 1K with r = 128)."""
    from dga_compile.eval.fetch import jargon_text, smollm2

    model, text = _eval_models.fetched(smollm2), _eval_models.fetched(jargon_text).read_text()
    res = evaluate(model, text, seq_len=1024, windows=3, progress=False, baselines=(), task="passkey", trials=3,
                   configs=[DGAConfig(min_seq_len=0)])
    dense, dga = res.methods
    assert dense.exact_match == 1.0 and dense.answer_logprob > -2.0
    # the prefill has N = 1023 queries: the last r = 128 rows × their visible keys, per head
    assert dga.cost_terms["probes"] == pytest.approx(sum(range(896, 1024)) / (1023 * 1024 / 2), rel=1e-6)
    assert dga.cost_terms["probes"] < dga.cost < 1.0
