"""`convert`, `inspect`, `compare`: what ``dga-compile convert`` / ``inspect`` / ``--verify`` do, as functions.

    from dga_compile import deploy
    from dga_compile.models import load_model

    loaded = load_model("model.pt2")
    done = deploy.convert(loaded, "model.onnx", verify=True)   # VerificationError when ORT disagrees
    print(done.report, done.verification.outputs)
    for site in deploy.inspect(loaded).sites: ...

`convert` checks the output path before any work, and writes the ONNX file (and its external
data, if any) into a hidden folder beside it, moved into place only once it is complete and,
with ``verify``, verified: a failed verification leaves no file behind, and an existing output
stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import tempfile
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional, Union

import torch

from .config import DGAConfig
from .errors import VerificationError

if TYPE_CHECKING:
    from .models import LoadedModel
    from .passes import RewriteReport

__all__ = ["Converted", "DGASite", "Inspection", "OutputError", "Verification", "check_output", "check_tolerance",
           "compare", "convert", "inspect", "reference_module"]

PathLike = Union[str, os.PathLike]
#: A progress callback: ``step(description)`` returns a context manager around one long step.
Step = Callable[[str], ContextManager]


def _no_progress(description: str) -> ContextManager:
    return contextlib.nullcontext()


# ------------------------------------------------------------------------- the output path

def check_output(output: PathLike, source: Optional[PathLike] = None, force: bool = False) -> pathlib.Path:
    """``output`` as a path, after checking that it can be written: not the model ``source``
    itself (also through hard or symbolic links) nor a file of a model directory, whatever
    ``force`` says; not a directory; under a writable directory; absent unless ``force``."""
    out = pathlib.Path(output)
    if source is not None and out.exists() and pathlib.Path(source).exists():
        src = pathlib.Path(source)
        if os.path.samefile(out, src):
            other = out.with_suffix(".onnx") if out.suffix != ".onnx" else out.with_name("model.onnx")
            raise ValueError(f"the output {out} is the model {src} itself (the same file); write the ONNX file "
                             f"elsewhere, e.g. -o {other}")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise ValueError(f"the output {out} is a file of the model directory {src}; write the ONNX file elsewhere")
    if out.is_dir():
        raise IsADirectoryError(f"the output {out} is a directory; name the ONNX file, e.g. {out / 'model.onnx'}")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: the directory {parent} is not writable")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force (force=True) to overwrite it")
    return out


# ------------------------------------------------------------------------- verification

def check_tolerance(tolerance: float) -> float:
    """``tolerance`` as a float; `ValueError` unless it is a finite number ≥ 0."""
    ok = isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool)
    if not (ok and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"the tolerance (--tolerance) must be a finite number ≥ 0, got {tolerance!r}; use e.g. 1e-3")
    return float(tolerance)


@dataclasses.dataclass(frozen=True)
class OutputError:
    """The absolute error of one output (NaN when either side has a NaN there)."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float


@dataclasses.dataclass(frozen=True)
class Verification:
    """ONNX Runtime (``impl``: ``"native"`` or ``"function"``) vs `reference_module` on the sample inputs."""

    impl: str
    tolerance: float
    outputs: tuple[OutputError, ...]

    @property
    def failure(self) -> Optional[str]:
        """Why it failed, or None: a non-finite error (NaN anywhere) or one above ``tolerance``."""
        for o in self.outputs:
            if not math.isfinite(o.max_abs):
                return (f"output {o.name}: the error is {o.max_abs} (a NaN or infinity in ONNX Runtime's or "
                        f"PyTorch's result)")
        worst = max((o.max_abs for o in self.outputs), default=0.0)
        if worst > self.tolerance:
            return f"max abs error {worst:.3g} > tolerance {self.tolerance:g}"
        return None


def reference_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``program`` as an eager module whose DGA sites run the spec, `reference_attention`
    (``impl="reference"``), not the C++ kernel the native ONNX Runtime op shares."""
    from .ops import OpCall

    module = program.module()
    for n in module.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.dga.attention.default:
            call = OpCall.parse(n.args)
            n.args = call._replace(config=call.config.replace(impl="reference")).args()
    module.recompile()
    return module


def compare(program: torch.export.ExportedProgram, path: PathLike, args: tuple, kwargs: Optional[dict] = None,
            tolerance: float = 1e-3, native: bool = True) -> Verification:
    """Runs the ONNX file ``path`` in ONNX Runtime (`dga_compile.onnx.session`) and
    `reference_module` of ``program`` on the same inputs; the error of each output. Raises
    `VerificationError` when the outputs differ in number or shape."""
    import numpy as np
    from torch.utils._pytree import tree_flatten

    from .onnx import session

    tolerance = check_tolerance(tolerance)
    kwargs = dict(kwargs or {})
    with torch.no_grad():
        outputs = reference_module(program)(*args, **kwargs)
    want = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
    sess = session(path, native=native)
    feeds = [t for t in tree_flatten((tuple(args), kwargs))[0] if isinstance(t, torch.Tensor)]
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), feeds)})
    if len(got) != len(want):
        raise VerificationError(f"the ONNX model has {len(got)} outputs, PyTorch {len(want)}", None)
    errors = []
    for out, g, w in zip(sess.get_outputs(), got, want):
        w = w.detach().float().numpy()
        if g.shape != w.shape:
            raise VerificationError(f"output {out.name}: ONNX shape {g.shape} != PyTorch shape {w.shape}", None)
        g, w = g.astype(np.float64), w.astype(np.float64)
        err = np.where(g == w, 0.0, np.abs(g - w))  # equal infinities agree; a NaN on either side stays NaN
        errors.append(OutputError(out.name, tuple(g.shape), float(err.max(initial=0.0)),
                                  float(err.mean()) if err.size else 0.0))
    return Verification(sess.dga_impl, tolerance, tuple(errors))


# ------------------------------------------------------------------------- convert, inspect

@dataclasses.dataclass
class Converted:
    """What `convert` wrote: the file, the rewritten program and its report, the number of
    ``ai.dga`` nodes, and (with ``verify``) the passed `Verification`."""

    path: pathlib.Path
    program: torch.export.ExportedProgram
    report: "RewriteReport"
    dga_nodes: int
    verification: Optional[Verification]


def convert(loaded: "LoadedModel", output: PathLike, config: Optional[DGAConfig] = None, *, dynamic: bool = True,
            force: bool = False, verify: bool = False, tolerance: float = 1e-3, native: bool = True,
            step: Step = _no_progress, on_report: Optional[Callable[["RewriteReport"], Any]] = None) -> Converted:
    """Traces ``loaded`` (`dga_compile.models.load_model`), rewrites its attention into DGA and
    exports it to ONNX at ``output`` (`check_output` first: ``force`` to overwrite). With
    ``verify``, `compare` runs before the file is moved into place; above ``tolerance`` (or on
    any NaN) it raises `VerificationError` and writes nothing. ``step`` reports progress;
    ``on_report`` gets the rewrite report as soon as it is known, before the export."""
    from . import onnx as dga_onnx
    from .onnx.export import prepare

    out = check_output(output, loaded.path, force)
    if verify:
        check_tolerance(tolerance)
    with step("Tracing (torch.export) and rewriting attention into DGA"):
        program, report = prepare(loaded.model, loaded.args, loaded.kwargs, config, dynamic=dynamic)
    if on_report is not None:
        on_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as stage:
        staged = pathlib.Path(stage) / out.name
        with step("Exporting to ONNX (dynamo exporter + checker)"):
            dga_onnx.export(program, (), staged, config)
        verification = None
        if verify:
            with step("Verifying: ONNX Runtime vs PyTorch with the reference DGA, on the sample inputs"):
                verification = compare(program, staged, loaded.args, loaded.kwargs, tolerance, native)
            if verification.failure:
                raise VerificationError(f"verification failed: {verification.failure}; {out} was not written",
                                        verification)
        nodes = _count_dga_nodes(staged)
        check_output(out, loaded.path, force)  # nothing appeared there meanwhile
        for f in pathlib.Path(stage).iterdir():
            os.replace(f, out.parent / f.name)
    return Converted(out, program, report, nodes, verification)


def _count_dga_nodes(path: pathlib.Path) -> int:
    import onnx

    from .onnx import DOMAIN, OP_TYPE

    proto = onnx.load(str(path), load_external_data=False)
    return sum(n.domain == DOMAIN and n.op_type == OP_TYPE for n in proto.graph.node)


@dataclasses.dataclass(frozen=True)
class DGASite:
    """One ``dga.attention`` call of a rewritten program: its graph node, q/k/v shapes, the
    mask's dtype (None without a mask), causality and DGA parameters."""

    node: str
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    mask: Optional[str]
    is_causal: bool
    config: DGAConfig


@dataclasses.dataclass
class Inspection:
    """What `inspect` found: the rewritten program, its report and its DGA sites."""

    program: torch.export.ExportedProgram
    report: "RewriteReport"
    sites: list[DGASite]


def inspect(loaded: "LoadedModel", config: Optional[DGAConfig] = None, *, dynamic: bool = True,
            step: Step = _no_progress) -> Inspection:
    """Traces ``loaded`` and rewrites its attention into DGA, without exporting."""
    from .onnx.export import dga_nodes, prepare
    from .ops import OpCall

    with step("Tracing (torch.export) and rewriting attention into DGA"):
        program, report = prepare(loaded.model, loaded.args, loaded.kwargs, config, dynamic=dynamic)
    sites = []
    for n in dga_nodes(program):
        call = OpCall.parse(n.args)
        shape: Callable[[Any], tuple] = lambda x: tuple(x.meta["val"].shape)
        mask = None if call.attn_mask is None else str(call.attn_mask.meta["val"].dtype).removeprefix("torch.")
        sites.append(DGASite(n.name, shape(call.q), shape(call.k), shape(call.v), mask, bool(call.is_causal),
                             call.config))
    return Inspection(program, report, sites)
