"""What is specific to the CUDA kernels of csrc/cuda/ executed on the CPU under the emulator csrc/emu/cuda_emu.h
(marker `cuda_emu`): the emulator's own model of CUDA (barriers, shuffles, fresh shared memory, sm_90's launch
limits), every kernel at every d boundary, the launchers' d limit and early-history refusal, and the logits'
clamping called on the kernels directly (without fastdiff.ops' float64 promotion). The checks every backend
shares run on the emulator as the `cuda_emu` backend of tests/test_<op>.py (tests/contract.py builds the harness
once per session and registers the backend; select them with `-m cuda_emu` or `-k cuda_emu`).

The small functions emu_* below call that backend's op functions directly (the kernels and what csrc/ops/ does
around each launcher, without fastdiff.ops), from plain numbers. Tolerances: tests/contract.py.

ThreadSanitizer: FASTDIFF_EMU_TSAN=1 builds the harness with -fsanitize=thread (into build/fastdiff_cuda_emu_tsan)
and runs contract.TSAN_SUBSET only (tests/conftest.py skips the rest); the Python process must preload the TSan
runtime (the command is in README "Tests" and .ci/run; pass -s so a report reaches the terminal before TSan ends the
process). FASTDIFF_EMU_MODULE=path/to/name.so runs the tests on a harness built elsewhere (experiments on modified
kernels).
"""
import math

import pytest
import torch

import fastdiff as fd
from contract import (
    CUDA_MAX_D,
    EMU_BACKEND,
    F32,
    F64,
    _nan_like,
    check_posterior,
    check_step,
    check_trajectory,
    cloud,
    emulator,
    gen,
    step_table,
)
from fastdiff import _backend, _table

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(scope="module")
def emu():
    return emulator()


def _backend_emu():
    return EMU_BACKEND


def _f64(v):
    return torch.as_tensor(v, dtype=F64).reshape(-1)


def _lw(x, log_weights):
    return None if log_weights is None else torch.as_tensor(log_weights).to(x.dtype)


def emu_posterior(emu, x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
    return _backend_emu().posterior(x.contiguous(), data, _f64(alpha), _f64(sigma), _lw(x, log_weights),
                                    float(bandwidth))


def emu_pointcloud_step(emu, x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                        bandwidth=0.0, out=None):
    return _backend_emu().pointcloud_step(x, data, _f64(alpha), _f64(sigma), A, B, C, seed, step, sample_offset,
                                          _lw(x, log_weights), float(bandwidth), out)


def emu_pointcloud_sample(emu, x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                          return_trajectory=True):
    """table: the float64 [K, WIDTH] step table (fastdiff._table), passed as it is; x is updated in place."""
    assert x.is_contiguous() and table.dtype == F64 and table.is_contiguous() and table.shape[1] == _table.WIDTH
    return _backend_emu().pointcloud_sample(x, data, table, seed, sample_offset, _lw(x, log_weights),
                                            float(bandwidth), return_trajectory)


def check_sample(emu, x, data, table, seed, off, lw=None, v=0.0):
    """The whole trajectory, each step against the reference step from the kernel's own state; x ends as the last
    state."""
    x0 = x.clone()
    traj = emu_pointcloud_sample(emu, x, data, table, seed, off, lw, v)
    assert torch.equal(traj[-1], x)
    check_trajectory(traj, x0, data, table, seed, off, lw, v)
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
# Every kernel's boundaries: the small kernels' DMAX 4 | 16 | 64, the large kernel's 4 | 16 | 48 slices per
# thread (d = 1024, 4096), float64's and float32's 48 KiB of dynamic shared memory with the large kernel's static
# logits (d = 6113..6144 and 12257..12288), and the largest d.
BOUNDARY_D = [1, 4, 5, 16, 17, 47, 48, 64, 65, 1024, 1025, 4096, 4097, 6112, 6113, 6144, 12256, 12257, 12288]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", BOUNDARY_D)
def test_every_kernel_at_every_d_boundary(emu, dtype, d):
    """posterior, the fused step and a whole trajectory; M small and N small for the large d."""
    M, N = (3, 37) if d <= 64 else (2, 5)
    y = cloud(N, d, d, duplicates=True).to(dtype)
    x = (y.double()[torch.arange(M) % N] + torch.randn(M, d, generator=gen(d + 1), dtype=F64)).to(dtype)
    sigma = 0.7 * math.sqrt(d)
    D, L = emu_posterior(emu, x, y, 0.9, sigma)
    check_posterior(D, L, x, y, 0.9, sigma)
    out = emu_pointcloud_step(emu, x, y, 0.9, sigma, 1.1, 0.4, 0.3, 9, 4, 100)
    check_step(out, x, y, 0.9, sigma, 1.1, 0.4, 0.3, 9, 4, 100)
    table = step_table(fd.VP(), 2)
    check_sample(emu, x.clone(), y, table, 5, 2**32 - 1)


# ---------------------------------------------------------------- the launchers' refusals
@pytest.mark.parametrize("row, col", [(0, _table.B1), (1, _table.B2)], ids=["B1-row0", "B2-row1"])
def test_pointcloud_sample_refuses_history_from_before_the_first_row(emu, row, col):
    """The CUDA kernels run B1/B2 with the D's of earlier rows; a first row that would use D_{-1} or D_{-2} (which
    do not exist) is refused, never run on unset history; x is untouched."""
    x = torch.randn(5, 3, generator=gen(40))
    table = step_table(fd.VP(), 3)
    table[row, col] = -0.5
    xc = x.clone()
    with pytest.raises(ValueError, match=f"table row {row} uses a D from before the first step"):
        emu_pointcloud_sample(emu, xc, torch.randn(4, 3, generator=gen(41)), table, 0)
    assert torch.equal(xc, x)


def test_the_launchers_refuse_d_past_cuda_max_d(emu):
    """kCudaMaxD is the launchers' own limit (the one build_config reports): d = cuda_max_d runs (BOUNDARY_D),
    d = cuda_max_d + 1 is refused by every point-cloud launcher before anything is written."""
    assert emu.cuda_max_d == CUDA_MAX_D == max(BOUNDARY_D)
    if not _backend.BACKENDS["cpu"].unavailable_reasons():
        assert _backend.build_config()["cuda_max_d"] == emu.cuda_max_d
    d = CUDA_MAX_D + 1
    M, N = 1, 2
    x, y = torch.randn(M, d, generator=gen(42)), torch.randn(N, d, generator=gen(43))
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
    y5 = cloud(5, d, 8).to(dtype)
    D, L = emu_posterior(emu, y5[2:3].clone(), y5, 1.0, tiny)
    assert torch.equal(D, y5[2:3]) and float(L) == 0.0

