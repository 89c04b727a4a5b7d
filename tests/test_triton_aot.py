"""Every Triton kernel compiles ahead of time for sm_90 (H100/H200) without a GPU: `python -m fastdiff.triton.aot
--covering` in a separate process with TRITON_INTERPRET unset, so type and resource errors show up in CI. CI compiles
the covering subset (every value of every axis next to each kernel's heaviest configuration: 63 of the 400
configurations the launchers can pick, ~1/5 of the time); `python -m fastdiff.triton.aot` compiles them all."""
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _nvidia_backend_reason():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return "the installed triton has no NVIDIA backend (triton.backends.nvidia)"
    spec = importlib.util.find_spec("triton.backends.nvidia")
    if not (Path(spec.origin).parent / "bin" / "ptxas").exists():
        return "the installed triton's NVIDIA backend ships no ptxas"
    return None


def test_aot_configurations_cover_every_launcher_choice():
    from fastdiff.triton import _common as C
    from fastdiff.triton.aot import configurations

    confs = {(name, tuple(sorted(cex.items())), label.split()[0]) for _, name, _, cex, _, label in configurations()}
    for d in range(1, 3 * C.SMALL_D_MAX):
        if d <= C.SMALL_D_MAX:
            cfg = C.small_config(d)
            cex = tuple(sorted({k: cfg[k] for k in ("BM", "BN", "DP")}.items()))
            for name in ("_posterior_small_kernel", "_pointcloud_step_small_kernel"):
                for dt in ("fp32", "fp16", "bf16"):
                    assert (name, cex, f"data={dt}") in confs, (name, d)
            # the whole trajectory: one-step tables, B1, B1 and B2; without and with churned or two-stage rows
            for hist, stages in itertools.product((0, 1, 2), (False, True)):
                cex_h = tuple(sorted({**dict(cex), "HIST": hist, "STAGES": stages}.items()))
                for dt in ("fp32", "fp16", "bf16"):
                    assert ("_pointcloud_sample_small_kernel", cex_h, f"data={dt}") in confs, (d, hist, stages)
        else:
            cfg = C.large_config(d)
            for tf32 in (True, False):
                cex = tuple(sorted({"SCREEN_TF32": tf32, **{k: cfg[k] for k in ("BM", "BN", "BK", "BKE")}}.items()))
                for name in ("_posterior_large_kernel", "_posterior_large_split_kernel",
                             "_pointcloud_step_large_kernel"):
                    assert (name, cex, "data=fp32") in confs, (name, d)
                for hist, stages in itertools.product((0, 1, 2), (False, True)):
                    cex_h = tuple(sorted({**dict(cex), "HIST": hist, "STAGES": stages}.items()))
                    assert ("_pointcloud_sample_large_kernel", cex_h, "data=fp32") in confs, (d, hist, stages)
        cfg = C.affine_config(d)
        # numbers as kernel arguments (eager sampler loop), device counters (graph capture), the multistep history
        for noise, ctr, h1, h2 in ((True, False, False, False), (False, False, False, False),
                                   (True, True, False, False), (True, False, True, False), (False, False, True, False),
                                   (True, False, True, True), (False, False, True, True)):
            cex = tuple(sorted({"HAS_NOISE": noise, "CTR_PTR": ctr, "HAS_D1": h1, "HAS_D2": h2, "BM": cfg["BM"],
                                "BK": cfg["BK"]}.items()))
            assert ("_affine_step_kernel", cex, "D=fp32") in confs, d


def test_the_covering_subset_has_every_axis_value_of_every_kernel_next_to_its_heaviest_configuration():
    from fastdiff.triton.aot import HEAVIEST, axes, configurations, covering

    full, sub = configurations(), covering()
    assert set(map(repr, sub)) <= set(map(repr, full)) and len(sub) < len(full) // 4
    for name in {it[1] for it in full}:
        mine = [axes(it[5]) for it in full if it[1] == name]
        chosen = [axes(it[5]) for it in sub if it[1] == name]
        for a in mine:                                   # every (axis, value) pair of the kernel compiles
            for k, v in a.items():
                assert any(c.get(k) == v for c in chosen), (name, k, v)
        heaviest = {k: str(max(int(m[k]) for m in mine)) if k in ("DP", "BK") else HEAVIEST[k] for k in mine[0]}
        assert heaviest in chosen, (name, heaviest)      # and the heaviest configuration itself
        assert heaviest in mine


class _Compile:
    """The compile in the background: conftest.py starts it right after collection when this test is selected,
    so its ~3 CPU-minutes run on the core the (mostly single-threaded) tests leave idle, and the test collects
    the result. Output goes to a file (a pipe nobody reads could fill and stall the compile)."""
    proc = None
    log = None
    cache = None

    @classmethod
    def start(cls, jobs):
        if cls.proc is not None or _nvidia_backend_reason():
            return
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
        cls.cache = tempfile.mkdtemp(prefix="fastdiff-aot-")
        env["TRITON_CACHE_DIR"] = cls.cache                   # compile for real, not from a warm cache
        cls.log = tempfile.TemporaryFile(mode="w+")
        cls.proc = subprocess.Popen([sys.executable, "-m", "fastdiff.triton.aot", "--arch", "90", "--covering",
                                     "--jobs", str(jobs)], cwd=REPO, env=env, stdout=cls.log,
                                    stderr=subprocess.STDOUT, text=True)

    @classmethod
    def finish(cls, timeout=1800):
        """(return code, output) of the compile; starts it first when conftest did not."""
        cls.start(max(1, os.cpu_count() or 1))
        try:
            rc = cls.proc.wait(timeout=timeout)
            cls.log.seek(0)
            return rc, cls.log.read()
        finally:
            cls.stop()

    @classmethod
    def stop(cls):
        if cls.proc is not None and cls.proc.poll() is None:
            cls.proc.kill()
            cls.proc.wait()
        if cls.cache is not None:
            shutil.rmtree(cls.cache, ignore_errors=True)
        cls.cache = None


def test_every_kernel_compiles_for_sm90():
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(reason)
    rc, out = _Compile.finish()
    assert rc == 0, out[-6000:]
    from fastdiff.triton.aot import covering

    m = re.search(r"sm_90: (\d+)/(\d+) configurations of (\d+) kernels compiled", out)
    assert m and m.group(1) == m.group(2) == str(len(covering())) and int(m.group(3)) == 8, out[-3000:]
    assert "FAIL" not in out
