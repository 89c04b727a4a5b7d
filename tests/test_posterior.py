"""posterior(x, data, alpha, sigma, log_weights, bandwidth) -> (D [M, d], L [M]) on every backend this machine
runs (tests/contract.py: torch, cpu, triton, cuda, cuda_emu), through fastdiff.ops, against the torch reference
in float64 on the same inputs with the shared tolerances (float32 relative to the float32 reference's own error
plus MATH.md §7; float64 to 1e-11). Select one backend with -k, e.g. `-k cuda_emu`."""
import math

import pytest
import torch

import fastdiff as fd
from contract import CUDA, F16, F64, backend_dtypes, backends, check_posterior, cloud, device, gen, math7
from fastdiff import ops
from fastdiff.reference import posterior as ref_posterior


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (129, 257, 3), (3, 300, 7), (5, 40, 129)])
@pytest.mark.parametrize("sigma", [1e-3, 0.5, 1e3])
def test_posterior_odd_shapes_near_duplicates_and_sigma_1e_3_to_1e3(backend, dtype, M, N, d, sigma):
    y = cloud(N, d, 1, duplicates=True).to(dtype)
    x = (y.double()[torch.arange(M) % N] + 0.3 * torch.randn(M, d, generator=gen(2), dtype=F64)).to(dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), 0.8, sigma * math.sqrt(d), backend=backend)
    check_posterior(D, L, x, y, 0.8, sigma * math.sqrt(d))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (129, 7, 3), (5, 129, 7), (9, 33, 64)])
def test_posterior_small_d_across_sigma(backend, M, N, d):
    """Queries near data points at σ = 1e-3, 0.7, 1e3 (α = 1/√(1 + σ²)), float32."""
    g = gen(M + 10 * N + 100 * d)
    data = torch.randn(N, d, generator=g)
    idx = torch.randint(N, (M,), generator=g)
    dev = device(backend)
    for sigma in (1e-3, 0.7, 1e3):
        alpha = 1 / math.sqrt(1 + sigma**2)
        x = (alpha * data[idx] + sigma * torch.randn(M, d, generator=g)).float()
        D, L = ops.posterior(x.to(dev), data.to(dev), alpha, sigma, backend=backend)
        check_posterior(D, L, x, data, alpha, sigma)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [3, 65])
def test_posterior_per_row_t_weights_and_bandwidth(backend, dtype, d):
    p = fd.DriftedVE(T=10.0, beta="t^2")
    y = cloud(70, d, 3).to(dtype)
    x = (torch.randn(33, d, generator=gen(4), dtype=F64) * 2).to(dtype)
    t = torch.linspace(0.01, 10.0, 33, dtype=F64)
    alpha, sigma = p.alpha(t), p.sigma(t)
    lw = torch.log_softmax(torch.randn(70, generator=gen(5), dtype=F64), 0).to(dtype)
    dev = device(backend)
    for v in (0.0, 0.05):
        D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, lw.to(dev), v, backend=backend)
        check_posterior(D, L, x, y, alpha, sigma, lw, v)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("d", [2, 65])
def test_posterior_far_queries_and_one_hot_limit(backend, d):
    y = cloud(50, d, 6)
    x = torch.cat([torch.full((2, d), 1e4, dtype=F64), y[:5] + 1e-4]).float()
    dev = device(backend)
    for sigma in (1e-6, 1e-3):
        D, L = ops.posterior(x.to(dev), y.float().to(dev), 1.0, sigma, backend=backend)
        assert torch.isfinite(D).all() and torch.isfinite(L).all()
        D0, _ = ref_posterior(x.double(), y.float().double(), 1.0, sigma)
        assert torch.allclose(D.double().cpu(), D0, atol=1e-5)
    zero_w = torch.full((50,), -math.inf)
    zero_w[-1] = 0.0                                   # only the last point has mass
    D, L = ops.posterior(x[2:].to(dev), y.float().to(dev), 1.0, 0.5, zero_w.to(dev), backend=backend)
    assert torch.allclose(D.cpu(), y[-1].float().expand_as(D)) and torch.isfinite(L).all()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("d", [2, 4, 7, 65])
@pytest.mark.parametrize("storage", [F16, torch.bfloat16], ids=["f16", "bf16"])
def test_posterior_half_precision_data_storage(backend, d, storage):
    """data stored in half precision, upcast on load: against the reference on the same rounded values."""
    M, N = 11, 29
    g = gen(d)
    data = torch.randn(N, d, generator=g).to(storage)
    x = 0.8 * data[torch.randint(N, (M,), generator=g)].float() + 0.05 * torch.randn(M, d, generator=g)
    dev = device(backend)
    for alpha, sigma in ((0.8, 0.05), (1.0, 0.3)):
        D, L = ops.posterior(x.to(dev), data.to(dev), alpha, sigma, backend=backend)
        check_posterior(D, L, x, data.float(), alpha, sigma)


# Triton: its long-sum test is tests/test_triton.py's (2^15 points take minutes under the interpreter)
@pytest.mark.parametrize("backend", backends(exclude=("triton",)))
@pytest.mark.parametrize("d", [1, 65])
def test_softmax_sums_keep_the_contract_past_2_pow_24_ulps(backend, d):
    """Issue 11 §2.4. One point of weight 1 and 2¹⁵ points of weight p = 0.999·2⁻²⁴ each: summed one at a time in
    float every p is below half an ulp of the running sum and is lost, so L misses ln(1 + 2¹⁵p) ≈ 2e-3 and D as
    much (2¹⁵ is the smallest power of two where that breaks MATH.md §7). Per-tile sums in float merged in double
    keep §7 (the shared numeric rule 4)."""
    n = 2**15
    y = torch.ones(n + 1, d)
    y[0] = 0.0
    x = torch.full((1, d), 0.5)                          # equidistant from 0 and 1
    lw = torch.full((n + 1,), math.log(0.999) - 24 * math.log(2), dtype=F64)
    lw[0] = 0.0
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), 1.0, 1.0, lw.to(dev), backend=backend)
    D64, L64 = ref_posterior(x.double(), y.double(), 1.0, 1.0, lw)
    math7(D, L, D64, L64, y)


@pytest.mark.parametrize("backend", backends())
def test_far_queries_at_least_as_accurate_as_the_torch_reference(backend):
    """Issue 11 §2.8: a query 577σ from the data (d = 300, σ = 300, x = 1e4·𝟙, data ~ 3·N(0, I)): the float32
    kernel errs no more than the float32 torch reference, both against float64 on the same inputs."""
    d = 300
    dev = device(backend)
    for seed in (30, 34):                                # 34: the CUDA kernel's float logits erred 10x the reference
        y = (3 * torch.randn(40, d, generator=gen(seed), dtype=F64)).float()
        x = torch.full((2, d), 1e4)
        D, L = ops.posterior(x.to(dev), y.to(dev), 1.0, 300.0, backend=backend)
        Dt, Lt = ops.posterior(x, y, 1.0, 300.0, backend="torch")
        D64, L64 = ref_posterior(x.double(), y.double(), 1.0, 300.0)
        err = float((D.cpu().double() - D64).abs().max())
        err_torch = float((Dt.double() - D64).abs().max())
        assert err <= err_torch, (seed, err, err_torch)
        assert float((L.cpu().double() - L64).abs().max()) <= float((Lt.double() - L64).abs().max()), seed


# ---------------------------------------------------------------- issue 11, the Triton large-d kernels (d > 64)
def _far_problem(d, seed, N=200, M=3):
    """x = 1e4·𝟙 (+ noise), data ~ 3·N(0, I): every query is hundreds of σ from every point for the σ used below."""
    g = gen(seed + d)
    return 1e4 * torch.ones(M, d) + torch.randn(M, d, generator=g), 3 * torch.randn(N, d, generator=g)


@pytest.mark.parametrize("backend", backends("triton"))
@pytest.mark.parametrize("d, seed, far_sigmas", [(65, 0, 577.0), (65, 2, 471.0), (128, 11, 471.0), (300, 5, 577.0),
                                                 (300, 4, 471.0), (65, 1, 50.0), (65, 1, 1000.0)])
def test_far_queries_large_d_at_least_as_accurate_as_the_reference(backend, d, seed, far_sigmas):
    """Issue 11 defect 8 on the large-d path: |x − y| ≥ far_sigmas·σ, so every logit is ≈ −far_sigmas²/2·log2(e)
    (−1.6e5 log2 units at 471σ) and its own float32 rounding moves the weights by ~1%; the kernel must form the
    logits' differences without rounding them at that magnitude. Before, its error was 0.1x..2x the reference's
    (the first five cases 1.2x..2.1x); now ~1e-7·max|y|. The posterior whole, split over the data (the merge of
    split partials) and the fused step (its D). The slack is half a float32 ulp of max|D64|: D's final rounding,
    which no float32 result avoids."""
    from contract import EPS32
    from fastdiff.triton.posterior import run_posterior
    x, data = _far_problem(d, seed)
    sigma = float((x.double()[:, None] - data.double()[None]).norm(dim=2).min()) / far_sigmas
    D64, _ = ref_posterior(x.double(), data.double(), 1.0, sigma)
    D32, _ = ref_posterior(x, data, 1.0, sigma)
    ymax = float(data.abs().max())
    err_ref = float((D32.double() - D64).abs().max()) / ymax
    slack = 0.5 * EPS32 * float(D64.abs().max()) / ymax
    dev = device(backend)
    xd, yd = x.to(dev), data.to(dev)
    results = {"posterior": ops.posterior(xd, yd, 1.0, sigma, backend=backend)[0],
               "split": run_posterior(xd, yd, 1.0, sigma, splits=3)[0],
               "step": ops.pointcloud_step(xd, yd, 1.0, sigma, 0.0, 1.0, 0.0, seed=0, step=0, backend=backend)}
    for what, D in results.items():
        err = float((D.cpu().double() - D64).abs().max()) / ymax
        assert err <= err_ref + slack, f"{what}: triton {err:.3g} > reference {err_ref:.3g} + {slack:.2g}"


@pytest.mark.parametrize("backend", backends("triton"))
def test_large_d_sums_merge_in_double(backend):
    """Rule 4 on the large-d path (d = 65): one point of weight 1 at y = 𝟙 and 2¹² points of weight 2⁻³⁰ at y = −𝟙.
    Each tile of 32 adds 2⁻²⁵ to sums near 1, half a float32 ulp: float32 sums never move, missing 2⁻¹⁸ of the
    weight (D off by 7.6e-6·max|y|, L by 3.8e-6, where the contract's elementwise bound is ~1e-6). Per-tile sums
    merged into float64 keep it, in the whole posterior, its split partials and the fused step's accumulator."""
    from contract import check_step
    from fastdiff.triton.posterior import run_posterior
    n, d = 2**12, 65
    data = torch.cat([torch.ones(1, d), -torch.ones(n, d)])
    lw = torch.cat([torch.zeros(1, dtype=F64), torch.full((n,), -30 * math.log(2), dtype=F64)])
    x = 0.01 * torch.randn(2, d, generator=gen(7))
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), data.to(dev), 1.0, 1e3, lw.to(dev), backend=backend)
    check_posterior(D, L, x, data, 1.0, 1e3, lw)
    D, L = run_posterior(x.to(dev), data.to(dev), 1.0, 1e3, lw.to(dev), splits=2)
    check_posterior(D, L, x, data, 1.0, 1e3, lw)
    out = ops.pointcloud_step(x.to(dev), data.to(dev), 1.0, 1e3, 0.0, 1.0, 0.0, seed=0, step=0, log_weights=lw.to(dev),
                              backend=backend)
    check_step(out, x, data, 1.0, 1e3, 0.0, 1.0, 0.0, 0, 0, 0, lw)


# ---------------------------------------------------------------- far queries (issue 11, defect 8)
# A query far from every data point: each logit lw − |x − αy|²/(2c) has a large distance part p, and every
# working-precision formulation (the reference's too) loses ≈ u·p of the logit differences that set the weights
# (D erred by 2e-2·max|y| in float32 at 577σ). The kernels recompute such rows (every point's p > d + 16,
# csrc/common/far.h) with double-double logits, so they must be at least as accurate as the torch reference,
# against a float64 brute force (float32 inputs; its own error ≈ 2⁻⁵³·p ≪ 2⁻²⁴) or mpmath (float64 inputs).
# Slack FAR_SLACK·eps(dtype)·max|y| (L: ·(1 + |L|)): the kernel and the reference each round D to the dtype once
# (½ ulp) and sum in a different order (≤ 2u for the compensated far sums): 4 eps covers both, never more.
FAR_DIMS = [1, 2, 3, 4, 5, 8, 16, 47, 64, 65, 300, 784]
FAR_SLACK = 4


def far_problem(d, sigma, reach, dtype, N=64):
    """data ~ 3·N(0, I) with every other point a near-duplicate (1e-4 away); row 0 `reach`·σ beyond the data along
    𝟙, row 1 along a random direction. reach ≥ 10·max(1, √d/3) puts the nearest point's distance part above d + 16
    (at d = 300, 10σ is nearer than the noise's own √d·σ: not far)."""
    g = gen(1000 + d)
    y = 3 * torch.randn(N, d, generator=g, dtype=F64)
    y[1::2] = y[::2] + 1e-4 * torch.randn(N // 2, d, generator=g, dtype=F64)
    rows = []
    for e in (torch.ones(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)):
        e = e / e.norm()
        rows.append(e * (float((y @ e).max()) + reach * sigma))
    return torch.stack(rows).to(dtype), y.to(dtype)


def far_truth(x, y, sigma):
    """(D, L) at α = 1 without weights: float64 brute force for float32 inputs, mpmath (40 digits) for float64."""
    if x.dtype != F64:
        return ref_posterior(x.double(), y.double(), 1.0, sigma)
    import mpmath
    with mpmath.workdps(40):
        Y = [[mpmath.mpf(float(v)) for v in row] for row in y.tolist()]
        D, L = [], []
        for row in x.tolist():
            xr = [mpmath.mpf(v) for v in row]
            two_var = 2 * mpmath.mpf(sigma) ** 2
            logits = [-sum((a - b) ** 2 for a, b in zip(xr, yj, strict=True)) / two_var for yj in Y]
            m = max(logits)
            w = [mpmath.exp(v - m) for v in logits]
            s = mpmath.fsum(w)
            D.append([float(mpmath.fsum(wj * yj[k] for wj, yj in zip(w, Y, strict=True)) / s) for k in range(len(xr))])
            L.append(float(m + mpmath.log(s)))
    return torch.tensor(D, dtype=F64), torch.tensor(L, dtype=F64)


@pytest.mark.parametrize("backend, dtype", backend_dtypes("cpu", "cuda", "cuda_emu"))
@pytest.mark.parametrize("d", FAR_DIMS)
def test_posterior_far_queries_at_least_as_accurate_as_the_reference(backend, dtype, d):
    """Issue 11 §2.8 at every d (the CPU row and blocked kernels, the CUDA small and large kernels): queries
    10·max(1, √d/3)σ and 1000σ beyond data ~ 3·N(0, I) with near-duplicates, σ = 1, 30, 300, float32 and float64."""
    eps = torch.finfo(dtype).eps
    dev = device(backend)
    for sigma in (1.0, 30.0, 300.0):
        for reach in (10 * max(1.0, math.sqrt(d) / 3), 1000.0):
            x, y = far_problem(d, sigma, reach, dtype)
            Dt, Lt = far_truth(x, y, sigma)
            D, L = ops.posterior(x.to(dev), y.to(dev), 1.0, sigma, backend=backend)
            Dr, Lr = ops.posterior(x, y, 1.0, sigma, backend="torch")
            ymax = float(y.double().abs().max())
            err, err_ref = (float((t.double().cpu() - Dt).abs().max()) for t in (D, Dr))
            assert err <= err_ref + FAR_SLACK * eps * ymax, (sigma, reach, err, err_ref)
            lerr, lerr_ref = ((t.double().cpu() - Lt).abs() for t in (L, Lr))
            assert bool((lerr <= lerr_ref + FAR_SLACK * eps * (1 + Lt.abs())).all()), (sigma, reach, lerr, lerr_ref)


# The far rows' screen (csrc/cpu/posterior_row.h): each point's logit in plain double with an error bound; only
# points within 80 nats of the best lower bound reach the double-double pass, and past 2¹⁶ candidates a second pass
# screens every point again. Truth: float64 brute force of the float32 inputs (its error ≈ 2⁻⁵³·p ≪ 2⁻²⁴). The
# far pass rounds D and L once and sums in compensated double: 2 eps of max|y| (L: of 1 + |L|) holds; a dropped
# point that mattered (a wrong bound, a cut in the wrong units, a lost candidate) moves D by far more.
FAR_SCREEN_N = 70_000   # > 2¹⁶ candidates


def _far_shell(d, p_of_j, sigma=1.0, seed=0):
    """One query at the origin-shifted centre x0 and N points around it on random directions, point j at distance
    part p_of_j[j] nats (|x0 − y_j|² = 2σ²·p_j), float32."""
    g = gen(seed)
    x0 = 3 * torch.randn(d, generator=g, dtype=F64)
    u = torch.randn(len(p_of_j), d, generator=g, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    y = x0 + u * (2 * sigma**2 * p_of_j).sqrt()[:, None]
    return x0[None].float(), y.float()


def _assert_far_exact(x, y, alpha, sigma, log_weights=None, bandwidth=0.0):
    D, L = ops.posterior(x, y, alpha, sigma, log_weights, bandwidth, backend="cpu")
    Dt, Lt = ref_posterior(x.double(), y.double(), alpha, sigma,
                           None if log_weights is None else log_weights.double(), bandwidth)
    eps = torch.finfo(torch.float32).eps
    ymax = float(y.double().abs().max())
    assert float((D.double() - Dt).abs().max()) <= 2 * eps * ymax, (D, Dt)
    assert bool(((L.double() - Lt).abs() <= 2 * eps * (1 + Lt.abs())).all()), (L, Lt)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("d", [2, 5])
def test_far_row_with_more_candidates_than_the_list_holds(backend, d):
    """Every point within ~1e-5 nats of the others, d + 46 nats away (a far row): all 70,000 pass, the candidate
    list overflows, and the second pass screens them again. d = 2: the transposed small-d screen; d = 5: rows."""
    p = torch.full((FAR_SCREEN_N,), d + 46.0, dtype=F64)
    x, y = _far_shell(d, p)
    _assert_far_exact(x, y, 1.0, 1.0)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("d", [2, 5])
def test_far_row_whose_best_points_come_last(backend, d):
    """Logits rising 0.01 nats a point over 700 nats: the running cut keeps moving, the list is compacted at 2¹⁶
    and stays listed; only the last ~8,000 points matter."""
    p = (d + 30.0) + 0.01 * torch.arange(FAR_SCREEN_N - 1, -1, -1, dtype=F64)
    x, y = _far_shell(d, p, seed=1)
    _assert_far_exact(x, y, 1.0, 1.0)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 16, 65])
@pytest.mark.parametrize("alpha, bandwidth", [(1.0, 0.0), (0.7, 0.0), (0.3, 0.0), (0.7, 0.5)])
def test_far_rows_with_log_weights_alpha_and_bandwidth(backend, d, alpha, bandwidth):
    """Far rows (every distance part > d + 16) with log-weights: −inf points (the nearest among them), a heavy point
    20 nats farther than the nearest that outweighs it, the rest in [−3, 0]; α on both sides of ½ (the screen's
    two splits) and a kernel density."""
    g = gen(200 + d)
    N, sigma = 3000, 0.5
    y = 3 * torch.randn(N, d, generator=g, dtype=F64)
    c = alpha**2 * bandwidth + sigma**2
    rows = []
    for e in (torch.ones(d, dtype=F64), torch.randn(d, generator=g, dtype=F64)):
        e = e / e.norm()
        rows.append(e * (float((alpha * y @ e).max()) + 25 * math.sqrt(c) * max(1.0, math.sqrt(d) / 3)))
    x = torch.stack(rows)
    lw = -3 * torch.rand(N, generator=g, dtype=F64)
    dist = (x[:, None] - alpha * y[None]).pow(2).sum(-1) / (2 * c)
    order = dist[0].argsort()
    lw[order[:3]] = -math.inf                          # the three nearest points weigh nothing
    heavy = int((dist[0] - (dist[0, order[3]] + 20)).abs().argmin())
    lw[heavy] = 30.0                                   # 20 nats farther, 30 nats heavier: it decides row 0
    xf, yf, lwf = x.float(), y.float(), lw.float()
    assert bool((dist[:, order[3:]].min(1).values - lw.max() > d + 16).all())   # far rows, by the kernel's rule
    _assert_far_exact(xf, yf, alpha, sigma, lwf, bandwidth)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("d", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("alpha", [0.3, 0.7])
def test_far_row_screen_measures_x_minus_alpha_y(backend, d, alpha):
    """Two points of equal logit (d + 40 nats away, either side of x along one axis, through α) that any other
    distance, |x − y|² or |x − c1·y|² among them, puts hundreds of nats apart: D is their midpoint only if the screen
    measures |x − αy|², with α's split on either side of ½. 500 points beyond them make N realistic."""
    g = gen(300 + d)
    sigma = 0.05
    e = torch.zeros(d, dtype=F64)
    e[0] = 1.0
    x = 5 * e
    r = math.sqrt(2 * sigma**2 * (d + 40))
    pair = torch.stack([(x + r * e) / alpha, (x - r * e) / alpha])
    rest = (x + torch.randn(500, d, generator=g, dtype=F64) + 20) / alpha
    y = torch.cat([rest[:250], pair, rest[250:]])
    _assert_far_exact(x[None].float(), y.float(), alpha, sigma)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("sigma, lw_b", [(2.0, -8e307), (1e150, -1e8)])
def test_far_row_screen_keeps_points_at_the_edge_of_double_range(backend, sigma, lw_b):
    """float64, d = 10: point A's |x − y_A|² overflows in the exact pass (its logit is the floor, −max), while
    the screen's dot form stays finite; B has a finite logit and all the weight. A screen that trusted its finite
    value for A dropped B (D = y_A, L = −max)."""
    x = torch.tensor([[float.fromhex(h) for h in (
        "0x1.7ea5a45355f9cp+509", "-0x1.85fe8423c8518p+509", "-0x1.ef83c167d2d21p+508", "0x1.a78d32fec36fcp+508",
        "0x1.90494668abedp+508", "-0x1.da3931aac899p+505", "0x1.ab0407c21d5d6p+509", "0x1.3cb821e7a999dp+510",
        "-0x1.e2b5598254537p+500", "0x1.15e3b510acap+508")]], dtype=F64)      # |2x|² just above the double range
    y = torch.stack([-x[0], torch.zeros(10, dtype=F64)])
    lw = torch.tensor([0.0, lw_b], dtype=F64)
    D, L = ops.posterior(x, y, 1.0, sigma, lw, 0.0, backend=backend)
    Dr, Lr = ref_posterior(x, y, 1.0, sigma, lw, 0.0)
    assert torch.equal(D, torch.zeros_like(D)) and torch.equal(D, Dr)
    assert float(L[0]) == pytest.approx(float(Lr[0]), rel=1e-15) and float(L[0]) > -1.7e308


# ---------------------------------------------------------------- issue 15: screening + exact rescoring (d >= 5)
# A screening kernel skips a pair (row, j) once a float32 lower bound on |x − αy_j|² (the expanded form
# |x|² − 2α x·y + α²|y|², chunk by chunk over 128 dimensions, less a rounding slack) puts its logit more than
# T = ln N + 16 nats below an anchor's exact logit. These cases make a wrong screen visible through the file's
# tolerances: a threshold without ln N, in log2 units, or against a bound instead of an exact logit; a slack too
# small for the expanded form's cancellation; an anchor (the best point of the first chunk) taken for the best
# point; bounds that ignore the log-weights or the bandwidth; rows that see each other's screen.
CHUNK = 128
SCREEN_DIMS = [5, 16, 64, 65, 128, 129, 784, 3072]


def vp_alpha(sigma):
    return 1 / math.sqrt(1 + sigma**2)


def clustered(n_clusters, d, spread, seed, offset=0.0):
    """Clusters of 8 float64 points about centres offset·𝟙 + N(0, I), each member 0.5..1.5·spread from its centre:
    near-duplicates whose logits at σ = spread/3 (x = α·y_i + σ·z) lie 0 to ~40 nats apart."""
    g = gen(seed)
    centres = offset + torch.randn(n_clusters, 1, d, generator=g, dtype=F64)
    step = torch.randn(n_clusters, 8, d, generator=g, dtype=F64)
    radius = spread * (0.5 + torch.rand(n_clusters, 8, 1, generator=g, dtype=F64))
    return (centres + radius * step / step.norm(dim=2, keepdim=True)).reshape(-1, d)


def noisy_queries(y, M, alpha, sigma, seed):
    """x = α·y_i + σ·z for M random points i (x_t of a diffusion from a data point at small σ)."""
    g = gen(seed)
    idx = torch.randint(y.shape[0], (M,), generator=g)
    return alpha * y[idx] + sigma * torch.randn(M, y.shape[1], generator=g, dtype=F64)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [d for d in SCREEN_DIMS if d <= 784])
@pytest.mark.parametrize("kind", ["random", "clusters"])
def test_screening_sigma_1e_3_random_and_near_duplicate_data(backend, dtype, d, kind):
    """σ = 1e-3, x = α·y_i + σ·z: random data (one point matters) and clusters of 8 points ~3σ apart (2 to 8
    points within 5 to 25 nats of the best), d on both sides of the 128-dimension chunks; 13 rows, 296 points."""
    _check_sigma_1e_3(backend, dtype, d, kind)


@pytest.mark.parametrize("backend, dtype", backend_dtypes("torch", "cpu"))
@pytest.mark.parametrize("kind", ["random", "clusters"])
def test_screening_sigma_1e_3_at_d_3072(backend, dtype, kind):
    """The same at d = 3072 (24 chunks), torch and cpu only: the interpreter and the emulator take minutes."""
    _check_sigma_1e_3(backend, dtype, 3072, kind)


def _check_sigma_1e_3(backend, dtype, d, kind):
    sigma = 1e-3
    alpha = vp_alpha(sigma)
    y = clustered(37, d, 3 * sigma, seed=d) if kind == "clusters" else torch.randn(296, d, generator=gen(d), dtype=F64)
    x = noisy_queries(y, 13, alpha, sigma, seed=d + 1)
    x, y = x.to(dtype), y.to(dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, backend=backend)
    check_posterior(D, L, x, y, alpha, sigma)


# Row 0 ("threshold"): logits 0.5 + GAPS nats below 0 and BOUNDARY_K points at BOUNDARY_GAP, between 16 and
# T = ln N + 16 = 23.8: without them L moves by 3e-6, twice its float32 tolerance near the origin, so a threshold
# without ln N or in log2 units (16.5 nats) drops them visibly. Row 1 ("decoy"): the winner
# (logit −20) differs from x in the first 128 coordinates only, a decoy (logit −120) in the others only: the
# decoy is the best point of the first chunk, 100 nats below the winner (exp(100) overflows float32), and the
# points 1 to 40 nats below the winner lie below the decoy's first-chunk bound − T. The rest of the points are
# ~36·d nats away from both rows.
GAPS = (0.0, 1.0, 5.0, 10.0, 20.0, 25.0, 30.0, 40.0)
BOUNDARY_K, BOUNDARY_GAP, BOUNDARY_N = 250, 17.0, 2400


def _unit(v):
    return v / v.norm()


def boundary_problem(d, offset, sigma=0.05):
    """(x [2, d], data [BOUNDARY_N, d], alpha): the two rows above, everything about offset·𝟙; c = σ² (no
    bandwidth), α = 1/√(1 + σ²)."""
    g = gen(d + int(offset))
    alpha = vp_alpha(sigma)
    x = offset + 0.3 * torch.randn(2, d, generator=g, dtype=F64)

    def at(row, nats, direction):               # the point whose distance part from x[row] is `nats`
        return (x[row] + math.sqrt(2 * sigma**2 * nats) * _unit(direction)) / alpha

    def rand():
        return torch.randn(d, generator=g, dtype=F64)

    def first_chunk(keep):                      # a direction in coordinates < 128 (keep) or ≥ 128 (not keep)
        v = rand()
        v[CHUNK:] = 0 if keep else v[CHUNK:]
        v[:CHUNK] = v[:CHUNK] if keep else 0
        return v

    common = rand()
    points = [at(0, 0.5 + gap, rand()) for gap in GAPS]
    points += [at(0, 0.5 + BOUNDARY_GAP, common + 0.1 * rand()) for _ in range(BOUNDARY_K)]
    points += [at(1, 20.0, first_chunk(True)), at(1, 120.0, first_chunk(False))]
    points += [at(1, 20.0 + gap, rand()) for gap in GAPS[1:]]
    background = offset + 0.3 * torch.randn(BOUNDARY_N - len(points), d, generator=g, dtype=F64)
    y = torch.cat([torch.stack(points), background])
    return x, y[torch.randperm(BOUNDARY_N, generator=g)], alpha


def _boundary_params():
    """Every backend at d = 130; at d = 784 the Triton interpreter takes ~45 s a case (2400 points): GPU only."""
    return [pytest.param(d, *p.values, id=f"{d}-{p.id}", marks=p.marks) for d in (130, 784)
            for p in backend_dtypes(exclude=() if CUDA or d == 130 else ("triton",))]


@pytest.mark.parametrize("d, backend, dtype", _boundary_params())
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_screening_pruning_boundary_and_a_first_chunk_decoy(backend, dtype, d, offset):
    """The two rows of boundary_problem, near the origin and about 100·𝟙 (there the expanded form's float32
    rounding is ~10 nats a chunk at σ = 0.05: a bound without its slack drops the 17-nat points or the winner)."""
    x, y, alpha = boundary_problem(d, offset)
    sigma = 0.05
    x, y = x.to(dtype), y.to(dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, backend=backend)
    check_posterior(D, L, x, y, alpha, sigma)
    # the case is sharp: without the BOUNDARY_K points (a screen that drops them) row 0's L moves by > 2e-6
    _, L64 = ref_posterior(x.double(), y.double(), alpha, sigma)
    lw = torch.zeros(BOUNDARY_N, dtype=F64)
    lw[_logit_gaps(x.double()[0], y.double(), alpha, sigma) > BOUNDARY_GAP] = -math.inf
    _, L_cut = ref_posterior(x.double()[:1], y.double(), alpha, sigma, lw)
    assert float(L64[0] - L_cut[0]) > 2e-6


def _logit_gaps(x_row, y, alpha, sigma, lw=None, v=0.0):
    """How far (nats) each point's logit lies below the row's best, in float64."""
    c = alpha**2 * v + sigma**2
    logits = -((x_row - alpha * y) ** 2).sum(1) / (2 * c) + (0.0 if lw is None else lw)
    return logits.max() - logits


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [65, 130, 784])
def test_screening_cancellation_under_a_large_common_offset(backend, dtype, d):
    """Clusters about 100·𝟙 (|y| ≈ 100√d, 1.1e3 at d = 130): |x|² − 2α x·y + α²|y|² cancels ~7 digits of 1e4·d,
    so its float32 rounding (~1e-3·d) is 1e2..1e5 nats at these σ; exact logits need direct differences.
    α = 1/√(1 + σ²) (c2 = 1 − α tiny) and α = 0.9 (the α² term at full size) at σ = 0.1, 1e-3 of the data's
    scale (MATH.md §7's range: at σ = 1e-2 the float32 rounding of (1 − α)·y alone moves L by 2e-3 at d = 784)."""
    dev = device(backend)
    for sigma, alpha in ((1e-3, vp_alpha(1e-3)), (3e-2, vp_alpha(3e-2)), (0.1, 0.9)):
        y = clustered(12, d, 3 * sigma, seed=d + 7, offset=100.0)
        x = noisy_queries(y, 9, alpha, sigma, seed=d + 8).to(dtype)
        y = y.to(dtype)
        D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, backend=backend)
        check_posterior(D, L, x, y, alpha, sigma)


def heavy_weights_problem(d, sigma=1e-2, v=1e-4):
    """6 rows x = α·y_i + σ·z over clusters of 8 (3σ), log-weights log_softmax(N(0, 1)) with −inf at each row's
    own point i and at every 9th point; c = α²v + σ² is twice σ². Row 0 gets two far points (distance parts P =
    0.4·d + 10 and P + 5, P ≥ 62 nats) with log-weights P + 20 and P + 22: they hold all its mass, 3 nats apart.
    Row 1 gets one far point whose distance part is ~45 nats more than its best point's but whose log-weight is
    38: 2 nats below the best logit. A bound without the log-weights, or with σ² for c, prunes them."""
    alpha = vp_alpha(sigma)
    c = alpha**2 * v + sigma**2
    y = clustered(20, d, 3 * sigma, seed=d + 20)
    g = gen(d + 21)
    idx = torch.randperm(y.shape[0], generator=g)[:6]
    x = alpha * y[idx] + sigma * torch.randn(6, d, generator=g, dtype=F64)
    lw = torch.log_softmax(torch.randn(y.shape[0], generator=g, dtype=F64), 0)
    lw[::9] = -math.inf
    lw[idx] = -math.inf

    def far_point(row, nats):
        return (x[row] + math.sqrt(2 * c * nats) * _unit(torch.randn(d, generator=g, dtype=F64))) / alpha

    P = 0.4 * d + 10
    best1 = float((lw - ((x[1] - alpha * y) ** 2).sum(1) / (2 * c)).max())
    extra = torch.stack([far_point(0, P), far_point(0, P + 5), far_point(1, 40 - best1)])
    y = torch.cat([y, extra])
    lw = torch.cat([lw, torch.tensor([P + 20, P + 22, 38.0], dtype=F64)])
    return x, y, lw, alpha, sigma, v


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [130, 784])
def test_screening_log_weights_with_a_large_range_minus_inf_and_bandwidth(backend, dtype, d):
    """heavy_weights_problem: the far heavy points decide rows 0 and 1, −inf points are excluded (the nearest
    point of every row among them), bandwidth v = σ²; P stays below the far rows' rule (d + 16 nats)."""
    x, y, lw, alpha, sigma, v = heavy_weights_problem(d)
    x, y = x.to(dtype), y.to(dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, lw.to(dtype).to(dev), v, backend=backend)
    check_posterior(D, L, x, y, alpha, sigma, lw.to(dtype), v)
    gaps0, gaps1 = (_logit_gaps(x.double()[r], y.double(), alpha, sigma, lw, v) for r in (0, 1))
    assert float(gaps0[-3]) == 0 and abs(float(gaps0[-2]) - 3) < 0.1 and float(gaps0[:-3].min()) > 30
    assert abs(float(gaps1[-1]) - 2) < 0.1


def mixed_rows_problem(d, dtype, M=9):
    """Per-row times in one call: σ = 1e3 and 3 (dense rows: many points carry weight) beside σ = 1e-3 ..
    0.3 (sparse rows: one cluster of 8, 3e-3 wide), x = α·y_i + σ·z, α = 1/√(1 + σ²); log-weights with −inf."""
    sigma = torch.tensor([1e3, 1e-3, 1e-3, 0.3, 1e-2, 3.0, 1e-3, 3e-3, 1e3][:M], dtype=F64)
    alpha = 1 / torch.sqrt(1 + sigma**2)
    y = clustered(25, d, 3e-3, seed=d + 30)
    g = gen(d + 31)
    idx = torch.randint(y.shape[0], (M,), generator=g)
    x = alpha[:, None] * y[idx] + sigma[:, None] * torch.randn(M, d, generator=g, dtype=F64)
    lw = torch.log_softmax(torch.randn(y.shape[0], generator=g, dtype=F64), 0)
    lw[3::11] = -math.inf
    return x.to(dtype), y.to(dtype), alpha, sigma, lw.to(dtype)


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
@pytest.mark.parametrize("d", [130, 784])
def test_screening_per_row_times_dense_and_sparse_rows_in_one_call(backend, dtype, d):
    """A screen (or its dense fallback) decided per row with that row's own α, σ: the dense rows at σ = 1e3
    keep every point within 10 nats of the best, the σ = 1e-3 rows only a handful within 30."""
    x, y, alpha, sigma, lw = mixed_rows_problem(d, dtype)
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, lw.to(dev), backend=backend)
    check_posterior(D, L, x, y, alpha, sigma, lw)
    finite = torch.isfinite(lw.double())
    dense = _logit_gaps(x.double()[0], y.double(), float(alpha[0]), 1e3, lw.double())[finite]
    sparse = _logit_gaps(x.double()[1], y.double(), float(alpha[1]), 1e-3, lw.double())[finite]
    assert float(dense.max()) < 10 and int((sparse < 30).sum()) <= 8


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.parametrize("d", [130, 784])
def test_screening_rows_alone_equal_rows_in_the_batch(backend, d):
    """Row invariance through the screen: each row of mixed_rows_problem alone (its own α, σ) equals its row of
    the batch bit for bit, and so does a permuted batch; float32 and float64."""
    for dtype in (torch.float32, F64):
        x, y, alpha, sigma, lw = mixed_rows_problem(d, dtype)
        D, L = ops.posterior(x, y, alpha, sigma, lw, backend=backend)
        for r in range(x.shape[0]):
            Dr, Lr = ops.posterior(x[r:r + 1], y, float(alpha[r]), float(sigma[r]), lw, backend=backend)
            assert torch.equal(Dr, D[r:r + 1]) and torch.equal(Lr, L[r:r + 1]), (dtype, r)
        perm = torch.randperm(x.shape[0], generator=gen(d))
        Dp, Lp = ops.posterior(x[perm], y, alpha[perm], sigma[perm], lw, backend=backend)
        assert torch.equal(Dp, D[perm]) and torch.equal(Lp, L[perm]), dtype


@pytest.mark.parametrize("backend, dtype", backend_dtypes())
def test_screening_queries_far_from_every_point_at_d_784(backend, dtype):
    """d = 784, σ = 1e-2: rows whose best logit is −400 nats (below every point, above the far rows' rule of
    d + 16) and −3000 (a far row), about a cluster of 8 whose logits spread over tens of nats; finite and within
    the tolerances (the float64 reference's own error, 2⁻⁵³·3000, stays below close64's 1e-11)."""
    d, sigma = 784, 1e-2
    alpha = vp_alpha(sigma)
    y = clustered(8, d, 3 * sigma, seed=40)
    g = gen(41)
    rows = []
    for nats in (400.0, 400.0, 3000.0):
        centre = y[8 * len(rows):8 * len(rows) + 8].mean(0)
        rows.append(alpha * centre + math.sqrt(2 * sigma**2 * nats) * _unit(torch.randn(d, generator=g, dtype=F64)))
    x, y = torch.stack(rows).to(dtype), y.to(dtype)
    gaps = _logit_gaps(x.double()[0], y.double(), alpha, sigma)
    assert int((gaps < 40).sum()) >= 4                  # the row's logits are all −400 or below, yet several matter
    dev = device(backend)
    D, L = ops.posterior(x.to(dev), y.to(dev), alpha, sigma, backend=backend)
    check_posterior(D, L, x, y, alpha, sigma)
    assert float(L.max()) < -390


@pytest.mark.parametrize("backend", backends("cpu"))
def test_screening_survives_float32_dot_products_that_overflow(backend):
    """Inputs near float32's range with a σ large enough that the float64 rule keeps the call in float32: the
    screening's float dot products x·y overflow (3e18·3e18·64). The bound of such a row is useless, so the row
    must take the exact path; a pruned winner gave D off by 1.3·max|y| (review of issue 15's kernel)."""
    x = torch.full((1, 64), 3e18)
    data = torch.cat([-x.repeat(15, 1), x])
    D, L = ops.posterior(x, data, 0.9, 2.236e19, backend=backend)
    D64, L64 = ref_posterior(x.double(), data.double(), 0.9, 2.236e19)
    ymax = float(data.abs().max())
    assert torch.isfinite(D).all() and torch.isfinite(L).all()
    assert float((D.double() - D64).abs().max()) <= 1e-4 * ymax
    assert abs(float(L[0]) - float(L64[0])) <= 1e-3 + 1e-6 * abs(float(L64[0]))
