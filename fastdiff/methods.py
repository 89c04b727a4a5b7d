"""Every sampler method as one float64 table, and the plain-torch executor every kernel is held to (MATH.md §3b).

A step k of any method here is affine in the state x, the denoiser outputs and Gaussian noise:

    x̂  = P x + C_churn z_churn                          (churn: D_0 is evaluated at the raised level t̂)
    D_0 = D(x̂, t̂)
    u   = a_u x̂ + b_u D_0 + c_u z_stage               (two-stage methods only; D_1 = D(u, t_u))
    x'  = A x̂ + B₀ D_0 + Σ_j B₋ⱼ H₋ⱼ + B_1 D_1 + C z
    H_0 = h_x x̂ + h_D D_0                              (history kept for later steps: D_0 itself, or
                                                        LMS's derivative d = (x̃ − D)/σ̃)

so a `MethodTable` holds float64 columns [K] (B is [K, 1 + H], column j the coefficient of H₋ⱼ), built once
on the host from a σ-grid. The coefficients are k-diffusion's (MATH.md §3b), written for a VE σ̃-grid and
lifted to any fastdiff process by σ̃ = σ/α, x̃ = x/α (DPM-Solver's change of variables).

Noise. With a user noise sampler the noise of each use is whatever it returns. Otherwise it follows
fastdiff's counter-based contract (fastdiff.noise.normal(seed, sample index, step, component)) with
these step indices for step k (so K ≤ 2³⁰ − 1 steps, and the prior's index 2³² − 1 stays unused):

    z          k                      (the step's own noise: the same numbers as euler/ei/ei-x0 use)
    z_stage    STAGE_STEP_BASE + k = 2³¹ + k
    z_churn    CHURN_STEP_BASE + k = 2³¹ + 2³⁰ + k

For dpmpp_sde, whose two noises k-diffusion draws from one Brownian path (correlation ρ = √((σ − σ_s)/(σ − σ'))),
the contract gives z = ρ z_stage + √(1 − ρ²) w with w the draw at index k: the same joint law.

The euler / ei / ei-x0 tables of fastdiff.steps are wrapped without touching a bit of their columns, and the
executor applies a one-term step with the same operations as fastdiff.reference.affine_step, so they give
identical results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import _table
from . import noise as _noise
from ._checks import as_real, check_choice, check_flag
from .processes import Process
from .schedules import as_integer, check_times
from .steps import METHODS as FIRST_ORDER_METHODS
from .steps import step_table

MULTISTEP_METHODS = ("edm_euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "lms")
TWO_STAGE_METHODS = ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde")
NEW_METHODS = MULTISTEP_METHODS + TWO_STAGE_METHODS
ALL_METHODS = FIRST_ORDER_METHODS + NEW_METHODS
SOLVER_TYPES = ("midpoint", "heun")

STAGE_STEP_BASE = _table.STAGE_STEP_BASE
CHURN_STEP_BASE = _table.CHURN_STEP_BASE
MAX_STEPS = 2**30 - 1

# The options each method takes, with k-diffusion's defaults.
_CHURN: dict[str, Any] = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL: dict[str, Any] = {"eta": 1.0, "s_noise": 1.0}
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "edm_euler": _CHURN,
    "euler_ancestral": _ANCESTRAL,
    "heun": _CHURN,
    "dpm_2": _CHURN,
    "dpm_2_ancestral": _ANCESTRAL,
    "dpmpp_2s_ancestral": _ANCESTRAL,
    "dpmpp_sde": {"eta": 1.0, "s_noise": 1.0, "r": 0.5},
    "dpmpp_2m": {},
    "dpmpp_2m_sde": {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"},
    "dpmpp_3m_sde": {"eta": 1.0, "s_noise": 1.0},
    "lms": {"order": 4},
}


@dataclass(frozen=True)
class MethodTable:
    """Float64 per-step columns (k = 0..K−1) of one method on one grid; see the module docstring.

    times    [K + 1] the grid (process times, or k-diffusion's σ for `sigma_table`)
    t        [K] where D_0 is evaluated (t̂ ≥ times[k] with churn); t_u [K] where D_1 is (two-stage steps)
    staged   [K] bool: step k evaluates D_1 (a two-stage method's last step to σ = 0 is a plain Euler step)
    rho      [K] correlation of z with z_stage under the contract noise (dpmpp_sde)
    """

    method: str
    options: dict
    times: torch.Tensor
    t: torch.Tensor
    P: torch.Tensor
    C_churn: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor              # [K, 1 + H]: column 0 on D_0, column j on H₋ⱼ
    C: torch.Tensor
    staged: torch.Tensor
    t_u: torch.Tensor
    a_u: torch.Tensor
    b_u: torch.Tensor
    c_u: torch.Tensor
    B1: torch.Tensor
    rho: torch.Tensor
    hist_x: torch.Tensor
    hist_d: torch.Tensor
    _lists: dict | None = field(default=None, repr=False, compare=False)

    def __len__(self):
        return self.A.numel()

    @property
    def history(self) -> int:
        """H, how many past history items a step may use (0 for one-step methods)."""
        return self.B.shape[1] - 1

    def _column(self, j):
        return self.B[:, j] if j < self.B.shape[1] else torch.zeros_like(self.A)

    @property
    def B0(self):
        """Coefficient of D_0."""
        return self.B[:, 0]

    @property
    def Bm1(self):
        """B₋₁, the coefficient of the previous step's history item."""
        return self._column(1)

    @property
    def Bm2(self):
        """B₋₂, the coefficient of the second previous step's history item."""
        return self._column(2)

    def kernel_table_refusal(self) -> str | None:
        """Why the whole-trajectory kernels' step table (fastdiff._table) cannot express this table, or None.

        A kernel row (fastdiff._table) runs a step's churn, its D, its stage and D_u, the correlated step noise and
        up to two history items, which must be D itself (h_x = 0, h_D = 1): every §3b method but lms."""
        checks = (
            (self.history > 2, f"it uses {self.history} past steps (the kernels keep at most 2)"),
            (self.history > 0 and (bool((self.hist_x != 0).any()) or bool((self.hist_d != 1).any())),
             "its history is not D itself (lms keeps (x − D)/σ)"),
            (bool((self.staged & (self.B1 == 0)).any()), "a stage's D has weight 0 (a kernel row has a stage when "
                                                          "BU != 0)"),
            (bool(((self.rho != 0) & ~(self.staged & (self.c_u != 0))).any()),
             "its step noise is correlated with a stage draw it does not make"),
        )
        reasons = [why for refused, why in checks if refused]
        return "; ".join(reasons) if reasons else None

    def affine_step_refusal(self) -> str | None:
        """Why a model's loop cannot run this table as one fastdiff.ops.affine_step per step (x ← A x + B0 D_k
        + B₋₁ D_{k−1} + B₋₂ D_{k−2} + C z_k, history in buffers), or None: kernel_table_refusal's reasons, and
        churn, a second D per step or a correlated step noise (the model would be called between them)."""
        checks = (
            (bool((self.P != 1).any()) or bool((self.C_churn != 0).any()), "it churns (s_churn > 0)"),
            (bool(self.staged.any()), "it evaluates D twice per step (two-stage)"),
            (bool((self.rho != 0).any()), "its step noise is correlated with a stage's"),
        )
        reasons = [r for r in (self.kernel_table_refusal(),) if r] + [why for refused, why in checks if refused]
        return "; ".join(reasons) if reasons else None

    def kernel_table(self, process: Process) -> torch.Tensor | None:
        """The [K, WIDTH] float64 kernel step table of fastdiff._table (t, α(t), σ(t), A, B0, B₋₁, B₋₂, C, then
        the churn and stage columns) that fastdiff.ops.pointcloud_sample runs, for a point cloud (D is E[X_0 | x]
        itself) on `process`; None when the table cannot be expressed there (kernel_table_refusal says why).
        α and σ (at t and at the stage's t_u) are computed as the table executor's point-cloud run computes them
        (fastdiff.sampling), so both evaluate the same D's."""
        if self.kernel_table_refusal() is not None:
            return None
        alpha = torch.exp(process._log_alpha(self.t))
        sigma = torch.sqrt(process._sigma2(self.t))
        staged = self.staged
        zero = torch.zeros_like(self.A)
        # the stage's time is unused (and may be 0) on rows without one: α = σ = 1 there keeps the row finite
        t_u = torch.where(staged, self.t_u, self.t)
        alpha_u = torch.where(staged, torch.exp(process._log_alpha(t_u)), 1.0)
        sigma_u = torch.where(staged, torch.sqrt(process._sigma2(t_u)), 1.0)
        on = lambda col: torch.where(staged, col, zero)        # noqa: E731
        return _table.pack(alpha, sigma, self.A, self.B0, self.C, t=self.t, B1=self.Bm1, B2=self.Bm2, P=self.P,
                           Cchurn=self.C_churn, alphaU=alpha_u, sigmaU=sigma_u, Ux=on(self.a_u), UD=on(self.b_u),
                           Uz=on(self.c_u), BU=on(self.B1), rho=self.rho)

    def lists(self) -> dict:
        """Every column as Python floats (built once: the executor reads no tensor inside its loop)."""
        if self._lists is None:
            names = ("t", "P", "C_churn", "A", "C", "staged", "t_u", "a_u", "b_u", "c_u", "B1", "rho",
                     "hist_x", "hist_d")
            lists = {n: getattr(self, n).tolist() for n in names}
            lists["B"] = self.B.tolist()
            object.__setattr__(self, "_lists", lists)
            return lists
        return self._lists


# ------------------------------------------------------------------------------------------------ options

def method_options(method: str, **options) -> dict:
    """The full option set of `method` (k-diffusion's defaults filled in), checked."""
    check_choice(method, "method", NEW_METHODS)
    allowed = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes no option {', '.join(unknown)}; its options are "
                        f"{', '.join(allowed) or 'none'}")
    out = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    for name in ("eta", "s_noise", "s_churn"):
        if name in out:
            v = as_real(out[name], name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {out[name]}")
            out[name] = v
    for name in ("s_tmin", "s_tmax"):      # any bound: s_tmin = inf or s_tmax < 0 turns the churn off
        if name in out:
            out[name] = as_real(out[name], name)
            if math.isnan(out[name]):
                raise ValueError(f"{name} must not be NaN")
    if "r" in out:
        r = as_real(out["r"], "r")
        if not 0 < r <= 1:
            raise ValueError(f"r must lie in (0, 1], got {out['r']}")
        out["r"] = r
    if "solver_type" in out:
        check_choice(out["solver_type"], "solver_type", SOLVER_TYPES)
    if "order" in out:
        out["order"] = as_integer(out["order"], "order", minimum=1)
    return out


# ------------------------------------------------------------------------------ VE (σ̃-grid) coefficients

@dataclass
class _Step:
    """One step on a VE σ̃-grid (α ≡ 1); stage = (σ_u, a_u, b_u, c_u, B_1) for a two-stage step."""

    sigma_hat: float
    A: float
    B: list
    C: float = 0.0
    churn: float = 0.0
    stage: tuple | None = None
    rho: float = 0.0
    hist: tuple = (0.0, 1.0)


def _pow2_unit(s: float) -> int:
    """The exponent e of a power of two near s: σ's divided by 2^e (exactly) stay near 1, so a formula in σ² keeps
    the bits it has in range and does not overflow where σ̃ is large (the drifted VE's σ̃(T) = 1.9e93 squared
    twice is 1e372)."""
    return math.frexp(s)[1] if s > 0 and math.isfinite(s) else 0


def _ancestral_split(s_from: float, s_to: float, eta: float):
    """(σ_down, σ_up) of k-diffusion's get_ancestral_step, formed in units of 2^e (_pow2_unit): the same bits as
    k-diffusion's formula wherever its σ⁴ stays in float64's range."""
    if not eta:
        return s_to, 0.0
    e = _pow2_unit(s_from)
    a, b = math.ldexp(s_from, -e), math.ldexp(s_to, -e)
    up = min(b, eta * (b ** 2 * (a ** 2 - b ** 2) / a ** 2) ** 0.5)
    return math.ldexp((b ** 2 - up ** 2) ** 0.5, e), math.ldexp(up, e)


def _exp_step(s_to: float, s_from: float):
    """(σ_to/σ_from, 1 − σ_to/σ_from) of the D-frozen step, the second as −expm1(log(σ_to/σ_from))."""
    if s_to == 0:
        return 0.0, 1.0
    return s_to / s_from, -math.expm1(math.log(s_to) - math.log(s_from))


def _churn(sigma: float, K: int, o: dict):
    """(σ̂, std of the churn noise) of Karras et al.'s Algorithm 2 as k-diffusion applies it."""
    gamma = min(o["s_churn"] / K, 2 ** 0.5 - 1) if o["s_tmin"] <= sigma <= o["s_tmax"] else 0.0
    sigma_hat = sigma * (gamma + 1)
    return sigma_hat, (o["s_noise"] * (sigma_hat ** 2 - sigma ** 2) ** 0.5 if gamma > 0 else 0.0)


def _euler_to(s_hat):
    """x' = D_0: an Euler step to σ' = 0 (every method's last step to zero in k-diffusion)."""
    return _Step(s_hat, 0.0, [1.0])


def _edm_euler(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    s_hat, churn = _churn(s, len(sig) - 1, o)
    return _Step(s_hat, s_next / s_hat, [1 - s_next / s_hat], churn=churn)


def _euler_ancestral(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    down, up = _ancestral_split(s, s_next, o["eta"])
    return _Step(s, down / s, [1 - down / s], C=o["s_noise"] * up if s_next > 0 else 0.0)


def _heun(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    s_hat, churn = _churn(s, len(sig) - 1, o)
    if s_next == 0:
        return _Step(s_hat, 0.0, [1.0], churn=churn)
    dt = s_next - s_hat
    # x' = x + dt (d_0 + d_1)/2 with d = (x − D)/σ, u = x + dt d_0; B_0 is dimensionless: formed in units of 2^e
    # (exact), as σ̂·σ' overflows for σ̃ beyond 1e154 (a VP with a large β_max)
    e = _pow2_unit(s_hat)
    sh, sn = math.ldexp(s_hat, -e), math.ldexp(s_next, -e)
    stage = (s_next, s_next / s_hat, -dt / s_hat, 0.0, -dt / (2 * s_next))
    return _Step(s_hat, s_next / s_hat, [(sn - sh) * (sh - 2 * sn) / (2 * sn * sh)], churn=churn, stage=stage)


def _dpm_2_stage(s_hat, s_to):
    """DPM-Solver-2 from σ̂ to σ_to through σ_m = √(σ̂ σ_to): (A, B_0, stage)."""
    s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_to)))
    dt1, dt2 = s_mid - s_hat, s_to - s_hat
    stage = (s_mid, s_mid / s_hat, -dt1 / s_hat, 0.0, -dt2 / s_mid)
    e = _pow2_unit(s_hat)                          # B_0 in units of 2^e, as in _heun
    sh, sm, st = math.ldexp(s_hat, -e), math.ldexp(s_mid, -e), math.ldexp(s_to, -e)
    return s_to / s_hat, (st - sh) * (sh - sm) / (sm * sh), stage


def _dpm_2(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    s_hat, churn = _churn(s, len(sig) - 1, o)
    if s_next == 0:
        return _Step(s_hat, 0.0, [1.0], churn=churn)
    A, B0, stage = _dpm_2_stage(s_hat, s_next)
    return _Step(s_hat, A, [B0], churn=churn, stage=stage)


def _dpm_2_ancestral(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    down, up = _ancestral_split(s, s_next, o["eta"])
    if down == 0:                       # k-diffusion adds no noise on this branch
        return _euler_to(s)
    A, B0, stage = _dpm_2_stage(s, down)
    return _Step(s, A, [B0], C=o["s_noise"] * up, stage=stage)


def _dpmpp_2s_ancestral(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    down, up = _ancestral_split(s, s_next, o["eta"])
    C = o["s_noise"] * up if s_next > 0 else 0.0
    if down == 0:
        return _Step(s, 0.0, [1.0], C=C)
    h = math.log(s) - math.log(down)
    s_mid = math.exp(-(-math.log(s) + 0.5 * h))
    stage = (s_mid, s_mid / s, -math.expm1(-0.5 * h), 0.0, -math.expm1(-h))
    return _Step(s, down / s, [0.0], C=C, stage=stage)


def _dpmpp_sde(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    if s_next == 0:
        return _euler_to(s)
    eta, r, sn = o["eta"], o["r"], o["s_noise"]
    t, t_next = -math.log(s), -math.log(s_next)
    s_mid = math.exp(-(t + (t_next - t) * r))
    fac = 1 / (2 * r)
    down1, up1 = _ancestral_split(s, s_mid, eta)
    a_u, b_u = _exp_step(down1, s)
    down2, up2 = _ancestral_split(s, s_next, eta)
    A, E = _exp_step(down2, s)
    rho = math.sqrt((s - s_mid) / (s - s_next)) if sn * up1 != 0 and sn * up2 != 0 else 0.0
    return _Step(s, A, [E * (1 - fac)], C=sn * up2, stage=(s_mid, a_u, b_u, sn * up1, E * fac), rho=rho)


def _log_step(sig, k):
    """h = log(σ/σ') of step k (inf for a step to 0)."""
    return math.inf if sig[k + 1] == 0 else math.log(sig[k]) - math.log(sig[k + 1])


def _dpmpp_2m(sig, k, o):
    s, s_next = sig[k], sig[k + 1]
    h = _log_step(sig, k)
    E = 1.0 if s_next == 0 else -math.expm1(-h)
    if k == 0 or s_next == 0:
        return _Step(s, s_next / s, [E])
    r = _log_step(sig, k - 1) / h
    return _Step(s, s_next / s, [E * (1 + 1 / (2 * r)), -E / (2 * r)])


def _sde_common(sig, k, o):
    """(h, ĥ = (1 + η)h, A, E(ĥ), C) of the DPM-Solver++ SDE steps."""
    h = _log_step(sig, k)
    eta = o["eta"]
    h_eta = h * (eta + 1)
    C = o["s_noise"] * sig[k + 1] * math.sqrt(-math.expm1(-2 * h * eta)) if eta else 0.0
    return h, h_eta, math.exp(-h_eta), -math.expm1(-h_eta), C


def _dpmpp_2m_sde(sig, k, o):
    if sig[k + 1] == 0:
        return _euler_to(sig[k])
    h, h_eta, A, E, C = _sde_common(sig, k, o)
    if k == 0:
        return _Step(sig[k], A, [E], C=C)
    r = _log_step(sig, k - 1) / h
    c = 1 - E / h_eta if o["solver_type"] == "heun" else 0.5 * E
    return _Step(sig[k], A, [E + c / r, -c / r], C=C)


def _dpmpp_3m_sde(sig, k, o):
    if sig[k + 1] == 0:
        return _euler_to(sig[k])
    h, h_eta, A, E, C = _sde_common(sig, k, o)
    if k == 0:
        return _Step(sig[k], A, [E], C=C)
    phi2 = 1 - E / h_eta
    if k == 1:
        r = _log_step(sig, 0) / h
        return _Step(sig[k], A, [E + phi2 / r, -phi2 / r], C=C)
    phi3 = phi2 / h_eta - 0.5
    r0, r1 = _log_step(sig, k - 1) / h, _log_step(sig, k - 2) / h
    a = (phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1)) / r0
    b = (phi3 - phi2 * r0) / ((r0 + r1) * r1)
    return _Step(sig[k], A, [E + a, b - a, -b], C=C)


_GL8 = np.polynomial.legendre.leggauss(8)


def _lms_coefficients(sig, k, order):
    """c_j = ∫_{σ_k}^{σ_{k+1}} ℓ_j(τ) dτ over the Lagrange basis on σ_k, σ_{k−1}, …: Gauss–Legendre, exact for
    these polynomials of degree order − 1 (8 points up to order 16; k-diffusion uses scipy's adaptive quad with
    epsrel 1e-4)."""
    nodes = [sig[k - m] for m in range(order)]
    a, b = sig[k], sig[k + 1]
    rule = _GL8 if order <= 16 else np.polynomial.legendre.leggauss(order)
    tau = 0.5 * (b - a) * rule[0] + 0.5 * (a + b)
    out = []
    for j in range(order):
        basis = np.ones_like(tau)
        for m in range(order):
            if m != j:
                basis = basis * (tau - nodes[m]) / (nodes[j] - nodes[m])
        out.append(float(0.5 * (b - a) * np.dot(rule[1], basis)))
    return out


def _lms(sig, k, o):
    s = sig[k]
    c = _lms_coefficients(sig, k, min(k + 1, o["order"]))
    # x' = x + c_0 d_0 + Σ_j c_j d₋ⱼ with d_0 = (x − D_0)/σ; the history item is d = (x − D)/σ
    return _Step(s, 1 + c[0] / s, [-c[0] / s, *c[1:]], hist=(1 / s, -1 / s))


_BUILDERS = {
    "edm_euler": _edm_euler, "euler_ancestral": _euler_ancestral, "heun": _heun, "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral, "dpmpp_2s_ancestral": _dpmpp_2s_ancestral, "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m, "dpmpp_2m_sde": _dpmpp_2m_sde, "dpmpp_3m_sde": _dpmpp_3m_sde, "lms": _lms,
}


def _ve_steps(sigmas: list, method: str, options: dict) -> list:
    return [_BUILDERS[method](sigmas, k, options) for k in range(len(sigmas) - 1)]


# --------------------------------------------------------------------------------------------- tables

def _check_sigmas(sigmas) -> torch.Tensor:
    s = torch.as_tensor(sigmas)
    if s.is_complex() or s.dtype == torch.bool:
        raise TypeError(f"sigmas must be real numbers, got {s.dtype}")
    s = s.detach().to("cpu", torch.float64)                            # the call's one host copy
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 entries, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas contains NaN or inf")
    if not bool((s[1:] < s[:-1]).all()):
        k = int(torch.nonzero(s[1:] >= s[:-1])[0])
        raise ValueError(f"sigmas must be strictly decreasing; sigmas[{k}]={float(s[k])} <= "
                         f"sigmas[{k + 1}]={float(s[k + 1])}")
    if float(s[-1]) < 0 or float(s[-2]) <= 0:
        raise ValueError("sigmas must be positive except the last, which may be 0")
    if s.numel() - 1 > MAX_STEPS:
        raise ValueError(f"at most {MAX_STEPS} steps (the noise contract's step indices), got {s.numel() - 1}")
    return s


def _assemble(method, options, times, t_hat, steps, P, churn_scale, out_scale, t_u, u_scale, hist_scale):
    """Stack per-step records into a MethodTable, lifting the VE coefficients to x = α x̃ (all scales 1 on a
    plain σ-grid): P = α̂/α; churn noise × α̂ (churn_scale); the terms of x' × α' (out_scale); the stage's × α_u
    (u_scale); and the coefficients of x̂ (A, a_u, h_x) also × 1/α̂ (hist_scale), since x̃̂ = x̂/α̂."""
    K = len(steps)
    H = max(len(st.B) for st in steps) - 1
    f64 = torch.float64
    B = torch.zeros((K, H + 1), dtype=f64)
    for k, st in enumerate(steps):
        B[k, : len(st.B)] = torch.tensor(st.B, dtype=f64) * out_scale[k]
    col = lambda vals: torch.tensor(vals, dtype=f64)                    # noqa: E731
    stage = [st.stage if st.stage is not None else (0.0, 0.0, 0.0, 0.0, 0.0) for st in steps]
    table = MethodTable(
        method=method, options=dict(options), times=times, t=col(t_hat), P=col(P),
        C_churn=col([st.churn * churn_scale[k] for k, st in enumerate(steps)]),
        A=col([st.A * out_scale[k] * hist_scale[k] for k, st in enumerate(steps)]), B=B,
        C=col([st.C * out_scale[k] for k, st in enumerate(steps)]),
        staged=torch.tensor([st.stage is not None for st in steps]),
        t_u=col(t_u), a_u=col([g[1] * u_scale[k] * hist_scale[k] for k, g in enumerate(stage)]),
        b_u=col([g[2] * u_scale[k] for k, g in enumerate(stage)]),
        c_u=col([g[3] * u_scale[k] for k, g in enumerate(stage)]),
        B1=col([g[4] * out_scale[k] for k, g in enumerate(stage)]),
        rho=col([st.rho for st in steps]),
        hist_x=col([st.hist[0] * hist_scale[k] for k, st in enumerate(steps)]),
        hist_d=col([st.hist[1] for st in steps]))
    for name in ("P", "C_churn", "A", "B", "C", "a_u", "b_u", "c_u", "B1", "hist_x", "hist_d"):
        if not bool(torch.isfinite(getattr(table, name)).all()):
            raise ValueError(f"method table column {name} is not finite on this grid (a step too large for "
                             f"float64?); use more steps")
    return table


def sigma_table(sigmas, method: str, *, log_alpha=None, **options) -> MethodTable:
    """The table of `method` on a σ-grid: k-diffusion's convention (α ≡ 1, D evaluated at σ itself), or, with
    `log_alpha`, lifted to a process whose state is x = α x̃ (MATH.md §3b, "Other processes").

    sigmas: strictly decreasing, positive except a last 0 (any device: it is copied to the host once).
    log_alpha: None, or a function from a float64 tensor of σ̃ to log α there (e.g. diffusers' discrete VP
    schedules: log α = −½ log(1 + σ̃²)); the table's times are then the σ̃ themselves.
    options: the method's own (METHOD_OPTIONS), e.g. eta=, s_noise=, s_churn=, solver_type=, order=.
    """
    options = method_options(method, **options)
    sig = _check_sigmas(sigmas)
    sl = sig.tolist()
    steps = _ve_steps(sl, method, options)
    K = len(steps)
    t_hat = [st.sigma_hat for st in steps]
    t_u = [st.stage[0] if st.stage is not None else 0.0 for st in steps]
    if log_alpha is None:
        ones = [1.0] * K
        return _assemble(method, options, sig, t_hat, steps, ones, ones, ones, t_u, ones, ones)
    la = lambda v: log_alpha(torch.tensor(v, dtype=torch.float64)).tolist()     # noqa: E731
    la_grid, la_hat, la_u = la(sl), la(t_hat), la([u if st.stage else 1.0 for u, st in zip(t_u, steps, strict=True)])
    return _assemble(method, options, sig, t_hat, steps, [math.exp(la_hat[k] - la_grid[k]) for k in range(K)],
                     [math.exp(v) for v in la_hat], [math.exp(la_grid[k + 1]) for k in range(K)], t_u,
                     [math.exp(v) for v in la_u], [math.exp(-v) for v in la_hat])


def _time_of_sigma_tilde(process: Process, s: torch.Tensor, name: str) -> torch.Tensor:
    """t with σ(t)/α(t) = s (σ̃ = e^{−λ} increases with t)."""
    lo = math.exp(-float(process.log_snr(torch.tensor(0.0, dtype=torch.float64)))) if not process.drift_free \
        else math.sqrt(float(process._sigma2(torch.tensor(0.0, dtype=torch.float64))))
    hi = math.exp(-float(process.log_snr(torch.tensor(process.T, dtype=torch.float64))))
    if bool(((s < lo * (1 - 1e-12)) | (s > hi * (1 + 1e-12))).any()):
        raise ValueError(f"{name}: a noise level {float(s.max())} outside the process's range "
                         f"[{lo}, {hi}] of σ/α (lower s_churn or set s_tmax below σ/α at T)")
    if process.drift_free:
        return process._sigma_inverse(s).clamp(0.0, process.T)
    return process.log_snr_inverse(-torch.log(s)).clamp(0.0, process.T)


def method_table(process: Process, times, method: str, *, ode: bool = False, eta: float | None = None,
                 **options) -> MethodTable:
    """The table of `method` on a fastdiff process's time grid (MATH.md §3b, "Other processes").

    euler / ei / ei-x0 wrap fd.step_table(process, times, method, ode, eta) unchanged (one D column). Every
    other method is k-diffusion's on the σ̃ = σ/α grid, lifted by x = α x̃; eta there is k-diffusion's eta
    (k-diffusion's default where not given), and ode=True sets it to 0 (the deterministic variant).
    """
    check_choice(method, "method", ALL_METHODS)
    check_flag(ode, "ode")
    if method in FIRST_ORDER_METHODS:
        if options:
            raise TypeError(f"method {method!r} takes no option {', '.join(sorted(options))}")
        return _wrap_step_table(step_table(process, times, method, ode, eta))
    if eta is not None:
        options["eta"] = eta
    if ode:                     # the deterministic variant: no noise of any kind
        if any(as_real(options[k], k) != 0.0 for k in ("eta", "s_churn") if options.get(k) is not None):
            raise ValueError(f"ode=True means no noise; got eta={options.get('eta')}, "
                             f"s_churn={options.get('s_churn')} for {method!r}")
        if "eta" in METHOD_OPTIONS[method]:
            options["eta"] = 0.0
    options = method_options(method, **options)
    times = check_times(process, times)
    if times.numel() - 1 > MAX_STEPS:
        raise ValueError(f"at most {MAX_STEPS} steps (the noise contract's step indices), got {times.numel() - 1}")
    la = process._log_alpha(times)
    sig_tilde = torch.exp(0.5 * torch.log(process._sigma2(times)) - la)
    if not bool(torch.isfinite(sig_tilde).all()):
        k = int(torch.nonzero(~torch.isfinite(sig_tilde))[0])
        raise ValueError(f"times: σ/α overflows float64 at times[{k}]={float(times[k])} ({process!r}: α = "
                         f"e^{float(la[k]):.4g}); {method!r} works on σ̃ = σ/α, which float64 cannot hold there. Start "
                         f"the grid where α > e^-700, or use method 'ei' or 'ei-x0' (log-space coefficients)")
    live = sig_tilde[:-1] if float(times[-1]) == 0.0 else sig_tilde      # (a grid's final t = 0 has σ̃ = 0)
    if not bool((live[1:] < live[:-1]).all()):
        # σ/α must fall strictly (h = log of its ratio divides): a process's σ floor in float64 (VE below
        # t ≈ 1e-17, σ² = t² underflowing below 1e-154) repeats it on a strictly decreasing time grid
        k = int(torch.nonzero(live[1:] >= live[:-1])[0])
        raise ValueError(f"times: σ/α does not decrease from times[{k}]={float(times[k])} to "
                         f"times[{k + 1}]={float(times[k + 1])} (both {float(live[k])} in float64, {process!r}'s "
                         f"floor): {method!r} needs a strictly decreasing σ/α; end the grid at a larger t")
    steps = _ve_steps(sig_tilde.tolist(), method, options)
    K = len(steps)
    st_list = sig_tilde.tolist()
    # evaluation times of D_0 (t̂) and D_1 (t_u): the grid's own time where σ̃ is a grid value
    t_hat = _times_for(process, [st.sigma_hat for st in steps], [st_list[k] for k in range(K)], times[:-1],
                       "s_churn")
    t_u = _times_for(process, [st.stage[0] if st.stage else st_list[k + 1] for k, st in enumerate(steps)],
                     st_list[1:], times[1:], "stage")
    la_list = la.tolist()
    la_hat = process._log_alpha(torch.tensor(t_hat, dtype=torch.float64)).tolist()
    la_u = process._log_alpha(torch.tensor(t_u, dtype=torch.float64)).tolist()
    P = [math.exp(la_hat[k] - la_list[k]) for k in range(K)]             # x̂ = α̂ x̃: x scaled by α̂/α
    inv_hat = [math.exp(-la_hat[k]) for k in range(K)]                   # x̃̂ = x̂/α̂
    out = [math.exp(la_list[k + 1]) for k in range(K)]                  # x' = α' x̃'
    u_scale = [math.exp(la_u[k]) for k in range(K)]
    # A, a_u and h_x multiply x̂ = α̂ x̃̂: their VE values are divided by α̂ (hist_scale)
    return _assemble(method, options, times, t_hat, steps, P, [math.exp(v) for v in la_hat], out,
                     [t_u[k] if st.stage else 0.0 for k, st in enumerate(steps)], u_scale, inv_hat)


def _times_for(process, wanted, grid_sigma, grid_times, name):
    """Times where σ̃ equals `wanted`, taking the grid time itself where `wanted` is that grid value."""
    out = grid_times.tolist()
    todo = [k for k, (w, g) in enumerate(zip(wanted, grid_sigma, strict=True)) if w != g]
    if todo:
        solved = _time_of_sigma_tilde(process, torch.tensor([wanted[k] for k in todo], dtype=torch.float64), name)
        for k, v in zip(todo, solved.tolist(), strict=True):
            out[k] = v
    return out


def _wrap_step_table(st) -> MethodTable:
    """A first-order StepTable as a MethodTable: its A, B, C columns unchanged (the same tensors' values)."""
    K = len(st)
    zeros = torch.zeros(K, dtype=torch.float64)
    return MethodTable(method=st.method, options={"eta": st.eta}, times=st.times, t=st.t, P=torch.ones_like(zeros),
                       C_churn=zeros, A=st.A, B=st.B.reshape(K, 1), C=st.C,
                       staged=torch.zeros(K, dtype=torch.bool), t_u=zeros, a_u=zeros, b_u=zeros, c_u=zeros,
                       B1=zeros, rho=zeros, hist_x=zeros, hist_d=torch.ones_like(zeros))


# --------------------------------------------------------------------------------------------- noise

def contract_normal(seed: int, sample_index: torch.Tensor, step: int, like: torch.Tensor) -> torch.Tensor:
    """fastdiff.noise.normal(seed, sample_index, step, d) shaped like `like` ([M, ...], d = its row size),
    without noise.normal's argument checks: those read the index tensor back to the host, which on a GPU
    would synchronise once per draw. sample_index: an int64 tensor [M] on like's device (checked by callers)."""
    if like.shape[0] == 0:
        return torch.empty_like(like)
    dim = like[0].numel()
    quads = torch.arange((dim + 3) // 4, dtype=torch.int64, device=sample_index.device).view(1, -1)
    idx = sample_index.view(-1, 1)
    # the step word as a tensor on the index's device: a CPU scalar broadcast against device tensors would not
    # stay a scalar (and a Python int → device copy per draw is what this function avoids)
    step_word = torch.full((1, 1), int(step), dtype=torch.int64, device=sample_index.device)
    r = _noise.philox4x32_10((quads, step_word, idx & 0xFFFFFFFF, idx >> 32), (seed & 0xFFFFFFFF, seed >> 32))
    u = ((torch.stack(r, dim=-1).reshape(idx.shape[0], -1) >> 9).to(torch.float32) + 0.5) * 2.0**-23
    u = u.to(torch.float64).view(idx.shape[0], -1, 2, 2)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    angle = (2 * math.pi) * u[..., 1]
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return z.reshape(idx.shape[0], -1)[:, :dim].to(like.dtype).view(like.shape)


def kernel_normal(seed: int, sample_offset: int, step: int, like: torch.Tensor) -> torch.Tensor:
    """contract_normal for the rows sample_offset, sample_offset + 1, ... of `like`, drawn by the affine-step
    kernel of like's device (ops.affine_step with A = B = 0, C = 1): the same contract noise, float32 bit for
    bit on the CPU, float64 to the last ulp of libm's log/cos, other devices within the contract's ulps. The
    plain-torch Philox costs ~1 ms a draw of 1024 × 2 on the CPU (a dozen tensor ops per round), as much as a
    small network's forward: the samplers users run draw here. Other dtypes than float32/64 take the torch draw."""
    if like.dtype not in (torch.float32, torch.float64) or like.ndim == 0 or like.numel() == 0:
        index = torch.arange(sample_offset, sample_offset + (like.shape[0] if like.ndim else 1),
                             dtype=torch.int64, device=like.device)
        return contract_normal(seed, index, step, like)
    from . import ops
    zeros = torch.zeros((like.shape[0], like[0].numel()), dtype=like.dtype, device=like.device)
    return ops.affine_step(zeros, zeros, 0.0, 0.0, 1.0, seed, step, sample_offset, check_values=False).view(like.shape)


class ContractNoise:
    """The noise of a table run from fastdiff's counter-based contract (step indices in the module docstring).

    Row i of the state is global sample sample_offset + i, so the noise does not depend on the batch.

    kernels=True draws kernel_normal's noise (the samplers users run: fd.sample, fastdiff.k_diffusion), False with
    the plain-torch contract_normal (the reference's own). With kernels, each kind of draw (churn, stage, step) is
    written into one buffer of its own, reused by the next draw of that kind: the executor (run_table) uses each
    draw before the next of its kind, and the stage draw survives the step draw that correlates with it.
    """

    def __init__(self, table: MethodTable, seed: int, sample_offset: int, rows: int, device, kernels: bool = False):
        self.rho = table.lists()["rho"]
        self.seed = int(seed)
        self.offset = int(sample_offset)
        self.index = torch.arange(sample_offset, sample_offset + rows, dtype=torch.int64, device=device)
        self.kernels = kernels
        self._stage: torch.Tensor | None = None
        self._draws: dict = {}          # kind → (the kind's buffer, its ops.affine_stepper)

    def _normal(self, step: int, like: torch.Tensor, kind: str) -> torch.Tensor:
        if not self.kernels:
            return contract_normal(self.seed, self.index, step, like)
        if like.dtype not in (torch.float32, torch.float64) or like.ndim == 0 or like.numel() == 0:
            return kernel_normal(self.seed, self.offset, step, like)
        return self._kernel_draw(step, like, kind)

    def _kernel_draw(self, step: int, like: torch.Tensor, kind: str) -> torch.Tensor:
        """kernel_normal's bits into the kind's buffer b through ops.affine_stepper, b ← 0·b + 0·b + 1·z (0 times a
        finite normal is 0, so z exactly): the per-draw checks of ops.affine_step (~20 µs of a 1024 × 2 draw's
        ~35 µs on the CPU) are done once per buffer."""
        from . import ops
        rows, per_row = like.shape[0], like[0].numel()
        entry = self._draws.get(kind)
        if entry is None or entry[0].shape != (rows, per_row) or entry[0].dtype != like.dtype \
                or entry[0].device != like.device:
            buf = torch.zeros((rows, per_row), dtype=like.dtype, device=like.device)
            entry = self._draws[kind] = (buf, ops.affine_stepper(buf, self.seed, self.offset, 2**32))
        buf, step_into = entry
        step_into(step, buf, 0.0, 0.0, 1.0)
        return buf.view(like.shape)

    def __call__(self, k: int, kind: str, like: torch.Tensor) -> torch.Tensor:
        if kind == "churn":
            return self._normal(CHURN_STEP_BASE + k, like, kind)
        if kind == "stage":
            self._stage = self._normal(STAGE_STEP_BASE + k, like, kind)
            return self._stage
        w = self._normal(k, like, kind)
        rho = self.rho[k]
        if rho == 0.0:
            return w
        assert self._stage is not None, "a correlated step noise follows its stage's draw"
        # one Brownian path through σ_s: the step's increment contains the stage's (k-diffusion's dpmpp_sde)
        if w.dtype in (torch.float16, torch.bfloat16):   # one rounding, the same at every position (run_table's axpy)
            return w.copy_(w.float().mul_(math.sqrt(1 - rho * rho)).add_(self._stage.float().mul_(rho)))
        return w.mul_(math.sqrt(1 - rho * rho)).add_(self._stage, alpha=rho)


# ------------------------------------------------------------------------------------------ the executor

def run_table(table: MethodTable, denoise, x: torch.Tensor, noise, callback=None, progress=None, *,
              reuse_state: bool = False, trajectory: torch.Tensor | None = None, promote: bool = False,
              noise_calls=frozenset()) -> torch.Tensor:
    """Run `table` from the state x ([M, ...], not modified) and return the final state.

    denoise(x, k, stage) -> D at table.t[k] (stage 0) or table.t_u[k] (stage 1), same shape and dtype as x;
    noise(k, kind, like) -> z like `like`, kind in ("churn", "stage", "step");
    callback(k, x̂, D_0), if given, runs after D_0 and before the update (it may modify x̂ in place).
    The coefficients are Python floats read once from the table: no tensor is read back inside the loop.
    A step with one D term applies exactly fastdiff.reference.affine_step's operations.

    The history H₋₁ … H₋_H lives in H buffers allocated once and rotated (no per-step allocation; D_0 is copied
    into the oldest one after the callback, so a callback's in-place edit of D_0 reaches the history, as in
    k-diffusion). D_0 is used up before a stage's evaluation, so a model may return one output buffer every call.
    reuse_state=False gives every step's state a fresh tensor (k-diffusion's semantics: a callback
    may keep x̂); reuse_state=True alternates two state buffers (a callback must copy what it keeps).
    trajectory: None, or a preallocated tensor [K + 1, *x.shape] that receives x and every step's state.
    promote=True (k-diffusion's semantics, where x + d·dt promotes): a D or a noise draw of a wider floating dtype
    than the state's widens the state from there on; otherwise each must have the state's dtype.
    noise_calls: (k, kind) pairs at which noise is called even where its coefficient is 0, the draw unused (a
    caller's stateful noise sampler sees the calls k-diffusion makes).
    A float16 / bfloat16 state adds each scaled term in float32 and rounds once: torch's CPU add_(alpha=) rounds
    those dtypes differently in its vector body and its scalar tail, which made a row's result depend on its
    position in the batch.
    """
    c = table.lists()
    depth = table.history
    x = x.clone()
    hist = [torch.empty_like(x) for _ in range(depth)]   # H₋₁, H₋₂, … (most recent first)
    spare = torch.empty_like(x) if reuse_state else None
    if trajectory is not None:
        trajectory[0].copy_(x)

    def widened(t, *also):
        """t in the state's dtype, the state (x, the history, the spare, `also`) first widened to t's if it is wider."""
        nonlocal x, hist, spare
        if not promote or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == x.dtype:
            return (t, *also)
        wide = torch.promote_types(x.dtype, t.dtype)
        if wide != x.dtype:
            x, hist = x.to(wide), [h.to(wide) for h in hist]
            spare = None if spare is None else spare.to(wide)
            also = tuple(a.to(wide) for a in also)
        return (t.to(wide), *also)

    def axpy(y, t, a):
        """y += a·t in place."""
        if y.dtype in (torch.float16, torch.bfloat16):
            return y.add_(t.float().mul_(a))
        return y.add_(t, alpha=a)

    for k in range(len(table)):
        if c["C_churn"][k] != 0.0:
            z, = widened(noise(k, "churn", x))
            if c["P"][k] != 1.0:
                x.mul_(c["P"][k])
            axpy(x, z, c["C_churn"][k])
        else:
            if (k, "churn") in noise_calls:
                noise(k, "churn", x)
            if c["P"][k] != 1.0:
                x.mul_(c["P"][k])
        D0, = widened(denoise(x, k, 0))
        D0 = _checked(D0, x, "denoise")
        if callback is not None:
            callback(k, x, D0)
        u = None
        if c["staged"][k]:
            # a fresh stage input each step (k-diffusion's semantics: a model or hook may keep its input)
            u = axpy(torch.mul(x, c["a_u"][k]), D0, c["b_u"][k])
            if c["c_u"][k] != 0.0:
                z, u, D0 = widened(noise(k, "stage", x), u, D0)
                axpy(u, z, c["c_u"][k])
            elif (k, "stage") in noise_calls:
                noise(k, "stage", x)
        # D_0 is used up (in the step and the history) before the stage's evaluation: a model that returns one
        # output buffer on every call (a captured CUDA graph, an inference engine) overwrites D_0 with D_1 there
        out = torch.mul(x, c["A"][k], out=spare) if reuse_state else torch.mul(x, c["A"][k])
        axpy(out, D0, c["B"][k][0])
        for j, Hj in enumerate(hist, start=1):
            if c["B"][k][j] != 0.0:
                axpy(out, Hj, c["B"][k][j])
        if depth:
            oldest = hist.pop()
            if c["hist_x"][k] == 0.0 and c["hist_d"][k] == 1.0:
                oldest.copy_(D0)
            else:
                axpy(torch.mul(x, c["hist_x"][k], out=oldest), D0, c["hist_d"][k])
            hist.insert(0, oldest)
        if u is not None:
            D1, out = widened(denoise(u, k, 1), out)
            axpy(out, _checked(D1, x, "denoise"), c["B1"][k])
        if c["C"][k] != 0.0:
            z, out = widened(noise(k, "step", x), out)
            axpy(out, z, c["C"][k])
        elif (k, "step") in noise_calls:
            noise(k, "step", x)
        if reuse_state:
            spare = x
        x = out
        if trajectory is not None:
            trajectory[k + 1].copy_(x)
        if progress is not None:
            progress(k)
    return x


def _checked(D, x, name):
    if not isinstance(D, torch.Tensor) or D.shape != x.shape or D.dtype != x.dtype or D.device != x.device:
        raise ValueError(f"{name} must return a tensor like x ({tuple(x.shape)}, {x.dtype}, {x.device}); got "
                         f"{tuple(getattr(D, 'shape', ()))}, {getattr(D, 'dtype', type(D).__name__)}")
    return D


def sample_table(denoiser, table: MethodTable, x: torch.Tensor, *, seed: int = 0, sample_offset: int = 0,
                 callback=None) -> torch.Tensor:
    """The plain-torch reference sampler: run `table` (method_table on denoiser.process's grid) with a
    fastdiff denoiser's D (denoiser.denoise(x, t)) from x [M, d], noise from the contract (row i is sample
    sample_offset + i). callback(info) gets {"step", "t", "x", "prediction"} before each update."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if int(sample_offset) < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
    c = table.lists()

    def denoise(xk, k, stage):
        return denoiser.denoise(xk, c["t_u"][k] if stage else c["t"][k])

    cb = None
    if callback is not None:
        def cb(k, xk, D0):
            callback({"step": k, "t": c["t"][k], "x": xk, "prediction": D0})
    with torch.no_grad():
        return run_table(table, denoise, x, ContractNoise(table, seed, int(sample_offset), x.shape[0], x.device), cb)


# ---------------------------------------------------------------------------------- the Gaussian oracle

def table_oracle(table: MethodTable, data, *, final_denoise: bool = False):
    """(mean [d], cov [d, d]), float64, of the law `sample_table` produces from the prior N(0, prior_std² I)
    on Gaussian data (a fd.Gaussian on the table's process) with the contract noise (MATH.md §6).

    The state (x, H₋₁, …, H₋_H) is jointly Gaussian: every step is affine in it, in D = M x + c (exact for
    Gaussian data) and in independent standard normals (z_churn, z_stage, w), with z = ρ z_stage + √(1 − ρ²) w.
    """
    c = table.lists()
    d, H = data.dim, table.history
    n = (1 + H) * d
    eye = torch.eye(d, dtype=torch.float64)
    mu = torch.zeros(n, dtype=torch.float64)
    S = torch.zeros(n, n, dtype=torch.float64)
    S[:d, :d] = data.process.prior_std ** 2 * eye
    for k in range(len(table)):
        m = n + 3 * d                                    # state, then z_churn, z_stage, w
        block = lambda i, m=m: torch.nn.functional.pad(eye, (i * d, m - (i + 1) * d))   # noqa: E731
        L_x = c["P"][k] * block(0) + c["C_churn"][k] * block(1 + H)
        M0, c0 = data.linear_map(c["t"][k])
        L_D0, k_D0 = M0 @ L_x, c0
        L_new = c["A"][k] * L_x + c["B"][k][0] * L_D0
        k_new = c["B"][k][0] * k_D0
        for j in range(1, H + 1):
            L_new = L_new + c["B"][k][j] * block(j)
        if c["staged"][k]:
            L_u = c["a_u"][k] * L_x + c["b_u"][k] * L_D0 + c["c_u"][k] * block(2 + H)
            M1, c1 = data.linear_map(c["t_u"][k])
            L_new = L_new + c["B1"][k] * (M1 @ L_u)
            k_new = k_new + c["B1"][k] * (M1 @ (c["b_u"][k] * k_D0) + c1)
        rho = c["rho"][k]
        L_new = L_new + c["C"][k] * (rho * block(2 + H) + math.sqrt(1 - rho * rho) * block(3 + H))
        rows, consts = [L_new], [k_new]
        if H:
            rows.append(c["hist_x"][k] * L_x + c["hist_d"][k] * L_D0)
            consts.append(c["hist_d"][k] * k_D0)
            for j in range(1, H):
                rows.append(block(j))
                consts.append(torch.zeros(d, dtype=torch.float64))
        L = torch.cat(rows)
        mu_e = torch.cat([mu, torch.zeros(3 * d, dtype=torch.float64)])
        S_e = torch.block_diag(S, torch.eye(3 * d, dtype=torch.float64))
        mu, S = L @ mu_e + torch.cat(consts), L @ S_e @ L.T
    mu, S = mu[:d], S[:d, :d]
    if final_denoise:
        Mk, ck = data.linear_map(float(table.times[-1]))
        mu, S = Mk @ mu + ck, Mk @ S @ Mk.T
    return mu, 0.5 * (S + S.T)


def unit_gaussian_variance(table: MethodTable, process: Process) -> float:
    """The exact output variance of `table` on 1-D N(0, 1) data (table_oracle for d = 1, mean 0), as a Python
    float recursion over the (1 + H)-dimensional state covariance: microseconds per step, so fd.sample can run
    it on every call (its GridWarning)."""
    c = table.lists()
    H = table.history
    n = 1 + H
    # D(x) = m x on N(0, 1) data, m = α/(α² + σ²), where D_0 (t) and D_1 (t_u) are evaluated
    m0, m1 = ((torch.exp(process._log_alpha(tt)) / (torch.exp(2 * process._log_alpha(tt)) + process._sigma2(tt)))
              .tolist() for tt in (table.t, table.t_u))
    S = [[0.0] * n for _ in range(n)]
    S[0][0] = process.prior_std ** 2
    width = n + 3                                           # state, then z_churn, z_stage, w
    for k in range(len(table)):
        Lx = [0.0] * width
        Lx[0], Lx[n] = c["P"][k], c["C_churn"][k]
        LD0 = [m0[k] * v for v in Lx]
        row = [c["A"][k] * a + c["B"][k][0] * b for a, b in zip(Lx, LD0, strict=True)]
        for j in range(1, n):
            row[j] += c["B"][k][j]
        if c["staged"][k]:
            g = c["B1"][k] * m1[k]
            for i in range(width):
                row[i] += g * (c["a_u"][k] * Lx[i] + c["b_u"][k] * LD0[i])
            row[n + 1] += g * c["c_u"][k]
        rho = c["rho"][k]
        row[n + 1] += c["C"][k] * rho
        row[n + 2] += c["C"][k] * math.sqrt(1 - rho * rho)
        rows = [row]
        if H:
            rows.append([c["hist_x"][k] * a + c["hist_d"][k] * b for a, b in zip(Lx, LD0, strict=True)])
            for j in range(1, H):
                rows.append([1.0 if i == j else 0.0 for i in range(width)])
        # S ← L blockdiag(S, I₃) Lᵀ
        SL = [[sum(S[i][q] * r[q] for q in range(n)) for r in rows] for i in range(n)]
        S = [[sum(a[q] * SL[q][b] for q in range(n)) + sum(a[q] * rows[b][q] for q in range(n, width))
              for b in range(len(rows))] for a in rows]
    return S[0][0]
