"""``dga-compile eval --task decode`` on a tiny random Llama: rows, budgets, exactness, CLI."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _eval_models import TEXT  # noqa: E402

from decode_cases import SMALL  # noqa: E402
from dga_compile.eval.cli import main as eval_main  # noqa: E402
from dga_compile.eval.decode import evaluate_decode, snapkv_scores  # noqa: E402


def test_decode_eval_rows_and_budgets(tiny_llama):
    res = evaluate_decode(tiny_llama, TEXT, seq_len=80, continuation=12, greedy=6, config=SMALL, passkey_depths=(),
                          progress=False)
    dense, dga, snap, stream = res.methods
    assert [m.kind for m in res.methods] == ["dense", "dga", "snapkv", "streaming"]
    assert dense.delta == 0.0 and dense.agreement == 1.0 and dense.first_divergence == 6
    assert dense.cache_fraction == 1.0 and dga.cache_fraction < 0.8
    # the baselines hold the DGA cache's mean bytes, to within one token per layer and kv head
    token = 2 * 2 * 8 * 2 * 4                                         # layers · kv heads · (D + Dv) · float32
    assert abs(snap.cache_bytes - dga.cache_bytes) <= token and snap.cache_bytes == stream.cache_bytes
    assert all(m.ppl > 1 and math.isfinite(m.ppl) for m in res.methods) and res.passkey == []


def test_decode_eval_exact_config_equals_dense(tiny_llama):
    """m = 1: the DGA row decodes exactly (its cache is larger than dense: every block is a slot)."""
    res = evaluate_decode(tiny_llama, TEXT, seq_len=64, continuation=10, greedy=5, config=SMALL.replace(group_size=1),
                          passkey_depths=(), progress=False)
    dense, dga = res.methods[:2]
    assert dga.ppl == pytest.approx(dense.ppl, rel=1e-5) and dga.agreement == 1.0


def test_decode_eval_cli_with_passkey(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "dec"
    assert eval_main([str(tiny_llama), "--task", "decode", "--text", str(text), "--seq-len", "160", "--windows", "1",
                      "--continuation", "6", "--greedy", "3", "--passkey-depths", "0.5", "--group-size", "4",
                      "--num-probe", "8", "--window", "8", "--out", str(out), "--quiet"]) == 0
    data = json.loads((tmp_path / "dec.json").read_text())
    assert data["config"]["group_size"] == 4 and data["continuation"] == 6
    assert [p["method"] for p in data["passkey"]] == ["dense", "dga"]
    assert all(isinstance(p["correct"], bool) for p in data["passkey"])


def test_decode_eval_cli_refuses_several_configs(tiny_llama, tmp_path, capsys):
    """Regression: every --config after the first was ignored without a word."""
    assert eval_main([str(tiny_llama), "--task", "decode", "--config", "sinks=4", "--config", "window=8",
                      "--out", str(tmp_path / "dec"), "--quiet"]) == 2
    assert "measures one DGA config" in capsys.readouterr().err and not (tmp_path / "dec.json").exists()


def test_snapkv_scores_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    got = snapkv_scores(q, k, window=6, kernel=3)
    want = torch.zeros(1, 2, 24)
    for h in range(4):
        for t in range(24, 30):
            att = (q[0, h, t] @ k[0, h // 2, :t + 1].T / 8 ** 0.5).softmax(-1)
            want[0, h // 2, :] += att[:24] / 6 / 2
    want = torch.nn.functional.avg_pool1d(want, 3, stride=1, padding=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
