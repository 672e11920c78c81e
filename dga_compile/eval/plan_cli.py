"""``dga-compile calibrate MODEL --max-increase 2% [--text FILE] [--seq-len N] [--windows K] [-o plan.json]
[DGA flags]``: the cheapest per-site plan that meets a quality target (`dga_compile.eval.calibrate`).

The calibration windows lie between the windows ``dga-compile eval`` scores with the same
``--windows`` / ``--seq-len``; the DGA flags give the base config the ladder starts from. Writes
the plan (`dga_compile.plan.Plan`) for ``DGAConfig(plan=...)``, ``--plan`` and the backend's
``options={"plan": PATH}``. Exit codes: 0 ok, 2 usage error, 1 failure (no plan with a DGA site
meets the target: nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .._command import add_config_arguments, config_from_args, console, progress_step, usage_errors
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

__all__ = ["add_parser"]

_ABOUT = ("Measure every attention site of MODEL on calibration text and write the cheapest per-site plan "
          "(\"dense\" or DGA parameters) whose last-half perplexity increase over dense stays within a target.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``calibrate``."""
    p = subparsers.add_parser("calibrate", help=_ABOUT, description=_ABOUT)
    p.add_argument("model", help="Hugging Face causal LM directory, or 'smollm2' / 'gemma3'")
    p.add_argument("--max-increase", type=_increase, required=True, metavar="P%",
                   help="the target: last-half perplexity increase over dense, e.g. 2%% (or 0.02)")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: the Jargon File from Debian's jargon-text)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=3, help="the evaluation windows of `dga-compile eval` (default 3); "
                   "calibration uses the windows between them")
    p.add_argument("-o", "--output", type=Path, default=Path("plan.json"), help="plan file to write (default plan.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p)
    p.set_defaults(handler=_run)
    return p


def _increase(spec: str) -> float:
    try:
        value = float(spec[:-1]) / 100 if spec.endswith("%") else float(spec)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 10.0:
        raise argparse.ArgumentTypeError(f"--max-increase takes a percentage ≥ 0 such as 2% (or a fraction such "
                                         f"as 0.02), got {spec!r}")
    return value


def _run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .calibrate import calibrate
    from .fetch import jargon_text, read_text
    from .run import Evaluation, window_starts, token_ids

    out = console()
    if args.plan:
        raise CLIError("calibrate writes a plan; --plan does not apply (pass the DGA flags of the base config)",
                       EXIT_USAGE)
    if args.seq_len < 2 or args.windows < 1:
        raise CLIError(f"--seq-len must be ≥ 2 and --windows ≥ 1, got {args.seq_len} and {args.windows}", EXIT_USAGE)
    if args.min_seq_len is None:
        args.min_seq_len = 0
    base = config_from_args(args)
    text_path = args.text or jargon_text()
    text = read_text(text_path)
    step = (lambda description: contextlib.nullcontext()) if args.quiet else \
        (lambda description: progress_step(out, description))
    with step(f"Loading {args.model}"), usage_errors():
        loaded = load_model(args.model, seq_len=args.seq_len, tokenizer=True)
    if loaded.task != "causal-lm":
        raise CLIError(f"calibrate needs a causal LM (it measures last-half perplexity); {args.model} is an "
                       f"{loaded.task}", EXIT_USAGE)
    with usage_errors():                         # its own progress bar: the dense reference
        ev = Evaluation(args.model, text, args.seq_len, args.windows, not args.quiet, text_path.name, loaded=loaded,
                        between=True)
    starts = window_starts(len(token_ids(ev.tokenizer, text)), args.seq_len, args.windows, between=True)
    info = {"model": ev.model_path, "text": text_path.name, "seq_len": args.seq_len, "windows": args.windows,
            "calibration_starts": starts}
    cal = calibrate(ev, base, args.max_increase, step, info)
    Console().print(_table(cal, args.model))
    if cal.plan is None:
        raise CLIError(f"no plan with a DGA site meets +{args.max_increase:.1%} on the calibration windows: the least "
                       f"dense one measured {cal.increase:+.2%} at {cal.cost:.1%} of dense cost; raise --max-increase "
                       f"or keep {args.model} dense (nothing written)", EXIT_FAILURE)
    path = cal.plan.save(args.output)
    out.print(f"[green]wrote[/] {path}: last-half perplexity {cal.increase:+.2%} over dense at {cal.cost:.1%} of "
              f"dense attention cost on {len(ev.task.items)} calibration window(s) (target ≤ +{args.max_increase:.1%}); "
              f"{len(cal.tried)} plan(s) measured in {cal.seconds:.0f} s", highlight=False)
    return EXIT_OK


def _table(cal, model: str) -> Table:
    """The plan per site: what it runs, its attention-output error and its measured cost."""
    t = Table(title=f"calibrated plan for {model}: {cal.increase:+.2%} last-half perplexity at {cal.cost:.1%} cost")
    for col in ("site", "runs", "output error", "site cost"):
        t.add_column(col)
    errors, rungs = cal.table.errors(), cal.table.rungs
    measured = {s["layer"]: s for s in cal.sites}
    for site, j in sorted(cal.chosen.items(), key=lambda x: (x[0] is None, x[0] or 0)):
        cost = measured.get(site, {}).get("cost")
        t.add_row(str(site), "dense" if rungs[j] is None else rungs[j].budget(), f"{errors[site][j]:.3f}",
                  "" if cost is None else f"{cost:.1%}")
    return t
