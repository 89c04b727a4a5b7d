"""The shared numeric rule of the point-cloud posterior (finite logits; float32 rows computed in float64 when
their logits could overflow), far-query accuracy, and row invariance (row i's result never depends on the
other rows computed with it), on the backends the numerics own: the torch reference, cpu and triton.

Triton runs under the interpreter on CPU tensors when there is no GPU (as in tests/test_triton.py).
"""
import contextlib
import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiff as fd
from fastdiff import _backend, _precision, _table
from fastdiff.reference import posterior as ref_posterior

F32, F64 = torch.float32, torch.float64
F32_MAX = torch.finfo(F32).max


def _has_cpu_ext():
    return not _backend.BACKENDS["cpu"].unavailable_reasons()


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from fastdiff.triton import _common
    return torch.cuda.is_available() or _common.interpreting()


needs_cpu = pytest.mark.skipif(not _has_cpu_ext(), reason="fastdiff._C is not built")
needs_triton = pytest.mark.skipif(not _has_triton(), reason="triton (or its interpreter) is not available")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", pytest.param("cpu", marks=needs_cpu)]


def cpu_kernel_posterior(x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
    """fastdiff._C's CPU posterior called directly: the kernel in x's dtype, no promotion by the ops layer."""
    f64 = lambda v: torch.as_tensor(v, dtype=F64).reshape(-1)   # noqa: E731
    return _backend.extension().posterior(x, data, f64(alpha), f64(sigma), log_weights, float(bandwidth))


def assert_finite(*ts):
    for t in ts:
        assert bool(torch.isfinite(t).all()), f"non-finite values: {t}"


# ================================================================ the shared numeric rule
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_distance_gives_finite_D(backend):
    """x = 1e20, one point at 0, σ = 1: |x − y|² = 1e40 overflows float32 (it used to give D = NaN).
    The ops layer runs the row in float64: D = 0 exactly, L = −5e39 saturates to −max_float32."""
    x, data = torch.tensor([[1e20]]), torch.zeros(1, 1)
    D, L = fd.ops.posterior(x, data, 1.0, 1.0, backend=backend)
    assert D.dtype == F32 and L.dtype == F32
    assert float(D) == 0.0
    assert float(L) == -F32_MAX


@needs_cpu
def test_cpu_kernel_keeps_overflowing_logits_finite_in_float32():
    """The kernel itself (rule 2, no promotion): the overflowed point keeps the logit −max_float32, not −inf."""
    D, L = cpu_kernel_posterior(torch.tensor([[1e20]]), torch.zeros(1, 1), 1.0, 1.0)
    assert float(D) == 0.0 and float(L) == -F32_MAX
    # two overflowed points share equal weight (the documented limitation that the ops layer's promotion avoids)
    D, L = cpu_kernel_posterior(torch.tensor([[1e20]]), torch.tensor([[-1.0], [1.0]]), 1.0, 1.0)
    assert float(D) == 0.0 and float(L) == pytest.approx(-F32_MAX + 0.6931, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", [1e-20, 1e-25])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_tiny_sigma_query_on_a_data_point_gives_that_point(backend, sigma, dtype):
    """0.5/c = 5e39 (σ = 1e-20) overflows float32; 1/(2c) is clamped so distance 0 never forms 0·inf."""
    data = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, -1.0]], dtype=dtype)
    x = data[[1, 2, 0, 1]].clone()
    D, L = fd.ops.posterior(x, data, 1.0, sigma, backend=backend)
    assert torch.equal(D, x)
    assert torch.equal(L, torch.zeros(4, dtype=dtype))


@needs_cpu
@pytest.mark.parametrize("sigma", [1e-20, 1e-25])
def test_cpu_kernel_tiny_sigma_in_float32(sigma):
    """The kernel in float32 without the ops layer: 1/(2c) clamped to max_float32 (it used to give NaN)."""
    data = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, -1.0]])
    x = data[[2, 0]].clone()
    D, L = cpu_kernel_posterior(x, data, 1.0, sigma)
    assert torch.equal(D, x) and torch.equal(L, torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_point_overflow_gets_the_nearest_point_after_promotion(backend):
    """Every squared distance overflows float32: clamped float32 logits would give equal weights (D = 5e18);
    the row runs in float64 and gets the nearest point, 1e19 (its weight is e^{−4e39 + 5e39} ≈ 1)."""
    x, data = torch.tensor([[1e20]]), torch.tensor([[0.0], [1e19]])
    assert bool(_precision.float64_rows(x, data, 1.0, 1.0).all())
    D, L = fd.ops.posterior(x, data, 1.0, 1.0, backend=backend)
    assert float(D) == float(data[1, 0]) and float(L) == -F32_MAX
    # per-row decision: a normal row next to it is computed in float32, exactly as alone
    x2 = torch.tensor([[1e20], [0.3]])
    D2, L2 = fd.ops.posterior(x2, data, 1.0, 1.0, backend=backend)
    D1, L1 = fd.ops.posterior(x2[1:], data, 1.0, 1.0, backend=backend)
    assert float(D2[0]) == float(data[1, 0])
    assert torch.equal(D2[1:], D1) and torch.equal(L2[1:], L1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_extremes_stay_finite(backend):
    """float64 inputs near the top of the range: distances overflow float64, σ² under/overflows."""
    data = torch.tensor([[0.0, 1e199], [1e199, -1e199], [3.0, 4.0]], dtype=F64)
    x = torch.tensor([[1e200, 1e200], [1e-300, 0.0], [3.0, 4.0], [-1e300, 1e300]], dtype=F64)
    for sigma in (1e-200, 1e-20, 1.0, 1e200):
        D, L = fd.ops.posterior(x, data, 1.0, sigma, backend=backend)
        assert_finite(D, L)
        if sigma <= 1.0:   # a query on a data point gets it
            assert torch.equal(D[2], data[2])
    # σ so large that c = σ² overflows: 1/(2c) is 0 in float64, clamped to the smallest subnormal: D = mean
    D, L = fd.ops.posterior(x[1:3], data[2:], 1.0, 1e200, backend=backend)
    assert torch.equal(D, data[2:].expand(2, 2)) and float(L.abs().max()) < 1e-300


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_nan_or_inf_for_any_finite_input(backend, dtype):
    """A grid of scales of x, data, α, σ, with weights and bandwidth: D and L finite everywhere."""
    g = torch.Generator().manual_seed(3)
    big = 1e30 if dtype == F32 else 1e200
    for xs in (0.0, 1e-30, 1.0, 1e19, big):
        for ys in (1e-30, 1.0, 1e19, big):
            data = (torch.randn(5, 3, generator=g, dtype=F64) * ys).to(dtype)
            x = (torch.randn(4, 3, generator=g, dtype=F64) * xs).to(dtype)
            x[0] = data[1]
            lw = torch.tensor([0.0, -1.0, float("-inf"), 3.0, -50.0], dtype=dtype)
            for sigma in (1e-30, 1e-3, 1.0, 1e19):
                for alpha, bw in ((1.0, 0.0), (0.3, 0.0), (0.9, 0.5)):
                    D, L = fd.ops.posterior(x, data, alpha, sigma, lw, bw, backend=backend)
                    assert_finite(D, L)


def test_trajectory_bound_promotes_rows_that_grow():
    """pointcloud_sample promotes a row when its bound on |x_k| at some step makes the logits overflow."""
    data = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[1.0], [2.0]])
    ones = torch.ones(3, dtype=F64)
    # the second step multiplies x by 1e19: from then on |x| ≈ 2e19, |x|²·0.5/c = 2e38 > 1e36
    A = torch.tensor([1.0, 1e19, 1.0], dtype=F64)
    need = _precision.float64_rows_trajectory(x, data, _table.pack(ones, ones, A, 0 * ones, 0 * ones))
    assert need.tolist() == [True, True]
    need = _precision.float64_rows_trajectory(x, data, _table.pack(ones, ones, ones, 0 * ones, 0 * ones))
    assert need.tolist() == [False, False]


def test_trajectory_bound_follows_the_churn_and_the_stage():
    """The bound sees a row's churned state x̂ = P x + Cchurn z and its stage point u with the stage's own σ: a
    growth there alone (P = 1e19, or a stage σ so small that 1/(2c) overflows float32) promotes the row; the
    same table with P = 1 and no stage does not."""
    data = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[1.0], [2.0]])
    ones, zeros = torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64)
    plain = _table.pack(ones, ones, 0.5 * ones, 0.5 * ones, zeros)
    assert _precision.float64_rows_trajectory(x, data, plain).tolist() == [False, False]
    churned = _table.pack(ones, ones, 0.5 * ones, 0.5 * ones, zeros, P=torch.tensor([1e19, 1.0], dtype=F64))
    assert _precision.float64_rows_trajectory(x, data, churned).tolist() == [True, True]
    staged = _table.pack(ones, ones, 0.5 * ones, 0.5 * ones, zeros, alphaU=ones, sigmaU=1e-30 * ones, Ux=ones,
                         BU=0.1 * ones)
    assert _precision.float64_rows_trajectory(x, data, staged).tolist() == [True, True]
    unused = staged.clone()
    unused[:, _table.BU] = 0.0                   # the same stage columns without a second D: nothing to evaluate
    assert _precision.float64_rows_trajectory(x, data, unused).tolist() == [False, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pointcloud_sample_and_step_promote_overflowing_rows(backend):
    """Rows 1..2 overflow float32 logits at every step: they run in float64 (noise of their own global index),
    row 0 runs in float32; each equals its run alone."""
    data = torch.tensor([[0.0, 0.0], [1e19, 1e19], [-1e19, 3e18]])
    x = torch.tensor([[0.5, 0.1], [1e20, 1e20], [-3e19, 2e19], [0.2, 0.3]])
    K = 3
    alpha, sigma = torch.ones(K, dtype=F64), torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    A, B, C = torch.full((K,), 0.5, dtype=F64), torch.full((K,), 0.5, dtype=F64), torch.full((K,), 0.1, dtype=F64)
    table = _table.pack(alpha, sigma, A, B, C)
    xs = x.clone()
    traj = fd.ops.pointcloud_sample(xs, data, table, 7, 0, return_trajectory=True, backend=backend)
    assert_finite(xs, traj)
    assert torch.equal(traj[-1], xs)
    for r in range(4):
        xr = x[r:r + 1].clone()
        fd.ops.pointcloud_sample(xr, data, table, 7, r, backend=backend)
        assert torch.equal(xr, xs[r:r + 1]), f"row {r}"
    # the overflowing rows approach the nearest point (D = y exactly), not the mean of the cloud
    x64 = x[1:3].double()
    fd.ops.pointcloud_sample(x64, data.double(), table, 7, 1, backend=backend)
    torch.testing.assert_close(xs[1:3], x64.float(), rtol=2e-7, atol=0)
    out = fd.ops.pointcloud_step(x, data, 1.0, 1.0, 0.5, 0.5, 0.0, 7, 0, backend=backend)
    assert_finite(out)
    assert torch.equal(out[1], 0.5 * x[1] + 0.5 * data[1])


# ================================================================ far queries (issue 11, defect 8)
def far_query_problem(d=300, N=400, M=3, seed=11):
    g = torch.Generator().manual_seed(seed)
    data = 3 * torch.randn(N, d, generator=g)
    x = 1e4 * torch.ones(M, d) + torch.randn(M, d, generator=g)
    return x, data


def d_error(D, D64, data):
    return float((D.double() - D64).abs().max()) / float(data.abs().max())


def far_query_errors(fn):
    x, data = far_query_problem()
    D64, _ = ref_posterior(x.double(), data.double(), 1.0, 300.0)
    Dr, _ = ref_posterior(x, data, 1.0, 300.0)
    Db, Lb = fn(x, data, 1.0, 300.0)
    assert_finite(Db, Lb)
    return d_error(Db, D64, data), d_error(Dr, D64, data)


@needs_cpu
def test_far_queries_cpu_at_least_as_accurate_as_the_reference():
    """d = 300, σ = 300, x = 1e4·1 (577σ from the data): the CPU kernel used to err by 2e-2·max|y|."""
    err, err_ref = far_query_errors(lambda *a: fd.ops.posterior(*a, backend="cpu"))
    assert err <= err_ref, f"cpu {err:.3g} > reference {err_ref:.3g}"


@needs_cpu
@pytest.mark.parametrize("d", [64, 784])
def test_cpu_small_sigma_contract_still_holds(d):
    """MATH.md §7 at σ = 1e-3 with near-duplicate data (the double distances must not cost the small-σ accuracy)."""
    g = torch.Generator().manual_seed(d)
    data = torch.rand(300, d, generator=g)
    data[1::2] = data[::2] + 1e-4 * torch.randn(150, d, generator=g)
    x = data[:20] + 2e-3 * torch.randn(20, d, generator=g)
    for sigma in (1e-3, 1.0, 1e3):
        D, L = fd.ops.posterior(x, data, 0.999, sigma, backend="cpu")
        D64, L64 = ref_posterior(x.double(), data.double(), 0.999, sigma)
        assert d_error(D, D64, data) <= 1e-4
        assert float(((L.double() - L64).abs() - (1e-3 + 1e-6 * L64.abs())).max()) <= 0


# ================================================================ row invariance (issue 12, item 3)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("d", [1, 2, 3, 8, 9, 64, 300])
def test_reference_rows_do_not_depend_on_the_other_rows(dtype, d):
    g = torch.Generator().manual_seed(d)
    N = 700 if d < 64 else 150
    data = torch.randn(N, d, generator=g).to(dtype)
    x = (1.3 * torch.randn(70, d, generator=g)).to(dtype)
    alpha = torch.rand(70, generator=g, dtype=F64) * 0.6 + 0.4
    lw = torch.randn(N, generator=g).to(dtype)
    D, L = ref_posterior(x, data, alpha, 0.3, lw, block_elems=1 << 14)
    for a, b in ((0, 1), (5, 6), (3, 40), (69, 70)):
        Dp, Lp = ref_posterior(x[a:b], data, alpha[a:b], 0.3, lw, block_elems=1 << 14)
        assert torch.equal(Dp, D[a:b]) and torch.equal(Lp, L[a:b]), f"rows {a}:{b}"


@needs_cpu
@pytest.mark.parametrize("d", [1, 3, 5, 300])
def test_cpu_rows_do_not_depend_on_the_other_rows(d):
    g = torch.Generator().manual_seed(d)
    data = torch.randn(600, d, generator=g)
    x = 1.3 * torch.randn(50, d, generator=g)
    D, L = fd.ops.posterior(x, data, 0.8, 0.2, backend="cpu")
    for a, b in ((0, 1), (7, 8), (3, 40)):
        Dp, Lp = fd.ops.posterior(x[a:b], data, 0.8, 0.2, backend="cpu")
        assert torch.equal(Dp, D[a:b]) and torch.equal(Lp, L[a:b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_chunking_does_not_change_the_samples(backend):
    """fd.sample(..., chunk_size=100) equals the default bit for bit, and n=400[:100] equals n=100."""
    data = fd.datasets.swiss_roll(500, seed=0)
    cloud = fd.PointCloud(data, fd.VP())
    kw = dict(steps=20, seed=5, backend=backend)
    full = fd.sample(cloud, n=400, **kw)
    chunked = fd.sample(cloud, n=400, chunk_size=100, **kw)
    assert torch.equal(full, chunked)
    assert torch.equal(fd.sample(cloud, n=100, **kw), full[:100])


# ================================================================ triton
def _triton_posterior():
    from fastdiff.triton.posterior import run_posterior
    return run_posterior


@needs_triton
@pytest.mark.parametrize("d", [3, 67])
def test_triton_rows_do_not_depend_on_the_other_rows(d):
    posterior = _triton_posterior()
    g = torch.Generator().manual_seed(d)
    data = torch.randn(90, d, generator=g).to(DEV)
    x = (1.3 * torch.randn(40, d, generator=g)).to(DEV)
    alpha = (torch.rand(40, generator=g, dtype=F64) * 0.6 + 0.4).to(DEV)
    for splits in ((None,) if d <= 64 else (None, 3)):
        D, L = posterior(x, data, alpha, 0.2, splits=splits)
        for a, b in ((0, 1), (5, 9), (33, 34)):
            Dp, Lp = posterior(x[a:b], data, alpha[a:b], 0.2, splits=splits)
            assert torch.equal(Dp, D[a:b]) and torch.equal(Lp, L[a:b]), f"rows {a}:{b}, splits {splits}"


@needs_triton
def test_triton_split_count_does_not_depend_on_the_row_count(monkeypatch):
    from fastdiff.triton import _common
    monkeypatch.setattr(_common, "_sm_count", lambda dev: 132)
    counts = {_common.large_splits(10**6, 784, "cuda")}
    assert counts == {16}
    assert _common.large_splits(10**6, 784, "cpu") == 1
    assert _common.large_splits(100, 784, "cuda") == 1          # fewer than 8 tiles of points per split


@needs_triton
def test_triton_split_scratch_bound_launches_rows_in_chunks(monkeypatch):
    """A small scratch bound splits the rows into several launches; the result is the same bit for bit."""
    from fastdiff.triton import _common
    posterior = _triton_posterior()
    g = torch.Generator().manual_seed(5)
    data = torch.randn(80, 67, generator=g).to(DEV)
    x = torch.randn(70, 67, generator=g).to(DEV)
    D, L = posterior(x, data, 0.9, 0.4, splits=2)
    monkeypatch.setattr(_common, "SPLIT_SCRATCH_BYTES", 4 * 2 * 67 * 32)   # 32 rows (one BM block) per launch
    assert _common.split_row_chunk(2, 67, 32) == 32
    D2, L2 = posterior(x, data, 0.9, 0.4, splits=2)
    assert torch.equal(D, D2) and torch.equal(L, L2)


@needs_triton
def test_far_queries_triton_at_least_as_accurate_as_the_reference():
    """The large-d kernel forms re-scored logits relative to the row's maximum (float32 logits ≈ −2.4e5 would
    round by 0.008 log2 units)."""
    posterior = _triton_posterior()
    err, err_ref = far_query_errors(lambda x, data, a, s: posterior(x.to(DEV), data.to(DEV), a, s))
    assert err <= err_ref, f"triton {err:.3g} > reference {err_ref:.3g}"


@needs_triton
def test_triton_refuses_what_float32_cannot_represent():
    """Triton computes in float32 only: rows that need float64 are refused with the reason, never clamped."""
    posterior = _triton_posterior()
    data = torch.zeros(2, 1, device=DEV)
    # (the ops layer decides, fastdiff._precision; the backend op itself takes what it is given)
    with pytest.raises(ValueError, match="need float64"):
        fd.ops.posterior(torch.tensor([[0.0]], device=DEV), data, 1.0, 1e-20, backend="triton")
    with pytest.raises(ValueError, match="need float64"):
        fd.ops.posterior(torch.tensor([[1e20]], device=DEV), data, 1.0, 1.0, backend="triton")
    # a query on a data point at σ = 1e-10 (0.5/c = 5e19: float32 is fine) gets that point
    D, L = posterior(torch.tensor([[3.0]], device=DEV), torch.tensor([[3.0], [5.0]], device=DEV), 1.0, 1e-10)
    assert float(D) == 3.0 and float(L) == 0.0


@needs_triton
def test_triton_launchers_guard_the_tensors_device(monkeypatch):
    """Every launcher enters device_guard(x.device) around its kernel launch (tensors on cuda:1 must not run on
    the current device). No multi-GPU machine: record the guard's arguments instead."""
    from fastdiff import _table
    from fastdiff.triton import _common
    from fastdiff.triton.affine_step import affine_step
    from fastdiff.triton.pointcloud_sample import pointcloud_sample
    from fastdiff.triton.pointcloud_step import pointcloud_step
    from fastdiff.triton.posterior import posterior
    seen = []

    def recording_guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(_common, "device_guard", recording_guard)
    g = torch.Generator().manual_seed(0)
    for d in (3, 67):
        x = torch.randn(5, d, generator=g).to(DEV)
        data = torch.randn(40, d, generator=g).to(DEV)
        # partial binds this iteration's x and data (the calls run within the iteration)
        calls = [
            partial(posterior, x, data, 0.9, 0.5),
            partial(affine_step, x, x, 0.5, 0.5, 0.1, 1, 0),
            partial(pointcloud_step, x, data, 0.9, 0.5, 0.5, 0.5, 0.1, 1, 0),
            partial(pointcloud_sample, x.clone(), data, _table.pack(0.9, 0.5, 0.5, 0.5, 0.1, t=1.0), 1),
        ]
        if d > 64:
            calls.append(partial(_triton_posterior(), x, data, 0.9, 0.5, splits=2))
        for call in calls:
            seen.clear()
            call()
            assert seen and all(dev == x.device for dev in seen), seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_promotion_is_per_row_with_per_row_coefficients(backend):
    """Rows 0 and 2 need float64 (|x| = 1e20), rows 1 and 3 do not: four runs; per-row alpha and sigma given as
    lists are split with the rows; every row equals the same row computed alone."""
    data = torch.tensor([[0.0], [1e5]])
    x = torch.tensor([[1e20], [0.3], [-1e20], [0.5]])
    alpha, sigma = [1.0, 0.9, 1.0, 0.8], [1.0, 0.5, 2.0, 0.25]
    assert _precision.float64_rows(x, data, alpha, sigma).tolist() == [True, False, True, False]
    assert _precision.runs(_precision.float64_rows(x, data, alpha, sigma)) == [
        (0, 1, True), (1, 2, False), (2, 3, True), (3, 4, False)]
    D, L = fd.ops.posterior(x, data, alpha, sigma, backend=backend)
    assert D[:, 0].tolist()[0::2] == [1e5, 0.0]          # the nearest point, not the equal-weight mean 5e4
    for r in range(4):
        Dr, Lr = fd.ops.posterior(x[r:r + 1], data, alpha[r], sigma[r], backend=backend)
        assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), f"row {r}"


# ================================================================ blocked CPU kernel (issue 15)
# The CPU kernel runs d >= 5 in blocks of 4 queries (padded with copies of the last row) and in groups of rows
# that share each packed tile: every row's arithmetic must be the same whatever rows share its block or group.
def blocked_problem(d, M=23, N=700, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed + d)
    data = torch.randn(N, d, generator=g).to(dtype)
    data[1::3] = data[::3][: data[1::3].shape[0]] + 1e-3 * torch.randn(data[1::3].shape, generator=g).to(dtype)
    x = (0.9 * data[torch.randint(N, (M,), generator=g)] + 0.3 * torch.randn(M, d, generator=g)).to(dtype)
    alpha = torch.rand(M, generator=g, dtype=F64) * 0.6 + 0.4          # both sides of α = ½ (c1 = 0 and 1)
    sigma = torch.rand(M, generator=g, dtype=F64) * 0.5 + 0.05
    lw = torch.randn(N, generator=g).to(dtype)
    lw[::7] = -float("inf")
    return x, data, alpha, sigma, lw


ROW_SLICES = ((0, 1), (1, 4), (3, 10), (5, 23), (22, 23), (4, 8))


@needs_cpu
@pytest.mark.parametrize("d", [5, 64, 300, 784])
def test_cpu_blocked_rows_alone_equal_rows_in_the_batch(d):
    """23 rows (not a multiple of the block of 4), per-row α/σ, log-weights with −inf: rows [a:b] alone equal
    rows a:b of the batch bit for bit (the kernel itself, no ops layer)."""
    x, data, alpha, sigma, lw = blocked_problem(d)
    D, L = cpu_kernel_posterior(x, data, alpha, sigma, lw)
    for a, b in ROW_SLICES:
        Dp, Lp = cpu_kernel_posterior(x[a:b], data, alpha[a:b], sigma[a:b], lw)
        assert torch.equal(Dp, D[a:b]) and torch.equal(Lp, L[a:b]), f"d={d} rows {a}:{b}"
    # the same rows again after other rows: a permuted batch gives every row its own bits
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    Dq, Lq = cpu_kernel_posterior(x[perm], data, alpha[perm], sigma[perm], lw)
    assert torch.equal(Dq, D[perm]) and torch.equal(Lq, L[perm])


@needs_cpu
@pytest.mark.parametrize("d", [5, 300])
def test_cpu_blocked_rows_invariant_in_float64_and_many_rows(d):
    """float64, and more rows than one group (> 128 a thread), N not a multiple of the tile or the vector."""
    x, data, alpha, sigma, lw = blocked_problem(d, M=301, N=333, dtype=F64)
    D, L = cpu_kernel_posterior(x, data, alpha, sigma, lw)
    for a, b in ((0, 1), (127, 131), (255, 301), (300, 301)):
        Dp, Lp = cpu_kernel_posterior(x[a:b], data, alpha[a:b], sigma[a:b], lw)
        assert torch.equal(Dp, D[a:b]) and torch.equal(Lp, L[a:b]), f"d={d} rows {a}:{b}"


@needs_cpu
@pytest.mark.parametrize("d", [5, 64, 784])
def test_cpu_blocked_step_and_sample_rows_invariant_and_equal_to_posterior(d):
    """pointcloud_step of rows [a:b] alone equals the batch's rows, equals the posterior kernel then the
    affine step bit for bit; pointcloud_sample of rows [a:b] alone equals the batch's rows."""
    x, data, _, _, lw = blocked_problem(d, M=13)
    step = fd.ops.pointcloud_step(x, data, 0.8, 0.3, 1.1, 0.4, 0.3, 5, 2, 0, lw, backend="cpu")
    D, _ = cpu_kernel_posterior(x, data, 0.8, 0.3, lw)
    assert torch.equal(step, fd.ops.affine_step(x, D, 1.1, 0.4, 0.3, 5, 2, 0, backend="cpu"))
    alpha = torch.tensor([0.6, 0.8, 0.95], dtype=F64)
    sigma = torch.tensor([0.8, 0.4, 0.1], dtype=F64)
    A, B = torch.tensor([0.5, 0.4, 0.3], dtype=F64), torch.tensor([0.6, 0.7, 0.8], dtype=F64)
    C = torch.full((3,), 0.1, dtype=F64)
    table = _table.pack(alpha, sigma, A, B, C)
    xs = x.clone()
    fd.ops.pointcloud_sample(xs, data, table, 7, 0, lw, backend="cpu")
    assert torch.isfinite(xs).all()
    for a, b in ((0, 1), (3, 10), (12, 13)):
        sa = fd.ops.pointcloud_step(x[a:b], data, 0.8, 0.3, 1.1, 0.4, 0.3, 5, 2, a, lw, backend="cpu")
        assert torch.equal(sa, step[a:b]), f"step rows {a}:{b}"
        xa = x[a:b].clone()
        fd.ops.pointcloud_sample(xa, data, table, 7, a, lw, backend="cpu")
        assert torch.equal(xa, xs[a:b]), f"sample rows {a}:{b}"


@needs_cpu
@pytest.mark.parametrize("d", [16, 300, 3072])
def test_cpu_blocked_small_sigma_contract_random_and_near_duplicates(d):
    """MATH.md §7 at σ = 1e-3 (and 1, 1e3) through the blocked kernel in float32, random and near-duplicate data,
    against float64 direct differences; 11 rows (a padded block), several tiles of points."""
    g = torch.Generator().manual_seed(d)
    N = 2 * (1024 if d <= 64 else 96) + 37
    for near in (False, True):
        data = torch.randn(N, d, generator=g)
        if near:
            data[1::2] = data[::2][: N // 2] + 1e-3 / d ** 0.5 * torch.randn(N // 2, d, generator=g)
        x = 0.9 * data[torch.randint(N, (11,), generator=g)] + 1e-3 * torch.randn(11, d, generator=g)
        for sigma in (1e-3, 1.0, 1e3):
            D, L = cpu_kernel_posterior(x, data, 0.9, sigma)
            D64, L64 = ref_posterior(x.double(), data.double(), 0.9, sigma)
            assert d_error(D, D64, data) <= 1e-4, (near, sigma)
            assert float(((L.double() - L64).abs() - (1e-3 + 1e-6 * L64.abs())).max()) <= 0, (near, sigma)
