"""The command line: sample, info, demo (quick), and clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

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
    assert main(["sample", "--data", str(src), "--process", "pure-ve", "--T", "20", "--steps", "30",
                 "--schedule", "karras", "--n", "40", "--method", "ei-x0", "--ode", "--out", str(out)]) == 0
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
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0"),
    (["--timeout", "-5"], "--timeout must be a positive number of seconds, got -5"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan"),
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
    code = _run_sample(capsys, "--data", "circle", "--n-data", "5", "--n", "20", "--steps", "30", "--out", str(out))[0]
    assert code == 0
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
    # long runs: the default command, and a million steps on a few samples (the issue's silent 40 s)
    assert cli._estimated_seconds(10_000, 200, 2000, 2) > cli.AUTO_PROGRESS_SECONDS
    assert cli._estimated_seconds(4, 10**6, 50, 2) > cli.AUTO_PROGRESS_SECONDS
    assert cli._estimated_seconds(40, 10, 2000, 2) < cli.AUTO_PROGRESS_SECONDS
    # the torch reference: -n 1000 on 300 points, 200 steps took 13-37 s with no bar (measured 1.5 s at 50 steps)
    assert cli._estimated_seconds(1000, 200, 300, 2, "torch") > cli.AUTO_PROGRESS_SECONDS
    assert 0.5 < cli._estimated_seconds(1000, 50, 300, 2, "torch") < 3


def test_info_says_triton_needs_a_gpu(capsys):
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  triton"))
    if not torch.cuda.is_available():
        assert "interpreter only (CPU tensors with TRITON_INTERPRET=1)" in line or "unavailable" in line


# ---- issue 16 section 4: `torchrun --nproc-per-node=K -m fastdiff sample ...` ------------------------------

TORCHRUN_DEADLINE_S = 150    # hard limit per launch: start-up of 3 interpreters on 2 loaded cores included


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun():
    import os
    import shutil
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not installed")
    return exe


def _launch(argv, cwd):
    """torchrun with 2 CPU ranks on 127.0.0.1 in its own session (so a timeout can kill every rank)."""
    import os
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [_torchrun(), "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "-m", "fastdiff", "sample", *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc):
    import os
    import signal
    try:
        out, err = proc.communicate(timeout=TORCHRUN_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)              # torchrun and both ranks: the test never hangs
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {TORCHRUN_DEADLINE_S} s")
    return proc.returncode, out, err


# 301 points (shards of 151 and 150), 7 samples (slices of 4 and 3), a kernel bandwidth, float64
TORCHRUN_ARGS = ["--data", "swiss_roll", "--n-data", "301", "-n", "7", "--steps", "20", "--bandwidth", "0.001",
                 "--dtype", "float64", "--seed", "5", "--timeout", "60"]


def test_torchrun_two_ranks_equal_one_process(tmp_path, capsys):
    """Both layouts under torchrun (launched together: start-up dominates) against `fastdiff sample` with the
    same arguments in one process: --distributed samples bit for bit, data within 1e-9 (float64)."""
    runs = {mode: (tmp_path / mode, ["--distributed", mode, "--out", f"{mode}.npy"]) for mode in ("samples", "data")}
    procs = {}
    for mode, (folder, argv) in runs.items():
        folder.mkdir()
        procs[mode] = _launch(TORCHRUN_ARGS + argv, folder)
    single = {}
    for mode in runs:        # meanwhile, one process each (which ignores --distributed: no WORLD_SIZE)
        out = tmp_path / f"single_{mode}.npy"
        assert main(["sample", *TORCHRUN_ARGS, "--distributed", mode, "--out", str(out)]) == 0
        single[mode] = np.load(out)
    capsys.readouterr()
    assert np.array_equal(single["samples"], single["data"])
    ref = single["samples"]
    assert ref.shape == (7, 2) and ref.dtype == np.float64 and ref.std() > 0.1
    for mode, (folder, _) in runs.items():
        rc, out, err = _finish(procs[mode])
        assert rc == 0, err[-3000:]
        assert sorted(p.name for p in folder.iterdir()) == [f"{mode}.npy"]       # rank 0 alone writes
        said = "samples split" if mode == "samples" else "data sharded"
        assert out.count("wrote 7 samples") == 1 and f"2 ranks, {said}" in out, out
        x = np.load(folder / f"{mode}.npy")
        assert x.shape == ref.shape and x.dtype == ref.dtype
        if mode == "samples":
            assert np.array_equal(x, ref), np.abs(x - ref).max()
        else:
            assert np.abs(x - ref).max() <= 1e-9 * (1 + np.abs(ref).max())


def test_every_sample_option_passes_through_torchrun_unchanged():
    """torchrun's parser sees the script's arguments too: an option it reads as an abbreviation of its own
    would stop the launch. --n is one (--nnodes, --nproc-per-node, ...) and --r another (--rdzv-*, --role, ...);
    -n and -r are the spellings that pass."""
    from torch.distributed.run import get_args_parser

    from fastdiff.cli import build_parser

    sample = build_parser()._subparsers._group_actions[0].choices["sample"]
    options = [o for a in sample._actions for o in a.option_strings if o not in ("-h", "--help")]
    assert "-n" in options and "-r" in options and "--distributed" in options and "--timeout" in options
    blocked = []
    for option in options:
        argv = ["sample", option, "1"]
        try:
            parsed = get_args_parser().parse_args(["--nproc-per-node=2", "-m", "fastdiff", *argv])
        except SystemExit:
            blocked.append(option)
            continue
        assert parsed.training_script == "fastdiff" and parsed.training_script_args == argv, option
    assert blocked == ["--n", "--r"]


def test_help_says_the_distributed_options_need_torchrun(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--distributed {samples,data}" in text and "under torchrun (WORLD_SIZE > 1) only" in text
    assert "a plain process ignores it" in text and "under torchrun only: seconds a rank waits" in text
    assert "under torchrun write -n" in text and "under torchrun write -r" in text
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--distributed", "both"])
    assert exc.value.code == 2 and "invalid choice: 'both'" in capsys.readouterr().err


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set: launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "x", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "RANK=2 is outside [0, WORLD_SIZE=2)"),
])
def test_a_broken_launch_environment_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, env, needle):
    import torch.distributed as dist
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "s.npy"
    rc, _, err = _run_sample(capsys, "-n", "5", "--steps", "3", "--out", str(out))
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists() and not dist.is_initialized()
    if "RANK" in env:
        assert err.startswith(f"fastdiff sample (rank {env['RANK']} of 2): error: ")   # every rank prints its own


def test_one_explicit_gpu_for_several_ranks_of_a_node_is_refused(monkeypatch):
    from fastdiff.cli import _check_rank_device
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device 'cuda:0' would put all 2 ranks of this node on one GPU"):
        _check_rank_device(torch.device("cuda", 0))
    _check_rank_device(torch.device("cuda"))             # cuda:LOCAL_RANK per rank
    _check_rank_device(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    _check_rank_device(torch.device("cuda", 0))          # one rank per node may pick its GPU


def test_a_failed_peer_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    import fastdiff as fd
    from fastdiff.distributed import PeerError

    def dead_peer(*args, **kwargs):
        raise PeerError("fastdiff.distributed: rank 0: the posterior's all_reduce(SUM) did not complete within 60 s")
    monkeypatch.setattr(fd, "sample", dead_peer)
    out = tmp_path / "x.npy"
    rc, _, err = _run_sample(capsys, "-n", "5", "--out", str(out))
    assert rc == 1 and "did not complete within 60 s" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_reproduce_all_smoke_issues_no_grid_warning(tmp_path, monkeypatch, capsys):
    """Smoke sizes use poor grids on purpose (ode-sde-gap: 10 steps); the experiments say so by filtering
    fd.GridWarning there, so `fastdiff reproduce all --smoke` (CI) prints none."""
    import warnings

    import fastdiff as fd
    from fastdiff import reproduce

    monkeypatch.chdir(tmp_path)                         # 'all' writes reproductions/<name> here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fd.GridWarning)
        assert main(["reproduce", "all", "--smoke", "--no-progress"]) == 0
    grid = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, fd.GridWarning)]
    assert grid == [], grid
    printed = capsys.readouterr().out.split()
    assert printed == [f"reproductions/{name}-smoke/results.md" for name in reproduce.EXPERIMENTS]   # never the
    assert not (tmp_path / "reproductions" / "cem-schedules").exists()                             # committed ones


# ---- the CLI review (items 3-8, 15, 16) ----------------------------------------------------------------------

def test_n_data_too_big_for_memory_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc, _, err = _run_sample(capsys, "--n-data", "1e12", "--n", "5", "--steps", "3", "--out", str(out))
    assert rc == 2 and "--n-data 1000000000000 would need about" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--n", "-5"], "--n must be >= 1, got -5"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--seed", "99999999999999999999999"], f"--seed must be <= {2**64 - 1}"),
    (["--n", "1e12"], "--n 1000000000000 would need about"),
])
def test_demo_checks_its_options_before_any_work(tmp_path, capsys, argv, needle):
    out = tmp_path / "d"
    rc = main(["demo", "--steps", "3", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_demo_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["demo", "--quick", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"--out {str(afile)!r} is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err


def test_demo_explicit_n_and_steps_win_over_quick(tmp_path, capsys, monkeypatch):
    from fastdiff import cli
    calls = []
    monkeypatch.setattr(cli, "run_demo", lambda out, **kw: calls.append(kw) or ([], None))
    for argv, want in ((["--quick"], (2000, 50)), (["--quick", "--n", "500", "--steps", "5"], (500, 5)),
                       (["--quick", "--steps", "7"], (2000, 7)), ([], (10_000, 100)), (["--n", "1e3"], (1000, 100))):
        assert main(["demo", "--out", str(tmp_path), *argv]) == 0
        assert (calls[-1]["n"], calls[-1]["steps"]) == want, argv
        assert f"{want[0]} samples, {want[1]} steps" in capsys.readouterr().out


def test_plot_is_checked_before_sampling(tmp_path, capsys, monkeypatch):
    import fastdiff as fd
    sampled = []
    monkeypatch.setattr(fd, "sample", lambda *a, **k: sampled.append(1) or torch.zeros(5, 2))
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = tmp_path / "o.npz"
    for plot, needle in ((tmp_path / "p.txt", "--plot"), (blocker / "p.png", "is not writable"),
                         (tmp_path, "is a folder")):
        rc, _, err = _run_sample(capsys, "--n", "5", "--out", str(out), "--plot", str(plot))
        assert rc == 2 and f"--plot {str(plot)!r}" in err and needle in err, err
        assert len(err.strip().splitlines()) == 1
    assert "must end in a format matplotlib writes" in _run_sample(capsys, "--n", "5", "--out", str(out),
                                                                    "--plot", str(tmp_path / "p.txt"))[2]
    assert not sampled and not out.exists()
    rc, text, _ = _run_sample(capsys, "--n", "5", "--out", str(out), "--plot", str(tmp_path / "sub" / "p.PDF"))
    assert rc == 0 and sampled and (tmp_path / "sub" / "p.PDF").read_bytes()[:4] == b"%PDF"


def test_reproduce_refuses_bad_mode_out_and_seed_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "cem-schedules", "--quick", "--smoke"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    for argv, needle in ((["--out", "afile"], "--out 'afile' is a file, not a folder"),
                         (["--out", "afile/sub"], "--out 'afile/sub' cannot be created"),
                         (["--seed", "-1", "--out", "r1"], "--seed must be >= 0, got -1"),
                         (["--seed", str(2**64 - 1), "--out", "r2"], "--seed must be <= 9223372036854775807"),
                         (["--seed", "99999999999999999999", "--out", "r3"], "--seed must be <=")):
        rc = main(["reproduce", "cem-schedules", "--smoke", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exc:                         # argparse's own refusal, as for sample's --n
        main(["reproduce", "cem-schedules", "--smoke", "--seed", "1.5", "--out", "r4"])
    assert exc.value.code == 2 and "argument --seed: '1.5' is not an integer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]       # no folder left behind
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "integer in [0, 2**63)" in " ".join(capsys.readouterr().out.split())


def test_every_library_method_and_its_options_pass_through(tmp_path, capsys):
    import warnings

    import fastdiff as fd
    from fastdiff import cli
    from fastdiff.methods import ALL_METHODS

    sample = cli.build_parser()._subparsers._group_actions[0].choices["sample"]
    method = next(a for a in sample._actions if "--method" in a.option_strings)
    assert tuple(method.choices) == ALL_METHODS and len(ALL_METHODS) == 14
    out = tmp_path / "s.npy"
    common = ["--data", "gaussian_2d", "--n-data", "30", "-n", "6", "--steps", "8", "--seed", "3"]
    data = fd.datasets.gaussian_2d(30, seed=3)
    for argv, kw in (
            (["--method", "dpmpp_2m_sde", "--eta", "0.5", "--s-noise", "0.9", "--solver-type", "heun"],
             dict(method="dpmpp_2m_sde", eta=0.5, s_noise=0.9, solver_type="heun")),
            (["--method", "heun", "--s-churn", "1", "--s-tmin", "0.05", "--s-tmax", "50"],
             dict(method="heun", s_churn=1.0, s_tmin=0.05, s_tmax=50.0)),
            (["--method", "lms", "--order", "3"], dict(method="lms", order=3)),
            (["--method", "dpmpp_sde", "--r", "0.25"], dict(method="dpmpp_sde", r=0.25)),
            (["--method", "ei", "--eta", "0.3"], dict(method="ei", eta=0.3))):
        rc, _, err = _run_sample(capsys, *common, *argv, "--out", str(out))
        assert rc == 0, err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fd.GridWarning)            # 8 steps: a poor grid for some, on purpose
            want = fd.sample(fd.PointCloud(data, cli.make_process("drifted-ve", None)), n=6, steps=8, seed=3, **kw)
        assert np.array_equal(np.load(out), want.numpy()), argv
    rc, _, err = _run_sample(capsys, *common, "--method", "ei", "--s-churn", "1", "--out", str(out))
    assert rc == 2 and "method 'ei' takes no s_churn; its options are eta" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in ("dpmpp_3m_sde", "--s-churn", "--solver-type {midpoint,heun}", "--order", "--r R", "--eta"):
        assert word in text, word


def test_unset_method_options_are_not_passed(tmp_path, capsys, monkeypatch):
    import fastdiff as fd
    seen = {}
    monkeypatch.setattr(fd, "sample", lambda cloud, **kw: seen.update(kw) or torch.zeros(5, 2))
    assert _run_sample(capsys, "-n", "5", "--out", str(tmp_path / "s.npy"))[0] == 0
    assert not {"eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "solver_type", "order", "r"} & set(seen)


def test_settings_are_reproducible_and_record_resolved_values(tmp_path, capsys):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for out in (a, b):
        assert _run_sample(capsys, "--n-data", "40", "-n", "5", "--steps", "4", "--out", str(out))[0] == 0
    sa, sb = (json.loads(str(np.load(p)["settings"])) for p in (a, b))
    assert "func" not in sa and "bench_parser" not in sa
    assert sa["T"] == 100.0 and sa["progress"] is False and sa["n_data"] == 40 and sa["method"] == "ei"
    assert {k: v for k, v in sa.items() if k != "out"} == {k: v for k, v in sb.items() if k != "out"}
    assert _run_sample(capsys, "--process", "ou", "-n", "5", "--steps", "4", "--out", str(a))[0] == 0
    s = json.loads(str(np.load(a)["settings"]))
    assert s["T"] == 10.0 and s["n_data"] == 2000


def test_progress_estimate_counts_the_per_step_cost():
    from fastdiff import cli
    # measured: -n 2 --steps 1e5 took 4.7 s here and 8 s in the review (no bar: estimated 2.8 s before)
    assert cli._estimated_seconds(2, 100_000, 2000, 2) > cli.AUTO_PROGRESS_SECONDS
    assert 10 < cli._estimated_seconds(2, 300_000, 8, 2) < 30         # measured 13.6-24 s


def test_help_says_seed_also_draws_the_named_data_set(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "also draws a named --data set" in text
