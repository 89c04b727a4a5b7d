"""Analytic denoisers (MATH.md §5) against float64 brute force, finite differences and each other."""
import math
from functools import partial

import pytest
import torch

import fastdiff as fd
from fastdiff.reference.posterior import posterior

F64 = torch.float64


def _brute_force(x, y, alpha, sigma, log_w=None, v=0.0):
    """Direct float64 evaluation of MATH.md §5 with the full M×N logit matrix."""
    x, y = x.double(), y.double()
    alpha = torch.as_tensor(alpha, dtype=F64).reshape(-1, 1)
    sigma = torch.as_tensor(sigma, dtype=F64).reshape(-1, 1)
    c = alpha**2 * v + sigma**2
    diff = x[:, None, :] - alpha[:, :, None] * y[None]
    a = -(diff**2).sum(-1) / (2 * c)
    if log_w is not None:
        a = a + log_w.double()
    L = torch.logsumexp(a, 1)
    w = torch.softmax(a, 1)
    D = (w[:, :, None] * (y[None] + (alpha * v / c)[:, :, None] * diff)).sum(1)
    return D, L


def _data(n, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=g, dtype=F64)


@pytest.mark.parametrize("M, N, d", [(1, 1, 1), (7, 3, 2), (13, 129, 3), (5, 40, 64)])
@pytest.mark.parametrize("v", [0.0, 0.05])
def test_point_cloud_matches_brute_force(M, N, d, v):
    y, x = _data(N, d, 1), _data(M, d, 2, 1.5)
    for alpha, sigma in ((0.9, 0.5), (1.0, 1e-3 * math.sqrt(d)), (0.3, 30.0)):
        D, L = posterior(x, y, alpha, sigma, bandwidth=v, block_elems=64)   # many tiny blocks
        D0, L0 = _brute_force(x, y, alpha, sigma, v=v)
        assert torch.allclose(D, D0, rtol=1e-12, atol=1e-12) and torch.allclose(L, L0, rtol=1e-12, atol=1e-9)


def test_per_row_alpha_sigma_and_log_weights():
    y, x = _data(30, 2, 3), _data(9, 2, 4)
    alpha = torch.linspace(0.2, 1.0, 9, dtype=F64)
    sigma = torch.logspace(-3, 1, 9, dtype=F64)
    lw = torch.log_softmax(torch.randn(30, dtype=F64), 0)
    D, L = posterior(x, y, alpha, sigma, log_weights=lw, block_elems=50)
    D0, L0 = _brute_force(x, y, alpha, sigma, lw)
    assert torch.allclose(D, D0, rtol=1e-12, atol=1e-12) and torch.allclose(L, L0, rtol=1e-12)


def test_one_hot_limit_far_queries_and_near_duplicates_in_float32():
    y = _data(50, 3, 5)
    y[1] = y[0] + 1e-7                                   # near-duplicate pair
    x = torch.cat([y[:5] + 1e-4, torch.full((2, 3), 1e4, dtype=F64), -1e3 * torch.ones(1, 3, dtype=F64)])
    x32, y32 = x.float(), y.float()
    for sigma in (1e-6, 1e-3, 1.0, 1e3):
        D, L = posterior(x32, y32, 1.0, sigma)
        D0, L0 = _brute_force(x32, y32, 1.0, sigma)     # float64 on the same (rounded) inputs
        assert torch.isfinite(D).all() and torch.isfinite(L).all()
        # MATH.md §7's float32 contract, which direct differences meet
        assert float((D.double() - D0).abs().max()) / (float(y.abs().max()) + 1e-12) <= 1e-4
        assert bool(((L.double() - L0).abs() <= 1e-3 + 1e-6 * L0.abs()).all())
    D, _ = posterior(x[:5], y, 1.0, 1e-6)                # σ → 0: the nearest point, one-hot
    assert torch.allclose(D[2:5], y[2:5], atol=1e-12)


def test_zero_weight_blocks_do_not_poison_the_sums():
    y, x = _data(20, 2, 6), _data(4, 2, 7)
    lw = torch.full((20,), -math.inf, dtype=F64)
    lw[17] = 0.0                                          # only the last block has mass
    D, L = posterior(x, y, 1.0, 0.5, log_weights=lw, block_elems=8)
    assert torch.allclose(D, y[17].expand_as(D)) and torch.isfinite(L).all()


def test_point_cloud_is_a_gaussian_mixture(process):
    """A KDE point cloud with bandwidth v is the mixture Σ π_i N(y_i, vI); v = 0 is a singular mixture."""
    y, x = _data(6, 2, 8), _data(11, 2, 9, 2.0)
    w = torch.rand(6, dtype=F64) + 0.1
    t = torch.linspace(0.05, 0.9, 11, dtype=F64) * process.T
    for v in (0.0, 0.2):
        pc = fd.PointCloud(y, process, weights=w, bandwidth=v)
        gm = fd.GaussianMixture(w, y, v * torch.eye(2, dtype=F64).expand(6, 2, 2), process)
        assert torch.allclose(pc.denoise(x, t), gm.denoise(x, t), rtol=1e-10, atol=1e-10)
        assert torch.allclose(pc.score(x, t), gm.score(x, t), rtol=1e-8, atol=1e-8)
        assert torch.allclose(pc.log_prob(x, t), gm.log_prob(x, t), rtol=1e-10, atol=1e-9)


def _at_scalar_time(fn):
    """A model(x, t) calling fn(x, t) with t as a Python float (from_model hands the network a [M] time tensor)."""
    return lambda z, tt: fn(z, float(tt[0]))


def _fd_grad(fn, x, h=1e-5):
    g = torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = h
        g[:, j] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


def test_score_is_the_gradient_of_log_prob(process):
    t = 0.2 * process.T
    x = _data(8, 3, 10)
    mix = fd.GaussianMixture(torch.tensor([0.3, 0.7]), _data(2, 3, 11),
                             torch.stack([torch.eye(3, dtype=F64),
                                          torch.diag(torch.tensor([2.0, 0.0, 0.5], dtype=F64))]), process)
    pc = fd.PointCloud(_data(25, 3, 12), process, bandwidth=0.01)
    for den in (mix, pc):
        assert torch.allclose(den.score(x, t), _fd_grad(partial(den.log_prob, t=t), x), rtol=1e-5, atol=1e-6)


def test_log_prob_is_a_normalised_density():
    p = fd.OU()
    mix = fd.GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0], [2.0]]), torch.tensor([[[0.3]], [[0.0]]]),
                             p)
    grid = torch.linspace(-12, 12, 20001, dtype=F64).unsqueeze(1)
    for t in (0.01, 1.0, 10.0):
        mass = torch.trapezoid(mix.log_prob(grid, t).exp(), grid[:, 0])
        assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_gaussian_denoiser_closed_form_and_linear_map():
    p = fd.VP()
    mu = torch.tensor([1.0, -2.0], dtype=F64)
    cov = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)   # singular: the CEM paper's line
    G = fd.Gaussian(mu, cov, p)
    x = _data(5, 2, 13)
    t = 0.4
    a, s2 = p.alpha(t), p.sigma2(t)
    expect = mu + (a * cov @ torch.linalg.inv(a * a * cov + s2 * torch.eye(2, dtype=F64)) @ (x - a * mu).T).T
    assert torch.allclose(G.denoise(x, t), expect, rtol=1e-12, atol=1e-12)
    M, c = G.linear_map(t)
    assert torch.allclose(x @ M.T + c, expect, rtol=1e-12, atol=1e-12)
    # D stays on the line (D_1 − D_2 = μ_1 − μ_2) however small σ gets
    D = G.denoise(x, 1e-6)
    assert torch.allclose(D[:, 0] - D[:, 1], (mu[0] - mu[1]).expand(5), atol=1e-9)


def test_tweedie_conversions_between_x0_eps_and_score(process):
    mix = fd.GaussianMixture(torch.tensor([0.4, 0.6]), _data(2, 2, 14), torch.eye(2, dtype=F64).expand(2, 2, 2) * 0.3,
                             process)
    x = _data(6, 2, 15)
    t = 0.3 * process.T
    for kind in ("x0", "eps", "score"):
        native = {"x0": mix.denoise, "eps": mix.eps, "score": mix.score}[kind]
        wrapped = fd.from_model(_at_scalar_time(native), process, prediction=kind)
        assert torch.allclose(wrapped.denoise(x, t), mix.denoise(x, t), rtol=1e-9, atol=1e-9)
        assert torch.allclose(wrapped.score(x, t), mix.score(x, t), rtol=1e-9, atol=1e-9)
        assert torch.allclose(wrapped.eps(x, t), mix.eps(x, t), rtol=1e-9, atol=1e-9)


def test_model_gets_its_own_shape_and_sigma_when_asked():
    p = fd.PureVE(T=10.0)
    seen = {}

    def model(x, s):
        seen["shape"], seen["s"] = tuple(x.shape), s.clone()
        return torch.zeros_like(x)

    den = fd.from_model(model, p, "x0", event_shape=(2, 3), time_input="sigma")
    den.denoise(torch.ones(4, 6), 2.5)
    assert seen["shape"] == (4, 2, 3) and torch.allclose(seen["s"], torch.full((4,), 2.5))
    bad = fd.from_model(lambda x, t: x[:, :1], p)
    with pytest.raises(ValueError, match="shaped like x"):
        bad.denoise(torch.ones(4, 2), 1.0)


@pytest.mark.parametrize("make, err, match", [
    (lambda p: fd.PointCloud(torch.empty(0, 2), p), ValueError, "non-empty"),
    (lambda p: fd.PointCloud(torch.ones(3), p), ValueError, r"\[N, d\]"),
    (lambda p: fd.PointCloud(torch.tensor([[0.0, float("nan")]]), p), ValueError, "NaN"),
    (lambda p: fd.PointCloud(torch.ones(3, 2), p, weights=torch.tensor([1.0, -1.0, 1.0])), ValueError, "weights"),
    (lambda p: fd.PointCloud(torch.ones(3, 2), p, bandwidth=-1.0), ValueError, "bandwidth"),
    (lambda p: fd.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [0.0, 1.0]]], p), ValueError, "symmetric"),
    (lambda p: fd.GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]], p), ValueError, "semi-definite"),
    (lambda p: fd.GaussianMixture([1.0, 1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], p), ValueError, "weights"),
    (lambda p: fd.Gaussian([0.0, 0.0], [[1.0]], p), ValueError, "cov"),
    (lambda p: fd.PointCloud(torch.ones(3, 2), "OU"), TypeError, "process"),
    (lambda p: fd.from_model(lambda x, t: x, p, prediction="v"), ValueError, "prediction"),
])
def test_bad_construction(make, err, match):
    with pytest.raises(err, match=match):
        make(fd.OU())


def test_bad_queries():
    p = fd.OU()
    pc = fd.PointCloud(torch.randn(5, 2), p)
    with pytest.raises(ValueError, match="columns"):
        pc.denoise(torch.randn(3, 4), 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        pc.denoise(torch.randn(3, 2).half(), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        pc.denoise(torch.tensor([[0.0, float("inf")]]), 1.0)
    with pytest.raises(ValueError, match="t must lie"):
        pc.denoise(torch.randn(3, 2), 0.0)
    with pytest.raises(ValueError, match="t must lie"):
        pc.denoise(torch.randn(3, 2), 11.0)
    with pytest.raises(ValueError, match=r"shape \[M\]"):
        pc.denoise(torch.randn(3, 2), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="device"):
        posterior(torch.randn(3, 2), torch.randn(4, 2, device="meta"), 1.0, 1.0)
    with pytest.raises(ValueError, match="device"):
        pc.denoise(torch.empty(3, 2, device="meta"), 1.0)


def _kdiffusion_gaussian(mu, cov, prediction):
    """A k-diffusion-style network for N(mu, cov) data: it lives on y = x0 + s·z (a pure VE process with
    noise level s) and returns its exact x0 prediction, noise prediction or score there."""
    def model(y, s):
        s2 = s.to(F64).view(-1, 1, 1) ** 2
        C = cov + s2 * torch.eye(cov.shape[0], dtype=F64)                       # [M, d, d]
        D = mu + (cov @ torch.linalg.solve(C, (y.to(F64) - mu).unsqueeze(-1))).squeeze(-1)
        out = {"x0": D, "eps": (y.to(F64) - D) / s.to(F64).view(-1, 1), "score": (D - y.to(F64)) / s2.view(-1, 1)}
        return out[prediction].to(y.dtype)
    return model


@pytest.mark.parametrize("prediction", ["x0", "eps", "score"])
def test_sigma_time_input_follows_k_diffusion_on_every_process(process, prediction):
    """time_input="sigma": the network gets x/α and σ/α (k-diffusion's scaled process) for every process, and a
    k-diffusion Gaussian denoiser wrapped that way reproduces fd.Gaussian's exact D, score and eps."""
    mu = torch.tensor([0.5, -1.0], dtype=F64)
    cov = torch.tensor([[1.0, 0.3], [0.3, 0.4]], dtype=F64)
    G = fd.Gaussian(mu, cov, process)
    den = fd.from_model(_kdiffusion_gaussian(mu, cov, prediction), process, prediction, time_input="sigma")
    x = _data(7, 2, 21) * 3
    per_row = torch.linspace(0.05, 0.9, 7, dtype=F64) * process.T
    for t in (0.3 * process.T, 0.02 * process.T, per_row):
        assert torch.allclose(den.denoise(x, t), G.denoise(x, t), rtol=1e-9, atol=1e-9)
        assert torch.allclose(den.score(x, t), G.score(x, t), rtol=1e-8, atol=1e-9)
        assert torch.allclose(den.eps(x, t), G.eps(x, t), rtol=1e-8, atol=1e-9)


def test_sigma_time_input_passes_scaled_inputs():
    seen = {}

    def model(y, s):
        seen["y"], seen["s"] = y.clone(), s.clone()
        return torch.zeros_like(y)
    x = _data(3, 2, 22)
    for p in (fd.VP(), fd.DriftedVE(T=10.0, beta="t^2"), fd.OU(), fd.PureVE(T=5.0)):
        fd.from_model(model, p, time_input="sigma").denoise(x, 0.4 * p.T)
        a, s = p.alpha(0.4 * p.T), p.sigma(0.4 * p.T)
        assert torch.allclose(seen["y"], x / a, rtol=1e-14)
        assert torch.allclose(seen["s"], torch.full((3,), s / a, dtype=F64), rtol=1e-14)
    fd.from_model(model, fd.PureVE(T=5.0), time_input="sigma").denoise(x, 2.0)
    assert torch.equal(seen["y"], x)                         # α = 1: nothing changes, bit for bit


def test_model_time_inputs_are_memoised_per_process():
    """A scalar t's (1/α, σ/α) is computed once per denoiser (the sampling loop asks for the same grid every call):
    the second call passes the same values, a reassigned process gets its own, and per-row times are not
    memoised; the overflow refusal still applies to a memoised t."""
    seen = []

    def model(y, s):
        seen.append((y.clone(), s.clone()))
        return torch.zeros_like(y)
    x = _data(3, 2, 23)
    den = fd.from_model(model, fd.VP(), time_input="sigma")
    den.denoise(x, 0.7)
    den.denoise(x, 0.7)
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])
    den.process = p = fd.DriftedVE(T=10.0, beta="t^2")
    den.denoise(x, 0.7)
    a, s = p.alpha(0.7), p.sigma(0.7)
    assert torch.allclose(seen[2][0], x / a, rtol=1e-14) and torch.allclose(seen[2][1], torch.full((3,), s / a,
                                                                                                  dtype=F64))
    rows = torch.tensor([0.7, 2.0, 5.0], dtype=F64)
    den.denoise(x, rows)
    assert torch.allclose(seen[3][1], p.sigma(rows) / p.alpha(rows), rtol=1e-14)
    assert len(den._memo) == 1                               # only the scalar t of the current process
    big = fd.from_model(model, fd.DriftedVE(T=625.0, beta="t^2"), time_input="sigma")
    big.denoise(torch.ones(2, 2, dtype=F64), 600.0)          # memoised in float64 ...
    with pytest.raises(ValueError, match="overflows torch.float32"):
        big.denoise(torch.ones(2, 2), 600.0)                 # ... and still refused in float32


def test_sigma_time_input_refuses_an_overflowing_scale():
    p = fd.DriftedVE(T=625.0, beta="t^2")                    # α(T) = e^-208: 1/α overflows float32
    den = fd.from_model(lambda y, s: y, p, time_input="sigma")
    with pytest.raises(ValueError, match="overflows torch.float32"):
        den.denoise(torch.ones(2, 2), 600.0)
    assert torch.isfinite(den.denoise(torch.ones(2, 2, dtype=F64), 600.0)).all()


@pytest.mark.parametrize("process", [fd.PureVE(), fd.OU(theta=0.5, g=1.0, T=10.0), fd.VP()], ids=repr)
def test_float32_kernel_density_score_at_small_sigma(process):
    """With bandwidth v > 0, D lies within float32 rounding of a mix of x and ȳ, and Tweedie from D divided that
    rounding by σ² ≪ c = α²v + σ²: the float32 score was 6–8% off at σ = 1e-3 and exactly 0 at σ = 1e-4."""
    from fastdiff.streaming import StreamingPointCloud
    y = _data(50, 2, seed=3)
    x = (y[:7] + 0.4 * torch.randn(7, 2, generator=torch.Generator().manual_seed(1))).float()
    v = 1.0
    for sigma in (1e-4, 1e-3, 1e-2):
        if process.sigma(process.T) < sigma or process.sigma(0.0) > sigma:
            continue
        t = process.sigma_inverse(sigma)
        alpha = process.alpha(t)
        # exact: (αȳ − x)/c, ȳ the float64 posterior mean of the points at c
        c = alpha**2 * v + sigma**2
        a = -((x.double()[:, None] - alpha * y.double()[None]) ** 2).sum(-1) / (2 * c)
        exact = (alpha * torch.softmax(a, 1) @ y.double() - x.double()) / c
        for den in (fd.PointCloud(y.float(), process, bandwidth=v), StreamingPointCloud(y.float(), process, bandwidth=v,
                                                                                         chunk_rows=7)):
            s = den.score(x, t)
            assert s.dtype == torch.float32
            assert float(((s.double() - exact).abs() / exact.abs().max()).max()) <= 1e-5, (type(den), sigma)
            eps = den.eps(x, t)
            assert float((eps.double() + math.sqrt(process.sigma2(t)) * exact).abs().max()) \
                <= 1e-5 * math.sqrt(process.sigma2(t)) * float(exact.abs().max())


def test_float32_singular_covariances_are_accepted():
    """A rank-1 covariance built in float32 has eigenvalues around −1e-8 (its own rounding), which a fixed 1e-10
    tolerance called "not positive semi-definite"; the tolerance now follows the input's dtype."""
    p = fd.VP()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, dtype=F64, generator=g)
    for k in range(20):
        u = torch.randn(3, generator=g)
        cov32 = torch.outer(u, u)                          # float32, rank 1
        gauss = fd.Gaussian(torch.zeros(3), cov32, p)
        S, a, s2 = cov32.double(), p.alpha(0.3), p.sigma2(0.3)
        ref = a * x @ torch.linalg.solve(a * a * S + s2 * torch.eye(3, dtype=F64), S)     # D = αΣ(α²Σ + σ²I)⁻¹x
        assert torch.allclose(gauss.denoise(x, 0.3), ref, rtol=0, atol=1e-6 * float(S.abs().max())), k
        mix = fd.GaussianMixture([1.0], torch.zeros(1, 3), cov32[None].numpy(), p)
        assert torch.equal(mix.denoise(x, 0.3), gauss.denoise(x, 0.3)), k
    with pytest.raises(ValueError, match="semi-definite"):          # a real negative eigenvalue still fails
        fd.Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1e-4]]), p)
    with pytest.raises(ValueError, match="semi-definite"):
        fd.Gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, -1e-9]], p)       # float64 input keeps the tight tolerance


def test_model_time_is_checked_before_the_model_runs():
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return 0.5 * x
    p = fd.OU(T=1.0)
    x = torch.randn(4, 3)
    for prediction in ("x0", "eps", "score"):
        den = fd.from_model(net, p, prediction=prediction)
        for bad, err, match in ((0.0, ValueError, "t must lie"), (-1.0, ValueError, "t must lie"),
                                (5.0, ValueError, "t must lie"), (math.nan, ValueError, "finite"),
                                ("0.5", TypeError, "t must be a number"), (True, TypeError, "t must be a number"),
                                (torch.full((3,), 0.5), ValueError, r"shape \[M\]=\[4\]")):
            for call in (den.denoise, den.score, den.eps, den.predict):
                with pytest.raises(err, match=match):
                    call(x, bad)
        assert seen == [], prediction
    den = fd.from_model(net, p, time_input="sigma")
    with pytest.raises(ValueError, match="t must lie"):
        den.denoise(x, -1.0)
    # a [1] tensor is one time for every row: the network gets [M]
    for time_input in ("t", "sigma"):
        seen.clear()
        den = fd.from_model(net, p, time_input=time_input)
        out = den.denoise(x, torch.tensor([0.5]))
        assert seen[0].shape == (4,) and torch.equal(out, den.denoise(x, 0.5))


def test_a_float32_time_tensor_may_hold_t_rounded_up():
    """float32(0.3) = 0.30000001 > T = 0.3: torch.full((M,), T) in the default dtype is T, not out of range."""
    for p in (fd.OU(theta=0.5, g=1.0, T=0.3), fd.PureVE(T=2.2)):
        t32 = torch.full((5,), p.T)
        assert float(t32[0]) > p.T
        assert torch.equal(p.sigma(t32), torch.full((5,), p.sigma(p.T), dtype=F64))
        pc = fd.PointCloud(_data(9, 2), p)
        x = torch.randn(5, 2, dtype=F64)
        assert torch.equal(pc.denoise(x, t32), pc.denoise(x, p.T))
        with pytest.raises(ValueError, match="t must lie"):        # a real excess still fails
            p.sigma(torch.full((5,), p.T * 1.001))
        with pytest.raises(ValueError, match="t must lie"):        # float64 keeps its 1e-12
            p.sigma(torch.full((5,), p.T * (1 + 1e-9), dtype=F64))


def test_point_cloud_options_are_checked_by_type():
    from fastdiff.streaming import StreamingPointCloud
    p = fd.OU()
    y = _data(10, 2)
    x = torch.randn(3, 2, dtype=F64)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="bandwidth must be a number"):
            fd.PointCloud(y, p, bandwidth=bad)
        with pytest.raises(TypeError, match="bandwidth must be a number"):
            StreamingPointCloud(y, p, bandwidth=bad)
    for bad in ("4", 2.7, True):
        with pytest.raises(TypeError, match="chunk_rows must be an integer"):
            StreamingPointCloud(y, p, chunk_rows=bad)
    for name in ("alpha", "sigma"):
        for bad in ("1", True):
            args = {"alpha": 1.0, "sigma": 0.5, name: bad}
            with pytest.raises(TypeError, match=f"{name} must be a number"):
                fd.ops.posterior(x, y, args["alpha"], args["sigma"])
    # weights whose sum overflows float64 are still weights (equal here)
    huge = torch.full((10,), 1e308, dtype=F64)
    for den in (fd.PointCloud(y, p, weights=huge), StreamingPointCloud(y, p, weights=huge)):
        assert torch.allclose(den.denoise(x, 0.5), fd.PointCloud(y, p).denoise(x, 0.5), rtol=0, atol=1e-14)


def test_a_model_returning_an_array_is_named():
    import numpy as np
    den = fd.from_model(lambda x, t: np.zeros(tuple(x.shape)), fd.VP())
    with pytest.raises(ValueError, match=r"must return a tensor shaped like x \(4, 2\), got ndarray"):
        den.denoise(torch.randn(4, 2), 0.5)


def test_nearly_symmetric_float64_covariances_still_pass():
    """The dtype-aware tolerance must not make the symmetry check stricter than it was (rtol 1e-5)."""
    p = fd.VP()
    fd.Gaussian([0.0, 0.0], [[1.0, 0.3333333], [0.33333333, 1.0]], p)
    with pytest.raises(ValueError, match="symmetric"):
        fd.Gaussian([0.0, 0.0], [[1.0, 0.3], [0.4, 1.0]], p)
