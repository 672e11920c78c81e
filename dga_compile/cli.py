"""``dga-compile``: the command line, a thin adapter over `dga_compile.models` and `dga_compile.deploy`.

    dga-compile convert MODEL -o OUT.onnx [--focus-ratio ..] [--verify] [--force]
    dga-compile inspect MODEL
    dga-compile calibrate MODEL --max-increase 2% -o plan.json

MODEL is a torch.export archive (``.pt2``), a Hugging Face model directory (``config.json`` +
safetensors) or alias (``smollm2``, ``minilm``), or, with ``--trust-pickle`` only, a pickled
``nn.Module`` (``.pt``/``.pth``: unpickling runs code from the file). Exit codes: 0 ok, 2 usage
error, 1 failure (one line; ``--debug`` shows the traceback).

Subcommands are registered in `SUBCOMMANDS`: name -> ``"module:function"``, where
``function(subparsers)`` adds the subcommand's parser and sets ``handler=run`` (``run(args) -> int``,
the exit status). Modules are imported only when the CLI starts; ``eval`` comes from
`dga_compile.eval.cli`, ``bench`` can be added the same way. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional, Sequence

from rich.console import Console
from rich.table import Table

from ._command import CONFIG_FLAGS, add_config_arguments, config_from_args, console, progress_step, run, usage_errors
from .errors import EXIT_OK, VerificationError

__all__ = ["main", "SUBCOMMANDS"]

#: Subcommand name -> "module:function"; ``function(subparsers)`` adds the parser, with ``handler``.
SUBCOMMANDS: dict[str, str] = {
    "convert": "dga_compile.cli:add_convert_parser",
    "inspect": "dga_compile.cli:add_inspect_parser",
    "eval": "dga_compile.eval.cli:add_parser",
    "calibrate": "dga_compile.eval.plan_cli:add_parser",
    "build-ort-op": "dga_compile.onnx.native:add_parser",
    "build-ext": "dga_compile._extension:add_parser",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dga-compile`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dga-compile", description="Rewrite attention into Dynamic Group "
                                     "Attention and deploy it (ONNX / ONNX Runtime).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for target in SUBCOMMANDS.values():
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(sub)
    return run(parser, argv)


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="torch.export archive (.pt2), Hugging Face model directory or "
                   "alias (smollm2, minilm), or pickled nn.Module (.pt, with --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow what runs code from the file: a pickled nn.Module (.pt/.pth), or an archive whose "
                        "example inputs or weights need a full unpickler")
    p.add_argument("--input", dest="inputs", action="append", metavar="SHAPE[:DTYPE]",
                   help="sample input, e.g. 2x128:int64 (random 0/1) or 2x128x64 (float32, normal); one per forward "
                        "argument; needed for pickles and archives saved without example inputs, checked against "
                        "an archive's input shapes")
    p.add_argument("--seq-len", type=int, help="sample sequence length for Hugging Face models (default 64)")


def _load(args: argparse.Namespace, out: Console):
    """`load_model` on the model flags (a bad value or a refused file is a usage error)."""
    from .models import load_model

    with progress_step(out, f"Loading {args.model}"), usage_errors():
        return load_model(args.model, trust_pickle=args.trust_pickle, inputs=args.inputs, seq_len=args.seq_len)


def _step(out: Console):
    return lambda description: progress_step(out, description)


def _warn_kept_parameters(args: argparse.Namespace, out: Console, dga_sites: int, rewritten: int) -> None:
    """DGA flags do not change sites that called DGA before the rewrite: say so when flags were given."""
    given = [f for f in CONFIG_FLAGS if getattr(args, f) is not None] + \
        [f for f in ("dense_layers", "plan") if getattr(args, f)]
    if given and dga_sites > rewritten:
        out.print(f"[yellow]warning:[/] {dga_sites - rewritten} site(s) of {args.model} already called DGA and keep "
                  f"their own parameters; the DGA flags ({', '.join(given)}) apply to the sites rewritten now",
                  highlight=False)


# ------------------------------------------------------------------------- convert

def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``convert``."""
    about = "Convert MODEL to ONNX with every DGA site as one ai.dga::DynamicGroupAttention node."
    p = subparsers.add_parser("convert", help=about, description=about)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--verify", action="store_true",
                   help="before writing OUT, run ONNX Runtime and PyTorch (DGA sites on the reference "
                        "implementation) on the sample inputs and print the error per output")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="--verify fails above this max abs error (and on any NaN); default 1e-3")
    p.add_argument("--static", action="store_true", help="export with static shapes (default: dynamic batch/sequence)")
    add_config_arguments(p)
    p.set_defaults(handler=_convert)
    return p


def _convert(args: argparse.Namespace) -> int:
    from . import deploy
    from . import onnx as dga_onnx

    out = console()
    config = config_from_args(args)
    with usage_errors():
        deploy.check_tolerance(args.tolerance)
        deploy.check_output(args.output, args.model, args.force)
    loaded = _load(args, out)
    try:
        done = deploy.convert(loaded, args.output, config, dynamic=not args.static, force=args.force,
                              verify=args.verify, tolerance=args.tolerance, step=_step(out),
                              on_report=lambda report: report.print(out))
    except VerificationError as e:
        if e.verification is not None:
            Console().print(_verification_table(e.verification))
        raise
    _warn_kept_parameters(args, out, done.dga_nodes, done.report.num_rewritten)
    if not done.dga_nodes:
        out.print("[yellow]warning:[/] no attention site became DGA; the ONNX model computes dense attention")
    out.print(f"[green]wrote[/] {done.path} ({done.path.stat().st_size / 2**20:.1f} MiB): {done.dga_nodes} "
              f"DynamicGroupAttention node(s), domain {dga_onnx.DOMAIN} v{dga_onnx.DOMAIN_VERSION}, "
              f"ONNX opset {dga_onnx.OPSET}", highlight=False)
    if done.verification is not None:
        Console().print(_verification_table(done.verification))
    return EXIT_OK


def _verification_table(v) -> Table:
    table = Table(title=f"ONNX Runtime ({v.impl} DGA) vs PyTorch (rewritten program, reference DGA)")
    for col in ("output", "shape", "max abs error", "mean abs error"):
        table.add_column(col)
    for o in v.outputs:
        table.add_row(o.name, str(list(o.shape)), f"{o.max_abs:.3g}", f"{o.mean_abs:.3g}")
    return table


# ------------------------------------------------------------------------- inspect

def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``inspect``."""
    about = "Report the attention sites of MODEL (rewrite decisions, shapes, masks, DGA parameters) without converting."
    p = subparsers.add_parser("inspect", help=about, description=about)
    _add_model_arguments(p)
    add_config_arguments(p)
    p.set_defaults(handler=_inspect)
    return p


def _inspect(args: argparse.Namespace) -> int:
    from . import deploy

    out = console()
    config = config_from_args(args)
    found = deploy.inspect(_load(args, out), config, step=_step(out))
    found.report.print(Console())
    _warn_kept_parameters(args, out, len(found.sites), found.report.num_rewritten)
    table = Table(title=f"DGA sites in {args.model}")
    for col in ("node", "q / k / v", "mask", "causal", "γ", "m", "r", "w", "β", "dense below"):
        table.add_column(col)
    for s in found.sites:
        c = s.config
        shapes = " ".join(str(list(x)) for x in (s.q_shape, s.k_shape, s.v_shape))
        table.add_row(s.node, shapes, s.mask or "none", "yes" if s.is_causal else "no", f"{c.focus_ratio:g}",
                      str(c.group_size), str(c.num_probe), str(c.window), f"{c.group_bias:g}", str(c.min_seq_len))
    Console().print(table)
    out.print(f"{len(found.sites)} DGA site(s)", highlight=False)
    return EXIT_OK
