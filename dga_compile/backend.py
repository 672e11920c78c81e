"""The ``dga`` torch.compile backend: rewrite attention into DGA, then compile with Inductor.

``torch.compile(model, backend="dga")`` works without importing dga_compile (entry point
``torch_dynamo_backends``). Configuration: ``dga_compile.backend(DGAConfig(...))``, or
``torch.compile(model, backend="dga", options={...})``: torch forwards ``options`` to custom
backends; keys that are `DGAConfig` fields configure DGA, Inductor config keys are Inductor
patches, and any other key raises `ValueError` at the first call (naming the `DGAConfig` field
it nearly spells: ``"focus_ration"`` -> did you mean ``"focus_ratio"``).
"""

from __future__ import annotations

import dataclasses
import difflib
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

    cfg = _validate_config(config) or DGAConfig()
    dga_options, options = _split_options(options)
    if dga_options:
        cfg = cfg.replace(**dga_options)
    report = rewrite_graph_module(gm, cfg)
    _last.extend(report)
    if cfg.report or os.environ.get("DGA_REPORT", "0") not in ("", "0"):
        report.print()
    patches = {**(list_mode_options(mode) if mode else {}), **options}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _validate_config(config: Any) -> Optional[DGAConfig]:
    if config is not None and not isinstance(config, DGAConfig):
        raise TypeError(f"config must be a DGAConfig or None, got {type(config).__name__} ({config!r}); "
                        f"use DGAConfig(focus_ratio=0.1, ...) or options={{'focus_ratio': 0.1}}")
    return config


def _split_options(options: Optional[dict]) -> tuple[dict, dict]:
    """``options`` -> (`DGAConfig` fields, Inductor config patches); any other key raises."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict, got {type(options).__name__}")
    from torch._inductor import config as inductor_config

    dga, inductor, inductor_keys = {}, {}, None
    for key, value in (options or {}).items():
        if key in _FIELDS:
            dga[key] = value
            continue
        inductor_keys = inductor_keys or set(inductor_config.get_config_copy())
        if key in inductor_keys:
            inductor[key] = value
            continue
        near = difflib.get_close_matches(str(key), sorted(_FIELDS), n=1, cutoff=0.8)
        if near:
            raise ValueError(f"unknown option {key!r} for backend='dga': did you mean {near[0]!r}? "
                             f"(DGAConfig fields: {', '.join(sorted(_FIELDS))})")
        near = difflib.get_close_matches(str(key), sorted(inductor_keys), n=1, cutoff=0.8)
        hint = f"; did you mean the Inductor key {near[0]!r}?" if near else ""
        raise ValueError(f"unknown option {key!r} for backend='dga': neither a DGAConfig field "
                         f"({', '.join(sorted(_FIELDS))}) nor an Inductor config key (torch._inductor.config){hint}")
    return dga, inductor


def backend(config: Optional[DGAConfig] = None) -> Callable:
    """A torch.compile backend callable with ``config`` baked in:
    ``torch.compile(model, backend=dga_compile.backend(DGAConfig(focus_ratio=0.2)))``."""
    return functools.partial(dga_backend, config=_validate_config(config))


def compile(model: Any, config: Optional[DGAConfig] = None, **torch_compile_kwargs) -> Any:
    """``torch.compile(model, backend=backend(config), **torch_compile_kwargs)``."""
    return torch.compile(model, backend=backend(config), **torch_compile_kwargs)


def last_report(reset: bool = False) -> RewriteReport:
    """The sites of every graph the backend compiled in this process (``reset=True`` clears it)."""
    out = RewriteReport(list(_last.sites))
    if reset:
        _last.sites.clear()
    return out
