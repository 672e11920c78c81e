"""``dga-compile``: the command line.

    dga-compile convert MODEL -o OUT.onnx [--focus-ratio ..] [--verify] [--force]
    dga-compile inspect MODEL

MODEL is a torch.export archive (``.pt2``), a Hugging Face model directory (``config.json`` +
safetensors), or, with ``--trust-pickle`` only, a pickled ``nn.Module`` (``.pt``/``.pth``:
unpickling runs code from the file). Exit codes: 0 ok, 2 usage error, 1 failure (one line;
``--debug`` shows the traceback).

Subcommands are registered in `SUBCOMMANDS`: name -> ``"module:function"``, where
``function(subparsers)`` adds the subcommand's parser and sets ``handler=run`` (``run(args) -> int``,
the exit status). Modules are imported only when the CLI starts; ``eval`` comes from
`dga_compile.eval.cli`, ``bench`` can be added the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import pathlib
import logging
import warnings
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.table import Table

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, CLIError

__all__ = ["main", "SUBCOMMANDS", "add_config_arguments", "config_from_args",
           "load_model", "LoadedModel", "progress_step"]

#: Subcommand name -> "module:function"; ``function(subparsers)`` adds the parser, with ``handler``.
SUBCOMMANDS: dict[str, str] = {
    "convert": "dga_compile.cli:add_convert_parser",
    "inspect": "dga_compile.cli:add_inspect_parser",
    "eval": "dga_compile.eval.cli:add_parser",
    "build-ort-op": "dga_compile.onnx.native:add_parser",
    "build-ext": "dga_compile._extension:add_parser",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``dga-compile`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="dga-compile", description="Rewrite attention into Dynamic Group "
                                     "Attention and deploy it (ONNX / ONNX Runtime).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for target in SUBCOMMANDS.values():
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(sub)
    args = parser.parse_args(argv)  # usage errors exit with status 2
    console = _console()
    if not args.debug:  # the exporter's own chatter (torchvision absent, deprecations) is not ours to show
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.handler(args)
    except Exception as e:
        if args.debug:
            console.print_exception()
        code = e.code if isinstance(e, CLIError) else EXIT_FAILURE
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        console.print(f"[bold red]error:[/] {reason}", highlight=False, soft_wrap=True)
        return code


def _console() -> Console:
    """Progress, reports and errors go to stderr; results (tables) to stdout."""
    return Console(stderr=True)


# ------------------------------------------------------------------------- shared helpers

def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--focus-ratio`` … ``--min-seq-len``: DGAConfig fields (defaults: DGAConfig's)."""
    g = p.add_argument_group("DGA parameters (default: dga_compile.DGAConfig)")
    g.add_argument("--focus-ratio", type=float, help="γ, fraction of keys kept as focus tokens")
    g.add_argument("--group-size", type=int, help="m, tokens per aggregated group")
    g.add_argument("--num-probe", type=int, help="r, probe queries that score importance")
    g.add_argument("--window", type=int, help="w, local window kept raw (causal sites)")
    g.add_argument("--group-bias", type=float, help="β, group logit bias β·log m")
    g.add_argument("--min-seq-len", type=int, help="below this length attention stays dense")
    g.add_argument("--dense-layers", metavar="I,J,...", help="attention sites (layers) kept dense, by position in "
                   "model order, e.g. 0,7,18 (`dga-compile eval MODEL --calibrate K` finds the worst)")


def config_from_args(args: argparse.Namespace):
    """The `DGAConfig` the flags describe (a bad value is a usage error)."""
    from .config import DGAConfig

    fields = ("focus_ratio", "group_size", "num_probe", "window", "group_bias", "min_seq_len")
    try:
        changes = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
        if args.dense_layers:
            changes["dense_layers"] = tuple(int(i) for i in args.dense_layers.split(","))
        return DGAConfig(**changes)
    except ValueError as e:
        raise CLIError(f"{e} (from the DGA flags)", EXIT_USAGE) from e


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=pathlib.Path,
                   help="torch.export archive (.pt2), Hugging Face model directory, or pickled nn.Module (.pt)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (.pt/.pth): this RUNS CODE from the file")
    p.add_argument("--input", dest="inputs", action="append", metavar="SHAPE[:DTYPE]",
                   help="sample input, e.g. 2x128:int64 (random 0/1) or 2x128x64 (float32, normal); one per forward "
                        "argument; "
                        "needed for pickles and archives saved without example inputs")
    p.add_argument("--seq-len", type=int, default=64, help="sample sequence length for Hugging Face models")


@contextlib.contextmanager
def progress_step(console: Console, description: str):
    """A pulsing progress bar with elapsed time for one long step."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)
        yield
        bar.update(task, total=1, completed=1)


@dataclasses.dataclass
class LoadedModel:
    """What `load_model` read: a module or exported program and its sample inputs."""

    model: Any            # torch.nn.Module or torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    kind: str             # "pt2" | "huggingface" | "pickle"


def load_model(path: pathlib.Path, trust_pickle: bool = False, inputs: Optional[list[str]] = None,
               seq_len: int = 64) -> LoadedModel:
    """Reads MODEL in any supported format; raises `CLIError` with the reason and the fix."""
    if not path.exists():
        raise CLIError(f"{path}: no such file or directory")
    if path.is_dir():
        return _load_huggingface(path, seq_len)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _load_pt2(path, inputs)
    if suffix in (".pt", ".pth", ".pkl", ".bin"):
        if not trust_pickle:
            raise CLIError(f"refusing to unpickle {path}: loading a pickle executes code stored in the file. "
                           f"Pass --trust-pickle if you trust its source, or save a torch.export archive "
                           f"(torch.export.save(torch.export.export(model, args), 'model.pt2'))", EXIT_USAGE)
        return _load_pickle(path, inputs)
    raise CLIError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected a .pt2 archive, a Hugging "
                   f"Face model directory, or a pickled module (.pt with --trust-pickle)", EXIT_USAGE)


def _unreadable(path: pathlib.Path, what: str, e: BaseException) -> CLIError:
    first = (str(e).strip().splitlines() or [""])[0]
    return CLIError(f"cannot read {path} as {what} (corrupt or truncated?): {type(e).__name__}: {first}")


def _load_pt2(path: pathlib.Path, inputs: Optional[list[str]]) -> LoadedModel:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise _unreadable(path, "a torch.export archive (.pt2)", e) from e
    if inputs:
        return LoadedModel(program, _sample_inputs(inputs), {}, "pt2")
    example = getattr(program, "example_inputs", None)
    if example is None:
        raise CLIError(f"{path} holds no example inputs; give them with --input (e.g. --input 2x128:int64)",
                       EXIT_USAGE)
    args, kwargs = example
    return LoadedModel(program, tuple(args), dict(kwargs), "pt2")


def _load_pickle(path: pathlib.Path, inputs: Optional[list[str]]) -> LoadedModel:
    import torch

    try:
        model = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as e:
        raise _unreadable(path, "a pickled nn.Module", e) from e
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{path} holds a {type(model).__name__}, not an nn.Module; save the module itself "
                       f"(torch.save(model, path)) or a .pt2 archive")
    if not inputs:
        raise CLIError("a pickled module carries no sample inputs: give one --input per forward argument, "
                       "e.g. --input 2x128:int64", EXIT_USAGE)
    return LoadedModel(model.eval(), _sample_inputs(inputs), {}, "pickle")


def _load_huggingface(path: pathlib.Path, seq_len: int) -> LoadedModel:
    if not (path / "config.json").exists():
        raise CLIError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = cls.from_pretrained(str(path), attn_implementation="sdpa", dtype=torch.float32).eval()
    except Exception as e:
        raise _unreadable(path, "a Hugging Face model directory", e) from e
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, seq_len), generator=g)
    return LoadedModel(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "huggingface")


_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def _sample_inputs(specs: list[str]) -> tuple:
    """``"2x128:int64"`` -> a random tensor of that shape (ints in [0, 100), floats normal)."""
    import torch

    out = []
    for spec in specs:
        shape_s, _, dtype_s = spec.partition(":")
        dtype_s = dtype_s or "float32"
        try:
            shape = [int(d) for d in shape_s.lower().split("x")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1 or dtype_s not in _DTYPES:
            raise CLIError(f"--input {spec!r}: expected SHAPE[:DTYPE] such as 2x128:int64, DTYPE one of "
                           f"{', '.join(_DTYPES)}", EXIT_USAGE)
        dtype = getattr(torch, dtype_s)
        g = torch.Generator().manual_seed(len(out))
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, 2, shape, generator=g).to(dtype))  # 0/1: valid token ids and masks
    return tuple(out)


# ------------------------------------------------------------------------- convert

def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``convert``."""
    about = "Convert MODEL to ONNX with every DGA site as one ai.dga::DynamicGroupAttention node."
    p = subparsers.add_parser("convert", help=about, description=about)
    _add_model_arguments(p)
    p.add_argument("-o", "--output", required=True, type=pathlib.Path, metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run ONNX Runtime and PyTorch on the sample inputs and print the error per output")
    p.add_argument("--tolerance", type=float, default=1e-3, help="--verify fails above this max abs error")
    p.add_argument("--static", action="store_true", help="export with static shapes (default: dynamic batch/sequence)")
    add_config_arguments(p)
    p.set_defaults(handler=_convert)
    return p


def _convert(args: argparse.Namespace) -> int:
    console = _console()
    if args.output.exists() and not args.force:
        raise CLIError(f"{args.output} exists; pass --force to overwrite it")
    config = config_from_args(args)
    from . import onnx as dga_onnx
    from .onnx.export import prepare

    with progress_step(console, f"Loading {args.model}"):
        loaded = load_model(args.model, args.trust_pickle, args.inputs, args.seq_len)
    with progress_step(console, "Tracing (torch.export) and rewriting attention into DGA"):
        program, report = prepare(loaded.model, loaded.args, loaded.kwargs, config, dynamic=not args.static)
    report.print(console)
    with progress_step(console, "Exporting to ONNX (dynamo exporter + checker)"):
        dga_onnx.export(program, (), args.output, config)
    sites = _count_dga_nodes(args.output)
    if not sites:
        console.print("[yellow]warning:[/] no attention site became DGA; the ONNX model computes dense attention")
    console.print(f"[green]wrote[/] {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB): {sites} "
                  f"DynamicGroupAttention node(s), domain {dga_onnx.DOMAIN} v{dga_onnx.DOMAIN_VERSION}, "
                  f"ONNX opset {dga_onnx.OPSET}", highlight=False)
    if args.verify:
        return _verify(args, program, loaded, console)
    return EXIT_OK


def _count_dga_nodes(path: pathlib.Path) -> int:
    import onnx

    from .onnx import DOMAIN, OP_TYPE

    proto = onnx.load(str(path), load_external_data=False)
    return sum(n.domain == DOMAIN and n.op_type == OP_TYPE for n in proto.graph.node)


def _verify(args: argparse.Namespace, program, loaded: LoadedModel, console: Console) -> int:
    """ONNX Runtime vs the rewritten program (the function the ONNX file must compute)."""
    import numpy as np
    import torch
    from torch.utils._pytree import tree_flatten

    from .onnx import session

    with progress_step(console, "Verifying: ONNX Runtime vs PyTorch on the sample inputs"):
        with torch.no_grad():
            outputs = program.module()(*loaded.args, **loaded.kwargs)
        want = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
        sess = session(args.output)
        feeds = [t for t in tree_flatten((loaded.args, loaded.kwargs))[0] if isinstance(t, torch.Tensor)]
        names = [i.name for i in sess.get_inputs()]
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, feeds)})
    if len(got) != len(want):
        raise CLIError(f"ONNX model has {len(got)} outputs, PyTorch {len(want)}")
    table = Table(title=f"ONNX Runtime ({sess.dga_impl} DGA) vs PyTorch (rewritten program)")
    for col in ("output", "shape", "max abs error", "mean abs error"):
        table.add_column(col)
    worst = 0.0
    for out, g, w in zip(sess.get_outputs(), got, want):
        w = w.detach().float().numpy()
        if g.shape != w.shape:
            raise CLIError(f"output {out.name}: ONNX shape {g.shape} != PyTorch shape {w.shape}")
        err = np.abs(g.astype(np.float64) - w.astype(np.float64))
        worst = max(worst, float(err.max(initial=0.0)))
        table.add_row(out.name, str(list(g.shape)), f"{err.max(initial=0.0):.3g}", f"{err.mean() if err.size else 0:.3g}")
    Console().print(table)
    if worst > args.tolerance:
        raise CLIError(f"verification failed: max abs error {worst:.3g} > --tolerance {args.tolerance:g}")
    return EXIT_OK


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
    console = _console()
    config = config_from_args(args)
    from .onnx.export import dga_nodes, prepare
    from .ops import OpCall

    with progress_step(console, f"Loading {args.model}"):
        loaded = load_model(args.model, args.trust_pickle, args.inputs, args.seq_len)
    with progress_step(console, "Tracing (torch.export) and rewriting attention into DGA"):
        program, report = prepare(loaded.model, loaded.args, loaded.kwargs, config)
    report.print(Console())
    table = Table(title=f"DGA sites in {args.model}")
    for col in ("node", "q / k / v", "mask", "causal", "γ", "m", "r", "w", "β", "dense below"):
        table.add_column(col)
    sites = dga_nodes(program)
    for n in sites:
        call = OpCall.parse(n.args)
        c = call.config
        shapes = " ".join(str(list(x.meta["val"].shape)) for x in (call.q, call.k, call.v))
        mask_s = "none" if call.attn_mask is None else str(call.attn_mask.meta["val"].dtype).removeprefix("torch.")
        table.add_row(n.name, shapes, mask_s, "yes" if call.is_causal else "no", f"{c.focus_ratio:g}",
                      str(c.group_size), str(c.num_probe), str(c.window), f"{c.group_bias:g}", str(c.min_seq_len))
    Console().print(table)
    console.print(f"{len(sites)} DGA site(s)", highlight=False)
    return EXIT_OK

