"""What every ``dga-compile`` command shares: the console, the DGA flags, progress bars, and
`run`, which turns a handler's exception into a one-line message and an exit status.

`dga_compile.cli` (``dga-compile``) and `dga_compile.eval.cli` (also ``python -m
dga_compile.eval``) build their parsers with these; nothing here imports either.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from typing import Iterator, Optional, Sequence

from rich.console import Console

from .errors import EXIT_FAILURE, EXIT_USAGE, CLIError

__all__ = ["CONFIG_FLAGS", "add_config_arguments", "config_from_args", "console", "progress_step", "run",
           "usage_errors"]

#: The numeric `DGAConfig` fields that have a flag (``--focus-ratio`` ...) and a ``--config`` key.
CONFIG_FLAGS = ("focus_ratio", "group_size", "num_probe", "window", "group_bias", "min_seq_len", "sinks",
                "expand_mass", "expand_bias", "query_block", "expand_max")

#: Loggers whose chatter (deprecations, the exporter's notes, torch.export's retried-load
#: tracebacks) only ``--debug`` shows.
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export")


def console() -> Console:
    """Progress, reports and errors go to stderr; results (tables) to stdout."""
    return Console(stderr=True)


def run(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parses ``argv`` (usage errors exit with status 2), runs the ``handler`` the parser set
    and returns its status; an exception becomes its first line after ``error:`` (status 1, or
    `CLIError.code`), with the traceback under ``--debug``. dga-compile's own warnings (logger
    ``dga_compile``) print as ``warning:`` lines while the handler runs."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    args = parser.parse_args(argv)
    out = console()
    with _quiet_unless(args.debug), _warnings_to(out):
        try:
            return args.handler(args)
        except Exception as e:
            if args.debug:
                out.print_exception()
            code = e.code if isinstance(e, CLIError) else EXIT_FAILURE
            out.print(f"[bold red]error:[/] {_first_line(e)}", highlight=False, soft_wrap=True)
            return code


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_unless(debug: bool) -> Iterator[None]:
    """Without ``debug``: `_QUIET_LOGGERS` at ERROR and FutureWarnings off, restored afterwards."""
    if debug:
        yield
        return
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _ConsoleHandler(logging.Handler):
    def __init__(self, out: Console):
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.print(f"[yellow]warning:[/] {record.getMessage()}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _warnings_to(out: Console) -> Iterator[None]:
    logger, handler = logging.getLogger("dga_compile"), _ConsoleHandler(out)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def usage_errors(what: str = "") -> Iterator[None]:
    """A `ValueError` / `TypeError` raised inside (a bad flag value) becomes a `CLIError` with
    status 2 (usage error); ``what`` is appended to its message, e.g. ``"(from the DGA flags)"``."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise CLIError(f"{_first_line(e)} {what}".strip(), EXIT_USAGE) from e


# ------------------------------------------------------------------------- the DGA flags

def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """``--focus-ratio`` … ``--expand-max``, ``--dense-layers``, ``--plan``: DGAConfig fields (defaults: DGAConfig's)."""
    g = p.add_argument_group("DGA parameters (default: dga_compile.DGAConfig)")
    g.add_argument("--focus-ratio", type=float, help="γ, fraction of keys kept as focus tokens")
    g.add_argument("--group-size", type=int, help="m, tokens per aggregated group")
    g.add_argument("--num-probe", type=int, help="r, probe queries that score importance")
    g.add_argument("--window", type=int, help="w, local window kept raw (causal sites)")
    g.add_argument("--group-bias", type=float, help="β, group logit bias β·log m")
    g.add_argument("--min-seq-len", type=int, help="below this length attention stays dense")
    g.add_argument("--sinks", type=int, help="s, first positions always kept as focus tokens")
    g.add_argument("--expand-mass", type=float, help="τ, step 5′: expand the groups holding all but 1 − τ of a "
                   "query block's group mass (0: off)")
    g.add_argument("--expand-bias", type=float, help="βe, group logit bias of step 5′'s estimate")
    g.add_argument("--query-block", type=int, help="b, query rows per block of step 5′")
    g.add_argument("--expand-max", type=float, help="step 5′: above this share of groups expanded a block attends "
                   "densely")
    g.add_argument("--dense-layers", metavar="I,J,...", help="attention sites (layers) kept dense, by position in "
                   "model order, e.g. 0,7,18 (`dga-compile eval MODEL --calibrate K` finds the worst)")
    g.add_argument("--plan", metavar="PLAN.json", help="per-site budgets (\"dense\" or parameters) measured by "
                   "`dga-compile calibrate MODEL`; sites it does not name take the flags above")


def config_from_args(args: argparse.Namespace):
    """The `DGAConfig` the flags describe (a bad value is a usage error)."""
    from .config import DGAConfig

    with usage_errors("(from the DGA flags)"):
        changes = {f: getattr(args, f) for f in CONFIG_FLAGS if getattr(args, f) is not None}
        if args.dense_layers:
            changes["dense_layers"] = tuple(int(i) for i in args.dense_layers.split(","))
        if args.plan:
            changes["plan"] = args.plan
        return DGAConfig(**changes)


@contextlib.contextmanager
def progress_step(out: Console, description: str) -> Iterator[None]:
    """A pulsing progress bar with elapsed time for one long step."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=out, transient=False) as bar:
        task = bar.add_task(description, total=None)
        yield
        bar.update(task, total=1, completed=1)
