"""The command line: sample, info, demo (quick), and clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fastdiff.cli import main


def test_sample_writes_npz_and_png(tmp_path, capsys):
    out, png = tmp_path / "s.npz", tmp_path / "s.png"
    rc = main(["sample", "--data", "gaussian_2d", "--n-data", "50", "--process", "ou", "--steps", "10",
               "--n", "300", "--out", str(out), "--plot", str(png), "--schedule", "exponential"])
    assert rc == 0
    z = np.load(out)
    assert z["samples"].shape == (300, 2) and z["data"].shape == (50, 2) and np.isfinite(z["samples"]).all()
    assert json.loads(str(z["settings"]))["process"] == "ou"
    assert png.exists() and png.stat().st_size > 1000


def test_sample_from_a_user_file_to_npy(tmp_path):
    src = tmp_path / "pts.csv"
    src.write_text("x,y,z\n" + "\n".join(f"{i % 3},{i % 5},{i % 7}" for i in range(30)))
    out = tmp_path / "s.npy"
    assert main(["sample", "--data", str(src), "--process", "pure-ve", "--T", "20", "--steps", "30", "--schedule", "karras",
                 "--n", "40", "--method", "ei-x0", "--ode", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (40, 3)
    # ODE with the exact score of 30 points: samples land near data points
    data = np.loadtxt(src, delimiter=",", skiprows=1)
    assert np.sqrt(((x[:, None] - data[None]) ** 2).sum(-1)).min(1).max() < 0.1


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "available" in out and "triton" in out and "fastdiff 0.1.0" in out


def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pure VE" in out and "drifted VE" in out and "KL =" in out
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["process"] for r in results] == ["exact samples (floor)", "pure VE", "drifted VE (beta=t)"]
    assert all(0 <= r["kl"] < 2 for r in results)
    assert (tmp_path / "demo_swiss_roll.png").stat().st_size > 1000


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["sample", "--data", "swiss_roll", "--steps", "0", "--n", "5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--data", "no_such_thing"])


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "backends" in r.stdout


def test_reproduce_and_bench_subcommands_are_wired(tmp_path, capsys):
    from fastdiff import reproduce
    from fastdiff.cli import REPRODUCTIONS

    assert set(REPRODUCTIONS) == set(reproduce.EXPERIMENTS)          # the help text lists every experiment
    assert main(["reproduce", "no-such-experiment"]) == 2
    assert "cem-schedules" in capsys.readouterr().err
    assert main(["reproduce", "cem-schedules", "--smoke", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "results.md").read_text().startswith("# `cem-schedules`")
    assert main(["bench", "no-such-suite"]) == 2
    assert "posterior" in capsys.readouterr().err
