"""Step tables (MATH.md §3) against an independent numerical integration of the frozen linear SDE.

Backward in time from u = t to u = s, with k = (1 + η²)/2:
  ei     (score s0 frozen):  dm/du = f m − k g² s0,                  dv/du = 2 f v − η² g²
  ei-x0  (D frozen):         dm/du = f m − k g² (α D − m)/σ²,        dv/du = 2 (f + k g²/σ²) v − η² g²
Both are exact solutions, so the table must match the integration to integration accuracy; Euler is
checked by its local error order instead.
"""
import math

import pytest
import torch

import fastdiff as fd


def _integrate(p, t, s, eta, frozen, n=2000):
    """RK4 from u = t down to u = s of (m_x, m_frozen, v): the mean's coefficients of x_t and of the
    frozen quantity, and the variance."""
    k = (1 + eta * eta) / 2
    nodes = torch.linspace(t, s, 2 * n + 1, dtype=torch.float64)      # RK4 needs the half steps
    f, g2 = p._f(nodes).tolist(), p._g2(nodes).tolist()
    a, s2 = p._log_alpha(nodes).exp().tolist(), p._sigma2(nodes).tolist()

    def rhs(j, y):
        if frozen == "score":
            return (f[j] * y[0], f[j] * y[1] - k * g2[j], 2 * f[j] * y[2] - eta * eta * g2[j])
        lin = f[j] + k * g2[j] / s2[j]
        return (lin * y[0], lin * y[1] - k * g2[j] * a[j] / s2[j], 2 * lin * y[2] - eta * eta * g2[j])

    h = (s - t) / n
    y = (1.0, 0.0, 0.0)
    for i in range(n):
        k1 = rhs(2 * i, y)
        k2 = rhs(2 * i + 1, tuple(a + h / 2 * b for a, b in zip(y, k1, strict=True)))
        k3 = rhs(2 * i + 1, tuple(a + h / 2 * b for a, b in zip(y, k2, strict=True)))
        k4 = rhs(2 * i + 2, tuple(a + h * b for a, b in zip(y, k3, strict=True)))
        y = tuple(a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4)
                  for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4, strict=True))
    return y


STEPS = [(0.6, 0.45), (0.05, 0.02)]       # fractions of T: a big step in the bulk, a small one near 0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("frac", STEPS)
def test_ei_is_the_exact_frozen_score_step(process, eta, frac):
    t, s = frac[0] * process.T, frac[1] * process.T
    table = fd.step_table(process, torch.tensor([t, s], dtype=torch.float64), "ei", eta=eta)
    mx, ms, v = _integrate(process, t, s, eta, "score")
    assert float(table.A_score[0]) == pytest.approx(mx, rel=1e-9)
    assert float(table.K_score[0]) == pytest.approx(ms, rel=1e-8)
    assert float(table.C[0]) ** 2 == pytest.approx(v, rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("frac", STEPS)
def test_ei_x0_is_the_exact_frozen_denoiser_step(process, eta, frac):
    t, s = frac[0] * process.T, frac[1] * process.T
    table = fd.step_table(process, torch.tensor([t, s], dtype=torch.float64), "ei-x0", eta=eta)
    mx, mD, v = _integrate(process, t, s, eta, "x0", n=4000)
    assert float(table.A[0]) == pytest.approx(mx, rel=1e-7, abs=1e-12)
    assert float(table.B[0]) == pytest.approx(mD, rel=1e-7)
    assert float(table.C[0]) ** 2 == pytest.approx(v, rel=1e-7, abs=1e-14)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_euler_has_second_order_local_error(process, eta):
    """Euler–Maruyama agrees with the exact frozen-score step up to O(h²) per step (mean and variance)."""
    t = 0.5 * process.T
    errs = []
    for h in (0.02 * process.T, 0.01 * process.T):
        table = fd.step_table(process, torch.tensor([t, t - h], dtype=torch.float64), "euler", eta=eta)
        mx, ms, v = _integrate(process, t, t - h, eta, "score", n=400)
        errs.append((abs(float(table.A_score[0]) - mx), abs(float(table.K_score[0]) - ms),
                     abs(float(table.C[0]) ** 2 - v)))
    for big, small in zip(*errs, strict=True):
        if big > 1e-13:
            assert 3.0 < big / small < 5.0          # halving h quarters the local error


@pytest.mark.parametrize("method", fd.METHODS)
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_score_eps_and_x0_forms_agree(process, method, eta):
    times = fd.time_grid(process, 6, "quadratic", 1e-2 * process.T)
    table = fd.step_table(process, times, method, eta=eta)
    g = torch.Generator().manual_seed(0)
    x, D = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    alpha = process.alpha(table.t).unsqueeze(1)
    sig = table.sigma.unsqueeze(1)
    score = (alpha * D - x) / sig**2
    eps = -sig * score
    A, B, _ = table.for_prediction("x0")
    As, Ks, _ = table.for_prediction("score")
    Ae, Ke, _ = table.for_prediction("eps")
    ref = A[:, None] * x + B[:, None] * D
    scale = ref.abs().max()
    assert torch.allclose(As[:, None] * x + Ks[:, None] * score, ref, rtol=1e-9, atol=1e-11 * scale)
    assert torch.allclose(Ae[:, None] * x + Ke[:, None] * eps, ref, rtol=1e-9, atol=1e-11 * scale)


def test_drifted_ve_and_pure_ve_closed_forms():
    T, t, s = 100.0, 63.0, 41.0
    for beta, B in (("t", lambda u: u * u / 2), ("t^2", lambda u: u**3 / 3)):
        p = fd.DriftedVE(T, beta)
        rho = math.exp((B(t) - B(s)) / T**2)
        for eta in (0.0, 1.0):
            tab = fd.step_table(p, torch.tensor([t, s], dtype=torch.float64), "ei", eta=eta)
            assert float(tab.A_score[0]) == pytest.approx(rho, rel=1e-13)
            assert float(tab.K_score[0]) == pytest.approx((1 + eta**2) * T**2 * (rho - 1), rel=1e-12)
            assert float(tab.C[0]) == pytest.approx(eta * math.sqrt(T**2 * (rho**2 - 1)), rel=1e-12)
    p = fd.PureVE(T)
    for eta in (0.0, 1.0):
        tab = fd.step_table(p, torch.tensor([t, s], dtype=torch.float64), "ei", eta=eta)
        assert float(tab.A_score[0]) == 1.0
        assert float(tab.K_score[0]) == pytest.approx((1 + eta**2) / 2 * (t * t - s * s), rel=1e-14)
        assert float(tab.C[0]) == pytest.approx(eta * math.sqrt(t * t - s * s), rel=1e-14)


def test_peer_formulas():
    # score_sde ReverseDiffusionPredictor for VE: x ← x + (σ_t² − σ_s²)·s + √(σ_t² − σ_s²)·z
    ve = fd.VE(0.01, 50.0)
    t, s = 0.7, 0.65
    tab = fd.step_table(ve, torch.tensor([t, s], dtype=torch.float64), "ei")
    dv = ve.sigma2(t) - ve.sigma2(s)
    assert float(tab.A_score[0]) == 1.0 and float(tab.K_score[0]) == pytest.approx(dv, rel=1e-14)
    assert float(tab.C[0]) == pytest.approx(math.sqrt(dv), rel=1e-14)
    # DDIM (VP, η = 0): x_s = α_s D + σ_s (x − α_t D)/σ_t
    vp = fd.VP()
    t, s = 0.8, 0.3
    tab = fd.step_table(vp, torch.tensor([t, s], dtype=torch.float64), "ei-x0", ode=True)
    assert float(tab.A[0]) == pytest.approx(vp.sigma(s) / vp.sigma(t), rel=1e-13)
    assert float(tab.B[0]) == pytest.approx(vp.alpha(s) - vp.sigma(s) * vp.alpha(t) / vp.sigma(t), rel=1e-12)
    assert float(tab.C[0]) == 0.0
    # DDPM posterior (VP, η = 1): variance σ_s²(1 − (α_t σ_s / (α_s σ_t))²)
    tab = fd.step_table(vp, torch.tensor([t, s], dtype=torch.float64), "ei-x0")
    ratio = vp.alpha(t) * vp.sigma(s) / (vp.alpha(s) * vp.sigma(t))
    assert float(tab.C[0]) ** 2 == pytest.approx(vp.sigma2(s) * (1 - ratio**2), rel=1e-12)


def test_ei_x0_final_step_to_zero_returns_alpha_D():
    for p in (fd.OU(), fd.VP(), fd.PureVE(), fd.DriftedVE()):
        tab = fd.step_table(p, torch.tensor([0.5 * p.T, 1e-3 * p.T, 0.0], dtype=torch.float64), "ei-x0")
        assert float(tab.A[-1]) == 0.0 and float(tab.C[-1]) == 0.0
        assert float(tab.B[-1]) == pytest.approx(p.alpha(0.0))


def test_ode_flag_and_eta():
    p = fd.OU()
    times = fd.time_grid(p, 5)
    assert fd.step_table(p, times, "ei", ode=True).eta == 0.0
    assert fd.step_table(p, times, "ei").eta == 1.0
    assert bool((fd.step_table(p, times, "euler", ode=True).C == 0).all())
    with pytest.raises(ValueError, match="eta"):
        fd.step_table(p, times, "ei", eta=1.5)
    with pytest.raises(ValueError, match="ode=True"):
        fd.step_table(p, times, "ei", ode=True, eta=0.5)
    with pytest.raises(ValueError, match="method"):
        fd.step_table(p, times, "heun")
    with pytest.raises(ValueError, match="prediction"):
        fd.step_table(p, times, "ei").for_prediction("v")


def test_ei_ode_where_the_noise_variance_overflows():
    """ei with ode=True on VP(β_max = 2000), a step with log r ≈ 500: the noise variance r²σ_t² − σ_s² overflows,
    and 0·√inf made C NaN (the table was refused); η = 0 is no noise. A and B are mpmath's (1 and 0.63668675)."""
    p = fd.VP(beta_min=0.1, beta_max=2000.0)
    tab = fd.step_table(p, torch.tensor([1.0, 0.03, 1e-3], dtype=torch.float64), "ei", ode=True)
    assert torch.equal(tab.C, torch.zeros_like(tab.C))
    assert float(tab.A[0]) == pytest.approx(1.0, rel=1e-12) and float(tab.B[0]) == pytest.approx(0.63668675, rel=1e-8)
