"""ONNX export and ONNX Runtime: the ai.dga function body and the exported models vs PyTorch."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import dga_compile.onnx as dga_onnx
from dga_compile import DGAConfig, reference_attention
from dga_compile.onnx._function import function_proto
from dga_compile.onnx._schema import node_attributes

from _onnx_models import CONFIG, TinyBert, TinyLlama, bert_inputs, llama_inputs

ATOL, RTOL = 3e-5, 1e-4


def _op_model(cfg: DGAConfig, is_causal: bool, scale: float) -> onnx.ModelProto:
    """One DynamicGroupAttention node with symbolic shapes (B, H, N, D all dynamic)."""
    node = helper.make_node(dga_onnx.OP_TYPE, ["q", "k", "v", "mask"], ["out"], domain=dga_onnx.DOMAIN,
                            **node_attributes(cfg, is_causal, scale))
    sym = lambda *d: list(d)
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, sym("B", "Hq", "Nq", "D")),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, sym("B", "Hkv", "Nk", "D")),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, sym("B", "Hkv", "Nk", "Dv")),
              helper.make_tensor_value_info("mask", TensorProto.BOOL, sym("Bm", "Hm", "Nm", "Nkm"))]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, sym("B", "Hq", "Nq", "Dv"))
    model = helper.make_model(helper.make_graph([node], "dga", inputs, [out]), functions=[function_proto(dga_onnx.OPSET)],
                              opset_imports=[helper.make_opsetid("", dga_onnx.OPSET),
                                             helper.make_opsetid(dga_onnx.DOMAIN, dga_onnx.DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(sess, q, k, v, mask):
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
            "mask": (torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask).numpy()}
    return torch.from_numpy(sess.run(None, feed)[0])


def _session(model: onnx.ModelProto, native: bool = False):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    lib = dga_onnx.native_library() if native else None
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _qkv(b, hq, hkv, nq, nk, d=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=g), torch.randn(b, hkv, nk, d, generator=g),
            torch.randn(b, hkv, nk, dv, generator=g))


def _mask(kind: str, b: int, hq: int, n: int):
    """None, or a bool mask (True = attend) of the named kind."""
    if kind == "none":
        return None
    if kind == "pad":
        m = torch.ones(b, 1, 1, n, dtype=torch.bool)
        m[0, ..., : n // 4] = False
        return m
    if kind == "tril":  # causality spelled as a mask: the window rule applies (our reading)
        return torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(b, 1, n, n).contiguous()
    g = torch.Generator().manual_seed(1)  # per-head random mask with the diagonal kept
    return (torch.rand(b, hq, n, n, generator=g) > 0.3) | torch.eye(n, dtype=torch.bool)


CASES = [  # (id, Hq, Hkv, is_causal, mask kind)
    ("Hq4-Hkv2-causal", 4, 2, True, "none"),
    ("Hq2-Hkv2-pad", 2, 2, False, "pad"),
    ("Hq4-Hkv2-causal-pad", 4, 2, True, "pad"),
    ("Hq2-Hkv1-tril-mask", 2, 1, False, "tril"),
    ("Hq3-Hkv3-per-head-mask", 3, 3, False, "random"),
]


@pytest.mark.parametrize("hq,hkv,causal,kind", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_function_body_matches_reference_at_two_lengths(hq, hkv, causal, kind):
    """One ONNX model (dynamic N) at two lengths, both long enough for DGA, vs the reference."""
    cfg = CONFIG
    sess = _session(_op_model(cfg, causal, 0.3))
    for n in (37, 150):
        q, k, v = _qkv(2, hq, hkv, n, n)
        mask = _mask(kind, 2, hq, n)
        ref = reference_attention(q, k, v, mask, causal, 0.3, cfg)
        torch.testing.assert_close(_run(sess, q, k, v, mask), ref, atol=ATOL, rtol=RTOL)


def test_dga_differs_from_dense_at_test_config():
    """The configs above really exercise DGA (otherwise the comparisons could not fail)."""
    q, k, v = _qkv(1, 2, 2, 150, 150)
    dga = reference_attention(q, k, v, None, True, 0.3, CONFIG)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert (dga - dense).abs().max() > 1e-2


@pytest.mark.parametrize("change,nq,nk", [
    pytest.param(dict(focus_ratio=1.0), 90, 90, id="gamma1"),
    pytest.param(dict(group_size=1), 90, 90, id="m1"),
    pytest.param(dict(min_seq_len=100), 90, 90, id="short-N"),
    pytest.param({}, 5, 90, id="Nq5-Nk90-cross"),
])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_cases_equal_sdpa(change, nq, nk, causal):
    cfg = CONFIG.replace(**change)
    q, k, v = _qkv(2, 4, 2, nq, nk)
    mask = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    mask[1, ..., :7] = False
    out = _run(_session(_op_model(cfg, causal, 0.25)), q, k, v, mask)
    vis = mask & torch.ones(nq, nk, dtype=torch.bool).tril() if causal else mask
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=RTOL)


def test_focus_ties_go_to_smaller_positions():
    """Identical keys tie every score: the focus set must be the first n_f positions, as in the reference."""
    q, _, v = _qkv(1, 2, 1, 64, 64)
    k = torch.ones(1, 1, 64, 16)
    cfg = CONFIG.replace(window=0)
    out = _run(_session(_op_model(cfg, True, 0.3)), q, k, v, None)
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.3, cfg), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- exported models

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, path, inputs fn) for the tiny Llama-like and BERT-like models, exported once each."""
    torch.manual_seed(0)
    out = {}
    for name, model, inputs in (("llama", TinyLlama(), llama_inputs), ("bert", TinyBert(), bert_inputs)):
        path = dga_onnx.export(model.eval(), inputs(2, 24), tmp_path_factory.mktemp(name) / f"{name}.onnx")
        out[name] = (model, path, inputs)
    return out


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_structure(exported, name):
    _, path, _ = exported[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    nodes = [n for n in proto.graph.node if n.domain == dga_onnx.DOMAIN]
    assert len(nodes) == 2 and all(n.op_type == dga_onnx.OP_TYPE for n in nodes)
    assert {a.name for a in nodes[0].attribute} == set(node_attributes(CONFIG, False, 1.0))
    assert [(f.domain, f.name) for f in proto.functions if f.domain == dga_onnx.DOMAIN] == [(dga_onnx.DOMAIN, dga_onnx.OP_TYPE)]
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[dga_onnx.DOMAIN] == dga_onnx.DOMAIN_VERSION and opsets[""] == dga_onnx.OPSET
    seq_dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
    assert seq_dim.dim_param and not seq_dim.HasField("dim_value"), "sequence length must be dynamic"


def _compare_model(model, sess, inputs, n):
    args = inputs(2, n, seed=n)
    with torch.no_grad():
        want = model(*args)
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_function_body_matches_pytorch(exported, name):
    """ORT inlining the function body vs the eager model, at two lengths (DGA) and one short (dense)."""
    model, path, inputs = exported[name]
    sess = dga_onnx.session(path, native=False)
    assert sess.dga_impl == "function"
    for n in (20, 70, 9):
        _compare_model(model, sess, inputs, n)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_native_op_matches_pytorch(exported, name):
    if dga_onnx.native_library() is None:
        pytest.skip("native ai.dga library not built (dga_compile.onnx.native)")
    model, path, inputs = exported[name]
    sess = dga_onnx.session(path)
    assert sess.dga_impl == "native"
    for n in (20, 70):
        _compare_model(model, sess, inputs, n)


def test_native_op_matches_reference():
    if dga_onnx.native_library() is None:
        pytest.skip("native ai.dga library not built (dga_compile.onnx.native)")
    sess = _session(_op_model(CONFIG, True, 0.3), native=True)
    for n in (37, 150):
        q, k, v = _qkv(2, 4, 2, n, n)
        torch.testing.assert_close(_run(sess, q, k, v, None), reference_attention(q, k, v, None, True, 0.3, CONFIG),
                                   atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("missing", ["module", "library"])
def test_missing_native_library_falls_back_to_function(exported, monkeypatch, missing):
    if missing == "module":
        monkeypatch.setitem(sys.modules, "dga_compile.onnx.native", None)  # import fails
    else:
        fake = type(sys)("dga_compile.onnx.native")
        fake.library_path = lambda: None
        monkeypatch.setitem(sys.modules, "dga_compile.onnx.native", fake)
    assert dga_onnx.native_library() is None
    model, path, inputs = exported["llama"]
    sess = dga_onnx.session(path)
    assert sess.dga_impl == "function"
    _compare_model(model, sess, inputs, 20)
