"""Step tables: every first-order method is the affine update x_s = A·x_t + B·D(x_t, t) + C·z (MATH.md §3).

A table is computed once, in float64, from the closed forms. Each method is written in the form in
which it is exact, then converted:

  score form   x_s = A_s·x + K·s          (s = score)
  D form       x_s = A·x + B·D            with s = (αD − x)/σ²:  A = A_s − K/σ²,  B = Kα/σ²
  eps form     x_s = A_s·x − (K/σ)·ε      with s = −ε/σ

so a network predicting the score, the noise or x0 gets coefficients for its own output, with no
division by a tiny α at run time (α(T) underflows float32 for the aggressive drifted VE).
η = 1 is the reverse SDE, η = 0 the PF-ODE, k = (1 + η²)/2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _table
from ._checks import as_real, check_choice, check_flag
from .processes import Process
from .schedules import check_times

METHODS = ("euler", "ei", "ei-x0")
PREDICTIONS = ("x0", "eps", "score")


@dataclass(frozen=True)
class StepTable:
    """Per-step float64 coefficients for steps k = 0..K−1, from times[k] to times[k+1].

    t, A, B, C are the D-form table (what kernels see). A_score and K_score give the score form.
    """

    times: torch.Tensor      # [K+1]
    t: torch.Tensor          # [K] evaluation times (times[:-1])
    A: torch.Tensor          # [K]
    B: torch.Tensor          # [K]
    C: torch.Tensor          # [K]
    A_score: torch.Tensor    # [K]
    K_score: torch.Tensor    # [K]
    sigma: torch.Tensor      # [K] σ(t_k)
    method: str
    eta: float

    def __len__(self):
        return self.t.numel()

    def for_prediction(self, prediction: str):
        """(A, B, C) of the update x_s = A x + B·out + C z for a model whose output is `prediction`."""
        check_choice(prediction, "prediction", PREDICTIONS)
        if prediction == "x0":
            return self.A, self.B, self.C
        if prediction == "score":
            return self.A_score, self.K_score, self.C
        return self.A_score, -self.K_score / self.sigma, self.C

    def kernel_table(self, process: Process, prediction: str = "x0") -> torch.Tensor:
        """The [K, WIDTH] float64 table (t, α(t), σ(t), A, B0, 0, 0, C, then P = 1 and no stage) that
        fastdiff.ops.pointcloud_sample and every backend's whole-trajectory kernel take (fastdiff._table); B1 = B2 = 0
        for these one-step methods."""
        A, B, C = self.for_prediction(prediction)
        return _table.pack(process.alpha(self.t), self.sigma, A, B, C, t=self.t)


def _resolve_eta(ode: bool, eta) -> float:
    check_flag(ode, "ode")
    if eta is None:
        return 0.0 if ode else 1.0
    e = as_real(eta, "eta")
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if ode and e != 0.0:
        raise ValueError(f"ode=True means eta=0; got eta={eta} (pass ode=False to choose eta yourself)")
    return e


def step_table(process: Process, times, method: str = "ei", ode: bool = False, eta: float | None = None) -> StepTable:
    """Build the float64 step table of `method` ("euler" | "ei" | "ei-x0") on the grid `times`.

    ode=True gives the probability-flow ODE (η = 0); otherwise η = 1 (reverse SDE) unless `eta` is given.
    """
    check_choice(method, "method", METHODS)
    times = check_times(process, times)
    eta = _resolve_eta(ode, eta)
    k = (1 + eta * eta) / 2
    t, s = times[:-1], times[1:]
    h = t - s
    la_t, la_s = process._log_alpha(t), process._log_alpha(s)
    sig2_t, sig2_s = process._sigma2(t), process._sigma2(s)
    alpha_t = la_t.exp()
    # the step's increments, formed directly rather than as differences of nearby values (MATH.md §3)
    log_r = process._log_alpha_ratio(t, s)          # log(α_s/α_t) ≥ 0
    dsig2 = process._sigma2_increment(t, s)         # σ_t² − σ_s² ≥ 0

    if method == "euler":
        # x_s = x + h[−f x + k g² s] + η g √h z
        g2 = process._g2(t)
        A_score = 1 - h * process._f(t)
        K = h * k * g2
        C = eta * torch.sqrt(g2 * h)
        A, B = A_score - K / sig2_t, K * alpha_t / sig2_t
    elif method == "ei":
        # linear drift exact, score frozen: x_s = r x + k I s + η √(r²σ_t² − σ_s²) z
        r = torch.exp(log_r)
        A_score, K = r, k * process.ei_integral(t, s)
        # η = 0 (the ODE) is no noise even where the variance overflows (0·√inf was NaN: a VP with a large β_max)
        C = torch.zeros_like(r) if eta == 0 else \
            eta * torch.sqrt(_ei_noise_var(process, t, s, log_r, dsig2).clamp_min(0))
        A = _ei_d_form_A(process, eta, r, K, la_t, la_s, log_r, sig2_t, sig2_s, dsig2)
        B = K * alpha_t / sig2_t
    else:
        # D frozen (DPM-Solver++ 1 / DDIM / DDPM posterior): with E = e^{−(1+η²)ΔL}, ΔL = λ_s − λ_t,
        # A = r E, B = α_s (1 − E), C = σ_s √(1 − e^{−2η²ΔL}); a step to σ_s = 0 gives x_s = α_s D.
        # ΔL = log r + ½ log(σ_t²/σ_s²) is a sum of two non-negative increments (no cancellation), and
        # A = r E is formed in log space: as r·(1 − (1 − E)) it lost all digits once E < 1e-16.
        r = torch.exp(log_r)
        half_log_var_ratio = 0.5 * torch.log1p(dsig2 / sig2_s)            # +inf where σ_s = 0
        dL = log_r + half_log_var_ratio
        one_minus_E = -torch.expm1(-(1 + eta * eta) * dL)
        A = torch.exp(-eta * eta * log_r - (1 + eta * eta) * half_log_var_ratio)
        B = la_s.exp() * one_minus_E
        C = torch.sqrt(sig2_s) * torch.sqrt(-torch.expm1(-2 * eta * eta * dL))
        C = torch.where(sig2_s == 0, torch.zeros_like(C), C)            # 0·√1 when the step ends at σ = 0
        A_score, K = r, r * sig2_t * one_minus_E                          # = A + B/α_t, Bσ_t²/α_t

    table = StepTable(times=times, t=t, A=A, B=B, C=C, A_score=A_score, K_score=K,
                      sigma=sig2_t.sqrt(), method=method, eta=eta)
    for name in ("A", "B", "C", "A_score", "K_score"):
        if not bool(torch.isfinite(getattr(table, name)).all()):
            raise ValueError(f"step table column {name} is not finite for {process!r} on this grid "
                             f"(a step too large for float64?); use more steps")
    return table


def _ei_noise_var(process, t, s, log_r, dsig2):
    """r²σ_t² − σ_s² = α_s² ∫_s^t g²/α² du, the exact noise variance of one exponential-integrator step."""
    if process.drift_free:
        return dsig2
    if process.variance_scale is not None:
        return process.variance_scale * torch.expm1(2 * log_r)
    r = torch.exp(log_r)
    return r * r * process._sigma2(t) - process._sigma2(s)


def _ei_d_form_A(process, eta, r, K, la_t, la_s, log_r, sig2_t, sig2_s, dsig2):
    """A = r − K/σ_t² of the frozen-score step, in a form without cancellation where one exists.

    f = 0:            A = (σ_s² + ½(1 − η²)(σ_t² − σ_s²))/σ_t², a sum of non-negative terms.
    σ² = c(1 − α²):   A = ((1 − α_t α_s) − η²(r − 1))/(1 − α_t²); for η = 0 one positive term (as r − K/σ_t²
                      it was the difference of two numbers near e^{120} for the aggressive drifted VE at
                      T = 625), for η > 0 a difference that can cross zero (then only its terms' scale is kept).
    """
    if process.drift_free:
        return (sig2_s + 0.5 * (1 - eta * eta) * dsig2) / sig2_t
    if process.variance_scale is not None:
        return (-torch.expm1(la_t + la_s) - eta * eta * torch.expm1(log_r)) / -torch.expm1(2 * la_t)
    return r - K / sig2_t
