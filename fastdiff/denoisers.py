"""Denoisers: exact ones for Gaussian, Gaussian-mixture and point-cloud data (MATH.md §5), and adapters
for a user's network that predicts x0, the noise ε or the score.

Every denoiser has `.denoise(x, t)` → D = E[X_0 | X_t = x] and `.score(x, t)` → ∇ log p_t(x), related by
Tweedie (MATH.md §2): s = (αD − x)/σ², D = (x + σ²s)/α, ε = −σs. `.predict(x, t)` returns the
denoiser's native output, named by `.prediction`; the sampler turns its step table into that form.
x is [M, d]; t is a float or a per-row tensor [M] (or [1]) in (0, T], checked before any model runs.
PointCloud, StreamingPointCloud, Gaussian, GaussianMixture and a differentiable model are differentiable in x.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import ops
from ._checks import as_real, as_time, check_choice, check_points
from .processes import Process
from .steps import PREDICTIONS


def _coeffs(process: Process, t, x: torch.Tensor, dtype=None):
    """α(t), σ²(t) as float64 tensors of shape [M, 1] (per-row t) or [1, 1] (scalar t)."""
    tt = as_time(t, "t", process.T)
    tt = torch.as_tensor(tt, dtype=torch.float64, device=x.device).reshape(-1, 1)
    if tt.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t must be a scalar or have shape [M]=[{x.shape[0]}], got {tt.shape[0]} times")
    return process._log_alpha(tt).exp(), process._sigma2(tt)


class Denoiser:
    """Base class: subclasses set `process`, `prediction`, `dim` and implement `predict`."""

    prediction = "x0"
    dim: int | None = None

    def __init__(self, process: Process):
        if not isinstance(process, Process):
            raise TypeError("process must be a fastdiff process (OU, VP, VE, PureVE, DriftedVE), got "
                            f"{type(process).__name__}")
        self.process = process

    def predict(self, x: torch.Tensor, t) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, x):
        return check_points(x, "x", self.dim)

    def denoise(self, x: torch.Tensor, t) -> torch.Tensor:
        """D(x, t) = E[X_0 | X_t = x]."""
        self._check(x)
        if self.prediction == "x0":
            return self.predict(x, t)
        alpha, sig2 = _coeffs(self.process, t, x)          # (checks t before the model sees it)
        out = self.predict(x, t)
        if self.prediction == "score":
            return ((x + sig2 * out) / alpha).to(x.dtype)
        return ((x - sig2.sqrt() * out) / alpha).to(x.dtype)

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """s(x, t) = ∇_x log p_t(x)."""
        self._check(x)
        if self.prediction == "score":
            return self.predict(x, t)
        alpha, sig2 = _coeffs(self.process, t, x)
        out = self.predict(x, t)
        if self.prediction == "x0":
            return ((alpha * out - x) / sig2).to(x.dtype)
        return (-out / sig2.sqrt()).to(x.dtype)

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """ε(x, t) = −σ s(x, t), the noise-prediction target."""
        if self.prediction == "eps":
            self._check(x)
            return self.predict(x, t)
        _, sig2 = _coeffs(self.process, t, x)
        return (-sig2.sqrt() * self.score(x, t)).to(x.dtype)


class _Cloud(Denoiser):
    """What every point-cloud denoiser shares (in memory, streamed, sharded). Subclasses set `bandwidth` and
    `dim` and give `posterior(x, t)` → (D, L) and `_ybar(x, α, c)` → the float64 posterior mean of the data
    points at α and c = α²v + σ² (the points' own mean, before the kernel density's pull toward x)."""

    bandwidth: float
    dim: int

    def posterior(self, x: torch.Tensor, t):
        raise NotImplementedError

    def _ybar(self, x: torch.Tensor, alpha: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, x, t):
        return self.posterior(x, t)[0]

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """s(x, t) = ∇_x log p_t(x); with bandwidth v > 0, (αȳ − x)/c in float64. Tweedie from D would divide D's
        rounding by σ² ≪ c: D = (1 − α²v/c)ȳ + (αv/c)x lies within float32 rounding of x at small σ."""
        if not self.bandwidth:
            return super().score(x, t)
        self._check(x)
        alpha, sig2 = _coeffs(self.process, t, x)
        c = alpha * alpha * self.bandwidth + sig2
        return ((alpha * self._ybar(x, alpha, c) - x.to(torch.float64)) / c).to(x.dtype)

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x) = L − (d/2) log(2π c_t), c_t = α²v + σ²."""
        _, L = self.posterior(x, t)
        alpha, sig2 = _coeffs(self.process, t, x)
        c = (alpha * alpha * self.bandwidth + sig2).view(-1)
        return (L.to(torch.float64) - 0.5 * self.dim * torch.log(2 * math.pi * c)).to(x.dtype)


class PointCloud(_Cloud):
    """The exact denoiser of an empirical measure Σ π_i δ_{y_i} (or, with bandwidth v > 0, of the
    kernel density Σ π_i N(y_i, vI)): a log-sum-exp reduction over every data point (MATH.md §5).

    data: [N, d] in any float dtype; weights: [N] non-negative (normalised here); bandwidth: v ≥ 0 (a
    variance: the kernel's standard deviation is √v). backend: which backend's posterior kernel `posterior`,
    `denoise`, `score` and `log_prob` use ("auto" as in fastdiff.ops); fd.sample uses the backend it is given.
    Every posterior goes through fastdiff.ops.posterior, the kernels fd.sample's whole-trajectory op uses.
    """

    dim: int                   # data's d, always known

    def __init__(self, data: torch.Tensor, process: Process, weights=None, bandwidth: float = 0.0,
                 backend: str = "auto"):
        super().__init__(process)
        self.backend = backend
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or not data.is_floating_point():
            raise ValueError("data must be a floating tensor of shape [N, d], got "
                             f"{getattr(data, 'shape', type(data))}")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"data must be non-empty, got shape {tuple(data.shape)}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("data contains NaN or inf")
        self.bandwidth = as_real(bandwidth, "bandwidth")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0):
            raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}")
        self.log_weights = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64, device=data.device)
            if w.shape != (data.shape[0],):
                raise ValueError(f"weights must have shape [N]=[{data.shape[0]}], got {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
            keep = w > 0                                       # zero-weight points can never be chosen
            data, w = data[keep], w[keep] / w.max()            # (scaled first: a sum of 1e308's overflows)
            self.log_weights = (w / w.sum()).log()
        self.data = data
        self.dim = data.shape[1]

    def _check(self, x):
        if isinstance(x, torch.Tensor) and x.device != self.data.device:
            raise ValueError(f"x is on {x.device} but the point cloud's data is on {self.data.device}; "
                             "build the PointCloud from data on the device you sample on")
        return super()._check(x)

    def posterior(self, x: torch.Tensor, t):
        """(D [M, d], L [M]) with L = logsumexp_i a_i(x) (MATH.md §5)."""
        self._check(x)
        alpha, sig2 = _coeffs(self.process, t, x)
        return ops.posterior(x, self.data, alpha.view(-1), sig2.sqrt().view(-1), self.log_weights, self.bandwidth,
                             backend=self.backend)

    def _ybar(self, x, alpha, c):
        ybar, _ = ops.posterior(x, self.data, alpha.view(-1), c.sqrt().view(-1), self.log_weights, 0.0,
                                backend=self.backend)
        return ybar.to(torch.float64)

    def data_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_0(x) of the kernel density Σ π_i N(y_i, vI) itself (needs bandwidth v > 0)."""
        self._check(x)
        if self.bandwidth <= 0:
            raise ValueError("data_log_prob needs bandwidth > 0: an empty-bandwidth point cloud has no density")
        v = self.bandwidth
        _, L = ops.posterior(x, self.data, 1.0, math.sqrt(v), self.log_weights, 0.0, backend=self.backend)
        return (L.to(torch.float64) - 0.5 * self.dim * math.log(2 * math.pi * v)).to(x.dtype)


class GaussianMixture(Denoiser):
    """Exact denoiser of p_0 = Σ π_k N(μ_k, Σ_k) (MATH.md §5); covariances may be singular.

    Each Σ_k = U_k diag(λ_k) U_kᵀ is diagonalised once, so for any t (per-row too)
    C_k = α²Σ_k + σ²I = U_k diag(α²λ_k + σ²) U_kᵀ is inverted exactly. Computed in float64.
    """

    dim: int                   # the means' d, always known

    def __init__(self, weights, means, covs, process: Process):
        super().__init__(process)
        means = torch.as_tensor(means, dtype=torch.float64)
        # a covariance carries its own dtype's rounding: a float32 one of rank < d has eigenvalues around −1e-8
        tol = max(1e-10, 10 * means.shape[-1] * _eps_of(covs))
        covs = torch.as_tensor(covs, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        K, d = means.shape
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape [K, d, d]=[{K}, {d}, {d}], got {tuple(covs.shape)}")
        if w.shape != (K,):
            raise ValueError(f"weights must have shape [K]=[{K}], got {tuple(w.shape)}")
        for name, v in (("weights", w), ("means", means), ("covs", covs)):
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} contains NaN or inf")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError("weights must be non-negative and not all zero")
        if not torch.allclose(covs, covs.transpose(1, 2), atol=tol * max(1.0, float(covs.abs().max()))):
            raise ValueError("covs must be symmetric")
        lam, U = torch.linalg.eigh(covs)
        if bool((lam < -tol * lam.abs().max().clamp_min(1.0)).any()):
            raise ValueError("covs must be positive semi-definite")
        self.lam, self.U = lam.clamp_min(0.0), U                   # [K, d], [K, d, d]
        self.means, self.covs, self.dim = means, covs, d
        with torch.no_grad():
            self.log_weights = torch.where(w > 0, (w / w.sum()).log(), torch.full_like(w, -math.inf))

    def _parts(self, x, t):
        """Per-component logits a [M, K], projected offsets z [M, K, d] and variances q [M|1, K, d]."""
        self._check(x)
        alpha, sig2 = _coeffs(self.process, t, x)                  # [M|1, 1]
        dev = x.device
        U, lam, mu = self.U.to(dev), self.lam.to(dev), self.means.to(dev)
        x64 = x.to(torch.float64)
        diff = x64.unsqueeze(1) - alpha.unsqueeze(-1) * mu          # [M, K, d]
        z = torch.einsum("mkd,kde->mke", diff, U)                   # coordinates in each eigenbasis
        q = alpha.unsqueeze(-1) ** 2 * lam + sig2.unsqueeze(-1)     # [M|1, K, d]
        a = self.log_weights.to(dev) - 0.5 * (
            (z * z / q).sum(-1) + q.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return a, z, q, alpha

    def predict(self, x, t):
        a, z, q, alpha = self._parts(x, t)
        r = torch.softmax(a, dim=1)                                  # [M, K]
        # D_k = μ_k + α Σ_k C_k⁻¹ (x − αμ_k) = μ_k + U_k diag(αλ/q) z
        scaled_z = alpha.unsqueeze(-1) * self.lam.to(x.device) / q * z
        Dk = self.means.to(x.device) + torch.einsum("mke,kde->mkd", scaled_z, self.U.to(x.device))
        return (r.unsqueeze(-1) * Dk).sum(1).to(x.dtype)

    def score(self, x, t):
        a, z, q, _ = self._parts(x, t)
        r = torch.softmax(a, dim=1)
        sk = -torch.einsum("mke,kde->mkd", z / q, self.U.to(x.device))  # C_k⁻¹(αμ_k − x)
        return (r.unsqueeze(-1) * sk).sum(1).to(x.dtype)

    def log_prob(self, x, t):
        """log p_t(x) = logsumexp_k a_k."""
        a, _, _, _ = self._parts(x, t)
        return torch.logsumexp(a, dim=1).to(x.dtype)


def _eps_of(v) -> float:
    """The machine epsilon of a tensor's or array's floating dtype (float64's for anything else)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return torch.finfo(v.dtype).eps
    dtype = getattr(v, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


class Gaussian(GaussianMixture):
    """Exact denoiser of N(μ, Σ), Σ possibly singular (a line or plane: the CEM paper's "line"):
    D(x) = μ + αΣ(α²Σ + σ²I)⁻¹(x − αμ), linear in x."""

    def __init__(self, mean, cov, process: Process):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        given = cov if isinstance(cov, torch.Tensor) else np.asarray(cov)     # (its dtype sets the PSD tolerance)
        if mean.ndim != 1 or given.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"mean must be [d] and cov [d, d]; got {tuple(mean.shape)} and {tuple(given.shape)}")
        super().__init__(torch.ones(1), mean.unsqueeze(0), given[None], process)
        self.mean, self.cov = mean, self.covs[0]

    def linear_map(self, t: float):
        """(M, c) with D(x) = M x + c at scalar time t, float64 (used by the Gaussian oracle)."""
        tt = as_time(t, "t", self.process.T)
        alpha, sig2 = self.process.alpha(tt), self.process.sigma2(tt)
        U, lam = self.U[0], self.lam[0]
        M = alpha * (U * (lam / (alpha * alpha * lam + sig2))) @ U.T
        return M, self.mean - alpha * M @ self.mean


class ModelDenoiser(Denoiser):
    """A user's network `model(x, t) -> tensor` wrapped as a denoiser (see `from_model`)."""

    def __init__(self, model, process: Process, prediction: str = "x0", event_shape=None, time_input: str = "t"):
        super().__init__(process)
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
        self.model = model
        self.prediction = check_choice(prediction, "prediction", PREDICTIONS)
        self.time_input = check_choice(time_input, "time_input", ("t", "sigma"))
        self.event_shape = None if event_shape is None else tuple(int(s) for s in event_shape)
        self.dim = None if self.event_shape is None else math.prod(self.event_shape)
        self._memo: dict = {}
        self._memo_process = process

    def predict(self, x, t):
        M = x.shape[0]
        if type(t) is not float:     # (the sampler's own times are checked floats: their memo hit stays cheap)
            t = _model_time(t, self.process.T, M)
        xin = x if self.event_shape is None else x.view(M, *self.event_shape)
        inv_alpha, t_in = self._time_inputs(t, x)
        if self.time_input == "sigma":
            for v in (inv_alpha, t_in):
                if not _fits(v, x.dtype):
                    raise ValueError(f"time_input='sigma' feeds the network x/α and σ/α, and 1/α(t) overflows "
                                     f"{x.dtype} for {self.process!r} at this t; use float64, a smaller T, or "
                                     "time_input='t'")
            if isinstance(inv_alpha, torch.Tensor):
                inv_alpha = inv_alpha.to(x.dtype).view(M, *([1] * (xin.ndim - 1)))
            if not (isinstance(inv_alpha, float) and inv_alpha == 1.0):
                xin = xin * inv_alpha
        if not isinstance(t_in, torch.Tensor):   # a number: computed on the host, filled on the device (graph-safe)
            t_in = torch.full((M,), t_in, dtype=x.dtype, device=x.device)
        out = self.model(xin, t_in.to(x.dtype))
        if not isinstance(out, torch.Tensor) or out.shape != xin.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__   # (a numpy array too)
            raise ValueError(f"model(x, t) must return a tensor shaped like x {tuple(xin.shape)}, got {got}")
        unit_alpha = isinstance(inv_alpha, float) and inv_alpha == 1.0
        if inv_alpha is not None and self.prediction == "score" and not unit_alpha:
            # y = x/α has density α^d p_t(α y): the network's score is α ∇ log p_t(x), so divide by α.
            out = out * inv_alpha
        # (x0 and eps need no conversion: E[x0 | y] = E[x0 | x], and y's noise is x's noise z)
        return out.reshape(M, -1).to(x.dtype)

    def _time_inputs(self, t, x):
        """(1/α(t) or None, the network's time input): Python floats for a scalar t, float64 tensors [M] on x's
        device for per-row times. time_input="sigma" is k-diffusion's convention: the network sees the scaled
        process y = x/α = x0 + (σ/α) z, a pure VE process with noise level σ/α (for α = 1, the VE family, x and
        σ(t) pass unchanged). A scalar t's pair is memoised: a sampling loop asks for the same grid every call,
        and each costs several host tensor ops (tens of µs a step next to a small network's forward)."""
        scalar = not (isinstance(t, torch.Tensor) and t.ndim == 1)
        if scalar:
            if self._memo_process is not self.process:          # a reassigned process invalidates the memo
                self._memo, self._memo_process = {}, self.process
            key = float(t)
            hit = self._memo.get(key)
            if hit is not None:
                return hit
            as_time(key, "t", self.process.T)                      # checked once per time, then memoised
        if self.time_input == "t":
            pair = (None, self._rows(t, lambda u: u, x))
        else:
            pair = (self._rows(t, lambda u: torch.exp(-self.process._log_alpha(u)), x),
                    self._rows(t, lambda u: self.process._sigma2(u).sqrt() * torch.exp(-self.process._log_alpha(u)),
                               x))
        if scalar:
            if len(self._memo) >= 65536:                        # bounded: a caller with ever-new times
                self._memo.clear()
            self._memo[key] = pair
        return pair

    @staticmethod
    def _rows(t, fn, x):
        """fn(t) in float64: a Python float for a scalar t (computed on the host: no copy, no sync, so the
        model loop stays graph-safe), or a float64 tensor [M] on x's device for per-row times."""
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return fn(t.to(device=x.device, dtype=torch.float64))
        return float(fn(torch.tensor(float(t), dtype=torch.float64)))


def _model_time(t, T: float, M: int):
    """A model's time argument other than a float: a checked float, or a float64 tensor [M] (a [1] tensor is
    spread over the M rows: the network gets one time per row)."""
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        tt = as_time(t, "t", T)
        if tt.shape[0] not in (1, M):
            raise ValueError(f"t must be a scalar or have shape [M]=[{M}], got {tt.shape[0]} times")
        return tt.expand(M)
    return as_time(t, "t", T)


def _fits(v, dtype) -> bool:
    """Whether v (a float or a float64 tensor) is finite once cast to dtype."""
    big = torch.finfo(dtype).max
    if isinstance(v, torch.Tensor):
        return bool((v.abs() <= big).all())
    return math.isfinite(v) and abs(v) <= big


def from_model(model, process: Process, prediction: str = "x0", *, event_shape=None,
               time_input: str = "t") -> ModelDenoiser:
    """Wrap `model(x, t)` whose output is x0 (the CEM paper's conditional expectation), eps or the score.

    The model receives x shaped [M, *event_shape] (or [M, d]) and a tensor [M] in x's dtype:
      time_input="t"      (x_t, t): the process's own time and state.
      time_input="sigma"  k-diffusion's convention, for every process: (x_t/α(t), σ(t)/α(t)), the state and noise
                          level of the scaled process y = x/α = x0 + (σ/α) z. For α = 1 (VE, PureVE) that is
                          (x_t, σ(t)) unchanged. The output is read in the same convention: an x0 or eps
                          prediction is used as is (y has x's x0 and noise), a score s_y is converted by
                          s_x = s_y/α. So a k-diffusion denoiser D(y, σ') wraps as
                          from_model(D, process, "x0", time_input="sigma") on VP or drifted VE too.
    """
    return ModelDenoiser(model, process, prediction, event_shape, time_input)
