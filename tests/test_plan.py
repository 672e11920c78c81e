"""`dga_compile.Plan` and ``DGAConfig(plan=...)``: the file, its checks, `DGAConfig.for_site`."""

import dataclasses
import json
import os
import stat

import pytest

import dga_compile
from dga_compile import DGAConfig
from dga_compile import policy
from dga_compile.plan import FORMAT, PLAN_FIELDS, Plan

SITES = {7: "dense", 3: {"focus_ratio": 0.2, "window": 512}, 5: {}}


def _write(tmp_path, data, name="plan.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _file(sites) -> dict:
    return {"format": FORMAT, "measured": {}, "sites": sites}


def test_round_trip_keeps_sites_and_metadata(tmp_path):
    plan = Plan(SITES, {"model": "m", "seq_len": 2048, "increase": 0.018, "cost": 0.21})
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["sites"] == {"3": {"focus_ratio": 0.2, "window": 512}, "5": {},
                                                          "7": "dense"}
    back = Plan.load(path)
    assert back == plan and hash(back) == hash(plan)
    assert back.metadata == plan.metadata == {"model": "m", "seq_len": 2048, "increase": 0.018, "cost": 0.21}
    assert back.source == str(path) and back.name == "plan.json" and back.dense_sites == (7,)


def test_save_is_atomic_with_the_usual_mode(tmp_path):
    """A new file gets the umask's mode; a replaced file keeps its mode; no temp file stays."""
    old = os.umask(0o027)
    try:
        path = Plan(SITES).save(tmp_path / "new.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    kept = _write(tmp_path, "old", "kept.json")
    os.chmod(kept, 0o600)
    Plan(SITES).save(kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and Plan.load(kept) == Plan(SITES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "new.json"]


def test_plan_is_frozen_and_hashable():
    plan = dga_compile.Plan(SITES)       # the package exports it
    assert dga_compile.Plan is Plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.sites = ()
    cfg = DGAConfig(plan=plan)
    assert hash(cfg) == hash(DGAConfig(plan=Plan(dict(SITES)))) and cfg == DGAConfig(plan=Plan(dict(SITES)))
    assert Plan({1: "dense"}) != Plan({1: {}})
    assert dataclasses.replace(plan) == plan     # a normalised plan goes through __post_init__ again


@pytest.mark.parametrize("data,match", [
    pytest.param("{not json", r"plan file .*bad.json is not JSON", id="not-json"),
    pytest.param([1, 2], r"must hold a JSON object, got list", id="not-object"),
    pytest.param({"format": "dga-plan/0", "sites": {}}, r"format 'dga-plan/0' is not 'dga-plan/1'", id="format"),
    pytest.param({"sites": {}}, r"format None is not 'dga-plan/1'", id="no-format"),
    pytest.param({"format": FORMAT, "site": {}}, r"unknown key 'site': did you mean 'sites'", id="top-key"),
    pytest.param({"format": FORMAT}, r"has no 'sites'", id="no-sites"),
    pytest.param(_file({"3": {"focus_ration": 0.2}}), r"site 3: unknown field 'focus_ration': did you mean "
                 r"'focus_ratio'", id="unknown-field"),
    pytest.param(_file({"3": {"impl": "cpp"}}), r"site 3: unknown field 'impl'", id="impl"),
    pytest.param(_file({"4": {"window": -1}}), r"bad.json: site 4: DGAConfig.window must be an integer .* got -1",
                 id="bad-value"),
    pytest.param(_file({"4": {"focus_ratio": "0.2"}}), r"site 4: DGAConfig.focus_ratio .* got '0.2'", id="str-value"),
    pytest.param(_file({"4": {"group_size": 4.0}}), r"site 4: DGAConfig.group_size .* got 4.0", id="float-int"),
    pytest.param(_file({"-1": "dense"}), r"site -1 is not a site position; .* ≥ 0", id="negative-site"),
    pytest.param(_file({"x": "dense"}), r"site 'x' is not a site position", id="name-site"),
    pytest.param(_file({"2": "sparse"}), r"site 2: the entry must be 'dense' or an object", id="bad-entry"),
    pytest.param(_file([]), r"'sites' must map site positions", id="sites-list"),
    pytest.param({**_file({}), "measured": [1]}, r"'measured' must be a JSON object", id="measured-list"),
])
def test_bad_files_name_the_file_site_and_value(tmp_path, data, match):
    path = _write(tmp_path, data, "bad.json")
    with pytest.raises(ValueError, match=match):
        Plan.load(path)
    with pytest.raises(ValueError, match=match):      # the config loads it on construction
        DGAConfig(plan=path)


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read plan file .*nope.json"):
        DGAConfig(plan=str(tmp_path / "nope.json"))


def test_config_plan_takes_a_plan_or_a_path(tmp_path):
    path = Plan(SITES).save(tmp_path / "p.json")
    assert DGAConfig(plan=path).plan == DGAConfig(plan=str(path)).plan == Plan(SITES)
    with pytest.raises(TypeError, match=r"DGAConfig.plan must be a dga_compile.plan.Plan .* got dict"):
        DGAConfig(plan=SITES)


def test_for_site_applies_the_plan_and_dense_layers():
    cfg = DGAConfig(focus_ratio=0.05, num_probe=64, plan=Plan(SITES), dense_layers=(3, 4))
    assert cfg.for_site(7) is None                     # dense in the plan
    assert cfg.for_site(3) is None and cfg.for_site(4) is None    # dense_layers wins over the plan's entry
    assert cfg.for_site(5) == cfg.replace(plan=None)  # named with no overrides: the config's own values
    assert cfg.for_site(6) == cfg.replace(plan=None)  # not named
    assert cfg.for_site(None) == cfg.replace(plan=None)
    site = DGAConfig(focus_ratio=0.05, plan=Plan(SITES)).for_site(3)
    assert (site.focus_ratio, site.window, site.num_probe, site.plan) == (0.2, 512, 128, None)
    assert DGAConfig(dense_layers=(2,)).for_site(2) is None and DGAConfig().for_site(2) == DGAConfig()


def test_every_op_field_but_impl_can_be_planned():
    assert set(PLAN_FIELDS) == set(DGAConfig.__dataclass_fields__) & set(PLAN_FIELDS) and "impl" not in PLAN_FIELDS
    values = {"focus_ratio": 0.3, "group_size": 8, "num_probe": 32, "window": 64, "group_bias": 1.0,
              "min_seq_len": 16, "sinks": 4, "expand_mass": 0.8, "expand_bias": 0.5, "query_block": 32,
              "expand_max": 0.5}
    assert set(values) == set(PLAN_FIELDS)
    site = DGAConfig(plan=Plan({0: values})).for_site(0)
    assert {f: getattr(site, f) for f in PLAN_FIELDS} == values


def test_policy_reports_a_planned_dense_site_and_the_budget(tmp_path):
    cfg = DGAConfig(plan=Plan(SITES).save(tmp_path / "calib.json"))
    dense = policy.decide(policy.SiteFacts(position=7, nq=64, nk=64, causal=True), cfg)
    assert (dense.rewrite, dense.reason, dense.config) == (False, "plan calib.json: site 7 dense", None)
    planned = policy.decide(policy.SiteFacts(position=3, nq=64, nk=64, causal=True), cfg)
    assert planned.rewrite and planned.config.budget() == "γ=0.2 m=16 w=512 β=0.25 r=128"
    # the sliding-window check uses the site's own budget: w=512 leaves nothing to save in 600 keys
    windowed = policy.decide(policy.SiteFacts(position=3, nq=2048, nk=2048, window=600, causal=True), cfg)
    plain = policy.decide(policy.SiteFacts(position=6, nq=2048, nk=2048, window=600, causal=True), cfg)
    assert not windowed.rewrite and "min_saving" in windowed.reason and plain.rewrite


def test_report_table_shows_the_budget():
    import io

    from rich.console import Console

    site = policy.Site("sdpa", (), "model.layers.3.self_attn", (1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4), "none",
                       "yes", True, "", "sdpa", 3, "γ=0.2 m=16 w=512 β=0.25 r=128")
    report = policy.RewriteReport([site])
    console = Console(width=300, file=io.StringIO())
    console.print(report.table())
    text = console.file.getvalue()
    assert "budget" in text and "γ=0.2 m=16 w=512" in text
    assert "rewritten (γ=0.2 m=16 w=512 β=0.25 r=128)" in str(report)


FACTS = {"long": policy.SiteFacts(position=3, nq=4096, nk=4096, causal=True),
         "short": policy.SiteFacts(position=3, nq=64, nk=64, causal=True),
         "unknown-length": policy.SiteFacts(position=3, causal=True)}


@pytest.mark.parametrize("config, facts, warned", [
    pytest.param(DGAConfig(), "long", True, id="defaults-4K"),
    pytest.param(DGAConfig(), "unknown-length", True, id="defaults-dynamic-N"),
    pytest.param(DGAConfig(), "short", False, id="below-min_seq_len-is-exact"),
    pytest.param(DGAConfig(focus_ratio=1.0), "long", False, id="gamma1-is-exact"),
    pytest.param(DGAConfig(group_size=1), "long", False, id="m1-is-exact"),
    pytest.param(DGAConfig(plan=Plan(SITES)), "long", False, id="planned-site"),
    pytest.param(DGAConfig(plan=Plan({0: "dense"})), "long", True, id="site-the-plan-does-not-name"),
])
def test_uncalibrated_sites_are_warned_about(config, facts, warned):
    """A report warns, with why and what to do, when rewritten sites run approximate parameters no plan set."""
    decision = policy.decide(FACTS[facts], config)
    site = policy.Site("sdpa", (), "m", None, None, None, "none", "yes", decision.rewrite, decision.reason, "sdpa", 3,
                       decision.config.budget(), decision.uncalibrated)
    report = policy.RewriteReport([site])
    assert len(report.warnings) == warned
    if warned:
        assert report.warnings[0].startswith("1 of 1 DGA site(s) run parameters no calibration chose (γ=")
        assert "dga-compile calibrate MODEL --max-increase 2%" in report.warnings[0]
        assert f"warning: {report.warnings[0]}" in str(report)


def test_backend_report_warns_on_a_long_uncalibrated_model(tmp_path):
    """The whole path: a compiled model at N ≥ min_seq_len gets the warning in its report and log."""
    import logging

    import torch

    import dga_compile
    from dga_compile.passes import rewrite

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 1024, 8)
    program = torch.export.export(Attn(), (q, q, q))
    _, report = rewrite(program, dga_compile.DGAConfig())
    assert report.num_rewritten == 1 and len(report.warnings) == 1
    _, planned = rewrite(program, dga_compile.DGAConfig(plan=Plan({0: {"focus_ratio": 0.2}})))
    assert planned.num_rewritten == 1 and planned.warnings == []
    logger = logging.getLogger("dga_compile.passes")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        report.log()
    finally:
        logger.removeHandler(handler)
    assert any("no calibration chose" in r.getMessage() and r.levelno == logging.WARNING for r in records)
