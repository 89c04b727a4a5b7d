"""The sampler against the exact Gaussian oracle (MATH.md §6), and its contracts: batch invariance,
trajectories, callbacks, model adapters, input checks."""
import math

import pytest
import torch

import fastdiff as fd

F64 = torch.float64
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)


def _z_scores(x, mu, S):
    """Standardised errors of the empirical mean and covariance against the law N(mu, S)."""
    n = x.shape[0]
    mean_z = (x.mean(0) - mu) / torch.sqrt(S.diag() / n)
    var = S.diag()
    cov_se = torch.sqrt((var[:, None] * var[None, :] + S**2) / n)
    cov_z = (torch.cov(x.T) - S) / cov_se
    return float(mean_z.abs().max()), float(cov_z.abs().max())


@pytest.mark.parametrize("method", fd.METHODS)
@pytest.mark.parametrize("ode", [False, True])
def test_samples_follow_the_gaussian_oracle(process, method, ode):
    G = fd.Gaussian(MEAN, COV, process)
    times = fd.time_grid(process, 8, "quadratic", 1e-2 * process.T)   # few steps: a large, exact bias
    x = fd.sample(G, n=100_000, times=times, method=method, ode=ode, seed=3, dtype=F64)
    mu, S = fd.gaussian_oracle(process, times, method, ode, MEAN, COV)
    if float(S.diag().min()) < 1e-10 * float(S.diag().max()):
        # The discretised ODE can collapse the spread (VE + Euler); then compare absolutely.
        assert torch.allclose(x.mean(0), mu, atol=1e-8) and torch.allclose(torch.cov(x.T), S, atol=1e-8)
        return
    zm, zc = _z_scores(x, mu, S)
    assert zm < 5 and zc < 5, (zm, zc)


def test_intermediate_eta_and_final_denoise_follow_the_oracle():
    p = fd.DriftedVE(T=20.0, beta="t")
    G = fd.Gaussian(MEAN, COV, p)
    times = fd.time_grid(p, 6, "exponential", 0.05)
    for method in fd.METHODS:
        x = fd.sample(G, n=100_000, times=times, method=method, eta=0.5, final_denoise=True, dtype=F64)
        mu, S = fd.gaussian_oracle(p, times, method, mean=MEAN, cov=COV, eta=0.5, final_denoise=True)
        zm, zc = _z_scores(x, mu, S)
        assert zm < 5 and zc < 5, (method, zm, zc)


@pytest.mark.parametrize("method", fd.METHODS)
def test_oracle_converges_to_the_data_law(method):
    """With fine grids, every method's output law approaches N(μ, Σ), the error shrinking with K."""
    p = fd.OU(theta=0.5, g=1.0, T=10.0)
    errors = []
    for K in (50, 200, 800):
        times = fd.time_grid(p, K, "exponential", 1e-4)
        for ode in (False, True):
            mu, S = fd.gaussian_oracle(p, times, method, ode, MEAN, COV)
            errors.append((K, ode, float((mu - MEAN).abs().max() + (S - COV).abs().max())))
    for ode in (False, True):
        e = [err for K, o, err in errors if o == ode]
        assert e[0] > e[1] > e[2] and e[2] < 0.02, (method, ode, e)


def test_oracle_one_step_by_hand():
    p = fd.PureVE(T=2.0)
    times = torch.tensor([2.0, 1.0], dtype=F64)
    mean, var = torch.tensor([0.5], dtype=F64), torch.tensor([[0.25]], dtype=F64)
    tab = fd.step_table(p, times, "ei")
    A, B, C = float(tab.A[0]), float(tab.B[0]), float(tab.C[0])
    m = 0.25 / (0.25 + 4.0)                       # D(x) = μ + m (x − μ) at t = 2 (σ² = 4)
    P = A + B * m
    mu, S = fd.gaussian_oracle(p, times, "ei", False, mean, var)
    assert float(mu) == pytest.approx(B * (0.5 - m * 0.5), rel=1e-14)
    assert float(S) == pytest.approx(P * P * 4.0 + C * C, rel=1e-14)


@pytest.fixture
def cloud():
    g = torch.Generator().manual_seed(0)
    return fd.PointCloud(torch.randn(64, 2, generator=g), fd.PureVE(T=20.0))


def test_batch_invariance_bit_for_bit(cloud):
    kw = dict(steps=12, schedule="karras", method="ei-x0", seed=5, t_end=0.01)
    big = fd.sample(cloud, n=1000, **kw)
    assert torch.equal(big[:100], fd.sample(cloud, n=100, **kw))
    assert torch.equal(big, fd.sample(cloud, n=1000, chunk_size=37, **kw))
    assert torch.equal(big[250:400], fd.sample(cloud, n=150, sample_offset=250, **kw))
    assert not torch.equal(big, fd.sample(cloud, n=1000, **(kw | dict(seed=6))))


def test_trajectory_callback_and_final_denoise(cloud):
    seen = []
    x, traj = fd.sample(cloud, n=10, steps=5, return_trajectory=True, callback=lambda info: seen.append(info["step"]))
    assert traj.shape == (6, 10, 2) and torch.equal(traj[-1], x) and seen == [0, 1, 2, 3, 4]
    assert float(traj[0].std()) > 5                 # starts at the prior, σ(T) = 20
    x0 = torch.randn(10, 2) * 20
    assert torch.equal(fd.sample(cloud, x=x0, steps=5, return_trajectory=True)[1][0], x0)
    den = fd.sample(cloud, n=10, steps=5, final_denoise=True)
    assert torch.allclose(den, cloud.denoise(x, 1e-3))


def test_progress_bar_runs(cloud, capsys):
    x = fd.sample(cloud, n=10, steps=4, progress=True)
    assert x.shape == (10, 2)


@pytest.mark.parametrize("prediction", ["x0", "eps", "score"])
def test_model_adapters_sample_like_the_analytic_denoiser(prediction):
    """A network predicting eps or the score samples the same law as one predicting x0."""
    p = fd.DriftedVE(T=100.0, beta="t^2")
    G = fd.Gaussian(MEAN, COV, p)
    native = {"x0": G.denoise, "eps": G.eps, "score": G.score}[prediction]
    model = fd.from_model(lambda x, t: native(x, float(t[0])), p, prediction)
    kw = dict(n=500, steps=30, method="ei", seed=1, dtype=F64, shape=2)
    ref = fd.sample(G, **kw)
    assert torch.allclose(fd.sample(model, **kw), ref, rtol=1e-8, atol=1e-8)


def test_images_flatten_and_come_back():
    p = fd.OU()
    G = fd.Gaussian(torch.zeros(12, dtype=F64), torch.eye(12, dtype=F64), p)
    model = fd.from_model(lambda x, t: G.denoise(x.reshape(x.shape[0], -1), float(t[0])).view_as(x), p,
                          event_shape=(3, 2, 2))
    x = fd.sample(model, n=7, steps=4)
    assert x.shape == (7, 3, 2, 2) and x.dtype == torch.float32
    x2 = fd.sample(model, x=torch.randn(7, 3, 2, 2), steps=4)
    assert x2.shape == (7, 3, 2, 2)


def test_explicit_times_ending_at_zero():
    p = fd.OU()
    G = fd.Gaussian(MEAN, COV, p)
    times = fd.time_grid(p, 30, "exponential", 1e-4, append_zero=True)
    x = fd.sample(G, n=20000, times=times, method="ei-x0", dtype=F64)
    mu, S = fd.gaussian_oracle(p, times, "ei-x0", False, MEAN, COV)
    zm, zc = _z_scores(x, mu, S)
    assert zm < 5 and zc < 5
    with pytest.raises(ValueError, match="final_denoise"):
        fd.sample(G, n=3, times=times, final_denoise=True)


def test_bad_sample_arguments(cloud):
    with pytest.raises(ValueError, match="n must be"):
        fd.sample(cloud)
    with pytest.raises(ValueError, match="n must be"):
        fd.sample(cloud, n=0)
    with pytest.raises(ValueError, match="method"):
        fd.sample(cloud, n=3, method="dpm++2m")
    with pytest.raises(ValueError, match="schedule"):
        fd.sample(cloud, n=3, schedule="cosine")
    with pytest.raises(ValueError, match="differs"):
        fd.sample(cloud, fd.PureVE(T=5.0), n=3)
    with pytest.raises(ValueError, match="dimensions"):
        fd.sample(cloud, x=torch.randn(4, 3))
    with pytest.raises(ValueError, match="disagrees"):
        fd.sample(cloud, n=5, x=torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        fd.sample(cloud, x=torch.full((4, 2), float("nan")))
    with pytest.raises(TypeError, match="float32 or float64"):
        fd.sample(cloud, x=torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        fd.sample(cloud, n=3, backend="tpu")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run pointcloud_sample: .*cuda"):
        fd.sample(cloud, n=3, backend="cuda")          # CPU tensors: refused, with the reason
    with pytest.raises(ValueError, match="shape"):
        fd.sample(fd.from_model(lambda x, t: x, cloud.process), n=3)
    with pytest.raises(TypeError, match="denoiser"):
        fd.sample(lambda x, t: x, n=3)
    with pytest.raises(ValueError, match="device"):
        fd.sample(cloud, x=torch.empty(3, 2, device="meta"), steps=2)


def test_backend_env_override(monkeypatch, cloud):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        fd.sample(cloud, n=3, steps=2)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    assert fd.sample(cloud, n=3, steps=2).shape == (3, 2)
