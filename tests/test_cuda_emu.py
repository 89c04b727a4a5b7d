"""The CUDA kernels of csrc/cuda/ executed on the CPU under the emulator csrc/emu/cuda_emu.h (marker `cuda_emu`).

The kernels compile as host C++ (one TU, csrc/emu/binding.cpp, built here into build/<name>/ with
torch.utils.cpp_extension.load; never installed). Every GPU thread of a block is an OS thread, __syncthreads a
barrier, shuffles exchange through a per-warp buffer, shared memory is NaN at every block start, and launches obey
sm_90's limits (the emulator's own checks are test_emulator_models_cuda). The small functions emu_* below do what
csrc/ops/ does around each CUDA launcher (dtype, per-row alpha/sigma, scratch [M, d + 1]), on CPU tensors.

Tolerances are the ones tests/test_kernels.py and tests/test_triton.py use: float32 against the torch reference
in float64 and float32 on the same inputs (flash-attention style) plus MATH.md §7 for the posterior; float64 to
1e-11; noise: float32 bit for bit with fd.noise.normal, float64 within 8 ulps.

ThreadSanitizer: FASTDIFF_EMU_TSAN=1 builds the harness with -fsanitize=thread (into build/fastdiff_cuda_emu_tsan)
and runs TSAN_SUBSET only; the Python process must preload the TSan runtime (the command is in README "Tests" and
.ci/run; pass -s so a report reaches the terminal before TSan ends the process).
FASTDIFF_EMU_MODULE=path/to/name.so runs the tests on a harness built elsewhere (experiments on modified kernels).
"""
import math
import os
from pathlib import Path

import pytest
import torch

import fastdiff as fd
from fastdiff import _backend, _table, ops
from fastdiff.reference import affine_step as ref_affine
from fastdiff.reference import pointcloud_step as ref_step
from fastdiff.reference import posterior as ref_posterior
from test_kernels import _check_posterior, _cloud, _gen

pytestmark = pytest.mark.cuda_emu

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps
ROOT = Path(__file__).resolve().parents[1]
TSAN = os.environ.get("FASTDIFF_EMU_TSAN") == "1"
CUDA_MAX_D = 12288


@pytest.fixture(scope="module")
def emu():
    prebuilt = os.environ.get("FASTDIFF_EMU_MODULE")   # a harness built elsewhere (e.g. from a modified kernel)
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


# Under ThreadSanitizer (~10x slower) only a subset runs: every kernel and every __syncthreads (several data
# tiles and blocks per launch), float32 only.
TSAN_SUBSET = {
    "test_emulator_models_cuda": lambda p: True,
    "test_posterior_odd_shapes_near_duplicates_and_sigma_1e_3_to_1e3": lambda p: p["sigma"] == 0.5,
    "test_pointcloud_step_in_place_weights_and_bandwidth": lambda p: True,
    "test_pointcloud_sample_follows_the_reference_step_by_step": lambda p: True,
    "test_affine_step_noise_is_the_contract": lambda p: p["M"] == 301,
}


@pytest.fixture(autouse=True)
def _tsan_subset(request):
    if not TSAN:
        return
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    chosen = TSAN_SUBSET.get(request.node.originalname)
    if chosen is None or params.get("dtype", F32) != F32 or not chosen(params):
        pytest.skip("not in the ThreadSanitizer subset (TSAN_SUBSET)")


# ---------------------------------------------------------------- what csrc/ops/ does around the launchers
def _fn(emu, op, x):
    return getattr(emu, f"{op}_{'f64' if x.dtype == F64 else 'f32'}")


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _cloud_args(x, data, log_weights):
    assert x.shape[1] <= CUDA_MAX_D
    data = data.to(x.dtype).contiguous()
    lw = None if log_weights is None else torch.as_tensor(log_weights).to(x.dtype).contiguous()
    return data, lw


def _coeffs(alpha, sigma, M):
    """alpha, sigma as float64 [1] or both [M] (prepare_coeffs in csrc/ops/common.h)."""
    a = torch.as_tensor(alpha, dtype=F64).reshape(-1).contiguous()
    s = torch.as_tensor(sigma, dtype=F64).reshape(-1).contiguous()
    per_row = M != 1 and (a.numel() == M or s.numel() == M)
    if per_row:
        a, s = a.expand(M).contiguous(), s.expand(M).contiguous()
    return a, s, per_row


def _nan_like(x, shape=None):
    return torch.full(x.shape if shape is None else shape, math.nan, dtype=x.dtype)   # unwritten values show


def emu_posterior(emu, x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
    x = x.contiguous()
    data, lw = _cloud_args(x, data, log_weights)
    M, d = x.shape
    a, s, per_row = _coeffs(alpha, sigma, M)
    D, L = _nan_like(x), _nan_like(x, (M,))
    _fn(emu, "posterior", x)(x.data_ptr(), data.data_ptr(), _ptr(lw), M, data.shape[0], d, float(bandwidth),
                             a.data_ptr(), s.data_ptr(), per_row, D.data_ptr(), L.data_ptr())
    return D, L


def emu_affine_step(emu, x, D, A, B, C, seed, step, sample_offset=0, out=None):
    x, D = x.contiguous(), D.to(x.dtype).contiguous()
    out = _nan_like(x) if out is None else out
    _fn(emu, "affine_step", x)(x.data_ptr(), D.data_ptr(), out.data_ptr(), *x.shape, A, B, C, seed, step,
                               sample_offset)
    return out


def emu_pointcloud_step(emu, x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                        bandwidth=0.0, out=None):
    data, lw = _cloud_args(x, data, log_weights)
    M, d = x.shape
    a, s, _ = _coeffs(alpha, sigma, 1)
    out = _nan_like(x) if out is None else out
    scratch = _nan_like(x, (M * (d + 1),)) if d > 64 else None
    _fn(emu, "pointcloud_step", x)(x.data_ptr(), data.data_ptr(), _ptr(lw), out.data_ptr(), M, data.shape[0], d,
                                   float(bandwidth), a.data_ptr(), s.data_ptr(), A, B, C, seed, step, sample_offset,
                                   _ptr(scratch))
    return out


def emu_pointcloud_sample(emu, x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                          return_trajectory=True):
    """table: the float64 [K, 8] step table (fastdiff._table), passed as it is; x is updated in place."""
    assert x.is_contiguous() and table.dtype == F64 and table.is_contiguous() and table.shape[1] == _table.WIDTH
    data, lw = _cloud_args(x, data, log_weights)
    M, d = x.shape
    K = table.shape[0]
    traj = _nan_like(x, (K + 1, M, d)) if return_trajectory else None
    n_scratch = emu.sample_scratch(table.data_ptr(), K, M, d)      # as csrc/ops/ sizes it (history included)
    scratch = _nan_like(x, (n_scratch,)) if n_scratch else None
    _fn(emu, "pointcloud_sample", x)(x.data_ptr(), data.data_ptr(), table.data_ptr(), M, data.shape[0], d, K, seed,
                                     sample_offset, _ptr(lw), float(bandwidth), _ptr(traj), _ptr(scratch))
    return traj


# ---------------------------------------------------------------- checks (as in test_kernels / test_triton)
def fa_close(kernel, ref64, ref32, what=""):
    """max|kernel − ref64| ≤ 2·max|ref32 − ref64| + 4·eps32·(max|ref64| + 1) (tests/test_triton.py)."""
    assert bool(torch.isfinite(kernel).all()), f"{what}: non-finite output"
    err = float((kernel.double() - ref64.double()).abs().max())
    base = float((ref32.double() - ref64.double()).abs().max())
    atol = 4 * EPS32 * (float(ref64.double().abs().max()) + 1)
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2·{base:.3g} + {atol:.3g}"


def close64(kernel, ref, what=""):
    """float64 kernels against the float64 reference: rtol = atol = 1e-11 (tests/test_kernels.py)."""
    assert bool(torch.isfinite(kernel).all()), f"{what}: non-finite output"
    assert torch.allclose(kernel, ref, rtol=1e-11, atol=1e-11), \
        f"{what}: error {float((kernel - ref).abs().max()):.3g}"


def check_posterior(D, L, x, data, alpha, sigma, lw=None, v=0.0):
    if x.dtype == F32:
        _check_posterior(D, L, x, data.float(), alpha, sigma, lw, v)
    else:
        D0, L0 = ref_posterior(x, data.double(), alpha, sigma, lw, v)
        close64(D, D0, "D")
        close64(L, L0, "L")


def check_step(out, x, data, alpha, sigma, A, B, C, seed, step, off, lw=None, v=0.0):
    r64 = ref_step(x.double(), data.double(), alpha, sigma, A, B, C, seed, step, off,
                   None if lw is None else lw.double(), v)
    if x.dtype == F32:
        r32 = ref_step(x, data.float(), alpha, sigma, A, B, C, seed, step, off, None if lw is None else lw.float(), v)
        fa_close(out, r64, r32, f"step {step}")
    else:
        close64(out, r64, f"step {step}")


def _step_table(process, K, method="ei", ode=False):
    """The float64 [K, 8] kernel table (fastdiff._table) of a sampler grid, as the samplers hand pointcloud_sample."""
    times = fd.time_grid(process, K, "karras", 1e-2 * process.T if process.T > 1 else 1e-2)
    tab = fd.step_table(process, times, method, ode)
    A, B, C = tab.for_prediction("x0")
    return _table.pack(process.alpha(tab.t), tab.sigma, A, B, C, t=tab.t)


def check_sample(emu, x, data, table, seed, off, lw=None, v=0.0):
    """The whole trajectory, each step against the reference step from the kernel's own state (so the
    comparison measures the kernel, not how the grid amplifies earlier rounding); x ends as the last state."""
    x0 = x.clone()
    traj = emu_pointcloud_sample(emu, x, data, table, seed, off, lw, v)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    for k, row in enumerate(table.tolist()):
        a, sg, A, B, C = (row[c] for c in (_table.ALPHA, _table.SIGMA, _table.A, _table.B0, _table.C))
        check_step(traj[k + 1], traj[k], data, a, sg, A, B, C, seed, k, off, lw, v)
    return traj


# ---------------------------------------------------------------- the emulator itself
def test_emulator_models_cuda(emu):
    """Shared memory NaN at every block start, __syncthreads orders shared memory, shuffles move lanes'
    values, and launches fail with the driver's errors at sm_90's limits (9: invalid configuration, 1: invalid
    value)."""
    r = emu.selftest()
    assert r["fresh_shared_status"] == 0 and r["fresh_shared"] == [1] * 5
    assert r["neighbour_status"] == 0 and r["neighbour"] == [(t + 1) % 96 for t in range(96)] * 2
    lanes = range(64)
    expect = []
    for t in lanes:
        w = t & ~31
        expect += [t ^ 5, t + 3 if (t % 32) + 3 < 32 else t, w + 7]
    assert r["shuffle_status"] == 0 and r["shuffle"] == expect
    assert (r["threads_1024"], r["threads_1025"], r["block_z_65"]) == (0, 9, 9)
    assert (r["grid_y_65535"], r["grid_y_65536"], r["grid_z_65536"]) == (0, 9, 9)
    assert (r["dynamic_48k"], r["dynamic_48k_plus_1"]) == (0, 1)
    assert (r["static16_dynamic_48k_minus_16"], r["static16_dynamic_48k"]) == (0, 1)
    assert (r["set_attribute_227k_minus_16"], r["static16_dynamic_227k_minus_16"]) == (0, 0)
    assert (r["static16_dynamic_227k_minus_15"], r["set_attribute_227k_minus_15"]) == (1, 1)


# ---------------------------------------------------------------- the posterior
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (129, 257, 3), (3, 300, 7), (5, 40, 129)])
@pytest.mark.parametrize("sigma", [1e-3, 0.5, 1e3])
def test_posterior_odd_shapes_near_duplicates_and_sigma_1e_3_to_1e3(emu, dtype, M, N, d, sigma):
    y = _cloud(N, d, 1, duplicates=True).to(dtype)
    x = (y.double()[torch.arange(M) % N] + 0.3 * torch.randn(M, d, generator=_gen(2), dtype=F64)).to(dtype)
    D, L = emu_posterior(emu, x, y, 0.8, sigma * math.sqrt(d))
    check_posterior(D, L, x, y, 0.8, sigma * math.sqrt(d))


# Every kernel's boundaries: the small kernels' DMAX 4 | 16 | 64, the large kernel's 4 | 16 | 48 slices per
# thread (d = 1024, 4096), float64's and float32's 48 KiB of dynamic shared memory with the large kernel's static
# logits (d = 6113..6144 and 12257..12288), and the largest d.
BOUNDARY_D = [1, 4, 5, 16, 17, 47, 48, 64, 65, 1024, 1025, 4096, 4097, 6112, 6113, 6144, 12256, 12257, 12288]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", BOUNDARY_D)
def test_every_kernel_at_every_d_boundary(emu, dtype, d):
    """posterior, the fused step and a whole trajectory; M small and N small for the large d."""
    M, N = (3, 37) if d <= 64 else (2, 5)
    y = _cloud(N, d, d, duplicates=True).to(dtype)
    x = (y.double()[torch.arange(M) % N] + torch.randn(M, d, generator=_gen(d + 1), dtype=F64)).to(dtype)
    sigma = 0.7 * math.sqrt(d)
    D, L = emu_posterior(emu, x, y, 0.9, sigma)
    check_posterior(D, L, x, y, 0.9, sigma)
    out = emu_pointcloud_step(emu, x, y, 0.9, sigma, 1.1, 0.4, 0.3, 9, 4, 100)
    check_step(out, x, y, 0.9, sigma, 1.1, 0.4, 0.3, 9, 4, 100)
    table = _step_table(fd.VP(), 2)
    check_sample(emu, x.clone(), y, table, 5, 2**32 - 1)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", [3, 65])
def test_posterior_per_row_t_weights_and_bandwidth(emu, dtype, d):
    p = fd.DriftedVE(T=10.0, beta="t^2")
    y = _cloud(70, d, 3).to(dtype)
    x = (torch.randn(33, d, generator=_gen(4), dtype=F64) * 2).to(dtype)
    t = torch.linspace(0.01, 10.0, 33, dtype=F64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    lw = torch.log_softmax(torch.randn(70, generator=_gen(5), dtype=F64), 0)
    for v in (0.0, 0.05):
        D, L = emu_posterior(emu, x, y, alpha, sigma, lw, v)
        check_posterior(D, L, x, y, alpha, sigma, lw, v)


@pytest.mark.parametrize("d", [2, 65])
def test_far_queries_and_one_hot_limit(emu, d):
    y = _cloud(50, d, 6)
    x = torch.cat([torch.full((2, d), 1e4, dtype=F64), y[:5] + 1e-4]).float()
    for sigma in (1e-6, 1e-3):
        D, L = emu_posterior(emu, x, y.float(), 1.0, sigma)
        assert torch.isfinite(D).all() and torch.isfinite(L).all()
        D0, _ = ref_posterior(x.double(), y.float().double(), 1.0, sigma)
        assert torch.allclose(D.double(), D0, atol=1e-5)
    zero_w = torch.full((50,), -math.inf)
    zero_w[-1] = 0.0                                   # only the last point has mass
    D, L = emu_posterior(emu, x[2:], y.float(), 1.0, 0.5, zero_w)
    assert torch.allclose(D, y[-1].float().expand_as(D)) and torch.isfinite(L).all()


# ---------------------------------------------------------------- the affine step and the noise contract
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("M, d", [(301, 7), (5, 1030), (999, 2)])
def test_affine_step_noise_is_the_contract(emu, dtype, M, d):
    """Box–Muller in float64 from the float32 uniforms with the reference's angle fl64(2π·u), then rounded:
    float32 bit for bit with fd.noise.normal, float64 within 8 ulps (the device libm's last bits)."""
    seed, step, off = 2**40 + 5, 17, 2**33
    zero = torch.zeros(M, d, dtype=dtype)
    zk = emu_affine_step(emu, zero, zero, 1.0, 0.0, 1.0, seed, step, off)
    z64 = fd.noise.normal(seed, torch.arange(off, off + M), step, d, dtype=F64)
    if dtype == F32:
        assert torch.equal(zk, z64.float())
    else:
        ulps = (zk - z64).abs() / (torch.finfo(F64).eps * z64.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= 8, float(ulps.max())
    x = torch.randn(M, d, generator=_gen(9), dtype=dtype)
    D = torch.randn(M, d, generator=_gen(10), dtype=dtype)
    out = emu_affine_step(emu, x, D, 0.9, 0.2, 1.3, seed, step, off)
    ref = ref_affine(x.double(), D.double(), 0.9, 0.2, 1.3, seed, step, off)
    assert bool(((out.double() - ref).abs() <= 4 * torch.finfo(dtype).eps * (ref.abs() + 1)).all())
    xi = x.clone()                                     # in place (out = x), and C = 0 draws nothing
    emu_affine_step(emu, xi, D, 0.9, 0.2, 1.3, seed, step, off, out=xi)
    assert torch.equal(xi, out)
    ode = emu_affine_step(emu, x, D, 0.5, 0.5, 0.0, seed, step, off)
    assert torch.allclose(ode, (0.5 * x.double() + 0.5 * D.double()).to(dtype), atol=4 * torch.finfo(dtype).eps)


# ---------------------------------------------------------------- the fused step and whole trajectories
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("M, N, d", [(7, 3, 2), (130, 70, 5), (9, 33, 65)])
def test_pointcloud_step_in_place_weights_and_bandwidth(emu, dtype, M, N, d):
    g = _gen(M * N * d)
    y = torch.randn(N, d, generator=g, dtype=F64).to(dtype)
    x = torch.randn(M, d, generator=g, dtype=F64).to(dtype)
    lw = torch.log_softmax(torch.randn(N, generator=g, dtype=F64), 0)
    args = (0.8, 0.6, 0.97, 0.4, 0.3, 5, 12, 2**32 - 3)
    out = emu_pointcloud_step(emu, x, y, *args, lw, 0.1)
    check_step(out, x, y, *args, lw, 0.1)
    xi = x.clone()                                     # out = x: the same pointer as input and output
    emu_pointcloud_step(emu, xi, y, *args, lw, 0.1, out=xi)
    assert torch.equal(xi, out)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("process, method, ode, d", [
    (fd.VP(), "ei", False, 2),
    (fd.DriftedVE(T=10.0, beta="t"), "ei-x0", False, 3),
    (fd.PureVE(T=10.0), "euler", True, 7),
    (fd.OU(theta=0.5, g=1.0, T=10.0), "ei", False, 65),
], ids=["VP-2", "DriftedVE-3", "PureVE-ode-7", "OU-65"])
def test_pointcloud_sample_follows_the_reference_step_by_step(emu, dtype, process, method, ode, d):
    g = _gen(d)
    N, M, K = 23, 9, 5
    y = torch.randn(N, d, generator=g, dtype=F64).to(dtype)
    x = process.prior(M, d, seed=4).to(dtype).contiguous()
    lw = torch.log(torch.rand(N, generator=g, dtype=F64) + 0.1)
    check_sample(emu, x, y, _step_table(process, K, method, ode), 3, 7, lw, 0.01)


@pytest.mark.parametrize("row, col", [(0, _table.B1), (1, _table.B2)], ids=["B1-row0", "B2-row1"])
def test_pointcloud_sample_refuses_history_from_before_the_first_row(emu, row, col):
    """The CUDA kernels run B1/B2 with the D's of earlier rows; a first row that would use D_{-1} or D_{-2} (which
    do not exist) is refused, never run on unset history; x is untouched."""
    x = torch.randn(5, 3, generator=_gen(40))
    table = _step_table(fd.VP(), 3)
    table[row, col] = -0.5
    xc = x.clone()
    with pytest.raises(ValueError, match=f"table row {row} uses a D from before the first step"):
        emu_pointcloud_sample(emu, xc, torch.randn(4, 3, generator=_gen(41)), table, 0)
    assert torch.equal(xc, x)


def test_the_launchers_refuse_d_past_cuda_max_d(emu):
    """kCudaMaxD is the launchers' own limit (the one build_config reports): d = cuda_max_d runs (BOUNDARY_D),
    d = cuda_max_d + 1 is refused by every point-cloud launcher before anything is written."""
    assert emu.cuda_max_d == CUDA_MAX_D == max(BOUNDARY_D)
    if not _backend.BACKENDS["cpu"].unavailable_reasons():
        assert _backend.build_config()["cuda_max_d"] == emu.cuda_max_d
    d = CUDA_MAX_D + 1
    M, N = 1, 2
    x, y = torch.randn(M, d, generator=_gen(42)), torch.randn(N, d, generator=_gen(43))
    one = torch.ones(1, dtype=F64)
    D, L, out = _nan_like(x), _nan_like(x, (M,)), _nan_like(x)
    scratch = _nan_like(x, (M * (d + 1),))
    with pytest.raises(RuntimeError, match="posterior CUDA launch failed"):
        emu.posterior_f32(x.data_ptr(), y.data_ptr(), 0, M, N, d, 0.0, one.data_ptr(), one.data_ptr(), False,
                          D.data_ptr(), L.data_ptr())
    with pytest.raises(RuntimeError, match="pointcloud_step CUDA launch failed"):
        emu.pointcloud_step_f32(x.data_ptr(), y.data_ptr(), 0, out.data_ptr(), M, N, d, 0.0, one.data_ptr(),
                                one.data_ptr(), 1.0, 0.5, 0.1, 0, 0, 0, scratch.data_ptr())
    xc = x.clone()
    table = _table.pack(0.9, 0.5, 1.0, 0.1, 0.2)
    with pytest.raises(RuntimeError, match="pointcloud_sample CUDA launch failed"):
        emu.pointcloud_sample_f32(xc.data_ptr(), y.data_ptr(), table.data_ptr(), M, N, d, 1, 0, 0, 0, 0.0, 0,
                                  scratch.data_ptr())
    assert D.isnan().all() and L.isnan().all() and out.isnan().all() and torch.equal(xc, x)


# ---------------------------------------------------------------- defects of issue 11 §2, one test each
def contract(D, L, D64, L64, data):
    """MATH.md §7 (tests/test_triton.py)."""
    assert bool(torch.isfinite(D).all()) and bool(torch.isfinite(L).all()), "non-finite D or L"
    ymax = float(data.double().abs().max())
    d_err = float((D.double() - D64).abs().max()) / (ymax + 1e-12)
    assert d_err <= 1e-4, f"D error {d_err:.3g} (relative to max|y|)"
    l_err = (L.double() - L64).abs() - (1e-3 + 1e-6 * L64.abs())
    assert float(l_err.max()) <= 0, f"L error {float((L.double() - L64).abs().max()):.3g}"


@pytest.mark.parametrize("d", [1, 65])
def test_softmax_sums_keep_the_contract_past_2_pow_24_ulps(emu, d):
    """Issue 11 §2.4. One point of weight 1 and 2¹⁵ points of weight p = 0.999·2⁻²⁴ each: summed one at a time in
    float every p is below half an ulp of the running sum and is lost, so L misses ln(1 + 2¹⁵p) ≈ 2e-3 and D as
    much (2¹⁵ is the smallest power of two where that breaks MATH.md §7). Per-tile sums in float merged in double
    keep §7. (Per-tile float partials lose up to a tile's worth of ulps, more than the float reference's pairwise
    sums here, so the check is §7, which the shared numeric rule 4 asks for.)"""
    n = 2**15
    y = torch.ones(n + 1, d)
    y[0] = 0.0
    x = torch.full((1, d), 0.5)                          # equidistant from 0 and 1
    lw = torch.full((n + 1,), math.log(0.999) - 24 * math.log(2), dtype=F64)
    lw[0] = 0.0
    D, L = emu_posterior(emu, x, y, 1.0, 1.0, lw)
    D64, L64 = ref_posterior(x.double(), y.double(), 1.0, 1.0, lw)
    contract(D, L, D64, L64, y)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", [1, 65])
def test_logits_stay_finite_when_distances_overflow_or_sigma_vanishes(emu, dtype, d):
    """Issue 11 §2.5 and the shared numeric rule 1–2: inv2c is clamped to the largest finite value and every
    logit of a point with finite log-weight to ≥ −max_finite, so D and L stay finite for finite inputs."""
    big = torch.finfo(dtype).max
    far = 1e20 if dtype == F32 else 1e200               # |x − y|² overflows
    y = torch.zeros(1, d, dtype=dtype)
    D, L = emu_posterior(emu, torch.full((1, d), far, dtype=dtype), y, 1.0, 1.0)
    assert torch.equal(D, y) and float(L) == -big
    # several overflowed points share equal weight (the documented limitation); zero-weight points stay out
    y3 = torch.stack([torch.zeros(d), torch.ones(d), torch.full((d,), 7.0)]).to(dtype)
    lw = torch.tensor([0.0, 0.0, -math.inf], dtype=F64)
    D, L = emu_posterior(emu, torch.full((2, d), far, dtype=dtype), y3, 1.0, 1.0, lw)
    assert torch.equal(D, torch.full((2, d), 0.5, dtype=dtype)) and bool(torch.isfinite(L).all())
    out = emu_pointcloud_step(emu, torch.full((2, d), far, dtype=dtype), y3, 1.0, 1.0, 0.0, 1.0, 0.0, 1, 0, 0, lw)
    assert torch.equal(out, torch.full((2, d), 0.5, dtype=dtype))   # the fused step (small d) or its two launches
    # σ so small that 0.5/σ² is not finite in the working type: a query on a data point gets that point
    tiny = 1e-25 if dtype == F32 else 1e-160
    y5 = _cloud(5, d, 8).to(dtype)
    D, L = emu_posterior(emu, y5[2:3].clone(), y5, 1.0, tiny)
    assert torch.equal(D, y5[2:3]) and float(L) == 0.0


def test_far_queries_at_least_as_accurate_as_the_torch_reference(emu):
    """Issue 11 §2.8: a query 577σ from the data (d = 300, σ = 300, x = 1e4·𝟙, data ~ 3·N(0, I)): the float32
    kernel errs no more than the float32 torch reference, both against float64 on the same inputs."""
    d = 300
    for seed in (30, 34):                                # 34: the kernel's float logits erred 10x the reference
        y = (3 * torch.randn(40, d, generator=_gen(seed), dtype=F64)).float()
        x = torch.full((2, d), 1e4)
        D, L = emu_posterior(emu, x, y, 1.0, 300.0)
        Dt, Lt = ops.posterior(x, y, 1.0, 300.0, backend="torch")
        D64, L64 = ref_posterior(x.double(), y.double(), 1.0, 300.0)
        err = float((D.double() - D64).abs().max())
        err_torch = float((Dt.double() - D64).abs().max())
        assert err <= err_torch, (seed, err, err_torch)
        assert float((L.double() - L64).abs().max()) <= float((Lt.double() - L64).abs().max()), seed
