"""The compiled extension: what was built, lazy loading, and that CI really compiled the CUDA kernels."""
import os
import subprocess
import sys

import pytest
import torch

from fastdiff import _backend


def test_build_config_reports_what_was_compiled():
    cfg = _backend.build_config()
    if cfg is None:
        pytest.skip(f"fastdiff._C not built: {_backend.BACKENDS['cpu'].unavailable_reasons()}")
    assert cfg["cpu"] is True and cfg["openmp"] is True
    assert cfg["torch_version"] == torch.__version__, "fastdiff._C was built against another torch: rebuild it"


def test_build_config_states_the_cuda_kernels_limit_once():
    """The CUDA point-cloud kernels' largest d (kCudaMaxD, csrc/common/limits.h), reported even by a CPU-only
    build: fastdiff/_backend.py's refusals read it from here (the launchers and the glue refuse past it:
    tests/test_cuda_emu.py and tests/test_kernels.py)."""
    cfg = _backend.build_config()
    if cfg is None:
        pytest.skip(f"fastdiff._C not built: {_backend.BACKENDS['cpu'].unavailable_reasons()}")
    assert cfg["cuda_max_d"] == 12288


@pytest.mark.skipif(os.environ.get("FASTDIFF_BUILD_CUDA") != "1", reason="only where the CUDA build is required (CI)")
def test_cuda_kernels_were_compiled_for_hopper():
    cfg = _backend.build_config()
    assert cfg is not None and cfg["cuda"] is True
    assert "9.0" in cfg["cuda_arch_list"]


def test_importing_fastdiff_loads_nothing_compiled_and_touches_no_driver():
    code = ("import sys, fastdiff, torch; fastdiff.PureVE(); "
            "assert 'fastdiff._C' not in sys.modules; assert not torch.cuda.is_initialized(); "
            "assert 'fastdiff.triton' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_a_failed_load_is_remembered_and_explained(monkeypatch):
    monkeypatch.setattr(_backend, "_EXTENSION", None)
    monkeypatch.setattr(_backend, "_EXTENSION_ERROR", None)
    import fastdiff
    monkeypatch.delattr(fastdiff, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)          # makes `from . import _C` fail
    with pytest.raises(RuntimeError, match="could not be loaded.*pip install --no-build-isolation"):
        _backend.extension()
    reasons = _backend.BACKENDS["cpu"].unavailable_reasons()
    assert reasons and "could not be loaded" in reasons[0]
    # the torch backend still runs; auto falls back to it on CPU, with cpu's reason recorded
    assert _backend.select("posterior", "auto", device=torch.device("cpu"), dtype=torch.float32, d=2).name == "torch"
    with pytest.raises(ValueError, match="backend 'cpu' cannot run posterior: fastdiff._C could not be loaded"):
        _backend.select("posterior", "cpu", device=torch.device("cpu"))


def test_the_kernel_table_layout_is_the_same_in_python_and_cpp():
    """fastdiff/_table.py and csrc/common/table.h spell the same columns in the same order (the kernels read
    the table the Python side builds, by column number)."""
    import re
    from pathlib import Path

    from fastdiff import _table
    header = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "table.h").read_text()
    enum = re.search(r"enum TableColumn : int \{([^}]*)\}", header).group(1)
    names = [n.strip().split("=")[0].strip() for n in enum.split(",")]
    assert names[-1] == "kTableWidth" and len(names) - 1 == _table.WIDTH
    spelled = [n.removeprefix("kCol") for n in names[:-1]]
    assert [s.lower() for s in spelled] == [c.lower() for c in _table.COLUMNS]
    # the stage and churn noise steps, spelled as shifts in C++
    assert "kStageStepBase = 1u << 31;" in header and _table.STAGE_STEP_BASE == 1 << 31
    assert "kChurnStepBase = (1u << 31) + (1u << 30);" in header and _table.CHURN_STEP_BASE == (1 << 31) + (1 << 30)
