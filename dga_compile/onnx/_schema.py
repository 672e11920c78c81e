"""The ``ai.dga::DynamicGroupAttention`` contract, shared by the exporter, the function body
and the ONNX Runtime custom op (``native.py``).

The node's attributes are derived, never listed by hand: one per numeric field of
`dga_compile.config.OP_FIELDS` (its `DGAConfig` default is the attribute's default), then the
call's ``is_causal`` and ``scale`` (`dga_compile.ops.OpCall` fields). A new numeric op field
thus reaches the schema, the function body's signature and `node_attributes` unedited (the
C++ kernel reads attributes by name: csrc/ort/dga_op.cc).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Union

import onnx
import onnx.defs

from ..config import OP_FIELDS, DGAConfig
from ..ops import OpCall

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OP_TYPE", "ATTRIBUTES", "Attribute", "node_attributes", "register_schema"]

DOMAIN = "ai.dga"
DOMAIN_VERSION = 1
OP_TYPE = "DynamicGroupAttention"


class Attribute(NamedTuple):
    """One node attribute: ``type`` is float (ONNX FLOAT) or int (ONNX INT; bools as 0/1);
    ``default`` is None for a required attribute."""

    name: str
    type: type
    default: Optional[Union[float, int]]

    @property
    def onnx_type(self) -> int:
        return onnx.AttributeProto.FLOAT if self.type is float else onnx.AttributeProto.INT


#: Op fields that select how the op runs, not what it computes: no attribute.
_NOT_ATTRIBUTES = {"impl"}
#: `OpCall` fields carried as attributes: (type, default); SDPA's is_causal=False, scale required.
_CALL_ATTRIBUTES = {"is_causal": (int, 0), "scale": (float, None)}


def _attributes() -> tuple[Attribute, ...]:
    defaults = {f.name: f.default for f in dataclasses.fields(DGAConfig)}
    out = []
    for name in OP_FIELDS:
        if name in _NOT_ATTRIBUTES:
            continue
        default = defaults[name]
        kind = int if isinstance(default, bool) else type(default)
        if kind not in (float, int):
            raise TypeError(f"DGAConfig.{name} (default {default!r}) has no ONNX attribute type: map its type in "
                            f"dga_compile/onnx/_schema.py or list it in _NOT_ATTRIBUTES")
        out.append(Attribute(name, kind, kind(default)))
    missing = set(_CALL_ATTRIBUTES) - set(OpCall._fields)
    if missing:
        raise TypeError(f"OpCall has no field {sorted(missing)}: update _CALL_ATTRIBUTES in dga_compile/onnx/_schema.py")
    return tuple(out) + tuple(Attribute(name, *spec) for name, spec in _CALL_ATTRIBUTES.items())


#: The node's attributes in order. Semantics: `dga_compile.reference.reference_attention`.
ATTRIBUTES = _attributes()


def node_attributes(config: DGAConfig, is_causal: bool, scale: float) -> dict:
    """The node's attribute values for one site: {name: float or int}."""
    values = {"is_causal": is_causal, "scale": scale}
    return {a.name: a.type(values[a.name] if a.name in values else getattr(config, a.name)) for a in ATTRIBUTES}


def register_schema() -> None:
    """Registers the op's schema with `onnx.defs` (the exporter and the checker look it up). Idempotent."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    S = onnx.defs.OpSchema
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    attr_types = {float: S.AttrType.FLOAT, int: S.AttrType.INT}
    attributes = [S.Attribute(a.name, attr_types[a.type], required=True) if a.default is None
                  else S.Attribute(a.name, onnx.helper.make_attribute(a.name, a.default)) for a in ATTRIBUTES]
    onnx.defs.register_schema(S(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        "Dynamic Group Attention (dga-compile, docs/dga.md): q [B,Hq,N,D], k [B,Hkv,N,D], v [B,Hkv,N,Dv], "
        "optional bool attn_mask (True = may attend) broadcastable to [B,Hq,Nq,Nk] -> [B,Hq,Nq,Dv].",
        inputs=[S.FormalParameter("q", "T"), S.FormalParameter("k", "T"), S.FormalParameter("v", "T"),
                S.FormalParameter("attn_mask", "tensor(bool)", param_option=S.FormalParameterOption.Optional)],
        outputs=[S.FormalParameter("out", "T")],
        type_constraints=[("T", types, "float tensors")],
        attributes=attributes))
