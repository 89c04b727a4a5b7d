"""fastdiff.train: the Fokker–Planck residual vanishes on exact log-densities, each loss is minimised by
its analytic target (with the irreducible value where it is closed form), the loop is seeded, and the
MLP learns."""
import math
import warnings

import pytest
import torch

import fastdiff as fd
from fastdiff import train as tr

F64 = torch.float64


def _mixture_log_density(weights, means, variances, process):
    """log p_t(x) of Σ π_k N(μ_k, v_k I) under `process`, written with torch ops (differentiable in x
    and t): p_t = Σ π_k N(α μ_k, (α² v_k + σ²) I), α and σ² from the closed forms of MATH.md §1."""
    def u(x, t):
        la = process._log_alpha(t).unsqueeze(1)                      # [M, 1], differentiable in t
        s2 = process._sigma2(t).unsqueeze(1)
        a = la.exp()
        c = a * a * variances + s2                                   # [M, K]
        diff = x.unsqueeze(1) - a.unsqueeze(-1) * means              # [M, K, d]
        d = x.shape[1]
        logn = -0.5 * ((diff * diff).sum(-1) / c + d * torch.log(2 * math.pi * c))
        return torch.logsumexp(torch.log(weights) + logn, dim=1)
    return u


@pytest.mark.parametrize("make", [lambda: fd.OU(theta=1.0, g=1.0, T=10.0), lambda: fd.OU(0.5, 1.0, 10.0),
                                  lambda: fd.DriftedVE(T=10.0, beta="t"), lambda: fd.PureVE(T=10.0)],
                         ids=["OU(1,1)", "OU(0.5,1)", "DriftedVE", "PureVE"])
def test_fp_residual_vanishes_on_exact_mixture_log_density(make):
    process = make()
    w, mu, cov = fd.datasets.blob9_params()
    u = _mixture_log_density(w, mu, cov[:, 0, 0], process)
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(300, 2, generator=g, dtype=F64)
    t = 0.02 + 5 * torch.rand(300, generator=g, dtype=F64)
    R = tr.fp_residual(u, x, t, process, create_graph=False)
    assert R.shape == (300,) and R.dtype == F64
    assert float(R.abs().max()) < 1e-9
    # the library's GaussianMixture.log_prob is the same density (and differentiable in t)
    gm = fd.GaussianMixture(w, mu, cov, process)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # float(t.min()) on a tensor that requires grad
        R2 = tr.fp_residual(lambda xx, tt: gm.log_prob(xx, tt), x, t, process, create_graph=False)
    assert float(R2.abs().max()) < 1e-9
    # ... and a wrong density does not satisfy the equation: a stationary-in-time log-density, and a
    # density with the wrong time scale
    R_bad = tr.fp_residual(lambda xx, tt: u(xx, tt.detach() * 0 + 1.0), x, t, process, create_graph=False)
    R_bad2 = tr.fp_residual(lambda xx, tt: u(xx, 1.1 * tt), x, t, process, create_graph=False)
    assert float(R_bad.abs().mean()) > 1e-2 and float(R_bad2.abs().mean()) > 1e-2


def test_fp_residual_one_dimensional_closed_form():
    # p_t = N(0, α² v + σ²) under OU(θ, g): the residual of the exact log-density is 0, and of
    # u = log N(0, 1) (the wrong variance at every t) it is the closed form ½ g²(1 − ... ) computed by hand
    process = fd.OU(theta=0.7, g=1.3, T=5.0)
    x = torch.linspace(-3, 3, 41, dtype=F64).unsqueeze(1)
    t = torch.full((41,), 0.8, dtype=F64)
    u = _mixture_log_density(torch.ones(1, dtype=F64), torch.zeros(1, 1, dtype=F64), torch.tensor([0.3], dtype=F64),
                             process)
    assert float(tr.fp_residual(u, x, t, process, create_graph=False).abs().max()) < 1e-12

    def std_normal(xx, tt):
        return -0.5 * (xx * xx).sum(1) - 0.5 * math.log(2 * math.pi) + 0 * tt
    R = tr.fp_residual(std_normal, x, t, process, create_graph=False)
    f, g2 = -0.7, 1.3**2
    expected = f + f * (-x[:, 0] ** 2) - 0.5 * g2 * (-1 + x[:, 0] ** 2)   # ∂t u = 0, ∇u = −x, Δu = −1
    torch.testing.assert_close(R, expected, rtol=0, atol=1e-12)


def test_fp_residual_backpropagates_into_parameters():
    net = tr.PotentialMLP(2, hidden=16, layers=2, seed=0).double()
    R = tr.fp_residual(net, torch.randn(8, 2, dtype=F64), torch.rand(8, dtype=F64) + 0.1, fd.OU(1.0, 1.0, 10.0))
    (R * R).mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    # every parameter but the output bias (a constant added to u drops out of R) gets a finite gradient
    assert grads.pop("net.4.bias") is None
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


# ----------------------------------------------------------------------------------------- losses
def _gaussian_setup(n=200_000, seed=0):
    process = fd.OU(0.5, 1.0, 10.0)
    w, mu, cov = fd.datasets.gaussian_2d_params()
    den = fd.Gaussian(mu[0], cov[0], process)
    x0 = fd.datasets.gaussian_2d(n, seed=seed, dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    t = tr.sample_times(n, process, 1e-3, "log-uniform", g)
    z = torch.randn(n, 2, generator=g, dtype=F64)
    return process, den, cov[0], x0, t, z


def _irreducible(process, cov, t):
    """Per-sample minimum of all three losses for Gaussian data: Σ_i α²λ_i/(α²λ_i + σ²)."""
    lam = torch.linalg.eigvalsh(cov)
    a2 = process.alpha(t).unsqueeze(1) ** 2
    s2 = process.sigma2(t).unsqueeze(1)
    return (a2 * lam / (a2 * lam + s2)).sum(1)


def test_losses_agree_for_one_denoiser_and_reach_the_irreducible_value():
    process, den, cov, x0, t, z = _gaussian_setup()
    per = {
        "dsm": tr.dsm_loss(den.score, x0, t, z, process, reduction="none"),
        "eps": tr.eps_loss(den.eps, x0, t, z, process, reduction="none"),
        "cem": tr.cem_loss(den.denoise, x0, t, z, process, reduction="none"),
    }
    # σ s + z = z − ε̂ = (α/σ)(x0 − D̂): the three losses are one number per sample
    torch.testing.assert_close(per["dsm"], per["eps"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(per["dsm"], per["cem"], rtol=1e-7, atol=1e-10)
    target = float(_irreducible(process, cov, t).mean())
    for name, v in per.items():
        se = float(v.std()) / math.sqrt(v.numel())
        assert abs(float(v.mean()) - target) < 4 * se, (name, float(v.mean()), target, se)
        assert float(v.mean()) == pytest.approx(float(getattr(tr, f"{name}_loss")(
            {"dsm": den.score, "eps": den.eps, "cem": den.denoise}[name], x0, t, z, process)))


@pytest.mark.parametrize("name", ["dsm", "eps", "cem"])
def test_each_loss_is_minimised_by_its_analytic_target(name):
    process, den, cov, x0, t, z = _gaussian_setup(n=100_000, seed=3)
    fn = {"dsm": den.score, "eps": den.eps, "cem": den.denoise}[name]
    loss = tr.LOSSES[name]
    base = float(loss(fn, x0, t, z, process))
    c = torch.tensor([0.05, -0.03], dtype=F64)

    def shifted(xx, tt):
        return fn(xx, tt) + c

    def scaled(xx, tt):
        return 1.05 * fn(xx, tt)

    shift = loss(shifted, x0, t, z, process, reduction="none") - loss(fn, x0, t, z, process, reduction="none")
    scale_gap = float(loss(scaled, x0, t, z, process)) - base
    assert float(shift.mean()) > 0 and scale_gap > 0
    # E[target − prediction* | x_t] = 0, so a constant shift c adds exactly E w(t)|c|² (w the loss weight):
    # the per-sample gap is w|c|² + a zero-mean cross term, checked to 4 standard errors
    alpha, sigma = process.alpha(t), process.sigma(t)
    w = {"dsm": sigma**2, "eps": torch.ones_like(t), "cem": alpha**2 / sigma**2}[name]
    expected = float(w.mean()) * float(c @ c)
    se = float(shift.std()) / math.sqrt(shift.numel())
    assert abs(float(shift.mean()) - expected) < 4 * se + 1e-12, (float(shift.mean()), expected, se)
    assert se < 0.1 * expected


def test_cem_custom_weight_and_input_checks():
    process, den, _, x0, t, z = _gaussian_setup(n=1000)
    ones = tr.cem_loss(den.denoise, x0, t, z, process, weight=lambda tt: torch.ones_like(tt), reduction="none")
    torch.testing.assert_close(ones, ((den.denoise(fd.train.perturb(x0, t, process, z)[0], t) - x0) ** 2).sum(1))
    with pytest.raises(ValueError, match="t must"):
        tr.dsm_loss(den.score, x0, t[:-1], z, process)
    with pytest.raises(ValueError, match="t_min"):
        tr.sample_times(5, process, t_min=20.0)
    with pytest.raises(ValueError, match="dist"):
        tr.sample_times(5, process, dist="normal")


# ----------------------------------------------------------------------------------------- networks and loop
def test_mlp_shapes_seed_and_potential_score():
    a, b = tr.MLP(2, hidden=16, layers=2, seed=5), tr.MLP(2, hidden=16, layers=2, seed=5)
    state = torch.random.get_rng_state()
    tr.MLP(2, hidden=16, layers=2, seed=6)
    assert torch.equal(state, torch.random.get_rng_state())          # seeded init leaves the global RNG alone
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    x, t = torch.randn(7, 2), torch.rand(7) + 0.01
    assert a(x, t).shape == (7, 2) and a(x, torch.tensor(0.5)).shape == (7, 2)
    pot = tr.PotentialMLP(2, hidden=16, layers=2, seed=0).double()
    x, t = x.double(), t.double()
    s = pot.score(x, t)
    assert not s.requires_grad
    h = 1e-6
    fd_grad = torch.stack([(pot(x + h * e, t) - pot(x - h * e, t)) / (2 * h) for e in torch.eye(2, dtype=F64)], 1)
    torch.testing.assert_close(s, fd_grad, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="x must be"):
        a(torch.randn(3, 3), torch.rand(3))


def _tiny(loss, seed=0, iters=150, model_seed=0, **kw):
    net = tr.MLP(2, hidden=32, layers=2, seed=model_seed)
    data = fd.datasets.gaussian_2d(512, seed=0)
    return tr.train(net, data, fd.OU(0.5, 1.0, 10.0), loss, iters=iters, batch_size=128, t_min=1e-2,
                    seed=seed, **kw)


def test_training_is_deterministic_given_the_seed():
    a, b, c = _tiny("cem", iters=30), _tiny("cem", iters=30), _tiny("cem", iters=30, seed=1)
    assert a.losses == b.losses and a.losses != c.losses
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    # data given as a sampler fn(n, seed=...) is seeded too
    s1 = tr.train(tr.MLP(2, 16, 1, seed=0), fd.datasets.spiral, fd.OU(), "eps", iters=5, batch_size=16, seed=2)
    s2 = tr.train(tr.MLP(2, 16, 1, seed=0), fd.datasets.spiral, fd.OU(), "eps", iters=5, batch_size=16, seed=2)
    assert s1.losses == s2.losses


@pytest.mark.parametrize("loss", ["dsm", "eps", "cem"])
def test_mlp_trains_loss_downward(loss):
    r = _tiny(loss, iters=200, lr=3e-3)
    first, last = sum(r.losses[:20]) / 20, sum(r.losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    assert r.prediction == tr.PREDICTIONS[loss]
    den = r.denoiser(fd.OU(0.5, 1.0, 10.0))
    x = fd.sample(den, n=64, steps=10, schedule="exponential", t_end=1e-2)
    assert x.shape == (64, 2) and torch.isfinite(x).all()


def test_potential_training_with_fp_residual():
    process = fd.OU(1.0, 1.0, 10.0)
    pot = tr.PotentialMLP(2, hidden=32, layers=2, seed=0)
    r = tr.train(pot, fd.datasets.blob9, process, "dsm", iters=60, batch_size=64, lr=3e-3, t_min=1e-2,
                 fp_weight=1.0, fp_box=((-3.5, 3.5), (-3.5, 3.5)), seed=0)
    assert len(r.fp_residuals) == 60 and len(r.diffusion_losses) == 60
    assert sum(r.fp_residuals[-10:]) < sum(r.fp_residuals[:10])
    x = fd.sample(r.denoiser(process), n=32, steps=5, t_end=1e-2)
    assert x.shape == (32, 2) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="PotentialMLP"):
        tr.train(tr.MLP(2, 8, 1), fd.datasets.blob9, process, "dsm", iters=1, fp_weight=1.0)
    with pytest.raises(ValueError, match="dsm"):
        tr.train(pot, fd.datasets.blob9, process, "cem", iters=1)
    with pytest.raises(ValueError, match="unknown loss"):
        tr.train(pot, fd.datasets.blob9, process, "l1", iters=1)


def test_non_finite_data_are_refused_before_training():
    bad = fd.datasets.spiral(500, seed=0)
    bad[3, 0] = float("nan")
    net = tr.MLP(2, hidden=8, layers=1, seed=0)
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="data contain NaN or inf"):
        tr.train(net, bad, fd.OU(0.5, 1.0, 10.0), "dsm", iters=5, batch_size=64)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))   # nothing trained

    def inf_sampler(n, seed=0):
        x = fd.datasets.spiral(n, seed=seed)
        x[0, 1] = float("inf")
        return x
    with pytest.raises(ValueError, match="data contain NaN or inf"):
        tr.train(net, inf_sampler, fd.OU(0.5, 1.0, 10.0), "dsm", iters=5, batch_size=64)


def test_log_every_windows_are_the_last_log_every_losses():
    seen = []
    r = _tiny("dsm", iters=6, log_every=2, callback=seen.append)
    assert [s["step"] for s in seen] == [2, 4, 6]
    assert [s["loss"] for s in seen] == pytest.approx([sum(r.losses[i - 2:i]) / 2 for i in (2, 4, 6)], rel=1e-12)


@pytest.mark.parametrize("kw, needle", [
    ({"log_every": 0}, "log_every must be >= 1, got 0"),
    ({"log_every": -1}, "log_every must be >= 1, got -1"),
    ({"log_every": 2.5}, "log_every must be an integer"),
    ({"iters": 2.7}, "iters must be an integer"),
    ({"iters": float("nan")}, "iters must be an integer"),
    ({"iters": 0}, "iters must be >= 1, got 0"),
    ({"batch_size": 16.0}, "batch_size must be an integer"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"fp_batch": 3.5}, "fp_batch must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -1}, "seed must be >= 0, got -1"),
])
def test_counts_are_integers_never_truncated(kw, needle):
    args = {"iters": 3, "batch_size": 16, **kw}
    with pytest.raises(ValueError, match=needle):
        tr.train(tr.MLP(2, 8, 1, seed=0), fd.datasets.gaussian_2d(64, seed=0), fd.OU(), "dsm", **args)
