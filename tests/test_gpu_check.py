"""scripts/gpu_check.sh --dry-run: the GPU check's whole flow without CUDA (every GPU test skips, the bench runs
its targets-only plan at --quick sizes on the CPU), so the command a maintainer runs on a lent GPU machine
cannot rot. Checks the files it writes into $OUT (what a lent machine returns: at most 8 files, two folders
deep), the one-screen summary, that the junit XML parses, that a phase over its time budget is stopped with
SIGINT, and that a SIGINT or a kill in the middle of a run leaves every finished result in place. Also the
bench options the check uses (--targets-only, --brief, --json-only), and the distributed phase (issue 16): gloo
ranks at --smoke sizes in the dry run, its device-marked rows, the README's GPU row beside the CPU rows, and a
rank count above the GPU count skipped, never simulated. Nothing here measures speed."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PHASES = ("env", "build", "triton", "cuda", "bench", "distributed")
FILES = {"summary.txt", "env.txt", "build.log", "phases.log", "triton.xml", "cuda.xml", "bench/results.json",
         "distributed/results.json"}

if shutil.which("bash") is None or shutil.which("timeout") is None or not Path("/proc/self/stat").exists():
    pytest.skip("the GPU check needs bash, coreutils' timeout and /proc (Linux)", allow_module_level=True)


def _extension_built():
    from fastdiff import _backend
    return _backend.build_config() is not None


def _start(out: Path, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 540) -> tuple[int, str]:
    """Its exit status and output. The script bounds itself (480 s and a grace period): the timeout here only
    catches a hang of the script itself."""
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    return proc.returncode, stdout


def _phases(summary: str) -> dict:
    """{phase: (status, rest of the line with its spaces collapsed)} from summary.txt's phase table."""
    out = {}
    for line in summary.splitlines():
        m = re.match(r"(env|build|triton|cuda|bench|distributed) +"
                     r"(ok|FAILED|time limit|killed|interrupted|skipped|running|pending)"
                     r"\b(.*)$", line)
        if m:
            out[m.group(1)] = (m.group(2), " ".join(m.group(3).split()))
    return out


def _wait_for_phase(out: Path, proc: subprocess.Popen, phase: str, status: str, timeout: float = 300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the dry run ended (exit {proc.returncode}) before {phase} was {status}")
        try:
            if _phases((out / "summary.txt").read_text()).get(phase, ("",))[0] == status:
                return
        except OSError:
            pass
        time.sleep(0.2)
    _kill_tree(proc.pid)
    pytest.fail(f"{phase} not {status} after {timeout} s")


def _wait_for_pytest_session(out: Path, proc: subprocess.Popen, timeout: float = 120):
    """Until the cuda phase's pytest has printed its session header (or the phase is over): a SIGINT sent while its
    interpreter is still importing can end it without a KeyboardInterrupt, or break numpy's import half-way
    ("cannot load module more than once"), which is not the interruption this test is about."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            log = (out / "phases.log").read_text().split("=== gpu_check phase cuda", 1)
            if len(log) == 2 and ("test session starts" in log[1] or "=== gpu_check phase" in log[1]):
                return
        except OSError:
            pass
        time.sleep(0.1)


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int):
    """SIGKILL the script and everything it started (the phases run in process groups of their own), as a
    machine taken back would: stopped first, so that nothing forks while the tree is collected."""
    for _ in range(2):
        for p in _descendants(pid):
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
    for p in _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _junit_counts(path: Path) -> tuple[int, int]:
    """(test cases, skipped) of a junit file (it must parse)."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    return len(cases), sum(1 for c in cases if any(ch.tag == "skipped" for ch in c))


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------- the whole dry run
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    so = sorted((ROOT / "fastdiff").glob("_C*.so"))
    before = {p: p.stat().st_mtime_ns for p in so}
    t0 = time.monotonic()
    rc, stdout = _finish(_start(out))
    seconds = time.monotonic() - t0
    print(f"\ngpu_check.sh --dry-run: {seconds:.0f} s")
    return out, rc, stdout, before, seconds


def test_dry_run_writes_the_documented_files_and_nothing_else(dry_run):
    out, rc, stdout, _, _ = dry_run
    built = _extension_built()
    assert rc == (0 if built else 1), stdout[-3000:]
    assert _files(out) == FILES, stdout[-2000:]
    # what a lent machine returns: at most 8 files, two folders down, plain names
    assert len(FILES) <= 8
    for name in _files(out):
        assert name.count("/") <= 2 and re.fullmatch(r"[A-Za-z0-9._/-]+", name), name
        assert (out / name).stat().st_size > 0, name


def test_summary_is_one_screen_with_every_phase(dry_run):
    out, _, stdout, _, _ = dry_run
    summary = (out / "summary.txt").read_text()
    assert summary in stdout                                    # printed at the end as well
    lines = summary.splitlines()
    assert len(lines) <= 30 and max(len(s) for s in lines) <= 160, summary
    assert "DRY RUN" in lines[0] and "finished" in summary and "of the 480 s budget" in summary
    phases = _phases(summary)
    assert set(phases) == set(PHASES), summary
    for name in ("env", "triton", "cuda", "bench", "distributed"):
        assert phases[name][0] == "ok", summary
    assert phases["build"][0] == ("ok" if _extension_built() else "FAILED"), summary
    assert "targets (cpu, reduced repetitions" in summary
    assert """measured order: AUTO_ORDER["cpu"] = ('cpu', 'torch')""" in summary
    assert "distributed (cpu: " in summary and "complete; distributed/results.json):" in summary
    assert "  sharded, 1 rank: d=2 N=1,024 step " in summary and "  sharded, 2 ranks: d=2 N=1,024 step " in summary
    assert "  streamed: d=2 N=1e4 " in summary


def test_junit_parses_and_matches_the_summary(dry_run):
    out, _, _, _, _ = dry_run
    phases = _phases((out / "summary.txt").read_text())
    for name in ("triton", "cuda"):
        n, skipped = _junit_counts(out / f"{name}.xml")
        assert n > 0 and skipped == n, name                    # no CUDA: every gpu test skips
        assert f"0 passed, 0 failed, 0 errors, {n} skipped of {n} ({name}.xml)" in phases[name][1]
    log = (out / "phases.log").read_text()
    assert "=== gpu_check phase triton: pytest tests/test_triton.py" in log
    triton_cmd = log.split("=== gpu_check phase triton: ")[1].splitlines()[0]
    assert "tests/test_posterior.py" in triton_cmd and "tests/test_pointcloud_sample.py" in triton_cmd
    assert "=== gpu_check phase cuda: pytest -m gpu tests --ignore=tests/test_triton.py" in log
    selected = re.search(r"tests/test_kernels.py::\S+\[\S*cuda\S*\] SKIPPED", log)
    assert selected, "the CUDA kernel tests were not selected"


def test_dry_run_uses_no_gpu_and_rebuilds_nothing(dry_run):
    out, _, _, before, _ = dry_run
    assert "nothing touches a GPU" in (out / "env.txt").read_text()
    assert "device: none (CPU only)" in (out / "env.txt").read_text()
    build = (out / "build.log").read_text()
    if _extension_built():
        assert "dry run: no build; using" in build and "fastdiff._C: cpu=True" in build
    assert {p: p.stat().st_mtime_ns for p in before} == before      # the extension CI built is untouched


def test_bench_runs_the_reduced_target_plan(dry_run):
    out, _, _, _, _ = dry_run
    doc = json.loads((out / "bench" / "results.json").read_text())
    env = doc["environment"]
    assert env["targets_only"] is True and env["brief"] is True and env["json_only"] is True
    assert doc["quick"] is True and doc["device"] == "cpu" and doc["complete"] is True
    assert doc["suites"] == ["posterior", "step", "sample"]
    assert {r["suite"] for r in doc["rows"] if r["median_s"]} == {"posterior", "step", "sample"}
    # one stand-in case per suite (a --quick plan has no target cases), then the speedups
    assert list(doc["case_seconds"]) == ["posterior d=2 M=128 N=512", "step M=5461 d=3",
                                         "sample mlp loop n=256 steps=50", "posterior: speedups", "step: speedups",
                                         "sample: speedups"]
    from fastdiff.bench.report import load_targets  # the project's targets (benchmarks/targets.py)
    assert {t["id"] for t in doc["targets"]} == {t["id"] for t in load_targets().TARGETS if t["device"] == "cpu"}
    assert all(t["met"] == "not measured" for t in doc["targets"])    # --quick sizes: no target case runs
    assert all(r["reps"] <= 5 for r in doc["rows"] if r["median_s"])       # --brief: at most 5 samples
    bench_log = (out / "phases.log").read_text().split("=== gpu_check phase bench: ")[1]
    assert "fastdiff bench: " in bench_log.split("=== gpu_check phase distributed: ")[0]


def test_distributed_phase_runs_gloo_ranks_and_streaming_at_smoke_sizes(dry_run, tmp_path):
    out, _, _, _, _ = dry_run
    doc = json.loads((out / "distributed" / "results.json").read_text())
    assert doc["device"] == "cpu" and doc["smoke"] is True and doc["complete"] is True
    assert doc["errors"] == [] and doc["notes"] == [] and doc["time_limit_s"] > 0
    rows = doc["distributed"]
    assert [(r["scaling"], r["ranks"]) for r in rows] == [("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)]
    assert all(r["device"] == "cpu" and 0 < r["merge_s"] < r["step_s"] for r in rows)
    assert [r["case"] for r in doc["streaming"]] == ["d=2 N=1e4", "d=64 N=2e3 fp16"]
    assert all(r["device"] == "cpu" and "peak_gpu_mb" not in r and r["peak_rss_mb"] > 0 for r in doc["streaming"])
    log = (out / "phases.log").read_text().split("=== gpu_check phase distributed: ")[1]
    assert log.startswith("fastdiff.bench.distributed --device cpu --smoke\n") and "streaming d=64 N=2e3 fp16" in log
    # --json-only: the report is written afterwards from results.json, as a maintainer does after a GPU run
    shutil.copy(out / "distributed" / "results.json", tmp_path / "results.json")
    r = subprocess.run([sys.executable, "-m", "fastdiff.bench.distributed", "--report", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "report.md").read_text()
    assert "## Sharded point cloud (gloo, CPU ranks, 1 thread each)" in report
    assert "| weak | d=2 | 16 | 1,024 | 2 |" in report


# ------------------------------------------------------------------------------------------- interruptions
def test_sigint_mid_run_stops_cleanly_and_keeps_finished_results(tmp_path):
    """GPU_CHECK_ENV_S=1: the env phase (importing torch takes longer) is stopped by its own limit with SIGINT
    while the others go on; then a SIGINT to the script once the cuda tests have started."""
    out = tmp_path / "out"
    proc = _start(out, GPU_CHECK_ENV_S="1")
    try:
        _wait_for_phase(out, proc, "cuda", "running")
        _wait_for_pytest_session(out, proc)
        proc.send_signal(signal.SIGINT)
        rc, stdout = _finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert rc == 130, stdout[-3000:]
    summary = (out / "summary.txt").read_text()
    phases = _phases(summary)
    assert "INTERRUPTED by SIGINT" in summary
    assert phases["env"][0] == "time limit" and "limit 1 s reached" in phases["env"][1], summary
    # "time limit" is timeout's 124: SIGINT ended the phase within the grace, no SIGKILL (that would read
    # "killed"). Python shows a KeyboardInterrupt when the signal lands after its handler is installed; on a
    # loaded machine it can land earlier, during interpreter start-up, and end the process without a traceback.
    env_txt = (out / "env.txt").read_text()
    assert "Traceback" not in env_txt or "KeyboardInterrupt" in env_txt, env_txt[-2000:]
    assert phases["triton"][0] == "ok" and _junit_counts(out / "triton.xml")[0] > 0
    if _extension_built():
        assert phases["build"][0] == "ok"
    # the signal reached the cuda tests, or (if they had just ended) the bench, or landed between the two (then
    # the bench never starts: "skipped, not started: interrupted"); nothing starts afterwards
    hit = "cuda" if phases["cuda"][0] == "interrupted" else "bench"
    between = hit == "bench" and phases["bench"][0] == "skipped" and "interrupted" in phases["bench"][1]
    assert phases[hit][0] == "interrupted" or between, summary
    assert phases["distributed"][0] == "skipped" and "interrupted" in phases["distributed"][1]
    if hit == "cuda":
        assert phases["bench"][0] == "skipped" and "interrupted" in phases["bench"][1]
        assert "KeyboardInterrupt" in (out / "phases.log").read_text().split("=== gpu_check phase cuda")[1]
        if (out / "cuda.xml").exists():                      # written unless pytest was still starting up
            _junit_counts(out / "cuda.xml")
    else:
        assert phases["cuda"][0] == "ok" and _junit_counts(out / "cuda.xml")[0] > 0


def test_a_kill_mid_run_leaves_every_finished_result(tmp_path):
    out = tmp_path / "out"
    proc = _start(out)
    try:
        _wait_for_phase(out, proc, "cuda", "running")
        _kill_tree(proc.pid)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    summary = (out / "summary.txt").read_text()
    phases = _phases(summary)
    assert set(phases) == set(PHASES) and phases["cuda"][0] == "running" and phases["bench"][0] == "pending"
    assert phases["distributed"][0] == "pending"
    assert phases["triton"][0] == "ok" and phases["env"][0] == "ok"
    n, skipped = _junit_counts(out / "triton.xml")
    assert n > 0 and f"{skipped} skipped of {n} (triton.xml)" in phases["triton"][1]
    assert "versions: python" in (out / "env.txt").read_text()
    assert "fastdiff info" in (out / "build.log").read_text() or not _extension_built()
    assert {"summary.txt", "env.txt", "build.log", "phases.log", "triton.xml"} <= _files(out)


# ------------------------------------------------------------------------------------------- bench options
def test_targets_only_plan_takes_the_targets_lowest_issue_first():
    from fastdiff import bench
    plan = [label for _, label in bench.plan(["posterior", "step", "sample"], device="cuda", targets_only=True)]
    targets = [label for label in plan if "(target, " in label]
    assert targets == [label for label in plan[:len(targets)]]       # the targets first, then the speedups
    assert [bench._target_issue(label) for label in targets] == [3, 3, 3, 3, 3, 4, 4]
    for want in ("posterior d=2 M=65536 N=65536", "posterior d=3072 M=1024 N=50000", "step M=1048576 d=64",
                 "sample mlp loop n=1024 steps=1000", "sample pointcloud ancestral SDE n=100000 steps=1000 N=10000"):
        assert any(label.startswith(want) for label in targets[:5]), want
    assert plan[len(targets):] == ["posterior: speedups", "step: speedups", "sample: speedups"]
    full = bench.plan(["posterior", "step", "sample"], device="cuda")
    assert len(full) > len(plan) and set(plan) <= {label for _, label in full}


def test_brief_policy_keeps_the_method_with_fewer_repetitions():
    from fastdiff.bench import brief_policy
    from fastdiff.bench.timing import CUDA_POLICY, FULL_POLICY
    for policy in (CUDA_POLICY, FULL_POLICY):
        b = brief_policy(policy)
        assert b.warmup == 1 and b.min_reps == 3 and b.max_reps == 5 and b.max_time <= 1.0
        assert b.sample_time == policy.sample_time              # the same sample length: same precision per sample
        assert policy.min_reps > b.min_reps or policy.max_reps > b.max_reps


def test_json_only_writes_results_json_alone_and_report_rewrites_the_rest(tmp_path):
    from fastdiff import bench
    from fastdiff.bench import report
    path = bench.run(["step"], device="cpu", quick=True, out=tmp_path / "run", progress=False, threads=1,
                     targets_only=True, brief=True, json_only=True)
    assert sorted(p.name for p in path.iterdir()) == ["results.json"]
    doc = json.loads((path / "results.json").read_text())
    assert [r for r in doc["rows"] if r["median_s"]] and doc["environment"]["json_only"] is True
    report.rerender(path)                                        # what a maintainer runs after copying it
    assert {"results.csv", "report.md"} <= {p.name for p in path.iterdir()}


def test_cli_accepts_the_reduced_run_options(capsys):
    from fastdiff import bench
    assert bench.main(["--list", "--device", "cuda", "--targets-only", "posterior"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "posterior\tposterior d=2 M=65536 N=65536 (target, issue 3)"
    assert listed[-1] == "posterior\tposterior: speedups" and len(listed) == 4


# ------------------------------------------------------------------------------------------- summary of a GPU run
def _summary_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_distributed_doc() -> dict:
    """distributed/results.json as a 1-GPU run of `--device cuda --quick --ranks 1,2` writes it (made-up times)."""
    env = {"device": "cuda", "cpu_model": "Intel(R) Xeon(R) Platinum 8480+", "cpu_count": 16,
           "gpu_model": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch_version": "2.11.0+cu130", "torch_cuda": "13.0",
           "loadavg_start": [0.5, 0.4, 0.3]}
    sharded = [{"scaling": mode, "shape": shape, "d": d, "M": M, "N": N, "ranks": 1, "threads_per_rank": 1,
                "step_s": step, "local_s": step - merge, "merge_s": merge, "merge_fraction": merge / step,
                "allreduce_bytes_per_step": 8 * M * (d + 2), "pairs_per_s": N * M / step,
                ("speedup" if mode == "strong" else "efficiency"): 1.0, "device": "cuda"}
               for mode, shape, d, M, N, step, merge in (("strong", "d=2", 2, 4096, 1 << 22, 2.4e-4, 6e-5),
                                                         ("weak", "d=2", 2, 4096, 1 << 21, 1.3e-4, 5e-5),
                                                         ("strong", "d=3072", 3072, 64, 1 << 15, 3.1e-3, 1.2e-4),
                                                         ("weak", "d=3072", 3072, 64, 1 << 14, 1.7e-3, 1.1e-4))]
    streamed = [{"case": "d=2 N=1e7", "d": 2, "N": 10**7, "M": 1024, "storage": "float32", "threads": 16,
                 "file_gb": 0.08, "write_s": 0.9, "reps": 2, "pairs_per_s": 1.1e11, "s_per_call": 0.093,
                 "s_first_call": 0.4, "chunk_rows": 4194304, "source": ".npy streamed", "peak_rss_mb": 1711.0,
                 "rss_before_mb": 1650.0, "peak_above_setup_mb": 61.0, "peak_gpu_mb": 97.0, "gpu_before_mb": 0.01,
                 "gpu_model": "NVIDIA H200", "device": "cuda"}]
    return {"environment": env, "git": {"commit": "0123456789abcdef", "dirty_files": []}, "quick": True,
            "commit_env": None, "device": "cuda", "smoke": False, "time_limit_s": 28, "complete": True, "errors": [],
            "notes": ["ranks=2 not run: NCCL needs one GPU per rank and this machine has 1"],
            "distributed": sharded, "streaming": streamed, "seconds": 27.0, "loadavg_end": [1.0, 0.6, 0.4]}


def _gpu_run_files(out: Path):
    """What a GPU run leaves: triton phase (pytest-xdist) finished with one failure, cuda phase killed before
    its junit file, a bench cut short with two cuda targets and the backend order, the distributed bench on
    one GPU."""
    (out / "bench").mkdir(parents=True)
    (out / "distributed").mkdir()
    (out / "distributed" / "results.json").write_text(json.dumps(_cuda_distributed_doc()))
    (out / "env.txt").write_text("device: NVIDIA H200\nversions: python 3.12.3, torch 2.11.0+cu130 (CUDA 13.0), "
                                 "triton 3.6.0\n")
    (out / "triton.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.test_triton" name="test_a"/>'
        '<testcase classname="tests.test_triton" name="test_b"><failure message="x">tb</failure></testcase>'
        '<testcase classname="tests.test_triton" name="test_c"><error message="y">tb</error></testcase>'
        '<testcase classname="tests.test_triton" name="test_d"><skipped message="z"/></testcase>'
        '</testsuite></testsuites>')
    (out / "phases.log").write_text(
        "=== gpu_check phase triton: pytest tests/test_triton.py\n"
        "8 workers [4 items]\n"
        "[gw0] [ 25%] PASSED tests/test_triton.py::test_a \n"
        "=== gpu_check phase cuda: pytest -m gpu tests --ignore=tests/test_triton.py\n"
        "collecting ... collected 1102 items / 1066 deselected / 36 selected\n"
        "[gw1] [  3%] PASSED tests/test_kernels.py::test_posterior[cuda-2] \n"
        "[gw2] [  6%] FAILED tests/test_kernels.py::test_noise[cuda] \n"
        "[gw3] [  8%] SKIPPED tests/test_graphs.py::test_replay[True] \n"
        "tests/test_kernels.py::test_step[cuda] ERROR [ 11%]\n"
        "=== gpu_check phase bench: fastdiff bench posterior step sample --device cuda\n"
        "fastdiff bench: 3 measurements, 1 notes, 170 s -> OUT/bench/results.json\n"
        "=== gpu_check phase distributed: fastdiff.bench.distributed --device cuda --quick\n"
        "  strong d=2 N=4194304 M=4096 ranks=1\n")
    doc = {"device": "cuda", "complete": False, "environment": {"brief": True}, "rows": [{}, {}, {}],
           "targets": [{"met": "yes", "id": "I3-posterior-d2-rate", "measured": "1.3e+12 pairs/s",
                        "required": "≥ 1.0e12 pairs/s"},
                       {"met": "not measured", "id": "I3-pointcloud-sample", "measured": "–", "required": "≥ 50×"}],
           "auto_order": {"summary": {"posterior": {"fastest": {"triton": 2, "cuda": 1}},
                                      "affine_step": {"fastest": {"cuda": 1}},
                                      "pointcloud_sample": {"fastest": {"triton": 1}}}},
           "notes": [{"kind": "error", "provider": "sdpa", "note": "case failed: OutOfMemoryError"}]}
    (out / "bench" / "results.json").write_text(json.dumps(doc))


def test_summary_of_a_gpu_run_reads_junit_xdist_logs_targets_and_order(tmp_path):
    mod = _summary_module()
    out = tmp_path / "out"
    _gpu_run_files(out)
    table = [("env", "ok", "12", "0 problem(s) (env.txt)"), ("build", "ok", "80", "build.log"),
             ("triton", "ok", "95", ""), ("cuda", "killed", "115", "limit 100 s reached"),
             ("bench", "time limit", "180", "limit 180 s reached; bench/results.json"),
             ("distributed", "ok", "31", "distributed/results.json")]
    lines = mod.summarize(str(out), table, 470, 480, dry=False, root=str(tmp_path))
    text = "\n".join(lines)
    assert lines[0].startswith("fastdiff GPU check, GPU run: ") and "git ?" in lines[0]     # no git checkout here
    assert "  device: NVIDIA H200" in lines and "  finished; 470 s of the 480 s budget" in lines
    rows = _phases(text)
    assert rows["triton"] == ("ok", "95 s 1 passed, 1 failed, 1 errors, 1 skipped of 4 (triton.xml)")
    # killed before its junit file: the counts so far from the -v lines, both line formats, and the selection
    assert rows["cuda"][1].endswith("so far: 1 passed, 1 failed, 1 errors, 1 skipped of 36 (phases.log); "
                                    "limit 100 s reached")
    failed = lines[lines.index("failed tests (4; tracebacks in phases.log):") + 1:][:4]
    assert failed == ["  tests.test_triton::test_b", "  tests.test_triton::test_c",
                      "  tests/test_kernels.py::test_noise[cuda]", "  tests/test_kernels.py::test_step[cuda]"]
    assert "targets (cuda, reduced repetitions, 3 measurements, cut short; bench/results.json):" in lines
    assert any(line.split()[:2] == ["yes", "I3-posterior-d2-rate"] for line in lines)
    assert "  fastest first, posterior: triton 2, cuda 1 (cases won)" in lines
    # triton won 3 cases, cuda 2: triton first, torch last
    assert """  measured order: AUTO_ORDER["cuda"] = ('triton', 'cuda', 'torch') (fastdiff/_backend.py)""" in lines
    assert "  bench errors (1): sdpa: case failed: OutOfMemoryError" in lines
    assert rows["distributed"] == ("ok", "31 s distributed/results.json")
    at = lines.index("distributed (cuda: NVIDIA H200; complete; distributed/results.json):")
    assert lines[at + 1:at + 4] == [
        "  sharded, 1 rank: d=2 N=4,194,304 step 0.24 ms (merge 25 %); d=3072 N=32,768 step 3.1 ms (merge 4 %)",
        "  streamed: d=2 N=1e7 0.093 s (RSS 1711 MB, GPU 97 MB)",
        "  note: ranks=2 not run: NCCL needs one GPU per rank and this machine has 1"]
    assert lines[-1] == "files: summary.txt env.txt phases.log triton.xml bench/results.json distributed/results.json"
    assert all(len(line) <= 160 for line in lines) and len(lines) <= 40


def test_summary_states_and_atomic_write(tmp_path):
    mod = _summary_module()
    out = tmp_path / "out"
    out.mkdir()
    running = [("env", "ok", "3", ""), ("build", "running", "", "limit 240 s"), ("triton", "pending", "", ""),
               ("cuda", "pending", "", ""), ("bench", "pending", "", "")]
    lines = mod.summarize(str(out), running, 3, 480, dry=True)
    assert "DRY RUN" in lines[0] and any(line.startswith("  running (this file") for line in lines)
    assert not [line for line in lines if line.startswith("targets") or line.startswith("failed tests")]
    lines = mod.summarize(str(out), running, 9, 480, dry=True, interrupted="TERM")
    assert "  INTERRUPTED by SIGTERM; 9 s of the 480 s budget" in lines
    mod.write(str(out), lines)
    assert (out / "summary.txt").read_text().splitlines() == lines and sorted(os.listdir(out)) == ["summary.txt"]
    # the command line: the table from the environment, as gpu_check.sh passes it
    env = dict(os.environ, GC_TABLE="env|ok|3|\nbuild|FAILED|40|exit 1; build.log\n", GC_ELAPSED="41",
               GC_TOTAL="480", GC_DRY="0", GC_INTERRUPTED="", GC_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), str(out)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    phases = _phases((out / "summary.txt").read_text())
    assert phases["build"] == ("FAILED", "40 s exit 1; build.log")


# ------------------------------------------------------------------------------------------- the distributed bench
def test_readme_regenerates_the_cpu_block_and_puts_a_gpu_run_beside_it(tmp_path, monkeypatch):
    from fastdiff.bench import distributed as bd
    monkeypatch.chdir(ROOT)                   # the block names the folders as given, relative to the checkout
    cpu = Path("benchmarks/results/20261203-cpu-amd-epyc-zen5-distributed-b8ae604")
    readme = (ROOT / "README.md").read_text()
    committed = bd.README_START + readme.split(bd.README_START)[1].split(bd.README_END)[0] + bd.README_END
    assert bd.readme_section([cpu]) == committed
    assert bd.report(json.loads((cpu / "results.json").read_text())) == (cpu / "report.md").read_text()
    gpu = tmp_path / "20261201-cuda-h200-distributed"
    gpu.mkdir()
    (gpu / "results.json").write_text(json.dumps(_cuda_distributed_doc()))
    text = bd.readme_section([cpu, gpu])
    lines = text.splitlines()
    cpu_rows = [line for line in committed.splitlines() if line.startswith("| strong") or line.startswith("| weak")]
    sharded = [line for line in lines if line.startswith("| cpu | strong") or line.startswith("| cpu | weak")]
    assert len(sharded) == 12 and sharded == ["| cpu " + line for line in cpu_rows]       # the CPU rows unchanged
    assert "| cuda | strong | d=2 | 4096 | 4,194,304 | 1 | 0.24 | 0.18 | 0.06 | 25.0 | 131,072 | 1.00 |" in lines
    assert "| cuda | d=2 N=1e7 | float32 | 1024 | 0.08 | 4,194,304 | 0.093 | 2 | 1.1e+11 | 1711 | 61 | 97 |" in lines
    assert "| cpu | d=2 N=1e6 | float32 | 256 | 0.01 | 1,000,000 | 0.0433 | 3 | 5.91e+09 | 548 | 32 | – |" in lines
    assert any(line.startswith("Run `20261201-cuda-h200-distributed` at commit `0123456789ab` on NVIDIA H200 (host: ")
               for line in lines)
    assert "- cuda: ranks=2 not run: NCCL needs one GPU per rank and this machine has 1" in lines
    assert "#### Sharded point cloud (cpu: gloo, CPU ranks, 1 thread each; cuda: NCCL, one GPU per rank)" in lines
    assert len([line for line in lines if line.startswith("|---")]) == 2
    report = bd.report(_cuda_distributed_doc())
    assert "GPU: NVIDIA H200 (139.8 GiB), CUDA 13.0" in report
    assert "## Sharded point cloud (NCCL, one GPU per rank)" in report
    assert "| strong | d=2 | 4096 | 4,194,304 | 1 | 0.24 |" in report and "| peak GPU MB |" in report


def test_cuda_rank_counts_above_the_gpu_count_are_skipped_not_simulated(monkeypatch):
    from fastdiff.bench import distributed as bd
    spawned = []

    def fake_spawn(world, specs, device="cpu", timeout_s=900):
        spawned.append((world, device, [s["rows"] for s in specs]))
        return [[{"step_s": 2e-3, "local_s": 1.5e-3, "merge_s": 5e-4}] * world for _ in specs]
    monkeypatch.setattr(bd, "_spawn_cases", fake_spawn)
    monkeypatch.setattr(torch_cuda(), "device_count", lambda: 1)
    notes, errors, seen = [], [], []
    rows = bd.distributed_rows([("d=2", 2, 8, 100, 40)], (1, 2, 3), 3, lambda m: None, "cuda", notes=notes,
                               errors=errors, done=seen.append)
    assert spawned == [(1, "cuda", [[100], [40]])]            # one spawn, one rank, both scalings
    assert notes == [f"ranks={k} not run: NCCL needs one GPU per rank and this machine has 1" for k in (2, 3)]
    assert [(r["scaling"], r["ranks"], r["device"]) for r in rows] == [("strong", 1, "cuda"), ("weak", 1, "cuda")]
    assert errors == [] and seen == [rows]


def torch_cuda():
    import torch
    return torch.cuda


def test_distributed_bench_without_cuda_is_a_usage_error(tmp_path, capsys):
    if torch_cuda().is_available():
        pytest.skip("this machine has CUDA")
    from fastdiff.bench import distributed as bd
    assert bd.main(["--device", "cuda", "--smoke", "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    assert bd.main(["--device", "tpu", "--smoke", "--out", str(tmp_path / "x")]) == 2


def test_distributed_bench_interrupted_keeps_the_finished_rank_counts(tmp_path):
    """SIGINT to the process group (as `timeout` sends it) once ranks=1 is written: exit 130, the rows kept."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff.bench.distributed", "--smoke", "--no-streaming",
                             "--ranks", "1,3", "--json-only", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120 and proc.poll() is None:
            try:
                if json.loads((out / "results.json").read_text())["distributed"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 130, stdout[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["interrupted"] is True and doc["complete"] is False
    assert [r["ranks"] for r in doc["distributed"]] == [1, 1]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
