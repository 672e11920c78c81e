"""A resumable suite of evaluations and the document it regenerates (docs/ACCURACY.md).

An `Entry` is one evaluation: a model, a task, a length, windows or trials, and a list of DGA
configs, each with the baselines to measure at its cost. `run_suite` runs the entries in turn
and saves each entry's JSON (and plot) after every config, so an interrupted run resumes where
it stopped: a finished entry is skipped, a partial one re-measures dense (its reference) and
continues after its last finished config; ``force`` starts over. `regenerate` replaces the text
between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in the document with tables built
from those JSON files, so no table is assembled by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..config import DGAConfig
from .report import load_json, markdown_depth_table, markdown_table, markdown_window_table, save_plot, site_summary, \
    write_text
from ..models import load_model
from .run import EvalResult, Evaluation

__all__ = ["Entry", "Table", "run_suite", "regenerate", "entry_tables", "saved_result"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One evaluation of the suite, saved as ``NAME.json`` (and ``NAME.png``).

    ``model``: an alias or directory, or a function returning a directory (run only when the
    entry runs: e.g. a fine-tuning recipe); ``runs``: (DGA config, baseline kinds) pairs in
    order; ``calibrate``: keep the K worst layers dense in every config (`calibrate.worst_layers`).
    """

    name: str
    model: Union[str, Callable[[], Path]]
    seq_len: int
    runs: tuple
    windows: int = 3
    task: str = "perplexity"
    trials: int = 20
    calibrate: int = 0

    def scaled(self, windows: Optional[int] = None, trials: Optional[int] = None) -> "Entry":
        """The same entry with fewer (or more) windows / trials (a quick check of the suite)."""
        return dataclasses.replace(self, windows=windows or self.windows, trials=trials or self.trials)


@dataclasses.dataclass(frozen=True)
class Table:
    """A marked region of the document: ``build(results)`` gives its Markdown from the results
    by entry name (`entry_tables` makes the usual ones)."""

    marker: str
    build: Callable[[dict], str]
    entries: tuple


def entry_tables(entry: str, kinds: Sequence[str] = ("methods",), plot: bool = True) -> list[Table]:
    """Tables of one entry: ``"methods"`` (one row per method, with its plot under it when ``plot``),
    ``"windows"`` (per window), ``"depths"`` (passkey, per depth), ``"sites"`` (where DGA ran);
    markers ``entry``, ``entry:windows``, ``entry:depths``, ``entry:sites``."""
    build = {"methods": markdown_table, "windows": markdown_window_table, "depths": markdown_depth_table,
             "sites": site_summary}
    tables = []
    for kind in kinds:
        def table(results, kind=kind):
            text = build[kind](results[entry])
            if kind == "methods" and plot:
                text += f"\n\n![accuracy vs attention cost: {entry}]({{dir}}/{entry}.png)"
            return text
        tables.append(Table(entry if kind == "methods" else f"{entry}:{kind}", table, (entry,)))
    return tables


def run_suite(entries: Sequence[Entry], out_dir: Union[str, Path], text: str, text_name: str, force: bool = False,
              progress: bool = False, log: Callable[[str], None] = print) -> dict[str, EvalResult]:
    """Runs every entry not finished yet in ``out_dir`` (all of them with ``force``); returns the
    results by entry name, finished ones read back from their JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, loaded = {}, {}
    for entry in entries:
        path = out_dir / f"{entry.name}.json"
        state = _state(path) if path.exists() and not force else None
        if state and state["complete"]:
            log(f"{entry.name}: done ({path})")
            results[entry.name] = load_json(path)
            continue
        model = entry.model() if callable(entry.model) else entry.model
        if str(model) not in loaded:
            loaded.clear()                                   # one model in memory at a time
            longest = max(e.seq_len for e in entries if e.model == entry.model)
            loaded[str(model)] = load_model(model, seq_len=longest, tokenizer=True)
        results[entry.name] = _run_entry(entry, model, loaded[str(model)], path, text, text_name, state, progress, log)
    return results


def _state(path: Path) -> Optional[dict]:
    """The ``suite`` record of a saved entry: {"complete", "done": [run keys]}, or None."""
    try:
        return json.loads(path.read_text()).get("suite")
    except (OSError, ValueError):
        return None


def _run_key(config: DGAConfig, baselines) -> str:
    return json.dumps([dataclasses.asdict(config), list(baselines)], sort_keys=True)


def _run_entry(entry: Entry, model: Path, loaded, path: Path, text: str, text_name: str, state, progress,
               log) -> EvalResult:
    from .calibrate import layer_errors, worst_layers

    ev = Evaluation(model, text, entry.seq_len, entry.windows, progress, text_name, entry.task, entry.trials,
                    loaded=loaded)
    done = list(state["done"]) if state else []
    if done:
        ev.results = [ev.results[0]] + load_json(path).methods[1:]       # dense measured again: the reference
        log(f"{entry.name}: resuming after {len(done)} finished config(s)")
    dense_layers: tuple = ()
    if entry.calibrate:
        dense_layers = worst_layers(layer_errors(ev.model, ev.calibration_windows(), entry.runs[0][0]), entry.calibrate)
        log(f"{entry.name}: calibrated dense layers {dense_layers}")
    for config, baselines in entry.runs:
        key = _run_key(config, baselines)
        if key in done:
            continue
        cfg = config.replace(dense_layers=tuple(sorted(set(config.dense_layers) | set(dense_layers))))
        for res in ev.run_with_baselines(cfg, baselines):
            log(f"{entry.name}: {res.label}: cost {res.cost:.1%} " + _accuracy(res))
        done.append(key)
        _save(ev.result(), path, {"complete": len(done) == len(entry.runs), "done": done})
    if not entry.runs:
        _save(ev.result(), path, {"complete": True, "done": []})
    return ev.result()


def _accuracy(res) -> str:
    if res.delta_last_half is not None:
        return f"Δ last half {res.delta_last_half:+.1%}"
    if res.exact_match is not None:
        return f"exact match {res.exact_match:.0%}, log p(key) {res.answer_logprob:.2f}"
    return f"cosine {res.cosine:.5f}"


def _save(result: EvalResult, path: Path, suite: dict) -> None:
    data = result.to_json() | {"suite": suite}
    write_text(path, json.dumps(data, indent=1))
    try:
        save_plot(result, path.with_suffix(".png"))
    except ImportError:
        pass


def regenerate(doc: Union[str, Path], tables: Sequence[Table], results: dict, out_dir: Union[str, Path]) -> list[str]:
    """Rewrites each table's marked region of ``doc`` whose entries are in ``results``; returns
    the markers it rewrote. A marker opened without its closing marker raises `ValueError`."""
    doc = Path(doc)
    text = doc.read_text()
    rel = os.path.relpath(Path(out_dir), doc.parent)
    written = []
    for table in tables:
        if not all(e in results for e in table.entries):
            continue
        start, end = f"<!-- table:{table.marker} -->", f"<!-- /table:{table.marker} -->"
        if start not in text:
            continue
        if text.count(start) != 1 or end not in text.split(start, 1)[1]:
            raise ValueError(f"{doc}: the marker {start} needs exactly one closing {end} after it")
        body = table.build(results).replace("{dir}", rel)
        before, rest = text.split(start, 1)
        text = f"{before}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"
        written.append(table.marker)
    write_text(doc, text)
    return written


def saved_result(out_dir: Union[str, Path], name: str) -> Optional[EvalResult]:
    """The saved `EvalResult` of entry ``name`` in ``out_dir``, if any."""
    path = Path(out_dir) / f"{name}.json"
    return load_json(path) if path.exists() else None
