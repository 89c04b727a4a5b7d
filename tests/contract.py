"""The shared contract of the per-op kernel tests (tests/test_<op>.py): which backends this machine can run,
the tolerances, the MATH.md §7 posterior check, and problem generators.

Backends (ids usable with -k): "torch" (the reference itself), "cpu" (fastdiff._C, when it loads), "triton"
(CUDA, or the interpreter on CPU tensors: TRITON_INTERPRET is set in conftest.py), "cuda" (a GPU and the CUDA
kernels) and "cuda_emu": the CUDA kernels of csrc/cuda/ run on the CPU under the emulator csrc/emu/ (built once
per session into build/, never installed), registered here as a test-only backend of fastdiff._backend so that
fastdiff.ops.<op>(..., backend="cuda_emu") runs them through the whole real call path. Emulator cases carry the
`cuda_emu` marker; they are slow (one OS thread per GPU thread), so keep them small.

Tolerances (never loosened to pass), tied to the dtype's own error:
- float32: flash-attention style, against the torch reference in float64 and in float32 on the same inputs:
  max|kernel − ref64| ≤ 2·max|ref32 − ref64| + 4·eps32·(max|ref64| + 1) (fa_close); the posterior also
  elementwise |D − D64| ≤ 2·|D32 − D64| + 1e−6·max|y| (L: + 1e−6·(1 + |L64|)) and MATH.md §7 (math7);
- float64: atol = rtol = 1e−11 against the float64 reference (TOLERANCE, close64);
- affine steps: 4·eps(dtype)·(|ref| + 1) elementwise (step_tol);
- noise: float32 bit for bit with fd.noise.normal on the CPU build, within 8 ulps elsewhere (NOISE_ULPS).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import fastdiff as fd
from fastdiff import _backend, _table
from fastdiff.reference import pointcloud_step as ref_step
from fastdiff.reference import posterior as ref_posterior

F16, F32, F64 = torch.float16, torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps
CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
DTYPE_IDS = {F32: "f32", F64: "f64"}

# (atol, rtol) of a kernel against the reference in the same dtype where the kernel's result is compared
# elementwise (torch.allclose); float32 is compared relative to the float32 reference's own error (fa_close).
TOLERANCE = {F64: (1e-11, 1e-11)}
FA_FACTOR, FA_EPS = 2, 4          # fa_close: 2·|ref32 − ref64| + 4·eps32·(max|ref64| + 1)
STEP_EPS = 4                      # affine steps: 4·eps(dtype)·(|ref| + 1)
NOISE_ULPS = 8                    # normals off the CPU build: within 8 ulps of the float64 Box–Muller
MATH7_D, MATH7_L_ABS, MATH7_L_REL = 1e-4, 1e-3, 1e-6     # MATH.md §7


# ---------------------------------------------------------------- problem generators
def gen(seed):
    return torch.Generator().manual_seed(seed)


def cloud(N, d, seed=0, duplicates=False, scale=1.0):
    """N float64 points in d dimensions; duplicates=True makes points 1 and 2 a near and an exact duplicate of 0."""
    y = scale * torch.randn(N, d, generator=gen(seed), dtype=F64)
    if duplicates and N > 2:
        y[1] = y[0] + 1e-6
        y[2] = y[0]
    return y


# (M, N, d): nice shapes beside odd ones (1, primes, one past a tile or a power of two)
SHAPES = [(1, 1, 1), (7, 3, 2), (129, 257, 3), (3, 300, 7), (5, 40, 129), (64, 64, 8)]


def step_table(process, K, method="ei", ode=False, schedule="karras"):
    """The float64 [K, WIDTH] kernel table (fastdiff._table) of a sampler grid, as the samplers hand
    pointcloud_sample."""
    times = fd.time_grid(process, K, schedule, 1e-2 * process.T if process.T > 1 else 1e-2)
    tab = fd.step_table(process, times, method, ode)
    A, B, C = tab.for_prediction("x0")
    return _table.pack(process.alpha(tab.t), tab.sigma, A, B, C, t=tab.t)


# ---------------------------------------------------------------- checks
def fa_close(kernel, ref64, ref32, what=""):
    """max|kernel − ref64| ≤ 2·max|ref32 − ref64| + 4·eps32·(max|ref64| + 1)."""
    assert bool(torch.isfinite(kernel).all()), f"{what}: non-finite output"
    if kernel.numel() == 0:
        return
    kernel, ref64, ref32 = (t.detach().double().cpu() for t in (kernel, ref64, ref32))
    err = float((kernel - ref64).abs().max())
    base = float((ref32 - ref64).abs().max())
    atol = FA_EPS * EPS32 * (float(ref64.abs().max()) + 1)
    assert err <= FA_FACTOR * base + atol, f"{what}: error {err:.3g} > {FA_FACTOR}·{base:.3g} + {atol:.3g}"


def close64(kernel, ref, what=""):
    """float64 kernels against the float64 reference: TOLERANCE[F64]."""
    atol, rtol = TOLERANCE[F64]
    kernel, ref = kernel.detach().cpu(), ref.detach().cpu()
    assert bool(torch.isfinite(kernel).all()), f"{what}: non-finite output"
    assert torch.allclose(kernel, ref, rtol=rtol, atol=atol), f"{what}: error {float((kernel - ref).abs().max()):.3g}"


def step_tol(ref, dtype):
    """The elementwise bound of an affine step in `dtype` against its float64 value `ref`."""
    return STEP_EPS * torch.finfo(dtype).eps * (ref.abs() + 1)


def math7(D, L, D64, L64, data):
    """MATH.md §7: max|D − D64|/max|y| ≤ 1e−4 and |L − L64| ≤ 1e−3 + 1e−6·|L64|, D and L finite."""
    D, L, D64, L64 = (t.detach().double().cpu() for t in (D, L, D64, L64))
    assert bool(torch.isfinite(D).all()) and bool(torch.isfinite(L).all()), "non-finite D or L"
    ymax = float(data.detach().double().abs().max())
    d_err = float((D - D64).abs().max()) / (ymax + 1e-12) if D.numel() else 0.0
    assert d_err <= MATH7_D, f"D error {d_err:.3g} (relative to max|y|)"
    l_err = (L - L64).abs() - (MATH7_L_ABS + MATH7_L_REL * L64.abs())
    assert L.numel() == 0 or float(l_err.max()) <= 0, f"L error {float((L - L64).abs().max()):.3g}"


def _lw(lw, dtype):
    return None if lw is None else torch.as_tensor(lw).detach().cpu().to(dtype)


def check_posterior(D, L, x, data, alpha, sigma, lw=None, v=0.0):
    """A kernel's (D, L) for these inputs. float32: §7, elementwise 2·|ref32 − ref64| (+ 1e−6 of the scale) and
    fa_close, the references on the same (rounded) inputs; float64: close64."""
    x, data = x.detach().cpu(), data.detach().cpu()
    alpha, sigma = (torch.as_tensor(v_, dtype=F64).cpu() for v_ in (alpha, sigma))
    D0, L0 = ref_posterior(x.double(), data.double(), alpha, sigma, _lw(lw, F64), v)
    if x.dtype == F64:
        close64(D, D0, "D")
        close64(L, L0, "L")
        return
    D1, L1 = ref_posterior(x, data.float(), alpha, sigma, _lw(lw, F32), v)
    D, L = D.detach().cpu(), L.detach().cpu()
    assert bool(torch.isfinite(D).all()) and bool(torch.isfinite(L).all())
    scale = float(data.float().abs().max()) + 1e-12
    errD, errL = (D.double() - D0).abs(), (L.double() - L0).abs()
    assert bool((errD <= 2 * (D1.double() - D0).abs() + 1e-6 * scale).all()), float(errD.max())
    assert bool((errL <= 2 * (L1.double() - L0).abs() + 1e-6 * (1 + L0.abs())).all()), float(errL.max())
    fa_close(D, D0, D1, "D")
    fa_close(L, L0, L1, "L")
    math7(D, L, D0, L0, data)


def check_step(out, x, data, alpha, sigma, A, B, C, seed, step, off, lw=None, v=0.0):
    """A fused step against the reference step from the same x: fa_close in float32, close64 in float64."""
    x, data = x.detach().cpu(), data.detach().cpu()
    r64 = ref_step(x.double(), data.double(), alpha, sigma, A, B, C, seed, step, off, _lw(lw, F64), v)
    if x.dtype == F32:
        r32 = ref_step(x, data.float(), alpha, sigma, A, B, C, seed, step, off, _lw(lw, F32), v)
        fa_close(out, r64, r32, f"step {step}")
    else:
        close64(out, r64, f"step {step}")


def check_trajectory(traj, x0, data, table, seed, off, lw=None, v=0.0):
    """Every state of a trajectory against the reference step from the kernel's own previous state (the
    comparison measures the kernel, not how the grid amplifies earlier rounding)."""
    traj = traj.detach().cpu()
    assert torch.equal(traj[0], x0.detach().cpu())
    for k, row in enumerate(table.tolist()):
        a, sg, A, B, C = (row[c] for c in (_table.ALPHA, _table.SIGMA, _table.A, _table.B0, _table.C))
        check_step(traj[k + 1], traj[k], data, a, sg, A, B, C, seed, k, off, lw, v)


# ---------------------------------------------------------------- the CUDA emulator as a test-only backend
TSAN = os.environ.get("FASTDIFF_EMU_TSAN") == "1"
CUDA_MAX_D = 12288

# Under ThreadSanitizer (~10x slower) only a subset of the cuda_emu cases runs (tests/conftest.py skips the rest):
# every kernel and every __syncthreads (several data tiles and blocks per launch), float32 only. Keys: test names
# (in tests/test_cuda_emu.py and tests/test_<op>.py), values: which parameters.
TSAN_SUBSET = {
    "test_emulator_models_cuda": lambda p: True,
    "test_posterior_odd_shapes_near_duplicates_and_sigma_1e_3_to_1e3": lambda p: p["sigma"] == 0.5,
    "test_pointcloud_step_in_place_weights_and_bandwidth": lambda p: True,
    "test_pointcloud_sample_follows_the_reference_step_by_step": lambda p: True,
    "test_affine_step_noise_is_the_contract": lambda p: p["M"] == 301,
    # both posteriors of a staged step share the block's tile barriers (d <= 64), and d > 64 queues five launches
    "test_churn_and_stage_rows_follow_the_reference": lambda p: p["d"] in (3, 65),
}


def tsan_skip_reason(name, params):
    """Why a test is not in the ThreadSanitizer subset (None when it is)."""
    chosen = TSAN_SUBSET.get(name)
    if chosen is None or params.get("backend", "cuda_emu") != "cuda_emu" or params.get("dtype", F32) != F32 \
            or not chosen(params):
        return "not in the ThreadSanitizer subset (contract.TSAN_SUBSET)"
    return None
_EMU = None


def emulator():
    """The emulator module (csrc/emu/binding.cpp), built once per session (torch.utils.cpp_extension.load into
    build/fastdiff_cuda_emu, or build/fastdiff_cuda_emu_tsan with FASTDIFF_EMU_TSAN=1);
    FASTDIFF_EMU_MODULE=path/to/name.so loads a harness built elsewhere (experiments on modified kernels)."""
    global _EMU
    if _EMU is None:
        _EMU = _load_emulator()
    return _EMU


def _load_emulator():
    prebuilt = os.environ.get("FASTDIFF_EMU_MODULE")
    if prebuilt:
        import importlib.util
        spec = importlib.util.spec_from_file_location(Path(prebuilt).name.split(".")[0], prebuilt)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils.cpp_extension import load
    if TSAN and "libtsan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail("FASTDIFF_EMU_TSAN=1 needs the TSan runtime preloaded: "
                    "LD_PRELOAD=$(g++ -print-file-name=libtsan.so)")
    name = "fastdiff_cuda_emu_tsan" if TSAN else "fastdiff_cuda_emu"
    build_dir = Path(os.environ.get("FASTDIFF_EMU_BUILD_DIR", ROOT / "build" / name))
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++20", "-DFASTDIFF_CUDA_EMU", "-pthread"]
    flags += ["-O1", "-g", "-fsanitize=thread"] if TSAN else ["-O2"]
    preload = os.environ.pop("LD_PRELOAD", None)       # the TSan runtime is for this process, not the compiler
    try:
        return load(name=name, sources=[str(ROOT / "csrc" / "emu" / "binding.cpp")], extra_cflags=flags,
                    extra_ldflags=["-pthread"] + (["-fsanitize=thread"] if TSAN else []),
                    build_directory=str(build_dir), with_cuda=False)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _nan_like(x, shape=None):
    return torch.full(x.shape if shape is None else shape, math.nan, dtype=x.dtype)   # unwritten values show


def _emu_fn(op, x):
    return getattr(emulator(), f"{op}_{'f64' if x.dtype == F64 else 'f32'}")


def _emu_cloud(x, data, log_weights):
    """What csrc/ops/ does around a point-cloud launcher: data and log-weights in x's dtype, contiguous."""
    data = data.to(x.dtype).contiguous()
    lw = None if log_weights is None else log_weights.to(x.dtype).contiguous()
    return data, lw


def _emu_coeffs(alpha, sigma, M):
    """alpha, sigma as float64 [1] or both [M] (prepare_coeffs in csrc/ops/common.h)."""
    a = alpha.to("cpu", F64).reshape(-1).contiguous()
    s = sigma.to("cpu", F64).reshape(-1).contiguous()
    per_row = M != 1 and (a.numel() == M or s.numel() == M)
    if per_row:
        a, s = a.expand(M).contiguous(), s.expand(M).contiguous()
    return a, s, per_row


def _emu_scratch(x):
    M, d = x.shape
    return _nan_like(x, (M * (d + 1),)) if d > 64 else None


class CudaEmuBackend(_backend.Backend):
    """The CUDA kernels under the CPU emulator, on CPU float32/float64 tensors, with the backend contract
    (tests only: in fastdiff._backend.BACKENDS only while a cuda_emu-marked test runs, see conftest.py)."""

    name = "cuda_emu"
    ops = _backend.OPS

    def _op(self, op):
        return getattr(self, f"_{op}")

    def unavailable_reasons(self):
        return [] if shutil.which("c++") or os.environ.get("FASTDIFF_EMU_MODULE") else ["no C++ compiler"]

    def refuse_reasons(self, op, device=None, dtype=None, d=None, table=None, **_):
        reasons = super().refuse_reasons(op)
        if device is not None and torch.device(device).type != "cpu":
            reasons.append(f"inputs are on {device}, the cuda_emu backend runs on CPU tensors")
        if dtype is not None and dtype not in (F32, F64):
            reasons.append(f"dtype {dtype} is not float32 or float64")
        if d is not None and op != "affine_step" and d > CUDA_MAX_D:
            reasons.append(f"d={d} exceeds the CUDA point-cloud kernels' limit of {CUDA_MAX_D}")
        return reasons

    @staticmethod
    def _posterior(x, data, alpha, sigma, log_weights, bandwidth):
        data, lw = _emu_cloud(x, data, log_weights)
        M, d = x.shape
        a, s, per_row = _emu_coeffs(alpha, sigma, M)
        D, L = _nan_like(x), _nan_like(x, (M,))
        _emu_fn("posterior", x)(x.data_ptr(), data.data_ptr(), _ptr(lw), M, data.shape[0], d, float(bandwidth),
                                a.data_ptr(), s.data_ptr(), per_row, D.data_ptr(), L.data_ptr())
        return D, L

    @staticmethod
    def _affine_step(x, D, A, B, C, seed, step, sample_offset, out, D1=None, B1=0.0, D2=None, B2=0.0):
        D, D1, D2 = (None if t is None else t.to(x.dtype).contiguous() for t in (D, D1, D2))
        out = _nan_like(x) if out is None else out
        _emu_fn("affine_step", x)(x.data_ptr(), D.data_ptr(), out.data_ptr(), *x.shape, A, B, C, seed, step,
                                  sample_offset, _ptr(D1), B1, _ptr(D2), B2)
        return out

    @staticmethod
    def _pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out):
        data, lw = _emu_cloud(x, data, log_weights)
        M, d = x.shape
        a, s, _ = _emu_coeffs(alpha, sigma, 1)
        out = _nan_like(x) if out is None else out
        scratch = _emu_scratch(x)                      # held for the call: the launcher gets its pointer
        _emu_fn("pointcloud_step", x)(x.data_ptr(), data.data_ptr(), _ptr(lw), out.data_ptr(), M, data.shape[0], d,
                                      float(bandwidth), a.data_ptr(), s.data_ptr(), A, B, C, seed, step,
                                      sample_offset, _ptr(scratch))
        return out

    @staticmethod
    def _pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory):
        data, lw = _emu_cloud(x, data, log_weights)
        M, d = x.shape
        K = table.shape[0]
        traj = _nan_like(x, (K + 1, M, d)) if return_trajectory else None
        # held for the call: the launcher gets its pointer; sized as csrc/ops/ sizes it (history buffers included)
        n_scratch = emulator().sample_scratch(table.data_ptr(), K, M, d)
        scratch = _nan_like(x, (n_scratch,)) if n_scratch else None
        _emu_fn("pointcloud_sample", x)(x.data_ptr(), data.data_ptr(), table.data_ptr(), M, data.shape[0], d, K,
                                        seed, sample_offset, _ptr(lw), float(bandwidth), _ptr(traj), _ptr(scratch))
        return traj


EMU_BACKEND = CudaEmuBackend()


def register_cuda_emu():
    """Put the test-only cuda_emu backend into fastdiff._backend.BACKENDS (idempotent). conftest.py does this
    around each cuda_emu-marked test only: a registry that kept it would show it to every other test, e.g. the
    benchmark harness, which measures every registered backend (in subprocesses that never register it)."""
    _backend.BACKENDS["cuda_emu"] = EMU_BACKEND


def unregister_cuda_emu():
    if _backend.BACKENDS.get("cuda_emu") is EMU_BACKEND:
        del _backend.BACKENDS["cuda_emu"]


# ---------------------------------------------------------------- the backends this machine runs
DEVICE = {"torch": "cpu", "cpu": "cpu", "triton": "cuda" if CUDA else "cpu", "cuda": "cuda", "cuda_emu": "cpu"}
DTYPES = {"torch": (F32, F64), "cpu": (F32, F64), "triton": (F32,), "cuda": (F32, F64), "cuda_emu": (F32, F64)}
ALL_BACKENDS = ("torch", "cpu", "triton", "cuda", "cuda_emu")


def unavailable(name):
    """Why this machine cannot run backend `name` (empty when it can)."""
    backend = EMU_BACKEND if name == "cuda_emu" else _backend.BACKENDS[name]
    reasons = list(backend.unavailable_reasons())
    if name == "cuda" and not CUDA:
        reasons.append("no CUDA device")
    if name == "triton" and not reasons:
        from fastdiff.triton import _common
        if not CUDA and not _common.interpreting():
            reasons.append("no CUDA device and TRITON_INTERPRET is not 1")
    return reasons


def _marks(name):
    marks = []
    if name == "cuda" or name == "triton" and CUDA:     # on the GPU: scripts/gpu_check.sh's `-m gpu` phase runs them
        marks.append(pytest.mark.gpu)
    if name == "cuda_emu":
        marks.append(pytest.mark.cuda_emu)
    reasons = unavailable(name)
    if reasons:
        marks.append(pytest.mark.skip(reason="; ".join(reasons)))
    return marks


def backends(*names, exclude=()):
    """pytest params over the backends (all by default), id = the backend's name, skipped where unavailable."""
    return [pytest.param(n, id=n, marks=_marks(n)) for n in (names or ALL_BACKENDS) if n not in exclude]


def backend_dtypes(*names, exclude=(), dtypes=(F32, F64)):
    """pytest params (backend, dtype) for each backend and each of `dtypes` it computes in; ids "cpu-f32"."""
    return [pytest.param(n, dt, id=f"{n}-{DTYPE_IDS[dt]}", marks=_marks(n))
            for n in (names or ALL_BACKENDS) if n not in exclude for dt in dtypes if dt in DTYPES[n]]


def device(backend):
    """The device a backend's test tensors live on."""
    return DEVICE[backend]
