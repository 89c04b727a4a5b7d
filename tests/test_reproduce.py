"""fastdiff.reproduce: every experiment runs end to end in smoke mode (seconds) and writes results.md
with its settings, tables, the paper's claim and a verdict, results.json with the numbers, and its
figures. Smoke numbers mean nothing; the checks here are on the shape of the outputs, plus a few
quantities that are exact or robust even at smoke sizes."""
import json
import math
from pathlib import Path

import pytest
import torch

import fastdiff.reproduce as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# name -> (header prefix of its main table, number of rows that table has in smoke mode, figures,
#          keys of results.json["results"])
EXPECTED = {
    "drift-ve-gaussian": ("| h | K | euler: aggr", 2, ["kl_vs_step_size.png"],
                          {"curves", "prior_kl", "sampling_check", "order_stats"}),
    "drift-ve-table": ("| T | reverse process | method | 1-D GMM: pure VE", 2, ["samples.png"], {"kl", "floors"}),
    "cem-schedules": ("| N | K | grid | method | TV", 12, ["cem_schedules.png"],
                      {"point_clouds", "line", "singularity", "slopes", "table1_weights"}),
    "cem-training": ("| data | model | mean dist", 10, ["samples.png", "pollution_and_errors.png"],
                     {"metrics", "floors", "train", "target_errors_line"}),
    "ode-sde-gap": ("| data | score | mean R²", 12, ["samples.png", "w2_vs_weight.png"],
                    {"models", "exact_score", "floor"}),
}


def _cells(line: str):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(md: str, header_prefix: str):
    """(header cells, body rows) of the first markdown table whose header line starts with header_prefix."""
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_prefix):
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append(_cells(body))
            return _cells(line), rows
    raise AssertionError(f"no table with header {header_prefix!r}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each experiment once, in smoke mode, into its own folder: name -> (folder, markdown, json)."""
    out = {}
    for name in rp.EXPERIMENTS:
        folder = tmp_path_factory.mktemp(name)
        path = rp.run(name, smoke=True, out=folder, seed=0)
        out[name] = (folder, path.read_text(), json.loads((folder / "results.json").read_text()))
    return out


def test_registry_matches_expected():
    assert set(rp.EXPERIMENTS) == set(EXPECTED) == set(rp.DESCRIPTIONS)
    assert all(isinstance(d, str) and len(d) > 20 for d in rp.DESCRIPTIONS.values())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_smoke_outputs_have_the_expected_shape(runs, name):
    folder, md, js = runs[name]
    header, n_rows, figures, keys = EXPECTED[name]
    # results.md: title, command line, smoke warning, the sections every reproduction must have
    assert md.startswith(f"# `{name}`: ")
    assert f"`fastdiff reproduce {name} --smoke --seed 0`" in md
    assert "Smoke mode" in md
    for section in ("## Settings", "## Verdict", "What the paper claims", "What we find"):
        assert section in md, section
    head, rows = _table(md, header)
    assert len(rows) == n_rows
    assert all(len(r) == len(head) and all(r) for r in rows)           # no missing or empty cells
    # results.json: metadata and the experiment's own keys
    assert js["experiment"] == name and js["mode"] == "smoke" and js["seed"] == 0
    assert js["seconds"] > 0
    assert keys <= set(js["results"])
    # figures: listed in the json, referenced from the markdown, real PNG files
    assert sorted(js["figures"]) == sorted(figures)
    for fig in figures:
        data = (folder / fig).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({fig})" in md


def test_drift_ve_gaussian_oracle_numbers_are_exact_even_in_smoke(runs):
    # the KL curves come from the closed-form oracle, so they are meaningful at any size: finite,
    # positive, and smaller at the smaller step for the exponential integrator
    res = runs["drift-ve-gaussian"][2]["results"]
    for proc in ("aggressive", "conservative", "pure"):
        pts = res["curves"][f"T=10.0|ode=False|{proc}|ei"]
        kl = {h: v for h, _, v in pts}
        assert all(math.isfinite(v) and v > 0 for v in kl.values())
        assert kl[0.5] < kl[2.0]


def test_cem_schedules_weights_are_a_distribution(runs):
    w = runs["cem-schedules"][2]["results"]["table1_weights"]
    assert len(w) == 5 and abs(sum(w) - 1) < 1e-9 and min(w) >= 0


def test_cem_training_exact_denoiser_lands_near_the_line(runs):
    # with the exact conditional expectation the last step from t₁ = 1e−4 to 0 adds noise of size
    # √(1 − e^(−t₁)) ≈ 0.01 (per coordinate), so the mean distance to the line is about 0.008
    m = runs["cem-training"][2]["results"]["metrics"]
    assert m["line|exact"]["d_mean"] < 0.02
    for loss in ("cem", "dsm", "eps"):
        assert set(m[f"line|{loss}"]) >= {"d_mean", "d_median", "d_90", "kl_along", "kl_2d", "outside", "nonfinite"}


def test_ode_sde_gap_models_and_baselines_are_all_reported(runs):
    res = runs["ode-sde-gap"][2]["results"]
    assert len(res["models"]) == 3 * 3
    for v in res["models"].values():
        assert {"gap", "ode", "sde", "r2", "dsm", "out_ode", "out_sde"} <= set(v)
        assert 0 <= v["out_ode"] <= 1 and 0 <= v["out_sde"] <= 1
    # the exact score's gap is a finite number for every data set
    assert len(res["exact_score"]) == 3
    assert all(math.isfinite(v["gap"]) for v in res["exact_score"].values())


def test_run_rejects_an_unknown_experiment_and_restores_threads(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        rp.run("no-such-experiment", smoke=True, out=tmp_path)
    before = torch.get_num_threads()
    rp.run("drift-ve-gaussian", smoke=True, out=tmp_path / "again", threads=1)
    assert torch.get_num_threads() == before


def test_drift_ve_gaussian_verdict_when_conservative_beats_pure_in_most_cells(tmp_path, monkeypatch):
    """The verdict reads the median conservative-vs-pure difference; it must be computed before use even
    when more than half the cells have cons < pure (it raised UnboundLocalError there)."""
    import fastdiff as fd
    from fastdiff.reproduce import drift_ve_gaussian as dvg

    exact = dvg._oracle_kl

    def pure_worse(process, *args):        # pure VE's KL doubled: cons < pure in every finite cell
        kl = exact(process, *args)
        return 2 * kl if isinstance(process, fd.PureVE) else kl

    monkeypatch.setattr(dvg, "_oracle_kl", pure_worse)
    path = rp.run("drift-ve-gaussian", smoke=True, out=tmp_path, seed=0)
    js = json.loads((tmp_path / "results.json").read_text())["results"]
    stats = js["order_stats"]
    assert stats["cells"] > 0 and stats["cons<pure"] == stats["cells"]
    assert js["cons_vs_pure_relative_difference"]["median"] >= 0.05
    assert "**Agree**: the conservative drift is lower" in path.read_text()


def test_smoke_runs_default_to_their_own_folder(tmp_path, monkeypatch):
    """A smoke run never lands on the committed (--quick) results in reproductions/<name>."""
    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "reproductions" / "cem-schedules" / "results.md"
    committed.parent.mkdir(parents=True)
    committed.write_text("# committed --quick results\n")
    path = rp.run("cem-schedules", smoke=True, seed=0)
    assert path == Path("reproductions") / "cem-schedules-smoke" / "results.md"
    assert "Smoke mode" in path.read_text()
    assert committed.read_text() == "# committed --quick results\n"


def test_run_checks_mode_out_and_seed_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="quick and smoke exclude each other"):
        rp.run("cem-schedules", quick=True, smoke=True, out=tmp_path / "q")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="out .*afile.* is a file, not a folder"):
        rp.run("cem-schedules", smoke=True, out=afile)
    with pytest.raises(ValueError, match="out .* cannot be created"):
        rp.run("cem-schedules", smoke=True, out=afile / "sub")
    for seed, needle in ((-1, "seed must be >= 0"), (2**63, f"seed must be <= {rp.MAX_SEED}"),
                         (1.5, "seed must be an integer"), (True, "seed must be an integer")):
        with pytest.raises(ValueError, match=needle):
            rp.run("cem-schedules", smoke=True, out=tmp_path / "s", seed=seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]      # no folder left behind


def test_the_largest_seed_runs_with_every_derived_seed_in_range(tmp_path):
    # ode-sde-gap derives ctx.seed + 201 at most; fd.sample and torch's generators take [0, 2**64)
    path = rp.run("ode-sde-gap", smoke=True, out=tmp_path, seed=rp.MAX_SEED)
    assert f"--seed {rp.MAX_SEED}`" in path.read_text()
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == rp.MAX_SEED
