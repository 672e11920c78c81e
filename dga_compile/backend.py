"""The ``dga`` torch.compile backend: rewrite attention into DGA, then compile with Inductor.

``torch.compile(model, backend="dga")`` works without importing dga_compile (entry point
``torch_dynamo_backends``). Configuration: ``dga_compile.backend(DGAConfig(...))``, or
``torch.compile(model, backend="dga", options={...})``: torch forwards ``options`` to custom
backends; keys that are `DGAConfig` fields configure DGA, the others are Inductor config patches.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Optional

import torch

from .config import DGAConfig
from .passes import RewriteReport, rewrite_graph_module

__all__ = ["backend", "compile", "dga_backend", "last_report"]

_FIELDS = {f.name for f in dataclasses.fields(DGAConfig)}
_last = RewriteReport()


def dga_backend(gm: torch.fx.GraphModule, example_inputs: list, *, config: Optional[DGAConfig] = None,
                options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """Dynamo backend: rewrites ``gm``'s attention sites (torch level), then ``compile_fx``.

    Training works through aot_autograd inside Inductor (the op has a registered autograd).
    The report is logged; printed as a table when ``config.report`` or ``DGA_REPORT=1``;
    `last_report` returns it (all graphs compiled since the last `torch.compile` reset).
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    cfg = config or DGAConfig()
    options = dict(options or {})
    dga_options = {k: options.pop(k) for k in list(options) if k in _FIELDS}
    if dga_options:
        cfg = cfg.replace(**dga_options)
    report = rewrite_graph_module(gm, cfg)
    _last.extend(report)
    if cfg.report or os.environ.get("DGA_REPORT", "0") not in ("", "0"):
        report.print()
    patches = {**(list_mode_options(mode) if mode else {}), **options}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def backend(config: Optional[DGAConfig] = None) -> Callable:
    """A torch.compile backend callable with ``config`` baked in:
    ``torch.compile(model, backend=dga_compile.backend(DGAConfig(focus_ratio=0.2)))``."""
    return functools.partial(dga_backend, config=config)


def compile(model: Any, config: Optional[DGAConfig] = None, **torch_compile_kwargs) -> Any:
    """``torch.compile(model, backend=backend(config), **torch_compile_kwargs)``."""
    return torch.compile(model, backend=backend(config), **torch_compile_kwargs)


def last_report(reset: bool = False) -> RewriteReport:
    """The sites of every graph the backend compiled in this process (``reset=True`` clears it)."""
    out = RewriteReport(list(_last.sites))
    if reset:
        _last.sites.clear()
    return out
