"""The command line: sample, info, demo (quick), and clear errors."""
import json
import subprocess
import sys

import numpy as np
import torch
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
    assert "bandwidth v = 0.0025: a kernel variance, std 0.05" in out        # one name, one meaning: a variance
    results = json.loads((tmp_path / "demo_results.json").read_text())
    assert [r["process"] for r in results] == ["exact samples (floor)", "pure VE", "drifted VE (beta=t)"]
    assert all(0 <= r["kl"] < 2 for r in results)
    assert (tmp_path / "demo_swiss_roll.png").stat().st_size > 1000


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["sample", "--data", "swiss_roll", "--steps", "0", "--n", "5", "--out", str(tmp_path / "x.npy")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    assert main(["sample", "--data", "no_such_thing", "--out", str(tmp_path / "x.npy")]) == 2
    assert "neither a data set" in capsys.readouterr().err


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


# ---- issue 12: every bad input is one clear line and exit code 2, checked before the work ------------------

def _run_sample(capsys, *argv):
    rc = main(["sample", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv, needle", [
    (["--device", "banana"], "--device 'banana'"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--device", "cpu:1"], "--device 'cpu:1'"),
    (["--T", "0"], "T must be a positive"),
    (["--T", "5", "--process", "vp"], "--T does not apply to vp"),
    (["--seed", str(2**64)], "seed must be <="),
    (["--steps", "1e10"], "would need about"),                 # refused before the table is built
    (["--backend", "cuda"], "backend 'cuda' cannot run"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device 'cuda' is not available")]))
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "s.npz"
    rc, _, err = _run_sample(capsys, "--n", "5", "--steps", "3", "--out", str(out), *argv)
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_out_is_checked_before_sampling_and_written_exactly(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc, _, err = _run_sample(capsys, "--n", "100000000", "--out", str(blocker / "x.npz"))   # would take hours
    assert rc == 2 and "is not writable" in err
    rc, _, err = _run_sample(capsys, "--n", "5", "--out", str(tmp_path / "out.txt"))
    assert rc == 2 and "must end in .npz" in err and not (tmp_path / "out.txt").exists()
    assert not (tmp_path / "out.txt.npz").exists()
    rc, _, err = _run_sample(capsys, "--n", "5", "--out", str(tmp_path))
    assert rc == 2 and "folder" in err
    rc, out, _ = _run_sample(capsys, "--n", "5", "--steps", "4", "--out", str(tmp_path / "x.npz"))
    assert rc == 0 and f"to {tmp_path / 'x.npz'} (samples, data and settings" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "x.npz"]


def test_empty_or_corrupt_data_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"not a torch file")
    for path in (empty, bad_pt):
        rc, _, err = _run_sample(capsys, "--data", str(path), "--n", "5", "--out", str(tmp_path / "x.npz"))
        assert rc == 2 and str(path) in err and "Traceback" not in err, err
    rc, _, err = _run_sample(capsys, "--data", str(tmp_path), "--out", str(tmp_path / "x.npz"))
    assert rc == 2


def test_n_data_is_used_for_every_data_set_and_refused_for_files(tmp_path, capsys):
    out = tmp_path / "c.npz"
    assert _run_sample(capsys, "--data", "circle", "--n-data", "5", "--n", "20", "--steps", "30", "--out", str(out))[0] == 0
    assert np.load(out)["data"].shape == (5, 2)
    assert _run_sample(capsys, "--data", "circle", "--n", "20", "--steps", "30", "--out", str(out))[0] == 0
    assert np.load(out)["data"].shape == (8, 2)                 # circle's own default
    src = tmp_path / "pts.csv"
    src.write_text("1,2\n3,4\n")
    rc, _, err = _run_sample(capsys, "--data", str(src), "--n-data", "5", "--out", str(out))
    assert rc == 2 and "--n-data" in err


def test_integer_options_accept_1e3_and_refuse_fractions(tmp_path, capsys):
    out = tmp_path / "s.npy"
    rc, text, _ = _run_sample(capsys, "--data", "gaussian_2d", "--n-data", "50", "--n", "1e2", "--steps", "2e1",
                              "--out", str(out))
    assert rc == 0 and np.load(out).shape == (100, 2) and "20 logsnr steps" in text
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--n", "2.5"])
    assert exc.value.code == 2 and "not an integer" in capsys.readouterr().err


def test_huge_data_are_sampled_right_or_refused(tmp_path, capsys):
    src = tmp_path / "big.csv"
    src.write_text("1e30,2e30\n-1e30,5e29\n3e29,-1e30\n")
    out = tmp_path / "b.npz"
    rc, _, err = _run_sample(capsys, "--data", str(src), "--n", "20", "--steps", "30", "--out", str(out))
    assert "prior's std" in err                                  # the prior cannot reach such data: said so
    if rc == 0:
        x, data = np.load(out)["samples"], np.load(out)["data"]
        assert np.isfinite(x).all()
        assert (np.abs(x[:, None] - data[None]).max(-1).min(1) <= 1e-6 * np.abs(data).max()).all()
    else:
        assert rc == 2 and not out.exists()


def test_non_finite_samples_are_an_error_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    import fastdiff as fd
    monkeypatch.setattr(fd, "sample", lambda *a, **k: torch.full((5, 2), float("nan")))
    out = tmp_path / "x.npz"
    rc, _, err = _run_sample(capsys, "--n", "5", "--out", str(out))
    assert rc == 2 and "NaN or inf" in err and not out.exists()


def test_help_shows_defaults_and_the_right_T(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 200)" in text and "(default: logsnr)" in text and "(default: drifted-ve)" in text
    assert "ve and vp have T = 1" in text and "100 for the VE family" not in text
    assert "--backend" in text and "variance v of the Gaussian kernel" in text


def test_cli_defaults_match_the_library():
    import inspect

    import fastdiff as fd
    from fastdiff import cli

    assert cli.SCHEDULE_CHOICES == fd.SCHEDULES
    params = inspect.signature(fd.sample).parameters
    assert cli.DEFAULT_SCHEDULE == params["schedule"].default and cli.DEFAULT_T_END == params["t_end"].default


def test_progress_is_on_by_default_for_long_runs(tmp_path, capsys, monkeypatch):
    from fastdiff import cli
    out = tmp_path / "s.npy"
    _run_sample(capsys, "--n", "40", "--steps", "10", "--out", str(out))
    assert "10/10" not in capsys.readouterr().err               # a short run: quiet
    monkeypatch.setattr(cli, "AUTO_PROGRESS_SECONDS", 0)         # every run counts as long
    rc, _, err = _run_sample(capsys, "--n", "40", "--steps", "10", "--out", str(out))
    assert rc == 0 and "10/10" in err and "steps" in err
    rc, _, err = _run_sample(capsys, "--n", "40", "--steps", "10", "--out", str(out), "--no-progress")
    assert rc == 0 and "10/10" not in err
    monkeypatch.undo()
    # long runs: the default command, and a million steps on a few samples (the silent 40 s)
    assert cli._estimated_seconds(10_000, 200, 2000, 2) > cli.AUTO_PROGRESS_SECONDS
    assert cli._estimated_seconds(4, 10**6, 50, 2) > cli.AUTO_PROGRESS_SECONDS
    assert cli._estimated_seconds(40, 10, 2000, 2) < cli.AUTO_PROGRESS_SECONDS


def test_info_says_triton_needs_a_gpu(capsys):
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  triton"))
    if not torch.cuda.is_available():
        assert "interpreter only (CPU tensors with TRITON_INTERPRET=1)" in line or "unavailable" in line
