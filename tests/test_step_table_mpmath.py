"""Every step-table coefficient (MATH.md §3), in float64, against a 110-digit mpmath evaluation of the same step.

The mpmath side is written from the definitions, not from fastdiff's code: each process is given by its
α(t), σ(t)², f(t), g(t)² (MATH.md §1); the integrals of the exponential integrator (I = α_s ∫_s^t g²/α du,
noise variance α_s² ∫_s^t g²/α² du) by their antiderivatives (α' = fα, so with g² = −2cf,
∫ g²/α = 2c/α and ∫ g²/α² = c/α²; with f = 0, ∫ g² = σ²), which a separate test checks against mpmath
quadrature; and the D-frozen step by its log-SNR form. Inputs are the table's own float64 times, converted
exactly, so the comparison measures only the table's arithmetic.

Every coefficient (A, B, C, A_score, K_score and the ε-form K/σ) must be within 1e-12 relative (a
coefficient that is exactly zero must be zero), at the grid extremes: the first and last steps of coarse
and fine grids, t near 0, a last step to t = 0, and the aggressive drifted VE at T = 100 and T = 625 where
α(T) is e^{-33} and e^{-208}. One documented exception (`_a_may_cross_zero`): the D-form A of a score-form
step that changes sign with the step length is held to 1e-12 of its two parts.
"""
import mpmath as mp
import pytest
import torch

import fastdiff as fd

REL = 1e-12
# the D form of a score-form step subtracts two numbers as large as e^{120} (aggressive drifted VE, T = 625,
# 4 steps) that nearly cancel, so the reference carries 110 digits
mp.mp.dps = 110


# -- the processes, from their definitions (MATH.md §1): name -> (fastdiff process, mpmath model) --------
def _model(log_alpha, sigma2, f, g2, T, c=None):
    """A process as mpmath functions of t; c is set when σ² = c(1 − α²) and g² = −2cf."""
    m = {"log_alpha": log_alpha, "sigma2": sigma2, "f": f, "g2": g2, "T": T}
    if c is not None:
        m["c"] = c
    return m


def _alpha(m, u):
    return mp.exp(m["log_alpha"](u))


def _ou(theta, g, T):
    th, g2 = mp.mpf(theta), mp.mpf(g) ** 2
    return _model(lambda t: -th * t, lambda t: g2 / (2 * th) * (1 - mp.exp(-2 * th * t)), lambda t: -th,
                  lambda t: g2, T, c=g2 / (2 * th))


def _vp(b0, b1):
    b0, b1 = mp.mpf(b0), mp.mpf(b1)

    def log_alpha(t):
        return -t * t * (b1 - b0) / 4 - t * b0 / 2

    return _model(log_alpha, lambda t: 1 - mp.exp(2 * log_alpha(t)), lambda t: -(b0 + t * (b1 - b0)) / 2,
                  lambda t: b0 + t * (b1 - b0), 1.0, c=mp.mpf(1))


def _ve(smin, smax):
    smin, smax = mp.mpf(smin), mp.mpf(smax)

    def sigma2(t):
        return (smin * (smax / smin) ** t) ** 2

    return _model(lambda t: mp.mpf(0), sigma2, lambda t: mp.mpf(0),
                  lambda t: 2 * mp.log(smax / smin) * sigma2(t), 1.0)


def _pure_ve(T):
    return _model(lambda t: mp.mpf(0), lambda t: t * t, lambda t: mp.mpf(0), lambda t: 2 * t, T)


def _drifted_ve(T, power):
    tau = mp.mpf(T) ** 2

    def B(t):                                              # ∫₀ᵗ β with β(t) = t**power
        return t ** (power + 1) / (power + 1)

    return _model(lambda t: -B(t) / tau, lambda t: tau * (1 - mp.exp(-2 * B(t) / tau)),
                  lambda t: -(t**power) / tau, lambda t: 2 * t**power, T, c=tau)


PROCESSES = {
    "OU(0.5,1,10)": (lambda: fd.OU(0.5, 1.0, 10.0), lambda: _ou(0.5, 1.0, 10.0)),
    "OU(1,1,10)": (lambda: fd.OU(1.0, 1.0, 10.0), lambda: _ou(1.0, 1.0, 10.0)),
    "VP": (lambda: fd.VP(0.1, 20.0), lambda: _vp(0.1, 20.0)),
    "VE": (lambda: fd.VE(0.01, 50.0), lambda: _ve(0.01, 50.0)),
    "PureVE(100)": (lambda: fd.PureVE(100.0), lambda: _pure_ve(100.0)),
    "DriftedVE(100,t)": (lambda: fd.DriftedVE(100.0, "t"), lambda: _drifted_ve(100.0, 1)),
    "DriftedVE(100,t^2)": (lambda: fd.DriftedVE(100.0, "t^2"), lambda: _drifted_ve(100.0, 2)),
    "DriftedVE(625,t)": (lambda: fd.DriftedVE(625.0, "t"), lambda: _drifted_ve(625.0, 1)),
    "DriftedVE(625,t^2)": (lambda: fd.DriftedVE(625.0, "t^2"), lambda: _drifted_ve(625.0, 2)),
    # a callable β whose B is found by Gauss–Legendre quadrature (exact for this polynomial)
    "DriftedVE(625,callable t^2)": (lambda: fd.DriftedVE(625.0, lambda t: t * t), lambda: _drifted_ve(625.0, 2)),
}

# grids: (schedule, steps, t_end as a fraction of T, append_zero)
GRIDS = [
    ("uniform", 4, 1e-3, False),          # a few huge steps: E = e^{-(1+η²)ΔL} far below 1e-16 at the start
    ("uniform", 2500, 1e-5, False),       # fine steps; h = 0.25 at T = 625, t near 0 at the end
    ("exponential", 200, 1e-7, True),     # CEM grid: log-uniform to tiny t, then a last step to t = 0
    ("quadratic", 50, 1e-4, False),
    ("karras", 40, 1e-3, False),          # EDM grid: at T = 625 its first step has r·E = e^{-207}
]


def _grid_id(g):
    return f"{g[0]}{g[1]}-{g[2]:g}" + ("+0" if g[3] else "")


def _ei_integrals(m, t, s):
    """(∫_s^t g²/α du, ∫_s^t g²/α² du) from antiderivatives: α' = fα gives (1/α)' = −f/α and
    (1/α²)' = −2f/α², so with g² = −2cf they are 2c/α and c/α²; with f = 0 (α = 1), (σ²)' = g²."""
    if "c" in m:
        inv_t, inv_s = 1 / _alpha(m, t), 1 / _alpha(m, s)
        return 2 * m["c"] * (inv_t - inv_s), m["c"] * (inv_t**2 - inv_s**2)
    d = m["sigma2"](t) - m["sigma2"](s)
    return d, d


# -- one step in mpmath --------------------------------------------------------------------------------
def _step_mp(m, method, eta, t, s):
    """(A, B, C, A_score, K_score) of the step t -> s, from the definitions."""
    eta, k = mp.mpf(eta), (1 + mp.mpf(eta) ** 2) / 2
    a_t, s2_t = _alpha(m, t), m["sigma2"](t)
    if method == "euler":                                   # x_s = x + h[−f x + k g² score] + η g √h z
        h = t - s
        A_score, K = 1 - h * m["f"](t), h * k * m["g2"](t)
        C = eta * mp.sqrt(m["g2"](t) * h)
    elif method == "ei":                                    # linear part exact, score frozen at t
        a_s = _alpha(m, s)
        A_score = a_s / a_t
        g2_over_alpha, g2_over_alpha2 = _ei_integrals(m, t, s)
        K = k * a_s * g2_over_alpha
        C = eta * a_s * mp.sqrt(g2_over_alpha2)
    else:                                                   # D frozen at t, in the log-SNR variable
        a_s, s2_s = _alpha(m, s), m["sigma2"](s)
        A_score = a_s / a_t
        if s2_s == 0:                                       # the step to σ = 0 returns α_s·D exactly
            E, C = mp.mpf(0), mp.mpf(0)
        else:
            dL = (mp.log(a_s) - mp.log(s2_s) / 2) - (mp.log(a_t) - mp.log(s2_t) / 2)
            E = mp.exp(-(1 + eta**2) * dL)
            C = mp.sqrt(s2_s) * mp.sqrt(1 - mp.exp(-2 * eta**2 * dL))
        A, B = A_score * E, a_s * (1 - E)
        return A, B, C, A_score, A_score * s2_t * (1 - E)
    # the D form of a score-form step: score = (α D − x)/σ²
    return A_score - K / s2_t, K * a_t / s2_t, C, A_score, K


def _rel_err(got: float, want, scale) -> float:
    if scale == 0:
        return 0.0 if got == 0 else float("inf")
    return float(abs((mp.mpf(got) - want) / scale))


def _a_may_cross_zero(model, method, eta) -> bool:
    """The D-form A of a score-form step is A_score − K/σ_t². For Euler (1 − hf − hkg²/σ², the overshoot
    of a large step) and for the exponential integrator with drift and η > 0 ((1 − α_tα_s) − η²(r − 1),
    over 1 − α_t²) it is a difference that crosses zero as the step grows: near the crossing no float64
    evaluation keeps 1e-12 of A itself, only of its two parts. Everywhere else A is a sum of
    non-negative terms (or a product) and is held to 1e-12 of itself."""
    return method == "euler" or (method == "ei" and eta > 0 and "c" in model)


def _check_rows(process, model, method, eta, times, rows):
    table = fd.step_table(process, times, method, eta=eta)
    worst = []
    for i in rows:
        t, s = mp.mpf(float(table.times[i])), mp.mpf(float(table.times[i + 1]))
        want = _step_mp(model, method, eta, t, s)
        want_eps = -want[4] / mp.sqrt(model["sigma2"](t))                      # ε = −σ·score
        got = [table.A, table.B, table.C, table.A_score, table.K_score]
        got_eps = table.for_prediction("eps")[1]
        scales = [abs(w) for w in want + (want_eps,)]
        if _a_may_cross_zero(model, method, eta):
            scales[0] = abs(want[3]) + abs(want[4] / model["sigma2"](t))        # |A_score| + |K|/σ_t²
        for name, g, w, sc in zip(("A", "B", "C", "A_score", "K_score", "K_eps"), got + [got_eps],
                                  want + (want_eps,), scales, strict=True):
            err = _rel_err(float(g[i]), w, sc)
            if not err <= REL:
                worst.append(f"step {i} ({float(t):.6g} -> {float(s):.6g}) {name}: got {float(g[i])!r}, "
                             f"mpmath {mp.nstr(w, 17)}, rel err {err:.3g}")
    assert not worst, f"{method} eta={eta}:\n" + "\n".join(worst)


@pytest.mark.parametrize("grid", GRIDS, ids=_grid_id)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("method", fd.METHODS)
@pytest.mark.parametrize("name", list(PROCESSES))
def test_first_and_last_steps_match_mpmath(name, method, eta, grid):
    make, make_mp = PROCESSES[name]
    process, model = make(), make_mp()
    schedule, steps, frac, zero = grid
    times = fd.time_grid(process, steps, schedule, frac * process.T, append_zero=zero)
    K = times.numel() - 1
    rows = sorted({0, 1, K - 2, K - 1})
    _check_rows(process, model, method, eta, times, rows)


@pytest.mark.parametrize("name", ["DriftedVE(100,t^2)", "DriftedVE(625,t^2)"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_aggressive_drifted_ve_every_step_of_a_coarse_grid(name, eta):
    """The issue's case: ei-x0 on the aggressive drifted VE, where the first steps have E ≪ 1e-16."""
    make, make_mp = PROCESSES[name]
    process = make()
    times = fd.time_grid(process, 25, "uniform", 1e-3)
    for method in fd.METHODS:
        _check_rows(process, make_mp(), method, eta, times, range(25))


def test_ode_flag_is_eta_zero():
    """ode=True gives the η = 0 table (the PF-ODE) with C exactly zero."""
    p = fd.DriftedVE(625.0, "t^2")
    times = fd.time_grid(p, 12, "uniform", 1e-3)
    for method in fd.METHODS:
        ode, eta0 = fd.step_table(p, times, method, ode=True), fd.step_table(p, times, method, eta=0.0)
        for name in ("A", "B", "C", "A_score", "K_score"):
            assert torch.equal(getattr(ode, name), getattr(eta0, name)), (method, name)
        assert not ode.C.any()


@pytest.mark.parametrize("name", list(PROCESSES))
def test_antiderivatives_match_quadrature(name):
    """The reference's closed-form integrals against mpmath quadrature of the definitions, on steps
    where the integrand is moderate (quadrature at 110 digits over e^{120} of growth is too slow)."""
    model = PROCESSES[name][1]()
    T = mp.mpf(model["T"])
    for t, s in ((T / 2, T / 3), (T / 100, T / 1000), (T / 1000, mp.mpf(0))):
        with mp.workdps(35):
            want = (mp.quad(lambda u: model["g2"](u) / _alpha(model, u), [s, t]),
                    mp.quad(lambda u: model["g2"](u) / _alpha(model, u) ** 2, [s, t]))
        for got, w in zip(_ei_integrals(model, t, s), want, strict=True):
            assert abs(got - w) <= mp.mpf(10) ** -25 * abs(w), (name, float(t), float(s))
