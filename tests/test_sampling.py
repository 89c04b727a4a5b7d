"""The sampler against the exact Gaussian oracle (MATH.md §6), and its contracts: batch invariance,
trajectories, callbacks, model adapters, input checks."""

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


# ---- issue 12: any strides, integer-like arguments, devices, callbacks, autograd, progress, memory ----------

def test_non_contiguous_x_works_on_every_cpu_backend_and_is_not_modified(cloud):
    base = torch.randn(2, 40, dtype=torch.float32) * 20
    x = base.T                                              # [40, 2], column-major strides
    assert not x.is_contiguous()
    keep = x.clone()
    for backend in ("cpu", "torch"):
        out = fd.sample(cloud, x=x, steps=6, seed=2, backend=backend)
        ref = fd.sample(cloud, x=x.contiguous(), steps=6, seed=2, backend=backend)
        assert torch.equal(out, ref) and torch.equal(x, keep)
        assert torch.equal(fd.sample(cloud, x=x, steps=6, seed=2, backend=backend, callback=lambda i: None), ref)


def test_integer_like_arguments_are_accepted():
    import numpy as np
    G = fd.Gaussian(MEAN, COV, fd.OU())
    kw = dict(steps=12, seed=4, sample_offset=3, chunk_size=5)
    ref = fd.sample(G, n=11, **kw)
    for cast in (np.int64, np.int32, torch.tensor):
        got = fd.sample(G, n=cast(11), **{k: cast(v) for k, v in kw.items()})
        assert torch.equal(got, ref), cast
    assert torch.equal(fd.time_grid(G.process, np.int64(12)), fd.time_grid(G.process, 12))


@pytest.mark.parametrize("name, value, err", [
    ("n", 2.7, TypeError), ("n", 3.0, TypeError), ("n", True, TypeError), ("n", torch.tensor(3.0), TypeError),
    ("n", torch.tensor([3]), TypeError), ("n", 0, ValueError),
    ("steps", 1.5, TypeError), ("steps", False, TypeError), ("steps", 0, ValueError),
    ("seed", 1.7, TypeError), ("seed", -1, ValueError), ("seed", 2**64, ValueError),
    ("seed", torch.tensor(True), TypeError),
    ("sample_offset", 1.5, TypeError), ("sample_offset", -2, ValueError), ("sample_offset", 2**63, ValueError),
    ("chunk_size", 2.5, TypeError), ("chunk_size", 0, ValueError),
])
def test_non_integers_and_bools_are_refused_naming_the_argument(cloud, name, value, err):
    kw = dict(n=4, steps=3) | {name: value}
    with pytest.raises(err, match=name):
        fd.sample(cloud, **kw)


def test_sample_offset_plus_n_must_fit_the_int64_sample_index(cloud):
    with pytest.raises(ValueError, match="sample_offset \\+ n"):
        fd.sample(cloud, n=4, steps=2, sample_offset=2**63 - 4)
    last = fd.sample(cloud, n=3, steps=2, sample_offset=2**63 - 4)
    assert torch.equal(last[2:], fd.sample(cloud, n=1, steps=2, sample_offset=2**63 - 2))


@pytest.mark.parametrize("device", ["meta", "gpu", "cpu:1", "banana", "cuda:99"] +
                         ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_devices_are_a_clear_value_error(device):
    G = fd.Gaussian(MEAN, COV, fd.OU())
    with pytest.raises(ValueError, match="device"):
        fd.sample(G, n=3, steps=2, device=device)


def test_device_must_match_x_and_the_point_cloud(cloud):
    with pytest.raises(ValueError, match="x's device"):
        fd.sample(fd.Gaussian(MEAN, COV, fd.OU()), x=torch.empty(3, 2, device="meta"), steps=2)
    with pytest.raises(ValueError, match="device 'meta'"):
        fd.sample(cloud, x=torch.randn(3, 2), steps=2, device="meta")
    assert fd.sample(cloud, n=3, steps=2, device="cpu:0").device.type == "cpu"


def test_callback_sees_x_k_before_the_update_and_its_prediction(cloud):
    seen = []
    def record(info):
        seen.append((info["step"], info["t"], info["x"].clone(), info["prediction"]))

    x, traj = fd.sample(cloud, n=6, steps=4, return_trajectory=True, seed=1, callback=record)
    grid = fd.time_grid(cloud.process, 4)
    for k, t, xk, pred in seen:
        assert t == float(grid[k])
        assert torch.equal(xk, traj[k])                           # the state before step k's update
        assert torch.equal(pred, cloud.denoise(traj[k], t))       # D at (x_k, t_k), same kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_point_cloud_with_a_no_op_callback_equals_the_fused_run(backend, dtype):
    g = torch.Generator().manual_seed(3)
    data = torch.randn(200, 3, generator=g, dtype=dtype)
    for cloud in (fd.PointCloud(data, fd.DriftedVE(T=10.0), backend=backend),
                  fd.PointCloud(data, fd.VP(), weights=torch.rand(200, generator=g), bandwidth=0.01, backend=backend)):
        kw = dict(n=70, steps=9, seed=7, sample_offset=11, backend=backend, dtype=dtype, return_trajectory=True)
        x, traj = fd.sample(cloud, **kw)
        x_cb, traj_cb = fd.sample(cloud, callback=lambda info: None, **kw)
        assert torch.equal(x, x_cb) and torch.equal(traj, traj_cb)
        fin = fd.sample(cloud, final_denoise=True, **(kw | dict(return_trajectory=False)))
        assert torch.equal(fin, cloud.denoise(x, 1e-3))


def test_sampling_runs_without_autograd_but_models_may_enable_it():
    p = fd.OU()
    G = fd.Gaussian(MEAN, COV, p)
    x0 = (torch.randn(5, 2, dtype=F64) * p.prior_std).requires_grad_(True)
    out = fd.sample(G, x=x0, steps=5)
    assert out.grad_fn is None and not out.requires_grad and x0.grad is None

    def guided(x, t):                                        # a model that differentiates inside
        with torch.enable_grad():
            z = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(-(0.5 * (z - G.means[0].to(z)) ** 2).sum(), z)
        return G.denoise(x, float(t[0])) + 0 * g
    den = fd.from_model(guided, p)
    assert torch.equal(fd.sample(den, x=x0.detach(), steps=5), fd.sample(G, x=x0.detach(), steps=5))


def test_progress_counts_steps_or_finished_samples_never_both(cloud, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):                      # the plain-text fallback is easy to read back
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    ref = fd.sample(cloud, n=100, steps=30, seed=3)
    for backend in ("cpu", "torch"):                         # counted step by step: the same bits
        assert torch.equal(fd.sample(cloud, n=100, steps=30, seed=3, progress=True, backend=backend),
                           fd.sample(cloud, n=100, steps=30, seed=3, backend=backend))
        err = capsys.readouterr().err
        assert "fastdiff.sample: 30/30 steps" in err and "600" not in err and "100/100" not in err
    big = fd.sample(cloud, n=1300, steps=5, seed=3)          # enough rows to split: finished samples
    assert torch.equal(fd.sample(cloud, n=1300, steps=5, seed=3, progress=True), big)
    err = capsys.readouterr().err
    assert "1300/1300 samples" in err and "5 steps each" in err
    from fastdiff import sampling  # a fused backend (cuda, triton) counts samples
    monkeypatch.setattr(sampling, "_STEPWISE_EXACT", ())
    x = fd.sample(cloud, n=100, steps=30, seed=3, progress=True)
    assert torch.equal(x, ref)                               # the bar's chunking changes nothing
    err = capsys.readouterr().err
    assert "100/100 samples" in err and "30 steps each" in err and "600" not in err
    G = fd.Gaussian(MEAN, COV, fd.OU())
    fd.sample(G, n=10, steps=30, progress=True, chunk_size=5)
    err = capsys.readouterr().err
    assert "chunk 2/2: 30/30 steps" in err and "60/" not in err


def test_memory_is_checked_before_allocating(cloud, monkeypatch):
    from fastdiff import sampling
    monkeypatch.setattr(sampling, "_available_host_bytes", lambda: 2**30)
    with pytest.raises(ValueError, match=r"trajectory \[100001, 2000, 2\].*GiB.*return_trajectory=False"):
        fd.sample(cloud, n=2000, steps=100_000, return_trajectory=True)
    with pytest.raises(ValueError, match="step table for 100000000 steps"):
        fd.sample(cloud, n=10, steps=10**8)
    assert fd.sample(cloud, n=10, steps=5).shape == (10, 2)   # small runs still fit


def test_poor_grid_warns_and_agrees_with_the_gaussian_oracle():
    from fastdiff.sampling import unit_gaussian_variance
    one, eye = torch.zeros(1, dtype=F64), torch.eye(1, dtype=F64)
    for p in (fd.DriftedVE(T=100.0), fd.VP(), fd.OU(), fd.DriftedVE(T=100.0, beta="t^2")):
        for schedule, K, ode in (("uniform", 20, False), ("logsnr", 50, False), ("karras", 7, True)):
            table = fd.step_table(p, fd.time_grid(p, K, schedule), "ei", ode)
            _, S = fd.gaussian_oracle(p, table.times, "ei", ode, one, eye)
            assert unit_gaussian_variance(p, table) == pytest.approx(float(S), rel=1e-9)
    G = fd.Gaussian(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), fd.DriftedVE(T=100.0))
    with pytest.warns(fd.GridWarning, match="variance would be 25"):        # the example
        fd.sample(G, n=4, steps=20, schedule="uniform")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", fd.GridWarning)
        fd.sample(G, n=4, steps=20)                                          # the default grid is fine


def test_sample_documents_every_parameter():
    import inspect
    doc = fd.sample.__doc__
    for name in inspect.signature(fd.sample).parameters:
        assert f"\n    {name} " in doc or f" {name} " in doc.split("Autograd")[0], name
    assert "before the update" in doc and "no_grad" in doc


def test_default_device_follows_a_denoiser_that_names_one():
    """A streamed cloud names the device it reduces on (no .data tensor): samples are drawn there by default."""
    den = fd.from_model(lambda x, t: x, fd.OU(), event_shape=(2,))
    den.device = torch.device("meta")
    with pytest.raises(ValueError, match="device 'meta'|device meta"):
        fd.sample(den, n=3, steps=2)
    den.device = torch.device("cpu")
    assert fd.sample(den, n=3, steps=2).device.type == "cpu"


def test_a_grid_starting_below_t_needs_x():
    """The start is drawn from the prior, the law at T: a grid begun at 0.3 on VP used to give mean 2.57 for data
    of mean 3 without a word. With x= drawn at times[0] (img2img) the same grid is fine."""
    process = fd.VP()
    G = fd.Gaussian(torch.tensor([3.0]), torch.tensor([[0.25]]), process)
    times = torch.linspace(0.3, 1e-3, 101, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"times\[0\]=0.3 is below T=1.0"):
        fd.sample(G, n=10, times=times)
    a, s = process.alpha(0.3), process.sigma(0.3)
    g = torch.Generator().manual_seed(0)
    x0 = 3.0 + 0.5 * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    x = fd.sample(G, x=a * x0 + s * torch.randn(20000, 1, generator=g, dtype=torch.float64), times=times)
    assert abs(float(x.mean()) - 3.0) < 0.02 and abs(float(x.std()) - 0.5) < 0.02


def test_switches_and_arguments_that_x_gives_are_checked():
    den = fd.Gaussian(torch.zeros(2), torch.eye(2), fd.VP())
    x = torch.randn(3, 2)
    for name in ("ode", "final_denoise", "return_trajectory", "progress", "cuda_graph"):
        for bad in ("False", None, 1):
            with pytest.raises(TypeError, match=f"{name} must be True or False"):
                fd.sample(den, n=3, steps=5, **{name: bad})
    with pytest.raises(TypeError, match="ode must be True or False"):
        fd.step_table(fd.VP(), fd.time_grid(fd.VP(), 5), "ei", "False")
    with pytest.raises(ValueError, match=r"shape=\(5,\) disagrees with x's per-sample shape \(2,\)"):
        fd.sample(den, x=x, shape=(5,), steps=5)
    assert fd.sample(den, x=x, shape=(2,), steps=5).shape == (3, 2)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        fd.sample(den, x=x, dtype=torch.float16, steps=5)
    with pytest.raises(ValueError, match="dtype=torch.float64 disagrees with x's dtype"):
        fd.sample(den, x=x, dtype=torch.float64, steps=5)
    for bad, err in ((None, TypeError), ("1e-3x", TypeError), ([0.001], TypeError)):
        with pytest.raises(err, match="t_end must be a number"):
            fd.sample(den, n=3, steps=5, t_end=bad)


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms", "heun"])
def test_a_grid_whose_sigma_floor_repeats_is_named(method):
    """VE's σ equals σ_min in float64 below t ≈ 1e-17: a strictly decreasing time grid there repeats σ/α, and
    the multistep methods divided by h = 0 (ZeroDivisionError)."""
    process = fd.VE()
    times = torch.tensor([1.0, 0.5, 1e-18, 1e-19], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64) * process.prior_std
    den = fd.Gaussian(torch.zeros(2), torch.eye(2), process)
    with pytest.raises(ValueError, match=r"σ/α does not decrease from times\[2\]=1e-18 to times\[3\]=1e-19"):
        fd.sample(den, x=x, times=times, method=method)
    with pytest.raises(ValueError, match="σ/α does not decrease"):
        fd.gaussian_oracle(process, times, method, False, torch.zeros(1), torch.eye(1))


def test_a_float32_grid_starting_at_t_rounded_is_t():
    """torch.linspace(0.7, ...) in float32 starts at 0.69999999: that is T, not a grid begun below it (nor, for
    T = 0.3 rounded up to 0.30000001, one beyond it)."""
    for T in (0.7, 0.3):
        p = fd.OU(T=T)
        den = fd.Gaussian(torch.zeros(1), torch.eye(1), p)
        times = torch.linspace(T, 1e-3, 11)
        assert float(times[0]) != T
        grid = fd.schedules.check_times(p, times)
        assert float(grid[0]) == T and torch.equal(grid[1:], times[1:].double())
        assert torch.equal(fd.sample(den, n=3, times=times), fd.sample(den, n=3, times=grid))
    with pytest.raises(ValueError, match="below T"):       # a real shortfall is still one
        fd.sample(fd.Gaussian(torch.zeros(1), torch.eye(1), fd.OU(T=0.7)), n=3, times=torch.linspace(0.69, 1e-3, 11))
