"""`export`: a PyTorch model with DGA sites -> an ONNX file any ONNX Runtime can run.

Each ``torch.ops.dga.attention`` call becomes ONE ``ai.dga::DynamicGroupAttention`` node
(domain version 1); the model carries the op's ONNX function (`_function.function_proto`),
so runtimes without the custom-op library inline the function body.
"""

from __future__ import annotations

import inspect
import logging
import os
import pathlib
from typing import TYPE_CHECKING, Optional, Union

import onnx
import onnx.checker
import torch

from .._files import replacing
from ..ops import OpCall
from ..config import DGAConfig
from ._function import function_proto
from ._schema import DOMAIN, DOMAIN_VERSION, OP_TYPE, node_attributes, register_schema

if TYPE_CHECKING:
    from ..passes import RewriteReport

__all__ = ["export", "prepare", "trace", "dga_nodes", "OPSET"]

log = logging.getLogger("dga_compile.onnx")

#: ONNX (ai.onnx) opset of exported models; the function body imports the same version.
OPSET = 18
_MAX_PROTO_BYTES = 2**31 - 2**26  # beyond this the weights go to an external data file

PathLike = Union[str, os.PathLike]


def trace(model: Union[torch.nn.Module, torch.export.ExportedProgram], args: tuple, kwargs: Optional[dict] = None,
          dynamic: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (an `ExportedProgram` is returned as is). With ``dynamic``
    every input dimension is ``Dim.AUTO``: export keeps a dim symbolic (batch, sequence) unless
    the model pins it."""
    if isinstance(model, torch.export.ExportedProgram):
        return model
    kwargs = _without_kv_cache(model, kwargs)
    auto = lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
    shapes = None
    if dynamic:
        inputs = tuple(args) + tuple((kwargs or {}).values())  # specs in call order
        shapes = torch.utils._pytree.tree_map(auto, inputs, is_leaf=lambda x: isinstance(x, torch.Tensor))
    with torch.no_grad():
        return torch.export.export(model, tuple(args), dict(kwargs or {}), dynamic_shapes=shapes)


def _without_kv_cache(model: torch.nn.Module, kwargs: Optional[dict]) -> Optional[dict]:
    """``kwargs`` plus ``use_cache=False`` for a model that would return a KV cache (a Hugging Face
    model whose config has ``use_cache`` on): a cache object is no ONNX output. Logged."""
    wants_cache = getattr(getattr(model, "config", None), "use_cache", False)
    if not wants_cache or "use_cache" in (kwargs or {}) or "use_cache" not in inspect.signature(model.forward).parameters:
        return kwargs
    log.info("dga: tracing %s with use_cache=False: the ONNX model returns no KV cache (pass use_cache "
             "yourself to override)", type(model).__name__)
    return {**(kwargs or {}), "use_cache": False}


def prepare(model: Union[torch.nn.Module, torch.export.ExportedProgram], args: tuple, kwargs: Optional[dict] = None,
            config: Optional[DGAConfig] = None, dynamic: bool = True) -> tuple[torch.export.ExportedProgram, "RewriteReport"]:
    """`trace`, then rewrite attention sites into DGA (`dga_compile.rewrite`; sites that already
    call DGA keep their parameters). Returns (program, `RewriteReport`)."""
    from ..passes import rewrite

    return rewrite(trace(model, args, kwargs, dynamic), config)


def dga_nodes(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The ``dga.attention`` calls of a program's graph."""
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == torch.ops.dga.attention.default]


def export(model: Union[torch.nn.Module, torch.export.ExportedProgram], args: tuple, path: PathLike,
           config: Optional[DGAConfig] = None, dynamic: bool = True, kwargs: Optional[dict] = None,
           check: bool = True) -> pathlib.Path:
    """Exports ``model`` to ONNX at ``path`` with every DGA site as one ``ai.dga`` node.

    Args:
        model: an `nn.Module` or a `torch.export.ExportedProgram` whose attention calls
            ``torch.ops.dga.attention`` (e.g. via `dga_compile.dynamic_group_attention`).
        args, kwargs: sample inputs (for tracing; their sizes do not matter with ``dynamic``).
        path: output file; written atomically (a temp file renamed into place), overwritten.
        config: `DGAConfig` of the rewrite (`prepare`) that turns attention sites into DGA;
            sites that already call DGA keep their own parameters.
        dynamic: keep batch and sequence dims symbolic (``Dim.AUTO``).
        check: run ``onnx.checker.check_model(full_check=True)`` on the result.

    Returns:
        The path written. The ONNX opset is `OPSET`; the custom domain is ``ai.dga`` version 1.
    """
    program, _ = prepare(model, args, kwargs, config, dynamic)
    _check_no_dropout(program)
    register_schema()
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                                     custom_translation_table={torch.ops.dga.attention.default: _translate})
    proto = with_function(onnx_program.model_proto)
    return _save_atomic(proto, pathlib.Path(path), check)


def _check_no_dropout(program: torch.export.ExportedProgram) -> None:
    """Attention dropout has no ONNX form: a traced ``dropout_p > 0`` means the model was in training mode."""
    for node in dga_nodes(program):
        dropout_p = OpCall.parse(node.args).dropout_p
        if dropout_p:
            raise ValueError(f"cannot export attention site {node.name} with dropout_p={dropout_p}: the model was "
                             f"traced in training mode; call model.eval() before exporting")


def with_function(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Adds the ``DynamicGroupAttention`` function (importing the model's ai.onnx opset) if a node uses it."""
    uses = any(n.domain == DOMAIN and n.op_type == OP_TYPE for n in proto.graph.node)
    have = any(f.domain == DOMAIN and f.name == OP_TYPE for f in proto.functions)
    if uses and not have:
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        proto.functions.append(function_proto(opset))
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return proto


def _translate(*args):
    """Translation of ``dga.attention`` (traced by the exporter; tensor arguments are ONNX IR values)."""
    import onnx_ir as ir
    import onnxscript
    from onnxscript import opset18 as op

    call = OpCall.parse(args)
    attn_mask = call.attn_mask
    if attn_mask is None:
        # no mask: an all-true [1, 1, 1, 1] (the function body takes the mask as a required input)
        mask = op.Reshape(op.Cast(op.Constant(value_ints=[1]), to=onnx.TensorProto.BOOL), op.Constant(value_ints=[1, 1, 1, 1]))
    else:
        mask = attn_mask if attn_mask.dtype == ir.DataType.BOOL else op.Equal(attn_mask, op.CastLike(op.Constant(value_float=0.0), attn_mask))
        rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
        if rank < 4:
            mask = op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - rank))))
    dga = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION), OP_TYPE)
    return dga(call.q, call.k, call.v, mask, **node_attributes(call.config, call.is_causal, call.scale))


def _save_atomic(proto: onnx.ModelProto, path: pathlib.Path, check: bool) -> pathlib.Path:
    """Writes ``proto`` to a temp file beside ``path``, checks the file (by path: models over
    2 GiB keep their weights in ``path.name + ".data"``), and renames it into place
    (`_files.replacing`: the mode of the file it replaces, else the umask's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        external = proto.ByteSize() > _MAX_PROTO_BYTES
        onnx.save_model(proto, tmp, save_as_external_data=external, location=path.name + ".data")
        if check:
            onnx.checker.check_model(tmp, full_check=True)
    return path
