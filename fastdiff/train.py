"""Training objectives for diffusion models (MATH.md §9): denoising score matching, the CEM paper's
conditional-expectation loss, the ε loss, the Fokker–Planck residual of the ODE–SDE gap paper, a small
MLP (and a potential network u(x, t) ≈ log p_t) and a seeded training loop.

All three losses use the forward perturbation x_t = α(t) x_0 + σ(t) z, z ~ N(0, I), with the squared
norm summed over dimensions and averaged over the batch:

  dsm  (score model s_θ)   E ‖σ s_θ(x_t, t) + z‖²                       (weight σ², Song et al.)
  eps  (noise model ε_θ)   E ‖ε_θ(x_t, t) − z‖²                         (DDPM's simple loss)
  cem  (x0 model D_θ)      E λ(t) ‖x_0 − D_θ(x_t, t)‖²,  λ = α²/σ²       (CEM paper; λ = 1/(eᵗ − 1) for OU(½, 1))

With the same underlying denoiser the three values are identical (σ s + z = z − ε̂ = (α/σ)(x_0 − D̂)):
they differ only in what the network outputs. The score s = (αD − x)/σ² and the noise ε = (x − αD)/σ
blow up as t → 0 off a data manifold, D stays bounded (CEM paper, Theorem 3.5).

Every model here is called as ``model(x, t)`` with x [M, d] and t [M] (the convention of
``fastdiff.from_model``); a potential network returns u [M] and its score is ∇_x u by autograd.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .processes import Process
from .schedules import as_integer

__all__ = [
    "perturb", "sample_times", "dsm_loss", "eps_loss", "cem_loss", "LOSSES", "PREDICTIONS",
    "fp_residual", "MLP", "PotentialMLP", "train", "TrainResult",
]


# ----------------------------------------------------------------------------------------- forward
def _coeffs(process: Process, t: torch.Tensor, like: torch.Tensor):
    """α(t), σ(t) as [M, 1] tensors in like's dtype/device (evaluated in float64, no gradient)."""
    t64 = t.detach().to(torch.float64).reshape(-1, 1)
    alpha = process._log_alpha(t64).exp()
    sigma = process._sigma2(t64).sqrt()
    return alpha.to(like), sigma.to(like)


def perturb(x0: torch.Tensor, t: torch.Tensor, process: Process, z: torch.Tensor):
    """(x_t, α [M, 1], σ [M, 1]) with x_t = α(t) x0 + σ(t) z, for per-row times t [M]."""
    if x0.ndim != 2 or z.shape != x0.shape:
        raise ValueError(f"x0 must be [M, d] and z the same shape, got {tuple(x0.shape)} and {tuple(z.shape)}")
    t = torch.as_tensor(t)
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape [M]=[{x0.shape[0]}], got {tuple(t.shape)}")
    if bool((t <= 0).any()) or bool((t > process.T * (1 + 1e-12)).any()):
        raise ValueError(f"t must lie in (0, T] = (0, {process.T}]")
    alpha, sigma = _coeffs(process, t, x0)
    return alpha * x0 + sigma * z, alpha, sigma


def sample_times(n: int, process: Process, t_min: float = 1e-4, dist: str = "uniform",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """n training times in [t_min, T], float64: ``uniform`` (the CEM paper's choice) or ``log-uniform``."""
    T = float(process.T)
    if not 0 < t_min < T:
        raise ValueError(f"t_min must lie in (0, T) = (0, {T}), got {t_min}")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if dist == "uniform":
        return t_min + (T - t_min) * u
    if dist == "log-uniform":
        return torch.exp(math.log(t_min) + (math.log(T) - math.log(t_min)) * u)
    raise ValueError(f"unknown dist {dist!r}; choose 'uniform' or 'log-uniform'")


def _mean_sq(r: torch.Tensor, reduction: str):
    per = (r * r).sum(dim=1)
    if reduction == "none":
        return per
    if reduction == "mean":
        return per.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------- losses
def dsm_loss(score_fn: Callable, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, process: Process,
             reduction: str = "mean") -> torch.Tensor:
    """Denoising score matching with weight σ²: E ‖σ s_θ(x_t, t) + z‖². Minimised by the true score;
    its minimum is d − σ² E‖∇log p_t‖² at each t."""
    xt, _, sigma = perturb(x0, t, process, z)
    return _mean_sq(sigma * score_fn(xt, t) + z, reduction)


def eps_loss(eps_fn: Callable, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, process: Process,
             reduction: str = "mean") -> torch.Tensor:
    """The ε loss E ‖ε_θ(x_t, t) − z‖². Minimised by ε* = −σ ∇log p_t = (x − αD)/σ."""
    xt, _, _ = perturb(x0, t, process, z)
    return _mean_sq(eps_fn(xt, t) - z, reduction)


def cem_loss(x0_fn: Callable, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, process: Process,
             reduction: str = "mean", weight: Callable | None = None) -> torch.Tensor:
    """The CEM paper's loss E λ(t) ‖x_0 − D_θ(x_t, t)‖², λ = α²/σ² by default (or ``weight(t)`` given
    the float64 times [M], returning [M]). Minimised by D* = E[X_0 | X_t]; the minimum is
    E λ tr Cov(X_0 | X_t)."""
    xt, alpha, sigma = perturb(x0, t, process, z)
    if weight is None:
        lam = (alpha / sigma) ** 2
    else:
        lam = torch.as_tensor(weight(t.detach().to(torch.float64))).reshape(-1, 1).to(x0)
    return _mean_sq(lam.sqrt() * (x0_fn(xt, t) - x0), reduction)


LOSSES = {"dsm": dsm_loss, "cem": cem_loss, "eps": eps_loss}
#: what a model trained with each loss predicts (the ``prediction`` argument of ``fastdiff.from_model``)
PREDICTIONS = {"dsm": "score", "cem": "x0", "eps": "eps"}


# ----------------------------------------------------------------------------------------- Fokker–Planck
def fp_residual(u: Callable, x: torch.Tensor, t: torch.Tensor, process: Process, create_graph: bool = True):
    """Fokker–Planck residual of a log-density model u(x, t) ≈ log p_t(x) [M] (MATH.md §9): for
    dX = f X dt + g dW in d dimensions,

        R(t, x) = ∂_t u + d f + f x·∇u − (g²/2)(Δu + |∇u|²),

    which vanishes for the true log p_t. ∂_t u, ∇u and the Laplacian Δu (d extra backward passes) come
    from autograd; with ``create_graph`` the result can be back-propagated into u's parameters.
    x [M, d], t [M] (the dtype of x); returns R [M]."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, d], got {tuple(x.shape)}")
    d = x.shape[1]
    x = x.detach().requires_grad_(True)
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).detach().reshape(-1).requires_grad_(True)
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape [M]=[{x.shape[0]}], got {tuple(t.shape)}")
    with torch.enable_grad():
        uu = u(x, t).reshape(-1)
        gx, gt = torch.autograd.grad(uu.sum(), (x, t), create_graph=True, allow_unused=True)
        if gx is None:
            gx = torch.zeros_like(x)
        if gt is None:                                      # u does not depend on t
            gt = torch.zeros_like(uu)
        lap = torch.zeros_like(uu)
        for i in range(d):
            if gx.requires_grad:
                h = torch.autograd.grad(gx[:, i].sum(), x, create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)[0]
                if h is not None:
                    lap = lap + h[:, i]
    t64 = t.detach().to(torch.float64)
    f = process._f(t64).to(x)
    g2 = process._g2(t64).to(x)
    R = gt + d * f + f * (x * gx).sum(1) - 0.5 * g2 * (lap + (gx * gx).sum(1))
    return R if create_graph else R.detach()


# ----------------------------------------------------------------------------------------- networks
class MLP(nn.Module):
    """A small MLP model(x, t) → [M, out_dim] (default out_dim = dim) with a smooth activation and a
    Fourier embedding of log t (t spans 1e−4 … 10 in the papers' settings).

    dim: data dimension; hidden: width; layers: hidden layers; activation: "silu" | "tanh" | "relu"
    (smooth ones keep second derivatives, needed by the Fokker–Planck residual); seed: if given, the
    weights are initialised from that seed without touching the global RNG state."""

    def __init__(self, dim: int, hidden: int = 128, layers: int = 3, out_dim: int | None = None,
                 activation: str = "silu", n_freq: int = 4, seed: int | None = None):
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1 or int(layers) < 1:
            raise ValueError(f"dim, hidden and layers must be positive, got {dim}, {hidden}, {layers}")
        acts = {"silu": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(acts)}")
        self.dim, self.out_dim = int(dim), int(out_dim or dim)
        self.register_buffer("freqs", 2.0 ** torch.arange(-2, int(n_freq) - 2, dtype=torch.float32))
        n_in = self.dim + 1 + 2 * int(n_freq)

        def build():
            mods, width = [], n_in
            for _ in range(int(layers)):
                mods += [nn.Linear(width, int(hidden)), acts[activation]()]
                width = int(hidden)
            mods.append(nn.Linear(width, self.out_dim))
            return nn.Sequential(*mods)

        if seed is None:
            self.net = build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = build()

    def time_features(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        tau = torch.log(torch.as_tensor(t, device=like.device).to(like.dtype).reshape(-1, 1))
        ang = tau * self.freqs.to(like.dtype)
        return torch.cat([tau / 4, torch.sin(ang), torch.cos(ang)], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [M, {self.dim}], got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, self.time_features(t, x)], dim=1))


class PotentialMLP(MLP):
    """A potential network u(x, t) ≈ log p_t(x) → [M] (the ODE–SDE gap paper's parameterisation):
    its score is ∇_x u, by autograd. ``score_model()`` gives a callable for
    ``fastdiff.from_model(..., prediction="score")``."""

    def __init__(self, dim: int, hidden: int = 128, layers: int = 3, activation: str = "silu",
                 n_freq: int = 4, seed: int | None = None):
        super().__init__(dim, hidden, layers, 1, activation, n_freq, seed)

    def forward(self, x, t):
        return super().forward(x, t).squeeze(1)

    def score(self, x: torch.Tensor, t: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """∇_x u(x, t) [M, d]; detached unless create_graph (training)."""
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self(xx, t).sum(), xx, create_graph=create_graph)
        return g if create_graph else g.detach()

    def score_model(self) -> Callable:
        """model(x, t) → ∇_x u, detached (for sampling)."""
        return lambda x, t: self.score(x, t)


# ----------------------------------------------------------------------------------------- training loop
@dataclass
class TrainResult:
    """What ``train`` returns: the model (trained in place), the per-iteration objective, the diffusion
    loss alone, the mean squared Fokker–Planck residual (when fp_weight > 0) and the settings."""

    model: nn.Module
    loss: str
    losses: list = field(default_factory=list)
    diffusion_losses: list = field(default_factory=list)
    fp_residuals: list = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def prediction(self) -> str:
        return PREDICTIONS[self.loss]

    def denoiser(self, process: Process):
        """The trained model as a fastdiff denoiser (``fd.from_model`` with the right prediction)."""
        from .denoisers import from_model

        m = self.model
        fn = m.score_model() if isinstance(m, PotentialMLP) else _NoGrad(m)
        return from_model(fn, process, self.prediction, event_shape=(m.dim,) if hasattr(m, "dim") else None)


class _NoGrad:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x, t):
        with torch.no_grad():
            return self.fn(x, t)


def _draw_data(data, n: int, gen: torch.Generator, step: int, seed: int, dtype):
    if isinstance(data, torch.Tensor):
        idx = torch.randint(data.shape[0], (n,), generator=gen)
        return data[idx].to(dtype)
    # a sampler like fd.datasets.spiral(n, seed=...): fresh draws, a distinct seed per step
    return data(n, seed=(seed * 1_000_003 + step) % (2**62)).to(dtype)


def train(model: nn.Module, data, process: Process, loss: str = "cem", *, iters: int = 2000,
          batch_size: int = 256, lr: float = 1e-3, lr_final: float | None = None, t_min: float = 1e-4,
          t_dist: str = "uniform", weight: Callable | None = None, fp_weight: float = 0.0,
          fp_batch: int | None = None, fp_box=None, grad_clip: float | None = None, seed: int = 0,
          progress: bool = False, log_every: int = 100, callback: Callable | None = None) -> TrainResult:
    """Train ``model`` in place with Adam and return a ``TrainResult``.

    model      ``MLP`` (its output is the loss's prediction: score for dsm, x0 for cem, ε for eps) or
               ``PotentialMLP`` (loss must be "dsm"; the score is ∇_x u)
    data       a tensor [N, d] (minibatches drawn with replacement) or a sampler ``fn(n, seed=...)``
               such as ``fd.datasets.spiral`` (fresh draws every step)
    loss       "dsm" | "cem" | "eps";  weight: the CEM weight λ(t) (default α²/σ²)
    t_min, t_dist   training times in [t_min, T], "uniform" (default, the CEM paper) or "log-uniform"
    lr, lr_final    Adam learning rate, cosine-decayed to lr_final if given
    fp_weight  w_R: adds w_R · mean R² of the Fokker–Planck residual (PotentialMLP only) at fp_batch
               collocation points uniform in [t_min, T] × fp_box (default: the data's bounding box ± 1)
    seed       every random draw (data, times, noise, collocation) comes from a private generator with
               this seed, so two runs from the same initial weights give identical results
    progress   a tqdm bar (or a line on stderr every log_every steps);  callback(dict) every log_every
               steps, with the mean loss of those steps
    iters, batch_size, log_every, fp_batch (default batch_size): integers >= 1; seed: an integer in
               [0, 2**64). Data with NaN or inf (for a sampler: in its first 4096-point draw) raise ValueError.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    potential = isinstance(model, PotentialMLP)
    if potential and loss != "dsm":
        raise ValueError("a PotentialMLP models log p_t: train it with loss='dsm'")
    if fp_weight and not potential:
        raise ValueError("fp_weight > 0 needs a PotentialMLP (the residual is an equation for log p_t)")
    # counts are integers, never truncated (iters=2.7 trained 2 steps; log_every=0 averaged the whole history)
    iters = as_integer(iters, "iters", 1)
    batch_size = as_integer(batch_size, "batch_size", 1)
    log_every = as_integer(log_every, "log_every", 1)
    fp_batch = batch_size if fp_batch is None else as_integer(fp_batch, "fp_batch", 1)
    seed = as_integer(seed, "seed", 0, 2**64 - 1)
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"data must be a tensor [N, d], got {tuple(data.shape)}")
        data_cpu = data.detach().cpu()
        box_src = data_cpu
    elif callable(data):
        data_cpu = data
        box_src = data(4096, seed=seed).cpu()
    else:
        raise TypeError("data must be a tensor [N, d] or a sampler fn(n, seed=...)")
    if not bool(torch.isfinite(box_src).all()):       # one NaN row turns every weight NaN, silently
        raise ValueError("data contain NaN or inf" + ("" if isinstance(data, torch.Tensor) else
                                                      " (in a draw of 4096 points from the sampler)"))
    d = box_src.shape[1]
    if fp_weight:
        if fp_box is None:
            lo, hi = box_src.min(0).values.double() - 1, box_src.max(0).values.double() + 1
            fp_box = list(zip(lo.tolist(), hi.tolist(), strict=True))
        fp_lo = torch.tensor([float(a) for a, _ in fp_box], dtype=torch.float64)
        fp_hi = torch.tensor([float(b) for _, b in fp_box], dtype=torch.float64)
        if fp_lo.numel() != d:
            raise ValueError(f"fp_box must give (lo, hi) for each of the {d} dimensions")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = None
    if lr_final is not None:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=float(lr_final))
    loss_fn = LOSSES[loss]
    fn = (lambda x, t: model.score(x, t, create_graph=True)) if potential else model
    kw = {"weight": weight} if loss == "cem" else {}
    result = TrainResult(model=model, loss=loss, settings=dict(
        iters=iters, batch_size=batch_size, lr=lr, lr_final=lr_final, t_min=t_min, t_dist=t_dist,
        fp_weight=float(fp_weight), fp_batch=fp_batch, seed=seed, process=repr(process)))
    bar = _bar(iters, progress, f"train {loss}" + (f" w_R={fp_weight:g}" if fp_weight else ""))
    t0 = time.perf_counter()
    model.train()
    for step in range(iters):
        x0 = _draw_data(data_cpu, batch_size, gen, step, seed, dtype).to(device)
        t = sample_times(batch_size, process, t_min, t_dist, gen).to(device=device, dtype=dtype)
        z = torch.randn(batch_size, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        main = loss_fn(fn, x0, t, z, process, **kw)
        total = main
        if fp_weight:
            tc = sample_times(fp_batch, process, t_min, "uniform", gen)
            xc = fp_lo + (fp_hi - fp_lo) * torch.rand(fp_batch, d, generator=gen, dtype=torch.float64)
            R = fp_residual(model, xc.to(device=device, dtype=dtype), tc.to(device=device, dtype=dtype), process)
            r2 = (R * R).mean()
            total = main + float(fp_weight) * r2
            result.fp_residuals.append(float(r2.detach()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
        opt.step()
        if sched is not None:
            sched.step()
        result.losses.append(float(total.detach()))
        result.diffusion_losses.append(float(main.detach()))
        if (step + 1) % log_every == 0 or step + 1 == iters:
            recent = sum(result.losses[-log_every:]) / len(result.losses[-log_every:])
            info = {"step": step + 1, "loss": recent}
            if fp_weight:
                recent = result.fp_residuals[-log_every:]
                info["fp_residual"] = sum(recent) / len(recent)
            bar.status(info)
            if callback is not None:
                callback(info)
        bar.update()
    bar.close()
    model.eval()
    result.seconds = time.perf_counter() - t0
    return result


class _bar:
    """tqdm when installed, else a line on stderr at each status; nothing when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.enabled, self.tqdm = bool(enabled), None
        if self.enabled:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm(total=total, desc=desc, unit="it", leave=False)
            except ImportError:
                self.tqdm = None
        self.desc, self.total = desc, total

    def status(self, info: dict):
        if not self.enabled:
            return
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items() if k != "step")
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(text)
        else:
            print(f"{self.desc}: {info['step']}/{self.total} {text}", file=sys.stderr)

    def update(self):
        if self.tqdm is not None:
            self.tqdm.update(1)

    def close(self):
        if self.tqdm is not None:
            self.tqdm.close()
