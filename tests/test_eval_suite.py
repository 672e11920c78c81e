"""The accuracy suite: resumable runs, JSON per entry, and the document's tables regenerated
between markers (examples/accuracy_suite.py is `make accuracy`)."""

import importlib.util
import json
import pathlib
import re

import pytest

transformers = pytest.importorskip("transformers")

import _eval_models  # noqa: E402

from dga_compile import DGAConfig  # noqa: E402
from dga_compile.eval.suite import Entry, Table, entry_tables, regenerate, run_suite  # noqa: E402

SMALL = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=8, min_seq_len=0)
ROOT = pathlib.Path(__file__).parents[1]



RUNS = ((SMALL, ("streaming",)), (SMALL.replace(window=4), ()))


def _entry(model, runs=RUNS):
    return Entry("tiny", str(model), 64, runs, windows=2)


def test_suite_runs_saves_and_skips_finished_entries(tiny_llama, tmp_path):
    log = []
    res = run_suite([_entry(tiny_llama)], tmp_path, _eval_models.TEXT, "t", log=log.append)["tiny"]
    assert [m.kind for m in res.methods] == ["dense", "dga", "streaming", "dga"]
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["suite"]["complete"] and len(saved["suite"]["done"]) == 2
    log.clear()
    again = run_suite([_entry(tiny_llama)], tmp_path, _eval_models.TEXT, "t", log=log.append)["tiny"]
    assert log == [f"tiny: done ({tmp_path / 'tiny.json'})"] and again.methods[2].label == res.methods[2].label
    log.clear()
    run_suite([_entry(tiny_llama)], tmp_path, _eval_models.TEXT, "t", force=True, log=log.append)
    assert sum("DGA" in line for line in log) == 2


def test_suite_resumes_after_the_last_finished_config(tiny_llama, tmp_path):
    first = _entry(tiny_llama, runs=((SMALL, ("streaming",)),))
    run_suite([first], tmp_path, _eval_models.TEXT, "t", log=lambda _: None)
    path = tmp_path / "tiny.json"
    data = json.loads(path.read_text())
    data["suite"]["complete"] = False                              # as if stopped after its first config
    path.write_text(json.dumps(data))
    log = []
    res = run_suite([_entry(tiny_llama)], tmp_path, _eval_models.TEXT, "t", log=log.append)["tiny"]
    assert log[0] == "tiny: resuming after 1 finished config(s)"
    assert [m.kind for m in res.methods] == ["dense", "dga", "streaming", "dga"]
    assert sum("DGA" in line for line in log) == 1                   # only the second config ran
    assert json.loads(path.read_text())["suite"]["complete"]


def test_regenerate_rewrites_only_marked_tables(tiny_llama, tmp_path):
    res = run_suite([_entry(tiny_llama)], tmp_path / "out", _eval_models.TEXT, "t", log=lambda _: None)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table:tiny -->\nold\n<!-- /table:tiny -->\nmiddle\n<!-- table:tiny:windows -->\n"
                   "old\n<!-- /table:tiny:windows -->\n<!-- table:other -->\nkept\n<!-- /table:other -->\n")
    tables = entry_tables("tiny", ("methods", "windows")) + [Table("other", lambda r: "new", ("missing",))]
    assert regenerate(doc, tables, res, tmp_path / "out") == ["tiny", "tiny:windows"]
    text = doc.read_text()
    assert text.startswith("intro\n<!-- table:tiny -->\n| method |") and "old" not in text
    assert "](out/tiny.png)" in text and "| window 2 |" in text and "kept" in text and "middle" in text
    assert regenerate(doc, tables, res, tmp_path / "out") == ["tiny", "tiny:windows"] and doc.read_text() == text
    doc.write_text("<!-- table:tiny -->\nno end\n")
    with pytest.raises(ValueError, match="closing <!-- /table:tiny -->"):
        regenerate(doc, tables, res, tmp_path / "out")


def _suite_module():
    spec = importlib.util.spec_from_file_location("accuracy_suite", ROOT / "examples" / "accuracy_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_suite_table_has_its_markers_in_the_doc():
    """docs/ACCURACY.md holds an open and a closing marker for every table the suite writes, and
    no marked region the suite does not write."""
    suite = _suite_module()
    text = (ROOT / "docs" / "ACCURACY.md").read_text()
    opened = re.findall(r"<!-- table:(\S+) -->", text)
    closed = re.findall(r"<!-- /table:(\S+) -->", text)
    assert sorted(opened) == sorted(closed) == sorted(t.marker for t in suite.TABLES)
    names = {e.name for e in suite.ENTRIES}
    assert all(set(t.entries) <= names for t in suite.TABLES) and len(names) == len(suite.ENTRIES)


def test_suite_lists_its_entries(capsys):
    assert _suite_module().main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-passkey-8k: smollm2, passkey, 8192 tokens" in out and "gemma3-2k" in out
