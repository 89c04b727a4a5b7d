"""Time grids: K steps from T down to t_end (MATH.md §4). All grids are float64 and strictly decreasing."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch

from ._checks import as_real, check_choice, dtype_slack
from .processes import Process

SCHEDULES = ("uniform", "quadratic", "exponential", "karras", "logsnr")

# The default grid of fd.sample, fd.time_grid and `fastdiff sample`, for every process. Chosen by measuring
# each schedule on each process (reverse SDE, ei, t_end = 1e-3; swiss roll point cloud and the 1-D Gaussian
# oracle, docs/defaults.md): log-SNR is best or close to best everywhere from 10 steps up, while uniform
# draws a blob on the VE family (50 steps: sample std 2.0 against the data's 0.7) and karras is poor on VP
# and OU (the oracle's variance for unit data: 458 on VP at 50 steps).
DEFAULT_SCHEDULE = "logsnr"
DEFAULT_T_END = 1e-3


class NotAnIntegerError(TypeError, ValueError):
    """A float, bool or other non-integer where an integer count is needed. Both a TypeError (the kind is
    wrong) and a ValueError (what argument checks raised before), as numpy's AxisError is both."""


def as_integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as a Python int: ints, numpy integers and 0-d integer tensors are accepted; floats (even 10.0,
    never truncated), bools and anything else raise NotAnIntegerError naming `name`, and values outside
    [minimum, maximum] ValueError."""
    bad_kind = isinstance(value, (bool, np.bool_)) or (
        isinstance(value, torch.Tensor) and (value.ndim != 0 or value.dtype == torch.bool))
    try:
        if bad_kind:
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise NotAnIntegerError(f"{name} must be an integer (int, numpy integer or 0-d integer tensor), "
                        f"got {value!r} ({type(value).__name__})") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def time_grid(process: Process, steps: int = 200, schedule: str = DEFAULT_SCHEDULE, t_end: float = DEFAULT_T_END,
              *, rho: float = 7.0, append_zero: bool = False) -> torch.Tensor:
    """Decreasing float64 tensor of steps + 1 times t_0 = T > … > t_K = t_end.

    uniform      t_k = T − k(T − δ)/K
    quadratic    t_k = δ + (T − δ)(1 − k/K)²                        (denser near δ)
    exponential  t_k = exp(log T − k(log T − log δ)/K)             (CEM paper eq. (41), log-uniform)
    karras       σ_k^{1/ρ} uniform between σ(T)^{1/ρ} and σ(δ)^{1/ρ} (EDM, ρ = 7), t_k = σ⁻¹(σ_k)
    logsnr       λ_k = log(α/σ) uniform between λ(T) and λ(δ), t_k = λ⁻¹(λ_k)

    The default, logsnr, gives good samples on every process from about 10 steps (DEFAULT_SCHEDULE).
    append_zero adds a last step from δ to t = 0 (the CEM paper's grid; D is still never evaluated at 0).
    """
    steps = as_integer(steps, "steps", 1)
    check_choice(schedule, "schedule", SCHEDULES)
    T, delta = float(process.T), as_real(t_end, "t_end")
    if not (math.isfinite(delta) and 0 < delta < T):
        raise ValueError(f"t_end must lie in (0, T) = (0, {T}), got {t_end}")
    frac = torch.arange(steps + 1, dtype=torch.float64) / steps       # k/K
    if schedule == "uniform":
        t = T - frac * (T - delta)
    elif schedule == "quadratic":
        t = delta + (T - delta) * (1 - frac) ** 2
    elif schedule == "exponential":
        t = torch.exp(math.log(T) - frac * (math.log(T) - math.log(delta)))
    elif schedule == "karras":
        rho = as_real(rho, "rho")
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number > 0, got {rho}")
        hi, lo = process.sigma(T) ** (1 / rho), process.sigma(delta) ** (1 / rho)
        t = process.sigma_inverse((hi + frac * (lo - hi)) ** rho)
    else:  # logsnr
        lam_T, lam_d = process.log_snr(T), process.log_snr(delta)
        t = _log_snr_inverse(process, lam_T + frac * (lam_d - lam_T))
    t[0], t[-1] = T, delta                                              # exact end points
    if not (bool(torch.isfinite(t).all()) and bool((t[1:] < t[:-1]).all())):
        # σ saturating (the aggressive drifted VE near T) or σ² underflowing (t_end below ~1e-154) in float64:
        # the inverse gives repeated or NaN times, which check_times would blame on a `times` never passed
        why = ("σ saturates or underflows over the range" if schedule in ("karras", "logsnr") else
               "its steps fall below float64's spacing of the times")
        raise ValueError(f"schedule {schedule!r} with t_end={delta} and {steps} steps cannot be resolved in "
                         f"float64 for {process!r} ({why}): use fewer steps, a t_end further from 0 and from T, "
                         "or another schedule")
    if append_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return check_times(process, t)


def _log_snr_inverse(process: Process, lam: torch.Tensor) -> torch.Tensor:
    """t with λ(t) = lam in closed form where the process has one (the default grid must stay cheap for a
    million steps; the generic bisection costs ~70 passes over the grid), else bisection on λ.
    α = 1 (VE family): σ = e^{−λ}, then σ⁻¹. σ² = c(1 − α²) (OU, VP, DriftedVE): e^{2λ} = α²/σ² gives
    m = −log α = ½·softplus(−(log c + 2λ)), accurate at both ends (σ would round to √c where α² < 1e-16),
    then t from m: OU m/θ, VP the root of ¼Δt² + ½β₀t = m, DriftedVE B⁻¹(τm)."""
    from .processes import OU, VP, DriftedVE

    if process.drift_free:
        return process._sigma_inverse(torch.exp(-lam)).clamp(0.0, process.T)
    if process.variance_scale is None:     # (OU, VP and DriftedVE always have one)
        return process.log_snr_inverse(lam)
    u = -(math.log(process.variance_scale) + 2 * lam)
    m = 0.5 * (u.clamp_min(0) + torch.log1p(torch.exp(-u.abs())))    # softplus(u), no cut-off at u = 20
    if isinstance(process, OU):
        t = m / process.theta
    elif isinstance(process, VP):
        b = 0.5 * process.beta_min
        t = 2 * m / (b + torch.sqrt(b * b + (process.beta_max - process.beta_min) * m))
    elif isinstance(process, DriftedVE) and process._B_inverse is not None:
        t = process._B_inverse(process.tau * m)
    else:
        return process.log_snr_inverse(lam)
    return t.clamp(0.0, process.T)


def check_times(process: Process, times) -> torch.Tensor:
    """Validate an explicit time grid: 1-D, finite, strictly decreasing, in (0, T] (the last may be 0)."""
    if isinstance(times, (str, bytes)):
        raise TypeError(f"times must be a 1-D grid of numbers, got {times!r}")
    try:
        raw = torch.as_tensor(times.detach() if isinstance(times, torch.Tensor) else times)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"times must be a 1-D grid of numbers, got {type(times).__name__} "
                        f"{str(times)[:80]}") from None
    if raw.dtype == torch.bool or raw.is_complex():
        raise TypeError(f"times must be real numbers, got {raw.dtype}")
    t = raw.to(torch.float64).cpu()
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"times must be a 1-D grid with at least 2 entries, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("times contains NaN or inf")
    # a grid in a narrower dtype holds T rounded (float32(0.7) = 0.69999999, float32(0.3) = 0.30000001): within a
    # few of its own ulps, times[0] is T
    slack = dtype_slack(times)
    if abs(float(t[0]) - process.T) <= slack * process.T:
        t[0] = process.T
    if not bool((t[1:] < t[:-1]).all()):
        k = int(torch.nonzero(t[1:] >= t[:-1])[0])
        raise ValueError(f"times must be strictly decreasing; times[{k}]={float(t[k])} <= "
                         f"times[{k + 1}]={float(t[k + 1])}")
    if float(t[0]) > process.T * (1 + 1e-12):
        raise ValueError(f"times[0]={float(t[0])} exceeds the process end time T={process.T}")
    if float(t[-1]) < 0 or float(t[-2]) <= 0:
        raise ValueError("times must be positive except the last, which may be 0 (D is never evaluated at t = 0)")
    return t
