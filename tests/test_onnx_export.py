"""ONNX export and ONNX Runtime: the ai.dga function body and the exported models vs the reference."""

from __future__ import annotations

import dataclasses
import sys

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import dga_compile.onnx as dga_onnx
from dga_compile import DGAConfig, reference_attention
from dga_compile.config import OP_FIELDS
from dga_compile.onnx._function import function_proto
from dga_compile.onnx._schema import ATTRIBUTES, node_attributes, register_schema

from _onnx_models import (CONFIG, ORT_LEVELS, TinyBert, TinyLlama, bert_inputs, llama_inputs, op_feeds, op_model,
                          op_session, qkv, reference_twin, run_isolated, run_op)

ATOL, RTOL = 3e-5, 1e-4
#: Every ORT optimisation level; `make test` runs BASIC (the first that folds) and ALL, the rest are slow.
LEVELS = [level if level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_ALL") else pytest.param(level, marks=pytest.mark.slow)
          for level in ORT_LEVELS]


def _mask(kind: str, b: int, hq: int, n: int):
    """None, or a bool mask (True = attend) of the named kind."""
    if kind == "none":
        return None
    if kind == "pad":
        m = torch.ones(b, 1, 1, n, dtype=torch.bool)
        m[0, ..., : n // 4] = False
        return m
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "tril":  # causality spelled as a mask: the window rule applies (our reading)
        return tril[None, None].expand(b, 1, n, n).contiguous()
    if kind == "tril-pad":  # HF's padded causal mask: keys ∧ causal (the positional path)
        return tril[None, None] & _mask("pad", b, hq, n)
    if kind == "band":  # sliding window of 20 keys: a general mask (the mask-reading path)
        return (tril & ~torch.ones(n, n, dtype=torch.bool).tril(-20))[None, None].expand(b, 1, n, n).contiguous()
    g = torch.Generator().manual_seed(1)  # per-head random mask with the diagonal kept
    return (torch.rand(b, hq, n, n, generator=g) > 0.3) | torch.eye(n, dtype=torch.bool)


CASES = [  # (id, Hq, Hkv, is_causal, mask kind)
    ("Hq4-Hkv2-causal", 4, 2, True, "none"),
    ("Hq2-Hkv2-pad", 2, 2, False, "pad"),
    ("Hq4-Hkv2-causal-pad", 4, 2, True, "pad"),
    ("Hq2-Hkv1-tril-mask", 2, 1, False, "tril"),
    ("Hq4-Hkv2-tril-pad-mask", 4, 2, False, "tril-pad"),
    ("Hq2-Hkv2-band-mask", 2, 2, False, "band"),
    ("Hq3-Hkv3-per-head-mask", 3, 3, False, "random"),
]


@pytest.mark.parametrize("hq,hkv,causal,kind", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_function_body_matches_reference_at_two_lengths(hq, hkv, causal, kind):
    """One ONNX model (dynamic N) at two lengths, both long enough for DGA, vs the reference."""
    cfg = CONFIG
    sess = op_session(op_model(cfg, causal, 0.3))
    for n in (37, 150):
        q, k, v = qkv(2, hq, hkv, n, n)
        mask = _mask(kind, 2, hq, n)
        ref = reference_attention(q, k, v, mask, causal, 0.3, cfg)
        torch.testing.assert_close(run_op(sess, q, k, v, mask), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("change", [
    pytest.param(dict(group_size=64), id="m64-no-complete-group"),
    pytest.param(dict(focus_ratio=0.0), id="gamma0-no-focus"),
    pytest.param(dict(num_probe=500, window=0), id="r-over-N-w0"),
    pytest.param(dict(window=1000, group_bias=0.0), id="w-over-N-beta0"),
    pytest.param(dict(group_size=1, focus_ratio=0.5), id="m1"),
])
@pytest.mark.parametrize("kind", ["none", "band"], ids=["positional", "mask-reading"])
def test_edge_configs_match_reference(change, kind):
    cfg = CONFIG.replace(**change)
    q, k, v = qkv(1, 2, 1, 53, 53)
    mask = _mask(kind, 1, 2, 53)
    out = run_op(op_session(op_model(cfg, True, 0.3)), q, k, v, mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, True, 0.3, cfg), atol=ATOL, rtol=RTOL)


def test_float16_computes_in_float32():
    """fp16 in, fp16 out; the body works in float32: error vs the fp64 golden within fp16 rounding."""
    sess = op_session(op_model(CONFIG, True, 0.3, TensorProto.FLOAT16))
    q, k, v = qkv(2, 4, 2, 90, 90)
    q, k, v = q.half(), k.half(), v.half()
    out = run_op(sess, q, k, v, None)
    assert out.dtype == torch.float16
    golden = reference_attention(q.double(), k.double(), v.double(), None, True, 0.3, CONFIG)
    eager = reference_attention(q, k, v, None, True, 0.3, CONFIG)
    err, eager_err = (out.double() - golden).abs().max(), (eager.double() - golden).abs().max()
    assert err <= 2 * eager_err + 1e-3, (err, eager_err)


def test_dga_differs_from_dense_at_test_config():
    """The configs above really exercise DGA (otherwise the comparisons could not fail)."""
    q, k, v = qkv(1, 2, 2, 150, 150)
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
    q, k, v = qkv(2, 4, 2, nq, nk)
    mask = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    mask[1, ..., :7] = False
    out = run_op(op_session(op_model(cfg, causal, 0.25)), q, k, v, mask)
    vis = mask & torch.ones(nq, nk, dtype=torch.bool).tril() if causal else mask
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, atol=ATOL, rtol=RTOL)


def test_focus_ties_go_to_smaller_positions():
    """Identical keys tie every score: the focus set must be the first n_f positions, as in the reference."""
    q, _, v = qkv(1, 2, 1, 64, 64)
    k = torch.ones(1, 1, 64, 16)
    cfg = CONFIG.replace(window=0)
    out = run_op(op_session(op_model(cfg, True, 0.3)), q, k, v, None)
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.3, cfg), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("opset", [18, pytest.param(19, marks=pytest.mark.slow), pytest.param(20, marks=pytest.mark.slow), 21, 23])
def test_function_body_valid_for_each_opset(opset):
    """The body is stamped with the model's ai.onnx opset (`export.with_function`): each must check and compute the same."""
    q, k, v = qkv(2, 4, 2, 150, 150, seed=opset)
    mask = _mask("tril-pad", 2, 4, 150)
    out = run_op(op_session(op_model(CONFIG, False, 0.3, opset=opset)), q, k, v, mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, False, 0.3, CONFIG), atol=ATOL, rtol=RTOL)


def _graph_reads(graph: onnx.GraphProto) -> set:
    """Names a graph (and the graphs nested in it) reads but does not define."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    read = set()
    for node in graph.node:
        defined |= set(node.output)
        read |= {i for i in node.input if i}
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read |= _graph_reads(a.g)
    return read - defined


def test_loop_bodies_read_no_outer_value():
    """Regression (issue #13: SIGSEGV in ONNX Runtime with static shapes): every Loop body is
    closed, its constants copied in and its other outer values loop-carried."""
    loops = []

    def walk(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    if node.op_type == "Loop":
                        loops.append(a.g)
                    walk(a.g.node)

    walk(function_proto(dga_onnx.OPSET).node)
    assert len(loops) == 2  # the positional and the mask-reading block loops
    for body in loops:
        assert _graph_reads(body) == set(), f"Loop body {body.name} reads outer values"


STATIC_KINDS = ["none", "pad", "tril-pad", "band"]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", STATIC_KINDS, ids=[f"B2-H4-Hkv2-N150-static-{k}" for k in STATIC_KINDS])
def test_function_body_static_shapes_every_optimization_level(kind, level, tmp_path):
    """Static shapes make every If condition and shape scalar constant: ONNX Runtime folds and
    inlines them (it crashed, issue #13). In a child process, at each optimisation level."""
    q, k, v = qkv(2, 4, 2, 150, 150, seed=3)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool) if kind == "none" else _mask(kind, 2, 4, 150)
    shapes = [list(q.shape), list(k.shape), list(v.shape), list(mask.shape)]
    path = tmp_path / "static.onnx"
    onnx.save(op_model(CONFIG, True, 0.3, shapes=shapes), path)
    out = torch.from_numpy(run_isolated(path, level, op_feeds(q, k, v, mask), tmp_path))
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, True, 0.3, CONFIG), atol=ATOL, rtol=RTOL)


def test_attribute_defaults_are_dgaconfig_defaults():
    """Schema, function signature and `node_attributes` come from one table: every numeric op field
    of DGAConfig with DGAConfig's default, then is_causal (default 0) and scale (required)."""
    register_schema()
    fields = {f.name: f.default for f in dataclasses.fields(DGAConfig)}
    schema = onnx.defs.get_schema(dga_onnx.OP_TYPE, dga_onnx.DOMAIN_VERSION, dga_onnx.DOMAIN)
    fn = function_proto(dga_onnx.OPSET)
    fn_defaults = {a.name: helper.get_attribute_value(a) for a in fn.attribute_proto}
    assert [a.name for a in ATTRIBUTES] == [f for f in OP_FIELDS if f != "impl"] + ["is_causal", "scale"]
    for name in OP_FIELDS[:-1]:
        assert fn_defaults[name] == pytest.approx(fields[name], rel=1e-7), name
        assert helper.get_attribute_value(schema.attributes[name].default_value) == pytest.approx(fields[name], rel=1e-7)
    assert fn_defaults["is_causal"] == 0 and list(fn.attribute) == ["scale"] and schema.attributes["scale"].required
    assert set(node_attributes(CONFIG, True, 0.5)) == {a.name for a in ATTRIBUTES}


def test_function_body_missing_attributes_take_dgaconfig_defaults():
    """A node that gives only is_causal and scale computes DGAConfig() (N = 1100 ≥ min_seq_len 1024)."""
    q, k, v = qkv(1, 2, 1, 1100, 1100, d=32, dv=16, seed=9)
    model = op_model(DGAConfig(), True, 0.2, attributes={"is_causal": 1, "scale": 0.2})
    out = run_op(op_session(model), q, k, v, None)
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.2, DGAConfig()), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- exported models

STATIC_N = 150  # two query blocks


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(name, shapes): (model, path, inputs fn)} for the tiny Llama-like and BERT-like models,
    exported once each with dynamic shapes (traced at N = 24) and static ones (N = `STATIC_N`)."""
    torch.manual_seed(0)
    out = {}
    for name, model, inputs in (("llama", TinyLlama(), llama_inputs), ("bert", TinyBert(), bert_inputs)):
        for shapes, n in (("dynamic", 24), ("static", STATIC_N)):
            path = tmp_path_factory.mktemp(name) / f"{name}-{shapes}.onnx"
            dga_onnx.export(model.eval(), inputs(2, n), path, dynamic=shapes == "dynamic")
            out[name, shapes] = (model, path, inputs)
    return out


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_structure(exported, name):
    _, path, _ = exported[name, "dynamic"]
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


def _expected(model, args) -> torch.Tensor:
    """The eager model with DGA by `dga_compile.reference` (not the C++ kernel the native op shares)."""
    with torch.no_grad():
        return reference_twin(model)(*args)


def _compare_model(model, sess, inputs, n):
    args = inputs(2, n, seed=n)  # fresh inputs: not the tracing ones
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = torch.from_numpy(sess.run(None, feed)[0])
    torch.testing.assert_close(got, _expected(model, args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_function_body_matches_reference(exported, name):
    """ORT inlining the function body vs the reference, at two lengths (DGA) and one short (dense)."""
    model, path, inputs = exported[name, "dynamic"]
    sess = dga_onnx.session(path, native=False)
    assert sess.dga_impl == "function"
    for n in (20, 70, 9):
        _compare_model(model, sess, inputs, n)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shapes", ["static", "dynamic"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_every_optimization_level(exported, name, shapes, level, tmp_path):
    """Regression (issue #13: `convert --static` models crashed ONNX Runtime, SIGSEGV): static and
    dynamic exports, function body, every optimisation level, in a child process."""
    model, path, inputs = exported[name, shapes]
    args = inputs(2, STATIC_N, seed=7)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    got = torch.from_numpy(run_isolated(path, level, {n: a.numpy() for n, a in zip(names, args)}, tmp_path))
    torch.testing.assert_close(got, _expected(model, args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_model_native_op_matches_reference(exported, name):
    if dga_onnx.native_library() is None:
        pytest.skip("native ai.dga library not built (dga_compile.onnx.native)")
    model, path, inputs = exported[name, "dynamic"]
    sess = dga_onnx.session(path)
    assert sess.dga_impl == "native"
    for n in (20, 70):
        _compare_model(model, sess, inputs, n)


def test_native_op_matches_reference():
    """With the library registered its kernel runs, not the function: the function here is a decoy."""
    if dga_onnx.native_library() is None:
        pytest.skip("native ai.dga library not built (dga_compile.onnx.native)")
    model = op_model(CONFIG, True, 0.3)
    decoy = helper.make_function(dga_onnx.DOMAIN, dga_onnx.OP_TYPE, ["q", "k", "v", "attn_mask"], ["out"],
                                 [helper.make_node("Identity", ["q"], ["out"])], [helper.make_opsetid("", dga_onnx.OPSET)])
    del model.functions[:]
    model.functions.append(decoy)
    sess = op_session(model, native=True)
    for n in (37, 150):
        q, k, v = qkv(2, 4, 2, n, n)
        torch.testing.assert_close(run_op(sess, q, k, v, None), reference_attention(q, k, v, None, True, 0.3, CONFIG),
                                   atol=ATOL, rtol=RTOL)


def _incompatible(_options):
    raise RuntimeError("built against a newer ONNX Runtime C API")


@pytest.mark.parametrize("missing", ["module", "library", "api-mismatch"])
def test_missing_native_library_falls_back_to_function(exported, monkeypatch, tmp_path, missing):
    if missing == "module":
        monkeypatch.setitem(sys.modules, "dga_compile.onnx.native", None)  # import fails
    else:
        fake = type(sys)("dga_compile.onnx.native")
        lib = tmp_path / "libdga_ort.so"
        fake.library_path = lambda: lib if missing == "api-mismatch" else None
        fake.register_library = _incompatible
        monkeypatch.setitem(sys.modules, "dga_compile.onnx.native", fake)
    model, path, inputs = exported["llama", "dynamic"]
    sess = dga_onnx.session(path)
    assert sess.dga_impl == "function"
    _compare_model(model, sess, inputs, 20)
