"""One plan, four entry points: backend="dga" (options={"plan": PATH}), rewrite(), register() +
attn_implementation="dga" and ONNX export decide the same per site, and a planned site's op call
carries the plan's values (the inserted node's args, the ONNX node's attributes, the HF attend's config)."""

import pytest
import torch

import dga_compile
from dga_compile import DGAConfig
from dga_compile.backend import last_report
from dga_compile.onnx._schema import node_attributes
from dga_compile.onnx.export import dga_nodes, prepare, trace
from dga_compile.ops import OpCall
from dga_compile.plan import Plan

from test_backend import _hybrid, _inputs

T = pytest.importorskip("transformers")

BASE = dict(min_seq_len=0, group_size=4, window=4, num_probe=8)
#: site 1 (global) gets its own budget, site 2 (sliding) is planned dense, site 3 is in dense_layers
SITES = {1: {"focus_ratio": 0.5, "window": 2, "group_bias": 1.0}, 2: "dense", 3: {"focus_ratio": 0.3}}
PLANNED = {"focus_ratio": 0.5, "window": 2, "group_bias": 1.0}
WINDOW = ("the mask limits each query to a sliding window of 16 keys: DGA would attend ≈85% of them, saving less "
          "than min_saving=0.25")
WANT = [(0, False, WINDOW), (1, True, "γ=0.5 m=4 w=2 β=1 r=8"), (2, False, "plan hybrid.json: site 2 dense"),
        (3, False, "attention site 3 is in DGAConfig.dense_layers=(3,): kept dense")]


def _decisions(sites) -> list:
    return [(s.position, s.rewritten, s.budget if s.rewritten else s.reason) for s in sites]


def _planned(config: DGAConfig) -> dict:
    return {f: getattr(config, f) for f in PLANNED}


@pytest.fixture
def plan_path(tmp_path):
    return Plan(SITES).save(tmp_path / "hybrid.json")


def test_backend_rewrite_and_register_follow_the_plan(plan_path, monkeypatch):
    from dga_compile.integrations.transformers import last_report as hf_report, register

    cfg = DGAConfig(**BASE, dense_layers=(3,), plan=plan_path)
    x = _inputs("llama", padded=True)
    model = _hybrid("gemma3", "sdpa")
    graphs = []
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx",
                        lambda gm, example_inputs, **kw: (graphs.append(gm), gm.forward)[1])
    torch._dynamo.reset()
    last_report(reset=True)
    with torch.no_grad():
        torch.compile(model, backend="dga", options={**BASE, "dense_layers": [3], "plan": str(plan_path)})(**x)
    assert _decisions(last_report().sites) == WANT
    calls = [OpCall.parse(n.args).config for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.dga.attention.default]
    assert [_planned(c) for c in calls] == [PLANNED]

    traced = trace(model, (), dict(x, use_cache=False))
    program, report = dga_compile.rewrite(traced, cfg)
    assert _decisions(report.sites) == WANT
    calls = [OpCall.parse(n.args).config for n in program.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.dga.attention.default]
    assert [_planned(c) for c in calls] == [PLANNED]
    exported, report = prepare(traced, (), None, cfg)            # what ONNX export rewrites
    assert _decisions(report.sites) == WANT
    nodes = dga_nodes(exported)
    attrs = node_attributes(OpCall.parse(nodes[0].args).config, True, 1.0)       # what _translate writes
    assert len(nodes) == 1 and {f: attrs[f] for f in PLANNED} == PLANNED

    seen = []
    real = dga_compile.integrations.transformers.dynamic_group_attention
    monkeypatch.setattr(dga_compile.integrations.transformers, "dynamic_group_attention",
                        lambda *a, config, **kw: (seen.append(config), real(*a, config=config, **kw))[1])
    hf = _hybrid("gemma3", register(cfg, name="dga-plan"))
    with torch.no_grad():
        hf(**x)
        hf(**x)
    assert _decisions(hf_report("dga-plan").sites) == WANT
    assert [_planned(c) for c in seen] == [PLANNED, PLANNED]
    assert seen[0] is seen[1]                        # one attend per layer, built once


@pytest.mark.slow
def test_onnx_export_carries_the_site_values(plan_path, tmp_path):
    pytest.importorskip("onnxscript")
    import onnx

    from dga_compile.onnx import DOMAIN, OP_TYPE, export

    cfg = DGAConfig(**BASE, dense_layers=(3,), plan=plan_path)
    x = _inputs("llama", padded=False, n=24)
    path = export(_hybrid("gemma3", "sdpa"), (), tmp_path / "m.onnx", cfg, kwargs=dict(x, use_cache=False))
    nodes = [n for n in onnx.load(str(path)).graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    assert len(nodes) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["focus_ratio"] == pytest.approx(0.5) and attrs["window"] == 2
    assert attrs["group_bias"] == pytest.approx(1.0) and attrs["group_size"] == 4
