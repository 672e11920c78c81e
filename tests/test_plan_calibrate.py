"""``dga-compile calibrate``: the ladder, the Lagrangian chooser and its path, the search, the CLI,
and ``dga-compile eval --plan``."""

import json

import pytest

from dga_compile import DGAConfig
from dga_compile.eval.calibrate import cheapest_meeting, choose, ladder, plan_of, plan_path
from dga_compile.plan import Plan

#: Synthetic tables: 3 sites × 3 rungs (cheap DGA, better DGA, dense); site 2's cheap rung is already exact.
ERRORS = {0: [0.30, 0.10, 0.0], 1: [0.05, 0.02, 0.0], 2: [0.0, 0.0, 0.0]}
COSTS = {0: [0.05, 0.10, 0.333], 1: [0.04, 0.08, 0.333], 2: [0.05, 0.07, 0.333]}


def _total(chosen, table):
    return sum(table[s][j] for s, j in chosen.items())


def _sq_error(chosen):
    return sum(ERRORS[s][j] ** 2 for s, j in chosen.items())


def test_ladder_runs_from_the_base_to_dense():
    base = DGAConfig(focus_ratio=0.1, window=256, min_seq_len=0, dense_layers=(1,))
    rungs = ladder(base)
    assert [None if r is None else (r.focus_ratio, r.num_probe, r.window) for r in rungs] == [
        (0.05, 64, 128), (0.1, 128, 256), (0.2, 128, 256), (0.1, 128, 512), (0.2, 128, 512), None]
    assert all(r.min_seq_len == 0 and r.plan is None and r.dense_layers == () for r in rungs[:-1])
    assert len(ladder(DGAConfig(focus_ratio=0.0))) == 4       # γ×2 = γ: dropped (half, base, w=512, dense)


def test_ladder_moves_the_expansion_mass_with_the_focus():
    """With step 5′ on, "focus×2" halves the mass 1 − τ left to groups and "half" doubles it; the
    base's family without step 5′ (γ at least the default's) follows, then dense."""
    base = DGAConfig(focus_ratio=0.0, sinks=4, expand_mass=0.8, window=256, min_seq_len=0)
    rungs = ladder(base)
    assert [None if r is None else (r.expand_mass, r.focus_ratio, r.window) for r in rungs] == [
        (pytest.approx(0.6), 0.0, 128), (0.8, 0.0, 256), (pytest.approx(0.9), 0.0, 256), (0.8, 0.0, 512),
        (pytest.approx(0.9), 0.0, 512),
        (0.0, 0.05, 128), (0.0, 0.1, 256), (0.0, 0.2, 256), (0.0, 0.1, 512), (0.0, 0.2, 512), None]
    assert all(r.sinks == 4 and r.min_seq_len == 0 for r in rungs[:-1])
    assert ladder(base.replace(expand_mass=0.4))[0].expand_mass == 0.0      # 1 − 2·0.6 < 0: expansion off
    assert len(ladder(base.replace(focus_ratio=0.3))) == 11                  # γ kept when above the default's


def test_chooser_is_monotone_in_lambda():
    """Cost never falls and squared error never rises as λ grows; λ = 0 is the cheapest, the end all exact."""
    lams = [0.0, 0.1, 0.5, 1, 2, 5, 10, 100, 1e4]
    plans = [choose(ERRORS, COSTS, lam) for lam in lams]
    costs, errors = [_total(p, COSTS) for p in plans], [_sq_error(p) for p in plans]
    assert costs == sorted(costs) and errors == sorted(errors, reverse=True)
    assert plans[0] == {0: 0, 1: 0, 2: 0} and plans[-1] == {0: 2, 1: 2, 2: 0}    # site 2: exact and cheap


def test_path_lists_each_distinct_plan_once_cheapest_first():
    path = plan_path(ERRORS, COSTS)
    assert path[0] == choose(ERRORS, COSTS, 0.0) and path[-1] == {0: 2, 1: 2, 2: 0}
    assert len({tuple(sorted(p.items())) for p in path}) == len(path)
    costs = [_total(p, COSTS) for p in path]
    assert costs == sorted(costs) and all(p[2] == 0 for p in path)
    assert path == [{0: 0, 1: 0, 2: 0}, {0: 1, 1: 0, 2: 0}, {0: 1, 1: 1, 2: 0}, {0: 2, 1: 1, 2: 0},
                    {0: 2, 1: 2, 2: 0}]


@pytest.mark.parametrize("target,want,measured", [
    pytest.param(0.05, 0, [0], id="cheapest-meets"),
    pytest.param(0.02, 3, [0, 4, 2, 3], id="middle"),
    pytest.param(0.001, 8, [0, 4, 6, 7], id="only-the-last"),
])
def test_search_finds_the_cheapest_plan_meeting_the_target(target, want, measured):
    increases = [0.04, 0.035, 0.03, 0.02, 0.015, 0.01, 0.008, 0.004, 0.0]       # falling along a 9-plan path
    calls = []

    def increase(i):
        calls.append(i)
        return increases[i]

    assert cheapest_meeting(len(increases), increase, target) == want
    assert calls == measured and 8 not in calls          # the last (all dense) is never measured


def test_plan_of_names_every_site_with_what_differs_from_the_defaults():
    base = DGAConfig(group_size=8, min_seq_len=0)
    rungs = ladder(base)
    plan = plan_of({0: 1, 3: 4, 5: len(rungs) - 1}, rungs, base, {"target": 0.02})
    assert plan == Plan({0: {"group_size": 8}, 3: {"group_size": 8, "focus_ratio": 0.2, "window": 512}, 5: "dense"})
    assert plan.metadata == {"target": 0.02}


def test_plan_entries_run_their_rung_over_the_base_and_the_defaults():
    """Regression: an expansion base's τ = 0 rungs lost ``expand_mass=0`` and ``focus_ratio=0.1``
    (equal to the defaults), so over the base those sites ran with step 5′ again."""
    base = DGAConfig(focus_ratio=0.0, sinks=4, expand_mass=0.8, min_seq_len=0)
    rungs = ladder(base)
    chosen = {site: site for site in range(len(rungs))}       # site i takes rung i
    plan = plan_of(chosen, rungs, base)
    for over in (base, DGAConfig(min_seq_len=0)):
        assert [over.replace(plan=plan).for_site(site) for site in chosen] == list(rungs)


# ------------------------------------------------------------------------- the command line

def _calibrate(model, text, out, target, *flags):
    from dga_compile.cli import main

    return main(["calibrate", str(model), "--text", str(text), "--seq-len", "48", "--windows", "2", "--group-size",
                 "4", "--num-probe", "8", "--window", "8", "--max-increase", target, "-o", str(out), "--quiet", *flags])


@pytest.fixture
def text(tmp_path):
    from _eval_models import TEXT

    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    return path


def test_cli_writes_a_plan_that_eval_measures(tiny_llama, text, tmp_path, capsys):
    """calibrate on the windows between eval's, then eval --plan: the DGA row runs the plan, site by site."""
    from transformers import AutoTokenizer

    from dga_compile.eval.cli import main as eval_main
    from dga_compile.eval.run import token_ids, window_starts

    out = tmp_path / "plan.json"
    assert _calibrate(tiny_llama, text, out, "5%") == 0
    printed = capsys.readouterr()
    assert "calibrated plan for" in printed.out and "wrote" in printed.err
    plan = Plan.load(out)
    meta = plan.metadata
    assert {p for p, _ in plan.sites} == {0, 1} and meta["increase"] <= 0.05 and 0 < meta["cost"] <= 1
    assert (meta["seq_len"], meta["windows"], meta["target"]) == (48, 2, 0.05) and meta["tried"]
    tokens = len(token_ids(AutoTokenizer.from_pretrained(tiny_llama), text.read_text()))
    scored = set().union(*(range(e, e + 48) for e in window_starts(tokens, 48, 2)))
    assert meta["calibration_starts"] and not any(scored & set(range(c, c + 48)) for c in meta["calibration_starts"])
    res = tmp_path / "res"
    assert eval_main([str(tiny_llama), "--text", str(text), "--seq-len", "48", "--windows", "2", "--group-size", "4",
                      "--num-probe", "8", "--window", "8", "--plan", str(out), "--baselines", "streaming",
                      "--out", str(res), "--quiet"]) == 0
    methods = json.loads(res.with_suffix(".json").read_text())["methods"]
    dga = methods[1]
    assert dga["kind"] == "dga" and "plan plan.json" in dga["label"] and dga["params"]["plan"]["sites"]
    assert [s["layer"] for s in dga["sites"]] == [0, 1]


def test_cli_planned_dense_sites_are_reported_by_eval(tiny_llama, text, tmp_path):
    from dga_compile.eval.cli import main as eval_main

    plan = Plan({0: "dense", 1: {"focus_ratio": 0.2}}).save(tmp_path / "p.json")
    res = tmp_path / "res"
    assert eval_main([str(tiny_llama), "--text", str(text), "--seq-len", "48", "--windows", "1", "--group-size", "4",
                      "--plan", str(plan), "--no-baselines", "--out", str(res), "--quiet"]) == 0
    sites = {s["layer"]: s for s in json.loads(res.with_suffix(".json").read_text())["methods"][1]["sites"]}
    assert (sites[0]["ran"], sites[0]["reason"], sites[0]["cost"]) == ("dense", "plan p.json: site 0 dense", 1.0)
    assert sites[1]["ran"] == "dga"


def test_cli_fails_when_only_dense_meets_the_target(tiny_llama, text, tmp_path, capsys, monkeypatch):
    """A model that loses 1% with any DGA site (the tiny random one barely reacts): at a 0.5% target
    the search ends at the all-dense plan, which is reported, not written."""
    from dga_compile.eval.run import Evaluation

    run = Evaluation.run

    def lossy(self, method):
        res = run(self, method)
        res.delta_last_half += 0.01
        return res

    monkeypatch.setattr(Evaluation, "run", lossy)
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit, match="2"):                               # a usage error
        _calibrate(tiny_llama, text, out, "two")
    assert _calibrate(tiny_llama, text, out, "0.5%") == 1
    err = capsys.readouterr().err
    assert "no plan with a DGA site meets +0.5%" in err and "nothing written" in err and not out.exists()


@pytest.mark.parametrize("flags,match", [
    pytest.param(["--plan", "x.json"], "calibrate writes a plan", id="plan"),
    pytest.param(["--focus-ratio", "2"], "DGAConfig.focus_ratio", id="bad-flag"),
])
def test_cli_usage_errors(tiny_llama, text, tmp_path, capsys, flags, match):
    assert _calibrate(tiny_llama, text, tmp_path / "p.json", "2%", *flags) == 2
    assert match in capsys.readouterr().err


def test_eval_plan_flag_names_the_file_in_errors(tiny_llama, text, tmp_path, capsys):
    from dga_compile.eval.cli import main as eval_main

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "dga-plan/1", "sites": {"0": {"windw": 8}}}')
    assert eval_main([str(tiny_llama), "--text", str(text), "--plan", str(bad), "--quiet"]) == 2
    assert "bad.json: site 0: unknown field 'windw': did you mean 'window'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_calibrates_smollm2_at_2k(tmp_path):
    """The real model, 1 window of 2048 tokens of the default text: a plan that meets +2%, cheaper than dense."""
    from _eval_models import fetched
    from dga_compile.cli import main
    from dga_compile.eval.fetch import smollm2

    fetched(smollm2)
    out = tmp_path / "plan.json"
    assert main(["calibrate", "smollm2", "--seq-len", "2048", "--windows", "1", "--max-increase", "2%", "-o",
                 str(out), "--quiet"]) == 0
    meta = Plan.load(out).metadata
    assert meta["increase"] <= 0.02 and meta["cost"] < 0.9 and len(meta["errors"]) == 30
