"""``dga-compile`` end to end: each input format, refusals, corrupt inputs, exit codes."""

from __future__ import annotations

import shutil

import onnx
import pytest
import torch

from dga_compile.cli import main
from dga_compile.onnx import DOMAIN

import _cli_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A .pt2 archive (with example inputs), a pickled module and a Hugging Face directory."""
    pytest.importorskip("transformers")
    return _cli_models.build(tmp_path_factory.mktemp("models"))


def _dga_nodes(path) -> int:
    return sum(n.domain == DOMAIN for n in onnx.load(str(path)).graph.node)


def _convert(models, tmp_path, name, *extra):
    out = tmp_path / "out.onnx"
    return main(["convert", str(models / name), "-o", str(out), *extra]), out


def test_convert_pt2_with_verify_overwrites_only_with_force(models, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    rc, _ = _convert(models, tmp_path, "llama.pt2")
    assert rc == 1 and out.read_bytes() == b"keep me"
    assert "--force" in capsys.readouterr().err
    rc, _ = _convert(models, tmp_path, "llama.pt2", "--verify", "--force")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert _dga_nodes(out) == 1
    assert "max abs error" in cap.out and ("function" in cap.out or "native" in cap.out)  # native when built
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"], "no temp file left behind"


def test_convert_pickle_is_refused_without_flag(models, tmp_path, capsys):
    rc, out = _convert(models, tmp_path, "bert.pt", "--input", "2x30:int64", "--input", "2x30:int64")
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "refusing to unpickle" in err and "--trust-pickle" in err and "Traceback" not in err


def test_convert_pickle_with_flag(models, tmp_path, capsys):
    rc, out = _convert(models, tmp_path, "bert.pt", "--trust-pickle", "--input", "2x30:int64",
                       "--input", "2x30:int64", "--verify")
    assert rc == 0, capsys.readouterr().err
    assert _dga_nodes(out) == 1


def test_convert_huggingface_directory(models, tmp_path, capsys):
    """The SDPA site of a Hugging Face Llama is rewritten (passes) and exported as one ai.dga node."""
    rc, out = _convert(models, tmp_path, "hf-llama", "--seq-len", "20", "--verify", "--min-seq-len", "16")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "1 of 1 attention sites rewritten" in cap.err
    assert _dga_nodes(out) == 1
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("name,extra", [pytest.param("llama.pt2", [], id="pt2"),
                                        pytest.param("bert.pt", ["--trust-pickle", "--input", "2x8:int64"], id="pickle")])
def test_truncated_input_gives_one_line_error(models, tmp_path, capsys, name, extra):
    bad = tmp_path / name
    data = (models / name).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    rc = main(["convert", str(bad), "-o", str(tmp_path / "x.onnx"), *extra])
    err = capsys.readouterr().err
    assert rc == 1 and "corrupt or truncated" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_truncated_safetensors_gives_one_line_error(models, tmp_path, capsys):
    bad = tmp_path / "hf"
    shutil.copytree(models / "hf-llama", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc = main(["convert", str(bad), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "corrupt or truncated" in err and "Traceback" not in err


def test_debug_shows_traceback(models, tmp_path, capsys):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    assert main(["--debug", "convert", str(bad), "-o", str(tmp_path / "x.onnx")]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    pytest.param(["convert", "m.pt2"], id="missing-output"),
    pytest.param(["frobnicate"], id="unknown-command"),
])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bad_parameter_is_usage_error(models, tmp_path, capsys):
    rc, _ = _convert(models, tmp_path, "llama.pt2", "--focus-ratio", "2")
    assert rc == 2 and "focus_ratio" in capsys.readouterr().err


def test_inspect_lists_sites(models, capsys):
    assert main(["inspect", str(models / "llama.pt2")]) == 0
    cap = capsys.readouterr()
    assert "1 DGA site(s)" in cap.err


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    if "dga-compile" not in scripts:
        pytest.skip("package not installed in this environment (pip install -e .)")
    assert scripts["dga-compile"] == "dga_compile.cli:main"


def test_dense_layers_flag_keeps_the_site_dense(models, tmp_path, capsys):
    rc, out = _convert(models, tmp_path, "hf-llama", "--seq-len", "20", "--min-seq-len", "16", "--dense-layers", "0")
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "0 of 1 attention sites rewritten" in cap.err and _dga_nodes(out) == 0
    rc, _ = _convert(models, tmp_path / "bad", "llama.pt2", "--dense-layers", "0,x")
    assert rc == 2 and "invalid literal" in capsys.readouterr().err


def test_convert_inspect_and_verify_are_library_functions(models, tmp_path):
    """What `convert --verify` and `inspect` do runs from Python, without the CLI (#14)."""
    from dga_compile import deploy
    from dga_compile.models import load_model

    loaded = load_model(models / "llama.pt2")
    assert loaded.kind == "pt2" and loaded.args[0].shape == (2, 24)
    done = deploy.convert(loaded, tmp_path / "m.onnx", verify=True)
    assert done.path == tmp_path / "m.onnx" and _dga_nodes(done.path) == done.dga_nodes == 1
    assert done.verification.failure is None and done.verification.impl in ("native", "function")
    assert [o.shape for o in done.verification.outputs] == [(2, 24, 61)]
    again = deploy.compare(done.program, done.path, loaded.args, tolerance=1e-3)
    assert again.outputs[0].max_abs < 1e-3
    (site,) = deploy.inspect(loaded).sites
    assert site.q_shape[1:] == (4, 24, 8) and site.k_shape[1] == 2 and site.is_causal and site.mask is None
    assert site.config.group_size == 4  # the archive's own parameters (tests/_onnx_models.CONFIG)


def test_verify_runs_the_reference_implementation(models):
    """--verify compares ONNX Runtime with the spec (impl="reference"), not with the C++ kernel the
    native ORT op shares; the program itself is left as it was."""
    from dga_compile import deploy
    from dga_compile.models import load_model
    from dga_compile.onnx.export import dga_nodes
    from dga_compile.ops import OpCall

    program = load_model(models / "llama.pt2").model
    module = deploy.reference_module(program)
    impls = [OpCall.parse(n.args).config.impl for n in module.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.dga.attention.default]
    assert impls == ["reference"]
    assert [OpCall.parse(n.args).config.impl for n in dga_nodes(program)] == ["auto"]


def test_eval_loads_models_with_the_cli_loader(models, monkeypatch):
    """One `load_model` for the CLI and the evaluation (#14): eval goes through dga_compile.models."""
    import dga_compile.eval.run as run
    from dga_compile import models as loader

    assert run.load_model is loader.load_model
    with pytest.raises(ValueError, match="no usable tokenizer"):
        run.Evaluation(models / "hf-llama", "some text", seq_len=16, windows=1, progress=False)
