"""Issue #13, the CLI: nothing runs code from a file without ``--trust-pickle``, ``--verify``
never passes a NaN, nothing is overwritten that should not be, and every bad input is ONE line
(``error: ...``, exit 2 for usage errors, 1 for failures) naming the value and the fix.

Each test runs the CLI in process (`dga_compile.cli.main`) and says in its docstring what broke.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile

import pytest
import torch

from dga_compile.cli import main

import _cli_models

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`_cli_models.build` plus an encoder-decoder (T5) directory."""
    d = _cli_models.build(tmp_path_factory.mktemp("models"))
    t5 = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    transformers.T5ForConditionalGeneration(t5).save_pretrained(d / "t5")
    return d


def _error(capsys) -> str:
    """The one ``error:`` line of the captured stderr (there must be exactly one, and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------- no code without --trust-pickle

class _Evil:
    """Unpickles by creating the directory ``marker``, then stands for ``value``."""

    def __init__(self, marker, value):
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        return eval, (f"__import__('os').mkdir({self.marker!r}) or __import__('torch').load(__import__('io').BytesIO("
                      f"{_saved(self.value)!r}))",)


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _evil_archive(src, dst, marker, part: str):
    """A real .pt2 whose example inputs (``part="inputs"``) or first weight (``"weight"``) is a
    pickle that creates ``marker`` when unpickled in full (and loads as the original otherwise),
    or (``"aoti"``) that carries an AOTInductor library, native code torch.export.load loads."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        names = a.namelist()
        if part == "aoti":
            b.writestr(names[0].split("/")[0] + "/data/aotinductor/model/model.so", b"\x7fELF")
        config_name = next(n for n in names if n.endswith("_weights_config.json"))
        config = json.loads(a.read(config_name))
        fqn, meta = next(iter(config["config"].items()))
        for info in a.infolist():
            data = a.read(info)
            if part == "inputs" and "/data/sample_inputs/" in info.filename:
                data = _saved(_Evil(marker, torch.load(io.BytesIO(data), weights_only=True)))
            elif part == "weight" and info.filename == config_name:
                meta["use_pickle"] = True
                data = json.dumps(config).encode()
            elif part == "weight" and info.filename.endswith("/data/weights/" + meta["path_name"]):
                data = _saved(_Evil(marker, torch.zeros(0)))
            b.writestr(info, data)


@pytest.mark.parametrize("part", ["inputs", "weight", "aoti"])
def test_pt2_pickles_run_no_code_without_trust_pickle(models, tmp_path, capsys, part):
    """A .pt2 whose example inputs held a pickle with a ``__reduce__`` ran it on a plain ``convert``
    (torch.export.load retries with weights_only=False); so did a pickled weight, and an
    AOTInductor library would be loaded."""
    evil, marker, out = tmp_path / "evil.pt2", tmp_path / "pwned", tmp_path / "x.onnx"
    _evil_archive(models / "llama.pt2", evil, marker, part)
    assert main(["convert", str(evil), "-o", str(out)]) == 2
    line = _error(capsys)
    assert "refusing to load" in line and "--trust-pickle" in line
    assert not marker.exists() and not out.exists()
    assert main(["inspect", str(evil)]) == 2 and not marker.exists()
    capsys.readouterr()


def test_pt2_with_trust_pickle_says_once_that_code_runs(models, tmp_path, capsys):
    evil, marker = tmp_path / "evil.pt2", tmp_path / "pwned"
    _evil_archive(models / "llama.pt2", evil, marker, "inputs")
    assert main(["inspect", str(evil), "--trust-pickle"]) == 0
    assert marker.exists()  # the user consented
    assert capsys.readouterr().err.count("code stored in the file will run") == 1


def test_pickle_with_trust_pickle_says_once_that_code_runs(models, tmp_path, capsys):
    assert main(["convert", str(models / "bert.pt"), "-o", str(tmp_path / "x.onnx"), "--trust-pickle",
                 "--input", "2x30:int64", "--input", "2x30:int64"]) == 0
    assert capsys.readouterr().err.count("code stored in the file will run") == 1


# ------------------------------------------------------------------------- --verify and NaN

@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1"])
def test_tolerance_must_be_finite_and_non_negative(models, tmp_path, capsys, tolerance):
    """``--tolerance nan`` passed every verification (nothing is > nan)."""
    out = tmp_path / "x.onnx"
    assert main(["convert", str(models / "llama.pt2"), "-o", str(out), "--verify", "--tolerance", tolerance]) == 2
    assert "finite number ≥ 0" in _error(capsys) and not out.exists()


def test_verify_fails_on_nan(models, tmp_path, capsys):
    """``--group-bias inf`` gave NaN outputs, shown as ``nan`` in the table, and exit 0; now the
    flag is refused or the NaN fails the verification, and no file is written either way."""
    out = tmp_path / "x.onnx"
    rc = main(["convert", str(models / "hf-llama"), "-o", str(out), "--verify", "--group-bias", "inf",
               "--window", "0", "--group-size", "4", "--num-probe", "4", "--min-seq-len", "16", "--seq-len", "40"])
    assert rc in (1, 2) and not out.exists()
    line = _error(capsys)
    assert "group_bias" in line or "nan" in line


def test_compare_counts_any_nan_as_a_failure(tmp_path):
    """An output that is NaN in both ONNX Runtime and PyTorch is no agreement."""
    from dga_compile import deploy
    from dga_compile.onnx import export

    class Log(torch.nn.Module):
        def forward(self, x):
            return torch.log(x)

    x = torch.tensor([[-1.0, 1.0, 2.0]])
    path = export(Log(), (x,), tmp_path / "log.onnx", dynamic=False)
    program = torch.export.export(Log(), (x,))
    v = deploy.compare(program, path, (x,))
    assert v.failure is not None and "nan" in v.failure
    assert deploy.compare(program, path, (x.abs() + 1,)).failure is None


# ------------------------------------------------------------------------- the output path

@pytest.mark.parametrize("link", ["same", "hardlink", "symlink"])
def test_output_that_is_the_input_is_refused(models, tmp_path, capsys, link):
    """``convert same.pt2 -o same.pt2 --force`` replaced the input archive with the ONNX file."""
    model = tmp_path / "m.pt2"
    model.write_bytes((models / "llama.pt2").read_bytes())
    out = model
    if link != "same":
        out = tmp_path / "alias.pt2"
        (os.link if link == "hardlink" else os.symlink)(model, out)
    assert main(["convert", str(model), "-o", str(out), "--force"]) == 2
    assert "is the model" in _error(capsys)
    assert model.read_bytes() == (models / "llama.pt2").read_bytes()


def test_output_inside_the_model_directory_is_refused(models, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in (models / "hf-llama").iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    before = (hf / "config.json").read_bytes()
    assert main(["convert", str(hf), "-o", str(hf / "config.json"), "--force"]) == 2
    assert "model directory" in _error(capsys) and (hf / "config.json").read_bytes() == before


@pytest.mark.parametrize("where,message", [
    pytest.param("dir", "is a directory", id="existing-dir"),
    pytest.param("file/x.onnx", "is a file, not a directory", id="under-a-file"),
])
def test_output_path_is_checked_before_any_work(models, tmp_path, capsys, monkeypatch, where, message):
    """``-o existing_dir --force`` failed only after the whole export; ``-o file/x.onnx`` said "File exists"."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("a file")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("dga_compile.models.load_model", no_work)
    assert main(["convert", str(models / "llama.pt2"), "-o", str(tmp_path / where), "--force"]) == 1
    assert message in _error(capsys)


# ------------------------------------------------------------------------- --input against the archive

@pytest.mark.parametrize("inputs,message", [
    pytest.param(["2x64x8"], "must be int64", id="float-3d"),
    pytest.param(["2x64"], "must be int64", id="float"),
    pytest.param([f"2x{_cli_models.MAX_N + 1}:int64"], f"must lie in [2, {_cli_models.MAX_N}]", id="too-long"),
    pytest.param(["3x64:int64"], "dim 0 must be 2", id="batch-3"),
    pytest.param(["2x64:int64", "2x64:int64"], "2 sample input(s) given, the archive takes 1", id="two-inputs"),
])
def test_input_is_checked_against_the_archive(models, tmp_path, capsys, inputs, message):
    """A wrong ``--input`` was silently ignored by ``convert x.pt2``, and failed ``--verify`` with
    "Guard failed" after writing the file."""
    out = tmp_path / "x.onnx"
    argv = ["convert", str(models / "llama.pt2"), "-o", str(out), "--verify"]
    assert main(argv + [a for spec in inputs for a in ("--input", spec)]) == 2
    line = _error(capsys)
    assert message in line and "input_ids: int64[2, " in line and not out.exists()


def test_failed_verify_writes_nothing_and_keeps_the_old_file(models, tmp_path, capsys):
    """A failed ``--verify`` left an output file that looked good (and had replaced the old one)."""
    out = tmp_path / "x.onnx"
    out.write_bytes(b"keep me")
    assert main(["convert", str(models / "llama.pt2"), "-o", str(out), "--force", "--verify",
                 "--tolerance", "0"]) == 1
    assert "verification failed" in _error(capsys)
    assert out.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["x.onnx"]


def test_matching_input_is_used(models, tmp_path, capsys):
    assert main(["convert", str(models / "llama.pt2"), "-o", str(tmp_path / "x.onnx"), "--verify",
                 "--input", "2x12:int64"]) == 0
    assert "[2, 12, 61]" in capsys.readouterr().out


# ------------------------------------------------------------------------- corrupt archives

@pytest.mark.parametrize("damage", ["truncate", "flip-a-weight-byte"])
def test_corrupt_pt2_prints_no_torch_log(models, tmp_path, capfd, damage):
    """A truncated .pt2 printed torch's logged traceback (W... lines) before the one-line error."""
    data = bytearray((models / "llama.pt2").read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        with zipfile.ZipFile(models / "llama.pt2") as a:
            weight = a.read(next(n for n in a.namelist() if n.endswith("/data/weights/weight_0")))
        data[bytes(data).index(weight) + len(weight) // 2] ^= 0xFF
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(data))
    records, logged = [], logging.Handler(logging.WARNING)
    logged.emit = records.append
    logging.getLogger("torch.export").addHandler(logged)  # torch's own handler may hold the pre-test stderr
    try:
        assert main(["convert", str(bad), "-o", str(tmp_path / "x.onnx")]) == 1
    finally:
        logging.getLogger("torch.export").removeHandler(logged)
    err = capfd.readouterr().err
    assert not records and "Traceback" not in err and "Ran into" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if "corrupt or truncated" in line)]


# ------------------------------------------------------------------------- Hugging Face inputs

@pytest.mark.parametrize("seq_len,message", [
    pytest.param("0", "got 0", id="zero"),
    pytest.param("-3", "got -3", id="negative"),
    pytest.param(str(_cli_models.HF_MAX_POSITIONS + 1), f"max_position_embeddings={_cli_models.HF_MAX_POSITIONS}",
                 id="above-max-positions"),
])
def test_bad_seq_len_is_one_line(models, tmp_path, capsys, seq_len, message):
    """``--seq-len 0 / -3 / above the model's max positions`` gave internal torch/HF messages."""
    assert main(["inspect", str(models / "hf-llama"), "--seq-len", seq_len]) == 2
    line = _error(capsys)
    assert message in line and "--seq-len" in line


def test_encoder_decoder_directory_is_one_line(models, capsys):
    """A T5 directory failed deep inside the tracer."""
    assert main(["inspect", str(models / "t5")]) == 2
    line = _error(capsys)
    assert "encoder-decoder" in line and "T5ForConditionalGeneration" in line


@pytest.mark.parametrize("argv,message", [
    pytest.param(["hf-llama", "--input", "2x8:int64"], "--seq-len", id="input-for-hf"),
    pytest.param(["llama.pt2", "--seq-len", "8"], "--input", id="seq-len-for-pt2"),
])
def test_flags_that_do_not_apply_are_refused(models, capsys, argv, message):
    """``--input`` for a Hugging Face directory, ``--seq-len`` for an archive: silently ignored."""
    assert main(["inspect", str(models / argv[0]), *argv[1:]]) == 2
    assert message in _error(capsys)


def test_dga_flags_on_sites_that_already_call_dga_are_not_silent(models, capsys):
    """``--group-bias`` and the other DGA flags silently did nothing to an archive whose sites
    already call DGA (they keep the parameters they were traced with)."""
    assert main(["inspect", str(models / "llama.pt2"), "--group-bias", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "1 site(s)" in err and "keep their own parameters" in err and "group_bias" in err
    assert main(["inspect", str(models / "llama.pt2")]) == 0
    assert "keep their own parameters" not in capsys.readouterr().err


def test_eval_without_tokenizer_is_one_line(models, tmp_path, capsys):
    """``dga-compile eval`` on a directory without a tokenizer gave transformers' internal message."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 50)
    assert main(["eval", str(models / "hf-llama"), "--text", str(text), "--seq-len", "32", "--quiet",
                 "--out", str(tmp_path / "r")]) != 0
    assert "no usable tokenizer" in _error(capsys)


def test_debug_still_shows_the_traceback(models, tmp_path, capsys):
    assert main(["--debug", "inspect", str(models / "hf-llama"), "--seq-len", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err
