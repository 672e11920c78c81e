"""The ``ai.dga::DynamicGroupAttention`` contract, shared by the exporter, the function body
and the ONNX Runtime custom op (``native.py``)."""

from __future__ import annotations

import onnx
import onnx.defs

from ..config import DGAConfig

__all__ = ["DOMAIN", "DOMAIN_VERSION", "OP_TYPE", "ATTRIBUTES", "node_attributes", "register_schema"]

DOMAIN = "ai.dga"
DOMAIN_VERSION = 1
OP_TYPE = "DynamicGroupAttention"

#: Attribute name -> ONNX attribute type. Semantics: `dga_compile.reference.reference_attention`.
ATTRIBUTES = {
    "focus_ratio": onnx.AttributeProto.FLOAT,
    "group_size": onnx.AttributeProto.INT,
    "num_probe": onnx.AttributeProto.INT,
    "window": onnx.AttributeProto.INT,
    "group_bias": onnx.AttributeProto.FLOAT,
    "min_seq_len": onnx.AttributeProto.INT,
    "is_causal": onnx.AttributeProto.INT,
    "scale": onnx.AttributeProto.FLOAT,
}


def node_attributes(config: DGAConfig, is_causal: bool, scale: float) -> dict:
    """The node's attribute values for one site."""
    return dict(focus_ratio=float(config.focus_ratio), group_size=int(config.group_size),
                num_probe=int(config.num_probe), window=int(config.window), group_bias=float(config.group_bias),
                min_seq_len=int(config.min_seq_len), is_causal=int(bool(is_causal)), scale=float(scale))


def register_schema() -> None:
    """Registers the op's schema with `onnx.defs` (the exporter and the checker look it up). Idempotent."""
    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    S = onnx.defs.OpSchema
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    attr_types = {onnx.AttributeProto.FLOAT: S.AttrType.FLOAT, onnx.AttributeProto.INT: S.AttrType.INT}
    onnx.defs.register_schema(S(
        OP_TYPE, DOMAIN, DOMAIN_VERSION,
        "Dynamic Group Attention (dga-compile, docs/dga.md): q [B,Hq,N,D], k [B,Hkv,N,D], v [B,Hkv,N,Dv], "
        "optional bool attn_mask (True = may attend) broadcastable to [B,Hq,Nq,Nk] -> [B,Hq,Nq,Dv].",
        inputs=[S.FormalParameter("q", "T"), S.FormalParameter("k", "T"), S.FormalParameter("v", "T"),
                S.FormalParameter("attn_mask", "tensor(bool)", param_option=S.FormalParameterOption.Optional)],
        outputs=[S.FormalParameter("out", "T")],
        type_constraints=[("T", types, "float tensors")],
        attributes=[S.Attribute(name, attr_types[t], required=True) for name, t in ATTRIBUTES.items()]))
