"""Processes against independent numerics (MATH.md §1): α and σ² integrate the moment ODEs
dm/dt = f m, dv/dt = 2 f v + g²; f and g² are finite differences of log α and σ²."""
import math

import pytest
import torch

import fastdiff as fd


def _rk4_moments(p, t_end, n=4000):
    """Integrate m' = f m (m(0) = 1) and v' = 2 f v + g² (v(0) = σ(0)²) with classical RK4 in float64."""
    def rhs(t, y):
        tt = torch.tensor(t, dtype=torch.float64)
        f, g2 = float(p._f(tt)), float(p._g2(tt))
        return (f * y[0], 2 * f * y[1] + g2)
    y = (1.0, p.sigma2(0.0))
    h = t_end / n
    t = 0.0
    for _ in range(n):
        k1 = rhs(t, y)
        k2 = rhs(t + h / 2, tuple(a + h / 2 * b for a, b in zip(y, k1, strict=True)))
        k3 = rhs(t + h / 2, tuple(a + h / 2 * b for a, b in zip(y, k2, strict=True)))
        k4 = rhs(t + h, tuple(a + h * b for a, b in zip(y, k3, strict=True)))
        y = tuple(a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(y, k1, k2, k3, k4, strict=True))
        t += h
    return y


def test_marginals_solve_the_moment_odes(process):
    for frac in (0.1, 0.5, 1.0):
        t = frac * process.T
        m, v = _rk4_moments(process, t)
        assert process.alpha(t) == pytest.approx(m, rel=1e-9)
        assert process.sigma2(t) == pytest.approx(v, rel=1e-8, abs=1e-12)


def test_f_and_g2_are_finite_differences(process):
    for frac in (0.05, 0.3, 0.9):
        t = torch.tensor(frac * process.T, dtype=torch.float64)
        h = 1e-5 * process.T
        dlog_alpha = (process.log_alpha(t + h) - process.log_alpha(t - h)) / (2 * h)
        dsig2 = (process.sigma2(t + h) - process.sigma2(t - h)) / (2 * h)
        assert float(process.f(t)) == pytest.approx(float(dlog_alpha), rel=1e-6, abs=1e-9)
        g2 = dsig2 - 2 * process.f(t) * process.sigma2(t)
        assert float(process.g2(t)) == pytest.approx(float(g2), rel=1e-6)


def test_float_in_float_out_and_tensor_in_tensor_out(process):
    assert isinstance(process.sigma(0.5 * process.T), float)
    t = torch.linspace(0.1, 1.0, 5, dtype=torch.float32) * process.T
    s = process.sigma(t)
    assert s.dtype == torch.float64 and s.shape == (5,)
    assert float(s[2]) == pytest.approx(process.sigma(float(t[2])), rel=1e-15)


def test_sigma_and_log_snr_inverses_round_trip(process):
    t = torch.tensor([1e-3, 0.01, 0.3, 0.77, 1.0], dtype=torch.float64) * process.T
    assert torch.allclose(process.sigma_inverse(process.sigma(t)), t, rtol=1e-9)
    assert torch.allclose(process.log_snr_inverse(process.log_snr(t)), t, rtol=1e-9)


def test_prior_law(process):
    x = process.prior(20000, 2, seed=1, dtype=torch.float64)
    assert float(x.std()) == pytest.approx(process.prior_std, rel=0.02)
    # MATH.md §1: OU and VP start from their stationary law, the VE family from N(0, σ(T)²)
    expect = {"OU": math.sqrt(1 / (2 * 0.5)), "VP": 1.0}.get(type(process).__name__, process.sigma(process.T))
    assert process.prior_std == pytest.approx(expect, rel=1e-12)


def test_small_t_keeps_relative_precision():
    # σ² = c(1 − e^{−2θt}) ≈ g² t: the expm1 form keeps every digit at t = 1e-12.
    ou = fd.OU(theta=0.5, g=1.0)
    t = 1e-12
    assert ou.sigma2(t) == pytest.approx(t * (1 - 0.5 * t), rel=1e-14)
    vp = fd.VP()
    assert vp.sigma2(t) == pytest.approx(0.1 * t, rel=1e-9)
    dve = fd.DriftedVE(T=625.0, beta="t^2")
    assert dve.sigma2(1e-4) == pytest.approx(2 * 1e-12 / 3, rel=1e-9)   # 2B(t) = 2t³/3


def test_aggressive_drifted_ve_at_625_stays_finite():
    p = fd.DriftedVE(T=625.0, beta="t^2")
    assert p.log_alpha(625.0) == pytest.approx(-625.0 / 3, rel=1e-14)      # α(T) = e^{−T/3}: 1e-91
    assert p.alpha(625.0) > 0 and math.isfinite(p.alpha(625.0))
    assert p.prior_std == pytest.approx(625.0, rel=1e-12)
    times = fd.time_grid(p, 200, "uniform", 1e-3)
    for method in fd.METHODS:
        table = fd.step_table(p, times, method)
        for col in (table.A, table.B, table.C, table.A_score, table.K_score):
            assert torch.isfinite(col).all()


def test_drifted_ve_closed_forms_from_the_paper():
    T = 100.0
    cons, aggr = fd.DriftedVE(T, "t"), fd.DriftedVE(T, "t^2")
    t = 37.0
    assert cons.alpha(t) == pytest.approx(math.exp(-t**2 / (2 * T**2)), rel=1e-14)
    assert cons.sigma2(t) == pytest.approx(T**2 * (1 - math.exp(-t**2 / T**2)), rel=1e-13)
    assert aggr.alpha(t) == pytest.approx(math.exp(-t**3 / (3 * T**2)), rel=1e-14)
    assert aggr.sigma2(t) == pytest.approx(T**2 * (1 - math.exp(-2 * t**3 / (3 * T**2))), rel=1e-13)


def test_drifted_ve_with_a_callable_beta_matches_the_builtin():
    ref = fd.DriftedVE(T=50.0, beta="t^2")
    quad = fd.DriftedVE(T=50.0, beta=lambda t: t * t)                    # B by quadrature
    given = fd.DriftedVE(T=50.0, beta=lambda t: t * t, B=lambda t: t**3 / 3)
    t = torch.tensor([0.5, 7.0, 33.0, 50.0], dtype=torch.float64)
    well_conditioned = t[:2]            # σ is flat near T (σ(33) = 49.998, σ(50) = 50): t(σ) is not
    for p in (quad, given):
        assert torch.allclose(p.sigma2(t), ref.sigma2(t), rtol=1e-12)
        assert torch.allclose(p.log_alpha(t), ref.log_alpha(t), rtol=1e-12)
        assert torch.allclose(p.sigma_inverse(ref.sigma(well_conditioned)), well_conditioned, rtol=1e-9)
        assert torch.allclose(ref.sigma(p.sigma_inverse(ref.sigma(t))), ref.sigma(t), rtol=1e-12)


def test_paper_processes():
    cem = fd.OU(theta=0.5, g=1.0, T=10.0)
    assert cem.alpha(2.0) == pytest.approx(math.exp(-1.0)) and cem.sigma2(2.0) == pytest.approx(1 - math.exp(-2.0))
    assert cem.prior_std == pytest.approx(1.0, rel=1e-8)
    gap = fd.OU(theta=1.0, g=1.0, T=10.0)
    assert gap.sigma2(1.0) == pytest.approx(0.5 * (1 - math.exp(-2.0))) and gap.prior_std**2 == pytest.approx(0.5)
    ve = fd.VE(0.01, 50.0)
    assert ve.sigma(0.0) == pytest.approx(0.01) and ve.sigma(1.0) == pytest.approx(50.0)


@pytest.mark.parametrize("make, match", [
    (lambda: fd.OU(theta=-1.0), "theta"), (lambda: fd.OU(T=0.0), "T"),
    (lambda: fd.VP(beta_min=float("nan")), "beta_min"), (lambda: fd.VP(beta_min=5.0, beta_max=1.0), "beta_max"),
    (lambda: fd.VE(sigma_min=2.0, sigma_max=1.0), "sigma_max"), (lambda: fd.PureVE(T=-3.0), "T"),
    (lambda: fd.DriftedVE(beta="t^3"), "beta"), (lambda: fd.DriftedVE(tau=0.0), "tau"),
])
def test_bad_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_times_outside_the_range_are_refused(process):
    with pytest.raises(ValueError, match="t must lie in"):
        process.sigma(process.T * 1.5)
    with pytest.raises(ValueError, match="t must lie in"):
        process.alpha(-0.1)
    with pytest.raises(ValueError, match="NaN"):
        process.f(torch.tensor([0.1, float("nan")]))
    with pytest.raises(TypeError):
        process.g2("soon")


def test_inverses_refuse_nan_and_out_of_range(process):
    lam_T, lam_0 = process.log_snr(process.T), process.log_snr(0.0)
    with pytest.raises(ValueError, match="sigma contains NaN"):
        process.sigma_inverse(math.nan)
    with pytest.raises(ValueError, match="sigma contains NaN"):
        process.sigma_inverse(torch.tensor([0.5, math.nan]))
    with pytest.raises(ValueError, match="lam contains NaN"):
        process.log_snr_inverse(math.nan)
    with pytest.raises(ValueError, match=r"lam must lie in \[λ\(T\), λ\(0\)\]"):
        process.log_snr_inverse(lam_T - 1.0)              # it used to return T without a word
    if math.isfinite(lam_0):
        with pytest.raises(ValueError, match=r"lam must lie in"):
            process.log_snr_inverse(lam_0 + 1.0)
    with pytest.raises(TypeError, match="lam must be a number"):
        process.log_snr_inverse("1.0")
    assert process.log_snr_inverse(lam_T) == pytest.approx(process.T, rel=1e-12)


# ------------------------------------------------ inverse functions at their ends (a review against mpmath)
def test_inverses_resolve_tiny_times_and_lambda_infinity():
    """The bisection stopped at T·2⁻²⁰⁰: every t below ~2e-58 came back as 1.9e-58, and λ = +inf (σ = 0) as a
    positive time. A callable β has no closed-form inverse, so it bisects for both."""
    callable_beta = fd.DriftedVE(T=625.0, beta=lambda t: t)
    for t in (1e-60, 1e-120):
        assert callable_beta.sigma_inverse(callable_beta.sigma(t)) == pytest.approx(t, rel=1e-12, abs=0)
        assert callable_beta.log_snr_inverse(callable_beta.log_snr(t)) == pytest.approx(t, rel=1e-12, abs=0)
    for p in (fd.OU(), fd.VP(), fd.DriftedVE(T=625.0, beta="t"), fd.PureVE(T=100.0)):
        assert p.log_snr_inverse(math.inf) == 0.0


def test_ve_sigma_inverse_near_sigma_min():
    """log(σ/σ_min) rounded the quotient: at t = 1e-14 the inverse of σ(t) was 1.6e-4 off the exact inverse of that
    (rounded) σ (mpmath); log1p of the exact difference keeps it to rounding."""
    import mpmath as mp
    p = fd.VE()
    with mp.workdps(50):
        for t in (1e-14, 1e-12, 1e-8):
            s = p.sigma(t)
            exact = mp.log(mp.mpf(s) / mp.mpf(p.sigma_min)) / mp.log(mp.mpf(p.sigma_max) / mp.mpf(p.sigma_min))
            assert abs(p.sigma_inverse(s) - exact) <= 1e-15 * exact


@pytest.mark.parametrize("p", [fd.VP(), fd.VE(), fd.PureVE(T=0.3), fd.DriftedVE(T=10.0)], ids=repr)
def test_inverses_take_a_float32_end_rounded_outward(p):
    """A float32 tensor holding σ(T), σ(0) or λ(T) rounded outward counts as that end (as times do); farther out
    is still refused, with the offending value in full."""
    for v, fn, t in ((p.sigma(p.T), p.sigma_inverse, p.T), (p.sigma(0.0), p.sigma_inverse, 0.0),
                     (p.log_snr(p.T), p.log_snr_inverse, p.T)):
        out = fn(torch.tensor([v], dtype=torch.float32))
        assert float(out[0]) == pytest.approx(t, abs=1e-6 * p.T)
    with pytest.raises(ValueError, match=r"got 1\.00997"):
        fd.VP().sigma_inverse(torch.tensor([1.01 * fd.VP().sigma(1.0)], dtype=torch.float32))


def test_a_given_antiderivative_keeps_small_steps_digits():
    """DriftedVE(beta=fn, B=fn) formed ∫_s^t β as B(t) − B(s): 3.4e-7 lost at (t − s)/t = 1e-10, T = 625, where
    beta="t^2" (the same process, increment with t − s as a factor) keeps 1e-14. Now the same to rounding."""
    given = fd.DriftedVE(T=625.0, beta=lambda t: t * t, B=lambda t: t ** 3 / 3)
    closed = fd.DriftedVE(T=625.0, beta="t^2")
    for t in (625.0, 300.0, 1.0):
        grid = torch.tensor([t, t * (1 - 1e-10)], dtype=torch.float64)
        a, b = (fd.step_table(p, grid, "ei-x0", eta=0.0) for p in (given, closed))
        assert float(a.B[0]) == pytest.approx(float(b.B[0]), rel=1e-12, abs=0)
    long_step = torch.tensor([625.0, 10.0], dtype=torch.float64)      # a long step keeps B(t) − B(s)
    a, b = (fd.step_table(p, long_step, "ei", eta=1.0) for p in (given, closed))
    assert float(a.C[0]) == pytest.approx(float(b.C[0]), rel=1e-12, abs=0)


def test_parameters_float64_cannot_hold_are_refused_by_name():
    """OU(g=1e160) and DriftedVE(T=1e200) raised a bare OverflowError, OU(theta=1e-310) made every σ² inf; and
    strings or bools passed as numbers (float('0.5'), float(True))."""
    for make, name in ((lambda: fd.OU(g=1e160), "g=1e"), (lambda: fd.OU(theta=1e-310), "theta=1e-310"),
                       (lambda: fd.DriftedVE(T=1e200), "T=1e")):
        with pytest.raises(ValueError, match=name):
            make()
    for make, name in ((lambda: fd.OU(theta="0.5"), "theta"), (lambda: fd.VP(beta_min=True), "beta_min")):
        with pytest.raises(TypeError, match=f"^{name} must be a number"):
            make()
