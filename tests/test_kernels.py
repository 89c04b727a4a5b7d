"""Compiled kernels (fastdiff._C: `cpu` on CPU tensors here, `cuda` on a GPU) against the plain-torch
reference in float64, on the same inputs. Tolerance relative to the dtype's own error (flash-attention
style): |kernel − ref64| ≤ 2·|ref32 − ref64| + atol, plus MATH.md §7's contract for the posterior."""
import math

import pytest
import torch

import fastdiff as fd
from fastdiff import _backend, _table, ops
from fastdiff.reference import pointcloud_step as ref_step
from fastdiff.reference import posterior as ref_posterior

F64 = torch.float64


def _backends():
    out = []
    for name, device, marks in (("cpu", "cpu", ()), ("cuda", "cuda", (pytest.mark.gpu,))):
        reasons = _backend.BACKENDS[name].unavailable_reasons()
        if name == "cuda" and not torch.cuda.is_available():
            reasons = reasons + ["no CUDA device"]
        marks = marks + ((pytest.mark.skip(reason="; ".join(reasons)),) if reasons else ())
        out.append(pytest.param(name, device, id=name, marks=marks))
    return out


BACKENDS = _backends()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cloud(N, d, seed=0, duplicates=False, scale=1.0):
    y = scale * torch.randn(N, d, generator=_gen(seed), dtype=F64)
    if duplicates and N > 2:
        y[1] = y[0] + 1e-6                      # near-duplicate points
        y[2] = y[0]
    return y


def _check_posterior(D, L, x32, y32, alpha, sigma, lw=None, v=0.0):
    D0, L0 = ref_posterior(x32.double(), y32.double(), alpha, sigma, lw, v)          # float64, same inputs
    D1, L1 = ref_posterior(x32, y32, alpha, sigma, None if lw is None else lw.float(), v)   # float32 reference
    scale = float(y32.abs().max()) + 1e-12
    errD, errL = (D.double().cpu() - D0).abs(), (L.double().cpu() - L0).abs()
    assert torch.isfinite(D).all() and torch.isfinite(L).all()
    assert bool((errD <= 2 * (D1.double() - D0).abs() + 1e-6 * scale).all()), float(errD.max())
    assert bool((errL <= 2 * (L1.double() - L0).abs() + 1e-6 * (1 + L0.abs())).all()), float(errL.max())
    assert float(errD.max()) / scale <= 1e-4                                           # MATH.md §7
    assert bool((errL <= 1e-3 + 1e-6 * L0.abs()).all())


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (129, 257, 3), (3, 300, 7), (5, 40, 129)])
@pytest.mark.parametrize("sigma", [1e-3, 0.5, 1e3])
def test_posterior_odd_shapes_and_extreme_sigma(backend, device, M, N, d, sigma):
    y = _cloud(N, d, 1, duplicates=True)
    x = (y[torch.arange(M) % N] + 0.3 * torch.randn(M, d, generator=_gen(2), dtype=F64)).float()
    y32 = y.float()
    D, L = ops.posterior(x.to(device), y32.to(device), 0.8, sigma * math.sqrt(d), backend=backend)
    _check_posterior(D, L, x, y32, 0.8, sigma * math.sqrt(d))


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_posterior_per_row_time_weights_bandwidth_and_float64(backend, device):
    p = fd.DriftedVE(T=10.0, beta="t^2")
    y = _cloud(70, 3, 3)
    x = torch.randn(33, 3, generator=_gen(4), dtype=F64) * 2
    t = torch.linspace(0.01, 10.0, 33, dtype=F64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    lw = torch.log_softmax(torch.randn(70, generator=_gen(5), dtype=F64), 0)
    for v in (0.0, 0.05):
        D, L = ops.posterior(x.float().to(device), y.float().to(device), alpha, sigma, lw.float().to(device), v,
                             backend=backend)
        _check_posterior(D, L, x.float(), y.float(), alpha, sigma, lw, v)
        D64, L64 = ops.posterior(x.to(device), y.to(device), alpha, sigma, lw.to(device), v, backend=backend)
        D0, L0 = ref_posterior(x, y, alpha, sigma, lw, v)
        assert torch.allclose(D64.cpu(), D0, rtol=1e-11, atol=1e-11) and torch.allclose(L64.cpu(), L0, rtol=1e-11)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_posterior_far_queries_and_one_hot_limit(backend, device):
    y = _cloud(50, 2, 6)
    x = torch.cat([torch.full((2, 2), 1e4, dtype=F64), y[:5] + 1e-4]).float()
    for sigma in (1e-6, 1e-3):
        D, L = ops.posterior(x.to(device), y.float().to(device), 1.0, sigma, backend=backend)
        assert torch.isfinite(D).all() and torch.isfinite(L).all()
        D0, _ = ref_posterior(x.double(), y.float().double(), 1.0, sigma)
        assert torch.allclose(D.double().cpu(), D0, atol=1e-5)
    zero_w = torch.full((50,), -math.inf)
    zero_w[-1] = 0.0                                   # only the last point has mass
    D, L = ops.posterior(x[2:].to(device), y.float().to(device), 1.0, 0.5, zero_w.to(device), backend=backend)
    assert torch.allclose(D.cpu(), y[-1].float().expand_as(D)) and torch.isfinite(L).all()


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_half_precision_data_storage(backend, device):
    y = _cloud(64, 4, 7)
    x = torch.randn(9, 4, generator=_gen(8)).float()
    for dt in (torch.float16, torch.bfloat16):
        ys = y.to(dt)
        D, L = ops.posterior(x.to(device), ys.to(device), 1.0, 0.3, backend=backend)
        _check_posterior(D, L, x, ys.float(), 1.0, 0.3)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_step_noise_is_the_contract(backend, device, dtype):
    M, d = 301, 7
    x = torch.randn(M, d, generator=_gen(9), dtype=dtype)
    D = torch.randn(M, d, generator=_gen(10), dtype=dtype)
    out = ops.affine_step(x.to(device), D.to(device), 0.9, 0.2, 1.3, seed=2**40 + 5, step=17, sample_offset=2**33,
                          backend=backend).cpu()
    z = fd.noise.normal(2**40 + 5, torch.arange(2**33, 2**33 + M), 17, d, dtype=F64)
    ref = 0.9 * x.double() + 0.2 * D.double() + 1.3 * z
    tol = 4 * torch.finfo(dtype).eps * (ref.abs() + 1)
    assert bool(((out.double() - ref).abs() <= tol).all())
    # noise only: z itself to a few ulps (bit for bit on the CPU build, which uses double Box–Muller)
    zk = ops.affine_step(torch.zeros_like(x).to(device), torch.zeros_like(x).to(device), 1.0, 0.0, 1.0, 2**40 + 5, 17,
                         2**33, backend=backend).cpu()
    z_ref = fd.noise.normal(2**40 + 5, torch.arange(2**33, 2**33 + M), 17, d, dtype=dtype)
    if backend == "cpu":
        # the C++ build evaluates Box–Muller in double like the reference: float32 agrees bit for bit,
        # float64 to the libm's last ulp
        assert torch.equal(zk, z_ref) if dtype == torch.float32 else torch.allclose(zk, z_ref, rtol=4e-16, atol=4e-16)
    else:
        ulps = (zk.double() - z).abs() / (torch.finfo(dtype).eps * z.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= 8
    # in place, and C = 0 draws nothing
    xi = x.clone().to(device)
    ops.affine_step(xi, D.to(device), 0.5, 0.5, 0.0, 0, 0, out=xi, backend=backend)
    assert torch.allclose(xi.cpu(), (0.5 * x.double() + 0.5 * D.double()).to(dtype), atol=4 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("M, d", [(2001, 1), (999, 2), (4099, 3), (300, 8), (700, 67), (5, 1030)])
def test_affine_step_float32_noise_in_bulk(backend, device, M, d):
    """Many draws, shapes that split quads, rows and the CPU generator's 256-quad blocks unevenly: the float32
    noise is the reference's (bit for bit on the CPU, whose vectorised Box–Muller is within 3 float64 ulps of
    libm's; to a few float32 ulps elsewhere), and its moments are a standard normal's."""
    zero = torch.zeros(M, d, device=device)
    zk = ops.affine_step(zero, zero, 1.0, 0.0, 1.0, seed=987654321987, step=3, sample_offset=2**32 - 2,
                         backend=backend).cpu()
    z64 = fd.noise.normal(987654321987, torch.arange(2**32 - 2, 2**32 - 2 + M), 3, d, dtype=F64)
    if backend == "cpu":
        assert torch.equal(zk, z64.float())
    else:
        ulps = (zk.double() - z64).abs() / (torch.finfo(torch.float32).eps * z64.abs().clamp_min(1e-3))
        assert float(ulps.max()) <= 8
    n = zk.numel()
    assert abs(float(zk.double().mean())) < 5 / math.sqrt(n)
    assert abs(float(zk.double().var()) - 1) < 5 * math.sqrt(2 / n)
    # the whole update, out of place and in place (out = x), against float64
    x = torch.randn(M, d, generator=_gen(M + d)).to(device)
    D = torch.randn(M, d, generator=_gen(M * d)).to(device)
    ref = 0.97 * x.double().cpu() + 0.05 * D.double().cpu() + 0.3 * z64
    got = ops.affine_step(x, D, 0.97, 0.05, 0.3, 987654321987, 3, 2**32 - 2, backend=backend)
    ops.affine_step(x, D, 0.97, 0.05, 0.3, 987654321987, 3, 2**32 - 2, out=x, backend=backend)
    assert torch.equal(x, got)
    err = float((got.cpu().double() - ref).abs().max())
    assert err <= 4 * torch.finfo(torch.float32).eps * (float(ref.abs().max()) + 1)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_pointcloud_step_is_posterior_then_affine_step(backend, device):
    y = _cloud(90, 3, 11, duplicates=True).float()
    x = torch.randn(65, 3, generator=_gen(12))
    fused = ops.pointcloud_step(x.to(device), y.to(device), 0.7, 0.2, 1.1, 0.4, 0.3, 9, 4, 100, backend=backend).cpu()
    D0, _ = ref_posterior(x.double(), y.double(), 0.7, 0.2)
    z = fd.noise.normal(9, torch.arange(100, 165), 4, 3, dtype=F64)
    ref = 1.1 * x.double() + 0.4 * D0 + 0.3 * z
    assert torch.allclose(fused.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("d", [2, 5])
def test_whole_trajectory_matches_the_reference_step_by_step(backend, device, d):
    p = fd.PureVE(T=20.0)
    data = _cloud(40, d, 13)
    cloud = fd.PointCloud(data.float(), p, bandwidth=0.01)
    kw = dict(n=64, steps=12, schedule="karras", method="ei-x0", seed=3, return_trajectory=True)
    x_ref, traj_ref = fd.sample(cloud, backend="torch", **kw)
    cloud_dev = fd.PointCloud(data.float().to(device), p, bandwidth=0.01)
    x_k, traj_k = fd.sample(cloud_dev, backend=backend, **kw)
    assert traj_k.shape == traj_ref.shape == (13, 64, d)
    for k in range(13):
        scale = float(traj_ref[k].abs().max())
        assert torch.allclose(traj_k[k].cpu(), traj_ref[k], rtol=1e-4, atol=1e-5 * scale), k


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_batch_invariance_through_the_kernels(backend, device):
    cloud = fd.PointCloud(_cloud(50, 2, 14).float().to(device), fd.DriftedVE(T=30.0))
    kw = dict(steps=10, method="ei", seed=8, backend=backend)
    big = fd.sample(cloud, n=300, **kw)
    assert torch.equal(big[:100], fd.sample(cloud, n=100, **kw))
    assert torch.equal(big[120:200], fd.sample(cloud, n=80, sample_offset=120, **kw))
    assert torch.equal(big, fd.sample(cloud, n=300, chunk_size=29, **kw))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("method", fd.METHODS)
def test_gaussian_oracle_holds_through_the_kernels(backend, device, method):
    """A wide Gaussian point cloud is (nearly) Gaussian data; the oracle of its empirical law must match."""
    p = fd.OU(theta=0.5, g=1.0, T=10.0)
    g = torch.Generator().manual_seed(15)
    data = torch.randn(4000, 2, generator=g, dtype=F64) @ torch.tensor([[1.0, 0.0], [0.6, 0.7]], dtype=F64)
    mean, cov = data.mean(0), torch.cov(data.T, correction=0)
    times = fd.time_grid(p, 6, "exponential", 0.3)        # stop where the cloud's law ≈ its Gaussian
    cloud = fd.PointCloud(data.to(device), p, bandwidth=0.0)
    x = fd.sample(cloud, n=20000, times=times, method=method, seed=4, dtype=F64, backend=backend).cpu()
    mu, S = fd.gaussian_oracle(p, times, method, False, mean, cov)
    n = x.shape[0]
    assert bool(((x.mean(0) - mu).abs() <= 5 * torch.sqrt(S.diag() / n) + 0.01).all())
    assert bool(((torch.cov(x.T) - S).abs() <= 5 * torch.sqrt(2 * S.diag()[:, None] * S.diag()[None] / n) + 0.02).all())


def test_compiled_backend_is_used_by_auto_on_cpu():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    chosen = _backend.select("pointcloud_sample", "auto", device=torch.device("cpu"), dtype=torch.float32, d=2)
    assert chosen.name == "cpu"


def test_bad_inputs_name_the_argument():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    C = _backend.extension()
    x, y = torch.randn(3, 2), torch.randn(5, 2)
    one = torch.ones((), dtype=F64)
    with pytest.raises(RuntimeError, match="x must have shape"):
        C.posterior(torch.randn(3), y, one, one)
    with pytest.raises(RuntimeError, match="d=2 columns but data has d=3"):
        C.posterior(x, torch.randn(5, 3), one, one)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.posterior(x.half(), y, one, one)
    with pytest.raises(RuntimeError, match="alpha must be a scalar or have shape"):
        C.posterior(x, y, torch.ones(2, dtype=F64), one)
    with pytest.raises(RuntimeError, match="log_weights must have shape"):
        C.posterior(x, y, one, one, torch.zeros(4))
    with pytest.raises(RuntimeError, match="data must contain at least one point"):
        C.posterior(x, torch.randn(0, 2), one, one)
    with pytest.raises(RuntimeError, match="D must have the shape of x"):
        C.affine_step(x, torch.randn(3, 3), 1.0, 1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="out must match x"):
        C.affine_step(x, x, 1.0, 1.0, 1.0, 0, 0, 0, torch.empty(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        ops.posterior(x, y, 1.0, 0.0, backend="cpu")
    with pytest.raises(ValueError, match="device"):
        ops.posterior(x, y.to("meta"), 1.0, 1.0, backend="cpu")


# ---------------------------------------------------------------- fastdiff._C.pointcloud_sample: the step table
def _compiled():
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    return _backend.extension()


def _kernel_table(process, K, method="ei-x0"):
    """The float64 [K, 8] table (fastdiff._table) of a sampler grid."""
    tab = fd.step_table(process, fd.time_grid(process, K, "karras", 1e-2 * process.T), method)
    A, B, C = tab.for_prediction("x0")
    return _table.pack(process.alpha(tab.t), tab.sigma, A, B, C, t=tab.t)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("d", [3, 9])              # the one-query kernel (d <= 4) and the blocked one (d >= 5)
def test_pointcloud_sample_runs_the_table_row_by_row(backend, device, dtype, d):
    """_C.pointcloud_sample(x, data, table, ...): each state of the trajectory is the reference step of the
    table's row k (noise step k) from the kernel's previous state; x ends as the last state, updated in place."""
    C = _compiled()
    M, N, K, seed, off = 37, 29, 4, 11, 2**33 + 5
    p = fd.DriftedVE(T=10.0, beta="t")
    table = _kernel_table(p, K)
    y = _cloud(N, d, 21, duplicates=True).to(dtype)
    lw = torch.log(torch.rand(N, generator=_gen(22), dtype=F64) + 0.1).to(dtype)
    x = p.prior(M, d, seed=23).to(dtype)
    xk = x.clone().to(device)
    traj = C.pointcloud_sample(xk, y.to(device), table, seed, off, lw.to(device), 0.01, True).cpu()
    assert traj.shape == (K + 1, M, d) and traj.dtype == dtype
    assert torch.equal(traj[0], x) and torch.equal(traj[-1], xk.cpu()) and not torch.equal(traj[-1], x)
    eps = torch.finfo(dtype).eps
    for k, row in enumerate(table.tolist()):
        a, sg, A, B, Cz = (row[c] for c in (_table.ALPHA, _table.SIGMA, _table.A, _table.B0, _table.C))
        prev = traj[k]
        r64 = ref_step(prev.double(), y.double(), a, sg, A, B, Cz, seed, k, off, lw.double(), 0.01)
        if dtype == torch.float32:
            r32 = ref_step(prev, y, a, sg, A, B, Cz, seed, k, off, lw, 0.01)
            tol = 2 * float((r32.double() - r64).abs().max()) + 4 * eps * (float(r64.abs().max()) + 1)
            assert float((traj[k + 1].double() - r64).abs().max()) <= tol, k
        else:
            assert torch.allclose(traj[k + 1], r64, rtol=1e-11, atol=1e-11), k


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("d", [2, 6])
def test_pointcloud_step_is_a_one_row_table(backend, device, d):
    """pointcloud_step and pointcloud_sample share one kernel path: step 0 of a one-row table is bit for bit
    the step; a strided x is updated in place, and return_trajectory=False returns None."""
    C = _compiled()
    y = _cloud(40, d, 24).float().to(device)
    x = torch.randn(50, d, generator=_gen(25)).to(device)
    row = _table.pack(0.8, 0.6, 1.05, 0.3, 0.4)
    stepped = C.pointcloud_step(x, y, torch.tensor([0.8], dtype=F64, device=device),
                                torch.tensor([0.6], dtype=F64, device=device), 1.05, 0.3, 0.4, 7, 0, 3)
    xs = x.clone()
    assert C.pointcloud_sample(xs, y, row, 7, 3) is None
    assert torch.equal(xs, stepped)
    strided = torch.zeros(50, 2 * d, device=device)[:, ::2]
    strided.copy_(x)
    C.pointcloud_sample(strided, y, row, 7, 3)
    assert torch.equal(strided, stepped)


def test_pointcloud_sample_checks_the_table_and_leaves_x_untouched_on_error():
    C = _compiled()
    x, y = torch.randn(3, 2), torch.randn(5, 2)
    good = _table.pack([0.9, 0.8], [0.5, 0.4], [1.0, 1.0], [0.1, 0.1], [0.2, 0.2])
    bad = {
        r"table must have shape \[K, 8\]": (ValueError, good[:, :7].contiguous()),
        r"table must have shape \[K, 8\].*got \[16\]": (ValueError, good.reshape(-1)),
        "table must be float64, got Float": (TypeError, good.float()),
        "table must be a CPU tensor.*meta": (ValueError, good.to("meta")),
        "table must be contiguous": (ValueError, good.t().contiguous().t()),
    }
    for match, (err, table) in bad.items():
        xc = x.clone()
        with pytest.raises(err, match=match):
            C.pointcloud_sample(xc, y, table, 0, 0, None, 0.0, True)
        assert torch.equal(xc, x)


@pytest.mark.parametrize("row, col", [(0, "B1"), (0, "B2"), (1, "B2")])
@pytest.mark.parametrize("value", [0.25, -1e-300, math.nan])
def test_pointcloud_sample_refuses_history_from_before_the_first_row(row, col, value):
    """The cpu glue runs the multistep columns B1/B2 with the D's of earlier rows; a first row that would use
    D_{-1} or D_{-2} (which do not exist) is an error, never run on unset history, and x is untouched."""
    C = _compiled()
    x, y = torch.randn(4, 3, generator=_gen(26)), torch.randn(6, 3, generator=_gen(27))
    table = _table.pack([0.9, 0.8, 0.7], [0.5, 0.4, 0.3], [1.0, 0.99, 0.98], 0.1, 0.2)
    table[row, _table.COLUMNS.index(col)] = value
    xc = x.clone()
    with pytest.raises(ValueError, match=f"table row {row} uses a D from before the first step"):
        C.pointcloud_sample(xc, y, table, 0, 0)
    assert torch.equal(xc, x)


@pytest.mark.gpu
def test_cuda_glue_refuses_d_past_cuda_max_d():
    """d = build_config()["cuda_max_d"] + 1 is refused by the glue of every point-cloud op, naming d; x untouched."""
    if not torch.cuda.is_available() or _backend.BACKENDS["cuda"].unavailable_reasons():
        pytest.skip("needs the CUDA kernels and a GPU")
    C = _backend.extension()
    d = C.build_config()["cuda_max_d"] + 1
    x, y = torch.randn(2, d, device="cuda"), torch.randn(3, d, device="cuda")
    one = torch.ones(1, dtype=F64, device="cuda")
    xc = x.clone()
    with pytest.raises(ValueError, match=f"posterior: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.posterior(x, y, one, one)
    with pytest.raises(ValueError, match=f"pointcloud_step: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.pointcloud_step(x, y, one, one, 1.0, 0.5, 0.1, 0, 0, 0, None, 0.0, x)
    with pytest.raises(ValueError, match=f"pointcloud_sample: the CUDA kernels support d <= {d - 1}, got d={d}"):
        C.pointcloud_sample(x, y, _table.pack(0.9, 0.5, 1.0, 0.1, 0.2), 0, 0)
    assert torch.equal(x, xc)


def test_global_sample_indices_beyond_32_bits():
    """Sample indices past 2³² use the counter's high word; the kernels take them as uint64."""
    if _backend.BACKENDS["cpu"].unavailable_reasons():
        pytest.skip("fastdiff._C not built")
    x = torch.zeros(4, 9)
    out = ops.affine_step(x, x, 1.0, 0.0, 1.0, seed=1, step=2, sample_offset=2**32 + 7, backend="cpu")
    assert torch.equal(out, fd.noise.normal(1, torch.arange(2**32 + 7, 2**32 + 11), 2, 9))
    assert not torch.equal(out, fd.noise.normal(1, torch.arange(7, 11), 2, 9))
