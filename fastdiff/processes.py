"""Forward processes dX = f(t) X dt + g(t) dW with closed-form marginals X_t = α(t) X_0 + σ(t) Z (MATH.md §1).

Every coefficient is evaluated in float64. α is carried in log space (`log_alpha`), because α(T)
underflows float32 (and, for extreme settings, float64) while ratios α_s/α_t stay moderate.
σ² uses `expm1` so it is accurate for t near 0.

Each public method takes a Python float (and returns a float) or a tensor of times (and returns a
float64 tensor on the same device).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ._checks import as_real, as_time, dtype_slack

# Gauss–Legendre nodes/weights on [-1, 1], used for the few integrals with no closed form.
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(64))


def _gauss_legendre(fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """∫_a^b fn(u) du for tensors a, b of one shape (64-point Gauss–Legendre, float64)."""
    x = _GL_X.to(a.device)
    w = _GL_W.to(a.device)
    half = ((b - a) / 2).unsqueeze(-1)
    mid = ((b + a) / 2).unsqueeze(-1)
    return (half * w * fn(mid + half * x)).sum(-1)


def _bisect_increasing(fn, target: torch.Tensor, lo: float, hi: float, iters: int = 1100) -> torch.Tensor:
    """Solve fn(t) = target for t in [lo, hi], fn increasing; vectorised bisection in float64. It stops once every
    bracket is within 1e-15 relative (~50 halvings for t near T); up to 1100 halvings resolve t down to float64's
    smallest values (200 stopped at T·2⁻²⁰⁰: every t below 2e-58 came back as that)."""
    a = torch.full_like(target, lo)
    b = torch.full_like(target, hi)
    for _ in range(iters):
        m = (a + b) / 2
        below = fn(m) < target
        a = torch.where(below, m, a)
        b = torch.where(below, b, m)
        if bool(((b - a) <= 1e-15 * b.abs().clamp_min(1e-300)).all()):
            break
    return (a + b) / 2


class Process:
    """Base class. Subclasses define `_log_alpha`, `_sigma2`, `_f`, `_g2` on float64 tensors.

    Structure flags used for closed-form step tables (MATH.md §3):
      `drift_free`      f ≡ 0 and α ≡ 1 (the VE family): I = σ_t² − σ_s².
      `variance_scale`  c with σ² = c(1 − α²) and g² = −2cf (OU, VP, DriftedVE): I = 2c(r − 1).
    """

    T: float = 1.0
    drift_free: bool = False
    variance_scale: float | None = None

    # -- subclass hooks (float64 tensors in, float64 tensors out) --------------------------
    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sigma2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _g2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Increments over one step t > s, formed directly: a step's coefficients depend on them, and the
    # difference of two large nearby values (la_t ≈ la_s ≈ −208 at T = 625, σ_t² ≈ σ_s² on a fine grid)
    # would keep only a few digits of a small increment (MATH.md §3).
    def _log_alpha_ratio(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log(α_s/α_t) ≥ 0. Default: the difference of `_log_alpha` (subclasses override with a form
        that is exact to rounding for small steps)."""
        return self._log_alpha(s) - self._log_alpha(t)

    def _sigma2_increment(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """σ_t² − σ_s² ≥ 0. With σ² = c(1 − α²) it is c·α_s²·(1 − (α_t/α_s)²), from `_log_alpha_ratio`."""
        if self.variance_scale is not None:
            return -self.variance_scale * torch.exp(2 * self._log_alpha(s)) * torch.expm1(
                -2 * self._log_alpha_ratio(t, s))
        return self._sigma2(t) - self._sigma2(s)

    def _sigma_inverse(self, sigma: torch.Tensor) -> torch.Tensor:
        """t with σ(t) = sigma. Default: bisection (σ is increasing in t for every process here)."""
        return _bisect_increasing(lambda t: self._sigma2(t).sqrt(), sigma, 0.0, self.T)

    @property
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian the sampler starts from at t = T (σ(T) unless
        the process has a stationary law, MATH.md §1)."""
        return math.sqrt(float(self._sigma2(torch.tensor(self.T, dtype=torch.float64))))

    # -- public, float or tensor ----------------------------------------------------------
    def _eval(self, fn, t, name="t"):
        tt = as_time(t, name, self.T, allow_zero=True)
        if isinstance(tt, float):
            return float(fn(torch.tensor(tt, dtype=torch.float64)))
        return fn(tt)

    def log_alpha(self, t):
        """log α(t)."""
        return self._eval(self._log_alpha, t)

    def alpha(self, t):
        """α(t), the signal scale of X_t = α X_0 + σ Z (may underflow: prefer `log_alpha` for ratios)."""
        return self._eval(lambda u: self._log_alpha(u).exp(), t)

    def sigma2(self, t):
        """σ(t)², the marginal noise variance."""
        return self._eval(self._sigma2, t)

    def sigma(self, t):
        """σ(t), the marginal noise standard deviation."""
        return self._eval(lambda u: self._sigma2(u).sqrt(), t)

    def f(self, t):
        """Drift coefficient f(t) of dX = f X dt + g dW."""
        return self._eval(self._f, t)

    def g2(self, t):
        """Squared diffusion coefficient g(t)²."""
        return self._eval(self._g2, t)

    def log_snr(self, t):
        """λ(t) = log(α/σ), decreasing in t (+inf where σ = 0)."""
        return self._eval(lambda u: self._log_alpha(u) - 0.5 * self._sigma2(u).log(), t)

    def sigma_inverse(self, sigma):
        """The time t at which σ(t) = sigma (σ is increasing in t)."""
        s = _as_values(sigma, "sigma")
        lo, hi = (math.sqrt(float(self._sigma2(torch.tensor(v, dtype=torch.float64)))) for v in (0.0, self.T))
        slack = dtype_slack(sigma)
        bad = (s < lo * (1 - slack)) | (s > hi * (1 + slack))
        if bool(bad.any()):
            raise ValueError(f"sigma must lie in [σ(0), σ(T)] = [{lo!r}, {hi!r}], got {float(s[bad].reshape(-1)[0])!r}")
        out = self._sigma_inverse(s).clamp(0.0, self.T)
        return float(out) if not isinstance(sigma, torch.Tensor) else out

    def log_snr_inverse(self, lam):
        """The time t at which λ(t) = lam (bisection; λ is decreasing in t), for lam in [λ(T), λ(0)]."""
        target = _as_values(lam, "lam")
        top, bottom = (float(self.log_snr(v)) for v in (0.0, self.T))      # λ(0) (+inf unless σ(0) > 0), λ(T)
        slack = dtype_slack(lam)
        lo, hi = bottom - slack * max(1.0, abs(bottom)), top + slack * max(1.0, abs(top))    # (inf stays inf)
        bad = (target < lo) | (target > hi)
        if bool(bad.any()):
            raise ValueError(f"lam must lie in [λ(T), λ(0)] = [{bottom!r}, {top!r}], got "
                             f"{float(target[bad].reshape(-1)[0])!r}")

        def neg_lambda(t):
            return 0.5 * self._sigma2(t).log() - self._log_alpha(t)

        out = _bisect_increasing(neg_lambda, -target, 0.0, self.T)
        out = torch.where(target == math.inf, torch.zeros_like(out), out)        # λ = +inf: σ = 0, at t = 0
        return float(out) if not isinstance(lam, torch.Tensor) else out

    def ei_integral(self, t, s):
        """I(t, s) = α_s ∫_s^t g(u)²/α(u) du, the frozen-score weight of the exponential integrator."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64)
        if self.drift_free:
            return self._sigma2_increment(t, s)
        if self.variance_scale is not None:
            return 2 * self.variance_scale * torch.expm1(self._log_alpha_ratio(t, s))

        def integrand(u):
            return self._g2(u) * torch.exp(-self._log_alpha(u))

        return torch.exp(self._log_alpha(s)) * _gauss_legendre(integrand, s, t)

    def prior(self, n: int, d: int, seed: int = 0, sample_offset: int = 0, *, dtype=torch.float32, device=None):
        """x_T ~ N(0, prior_std² I) for samples sample_offset..sample_offset+n−1, drawn from the
        batch-invariant noise contract (step index 2³² − 1, see `fastdiff.noise`)."""
        from . import noise

        if int(n) < 1 or int(d) < 1:
            raise ValueError(f"n and d must be positive, got n={n}, d={d}")
        idx = torch.arange(sample_offset, sample_offset + int(n), dtype=torch.int64, device=device)
        z = noise.normal(seed, idx, noise.PRIOR_STEP, int(d), dtype=torch.float64, device=device)
        return (self.prior_std * z).to(dtype)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self):
        return {"T": self.T}

    def _key(self):
        """What makes two processes the same (fd.sample's check of a process against its denoiser's)."""
        return type(self), tuple(self._repr_fields().items())


def _finite_scale(form, what: str, **given) -> float:
    """A process's variance scale from its parameters, refused by name where float64 cannot hold it (g = 1e160
    raised a bare OverflowError; theta = 1e-310 made every σ² inf)."""
    try:
        v = form()
    except OverflowError:
        v = math.inf
    if not (math.isfinite(v) and v > 0):
        shown = ", ".join(f"{k}={val!r}" for k, val in given.items())
        raise ValueError(f"{what} must be a positive finite float64, got {v} from {shown}")
    return v


def _positive(value, name):
    v = as_real(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


class OU(Process):
    """Ornstein–Uhlenbeck dX = −θX dt + g dW: α = e^{−θt}, σ² = (g²/2θ)(1 − e^{−2θt}).

    The CEM paper uses OU(theta=0.5, g=1, T=10); the ODE–SDE gap paper OU(theta=1, g=1, T=10).
    """

    variance_scale: float      # always set: g²/2θ

    def __init__(self, theta: float = 0.5, g: float = 1.0, T: float = 10.0):
        self.theta = _positive(theta, "theta")
        self.g = _positive(g, "g")
        self.T = _positive(T, "T")
        self.variance_scale = _finite_scale(lambda: self.g**2 / (2 * self.theta), "g²/(2·theta)", g=g, theta=theta)

    def _log_alpha(self, t):
        return -self.theta * t

    def _sigma2(self, t):
        return -self.variance_scale * torch.expm1(-2 * self.theta * t)

    def _log_alpha_ratio(self, t, s):
        return self.theta * (t - s)

    def _f(self, t):
        return torch.full_like(t, -self.theta)

    def _g2(self, t):
        return torch.full_like(t, self.g**2)

    def _sigma_inverse(self, sigma):
        return -torch.log1p(-(sigma**2) / self.variance_scale) / (2 * self.theta)

    @property
    def prior_std(self) -> float:
        """The stationary law N(0, g²/2θ · I) (MATH.md §1), not the marginal at T."""
        return math.sqrt(self.variance_scale)

    def _repr_fields(self):
        return {"theta": self.theta, "g": self.g, "T": self.T}


class VP(Process):
    """Variance preserving (score_sde VPSDE), T = 1: β(t) = β₀ + t(β₁ − β₀),
    log α = −¼t²(β₁ − β₀) − ½tβ₀, σ² = 1 − α²."""

    variance_scale = 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = _positive(beta_min, "beta_min")
        self.beta_max = _positive(beta_max, "beta_max")
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got {beta_max} < {beta_min}")
        self.T = 1.0

    def _beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def _sigma2(self, t):
        return -torch.expm1(2 * self._log_alpha(t))

    def _log_alpha_ratio(self, t, s):
        # ∫_s^t β/2 = (t − s)(¼(t + s)(β₁ − β₀) + ½β₀), with t − s formed first
        return (t - s) * (0.25 * (t + s) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min)

    def _f(self, t):
        return -0.5 * self._beta(t)

    def _g2(self, t):
        return self._beta(t)

    def _sigma_inverse(self, sigma):
        # Solve ¼Δ t² + ½β₀ t = m with m = −log α = −½ log(1 − σ²), in the cancellation-free form.
        m = -0.5 * torch.log1p(-(sigma**2))
        b = 0.5 * self.beta_min
        return 2 * m / (b + torch.sqrt(b * b + (self.beta_max - self.beta_min) * m))

    @property
    def prior_std(self) -> float:
        """The stationary law N(0, I) (MATH.md §1)."""
        return 1.0

    def _repr_fields(self):
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


class VE(Process):
    """Variance exploding (score_sde SMLD, geometric), T = 1: σ(t) = σ_min (σ_max/σ_min)^t, α = 1.

    score_sde's convention, kept here: σ(t) is the whole marginal noise std, so σ(0) = σ_min is
    treated as part of the data (the sampler stops at t_end and never reaches σ = 0).
    """

    drift_free = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min = _positive(sigma_min, "sigma_min")
        self.sigma_max = _positive(sigma_max, "sigma_max")
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min, got {sigma_max} <= {sigma_min}")
        self.T = 1.0
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _sigma2(self, t):
        return torch.exp(2 * (math.log(self.sigma_min) + t * self._log_ratio))

    def _f(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2 * self._log_ratio * self._sigma2(t)

    def _log_alpha_ratio(self, t, s):
        return torch.zeros_like(t)

    def _sigma2_increment(self, t, s):
        return self._sigma2(s) * torch.expm1(2 * (t - s) * self._log_ratio)

    def _sigma_inverse(self, sigma):
        # log1p of the exact difference near σ_min (Sterbenz): log(σ/σ_min) lost ε/(t·L) of t (1.6e-4 at t = 1e-14)
        return torch.log1p((sigma - self.sigma_min) / self.sigma_min) / self._log_ratio

    def _repr_fields(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class PureVE(Process):
    """The drifted-VE paper's pure VESDE: σ² = t², α = 1, g² = 2t (k-diffusion's σ = t)."""

    drift_free = True

    def __init__(self, T: float = 100.0):
        self.T = _positive(T, "T")

    def _log_alpha(self, t):
        return torch.zeros_like(t)

    def _sigma2(self, t):
        return t * t

    def _f(self, t):
        return torch.zeros_like(t)

    def _g2(self, t):
        return 2 * t

    def _log_alpha_ratio(self, t, s):
        return torch.zeros_like(t)

    def _sigma2_increment(self, t, s):
        return (t - s) * (t + s)

    def _sigma_inverse(self, sigma):
        return sigma.clone()


class DriftedVE(Process):
    """The drifted-VE paper's process dX = −(β(t)/τ) X dt + √(2β(t)) dW, B(t) = ∫₀ᵗ β:
    α = e^{−B/τ}, σ² = τ(1 − e^{−2B/τ}), τ = T² by default.

    beta: "t" (conservative, B = t²/2), "t^2" (aggressive, B = t³/3), or a callable β(t) on float64
    tensors; pass its integral as `B=` if you have it, else B is computed by Gauss–Legendre quadrature.
    """

    variance_scale: float      # always set: τ
    _B_inverse: Callable[[torch.Tensor], torch.Tensor] | None     # None for a callable β: no closed form

    def __init__(self, T: float = 100.0, beta="t", tau: float | None = None, B: Callable | None = None):
        self.T = _positive(T, "T")
        self.tau = _finite_scale(lambda: self.T**2, "T²", T=T) if tau is None else _positive(tau, "tau")
        self.variance_scale = self.tau
        self.beta_name = beta if isinstance(beta, str) else getattr(beta, "__name__", "callable")
        self._given = (beta if callable(beta) else None, B)     # a callable β and B, compared by identity
        # _B_increment(t, s) = B(t) − B(s) = ∫_s^t β, formed with t − s as a factor (or integrated over
        # [s, t] directly) so that a small step keeps its digits at any t
        if beta == "t":
            self._beta, self._B = (lambda t: t), (lambda t: 0.5 * t * t)
            self._B_increment = lambda t, s: 0.5 * (t - s) * (t + s)
            self._B_inverse = lambda b: torch.sqrt(2 * b)
        elif beta == "t^2":
            self._beta, self._B = (lambda t: t * t), (lambda t: t**3 / 3)
            self._B_increment = lambda t, s: (t - s) * (t * t + t * s + s * s) / 3
            self._B_inverse = lambda b: torch.pow(3 * b, 1.0 / 3.0)
        elif callable(beta):
            self._beta = beta
            if B is not None:
                self._B = B
                self._B_increment = lambda t, s: _given_B_increment(beta, B, t, s)
            else:
                self._B = lambda t: _gauss_legendre(beta, torch.zeros_like(t), t)
                self._B_increment = lambda t, s: _gauss_legendre(beta, s, t)
            self._B_inverse = None
        else:
            raise ValueError(f"beta must be 't', 't^2' or a callable β(t), got {beta!r}")

    def _log_alpha(self, t):
        return -self._B(t) / self.tau

    def _sigma2(self, t):
        return -self.tau * torch.expm1(-2 * self._B(t) / self.tau)

    def _log_alpha_ratio(self, t, s):
        return self._B_increment(t, s) / self.tau

    def _f(self, t):
        return -self._beta(t) / self.tau

    def _g2(self, t):
        return 2 * self._beta(t)

    def _sigma_inverse(self, sigma):
        if self._B_inverse is None:
            return super()._sigma_inverse(sigma)
        return self._B_inverse(-0.5 * self.tau * torch.log1p(-(sigma**2) / self.tau))

    def _repr_fields(self):
        return {"T": self.T, "beta": self.beta_name, "tau": self.tau}

    def _key(self):
        # a callable β (and B) by identity: two different functions may print the same name
        return super()._key() + self._given


def _given_B_increment(beta, B, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """∫_s^t β from a given antiderivative B: B(t) − B(s), except over steps shorter than 1% of t, where that
    difference cancels (3.4e-7 of it lost at (t − s)/t = 1e-10, T = 625) and Gauss–Legendre on [s, t] is exact to
    rounding for any smooth β."""
    t, s = torch.broadcast_tensors(torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64))
    short = (t - s).abs() <= 0.01 * t.abs()
    if not bool(short.any()):
        return B(t) - B(s)
    return torch.where(short, _gauss_legendre(beta, s, t), B(t) - B(s))


def _as_values(v, name: str) -> torch.Tensor:
    """A number or a floating tensor as a float64 tensor with no NaN (inverse functions: NaN has no time)."""
    if isinstance(v, torch.Tensor):
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a number or a floating tensor, got dtype {v.dtype}")
        out = v.to(torch.float64)
    else:
        out = torch.tensor(as_real(v, name), dtype=torch.float64)
    if bool(torch.isnan(out).any()):
        raise ValueError(f"{name} contains NaN")
    return out
