"""A diffusers scheduler running fastdiff's method tables: `FastdiffScheduler` (needs `pip install diffusers`).

    from fastdiff.diffusers import FastdiffScheduler
    pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config, method="dpmpp_2m")

It reads the pipeline's training schedule (betas, prediction_type, timestep spacing) from the config and runs
any method of fastdiff.methods on diffusers' discrete VP schedule: x_t = α_t x_0 + σ_t ε with σ̃ = σ_t/α_t =
√((1 − ᾱ_t)/ᾱ_t) and α_t = (1 + σ̃²)^(−1/2), so a step is k-diffusion's step on the σ̃-grid lifted by x = α x̃
(MATH.md §3b). The model output (epsilon, v_prediction or sample) is turned into D = x̂_0 at each call.

With method="dpmpp_2m" it is DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2): first
order on the first step and (lower_order_final, or final_sigmas_type="zero") on the last. It is not bit-exact:
diffusers forms every coefficient as a float32 tensor from float32 σ's (α_t, σ_t, λ_t, e^{−h} all rounded in
float32), while fastdiff forms each in float64 once and rounds only the final coefficient, so the two differ by
float32 coefficient rounding (measured ~1e-7 relative after 10 steps of a UNet; tested ≤ 1e-6).

Two-stage methods (heun, dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde) evaluate the model twice per
step, as diffusers' HeunDiscreteScheduler does: `timesteps` holds both evaluation times of each step (the
second one fractional where its σ̃ is between training timesteps) and `order` is 2. Churn (s_churn) is not
offered here: it adds noise before the model call, which a scheduler's step() cannot do for the first step
(use fastdiff.k_diffusion for it).

Noise (ancestral and SDE methods) follows fastdiff's counter-based contract: row i of the batch is sample i,
its noise at step k depends only on (seed, i, k) (batch-invariant). The seed is the config's `seed` if set;
else one 64-bit seed drawn from the `generator` given to the first step() of a run (a list of generators gives
each row its own seed, with sample index 0); else one drawn from torch's default generator.
"""
from __future__ import annotations

import math

import numpy as np
import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
except ImportError as exc:          # an optional extra: say which one
    raise ImportError("fastdiff.diffusers needs diffusers: pip install 'fastdiff[diffusers]' "
                      "(or pip install diffusers)") from exc

from . import methods as _m

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# methods whose history is past D's, so a first-order step is the row collapsed onto D_0 (its B's sum to E)
_D_HISTORY = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")


def _log_alpha_vp(sigma_tilde: torch.Tensor) -> torch.Tensor:
    """log α of diffusers' VP schedules at σ̃ = σ/α: α = (1 + σ̃²)^(−1/2)."""
    return -0.5 * torch.log1p(sigma_tilde * sigma_tilde)


class FastdiffScheduler(SchedulerMixin, ConfigMixin):
    """diffusers scheduler for every fastdiff method (`method` config key; see fastdiff.methods.NEW_METHODS).

    Config keys: the training schedule as diffusers' DPMSolverMultistepScheduler names it (num_train_timesteps,
    beta_start, beta_end, beta_schedule, trained_betas, prediction_type, timestep_spacing, steps_offset,
    use_karras_sigmas, final_sigmas_type, lower_order_final), plus method, its options (eta, s_noise,
    solver_type, lms_order (k-diffusion's `order` of sample_lms), r; None = k-diffusion's default), seed, and
    diffusers_rounding (dpmpp_2m only: form the coefficients in float32 as DPMSolverMultistepScheduler does,
    for results within float32 op rounding of it; default False: exact float64 coefficients).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = False,
                 final_sigmas_type: str = "zero", lower_order_final: bool = True, method: str = "dpmpp_2m",
                 eta: float | None = None, s_noise: float | None = None, solver_type: str | None = None,
                 lms_order: int | None = None, r: float | None = None, seed: int | None = None,
                 diffusers_rounding: bool = False):
        if method not in _m.NEW_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, _m.NEW_METHODS))}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
        if diffusers_rounding and method != "dpmpp_2m":
            raise ValueError(f"diffusers_rounding reproduces DPMSolverMultistepScheduler's float32 coefficients: "
                             f"it needs method='dpmpp_2m', got {method!r}")
        self._options = _m.method_options(method, **self._method_kwargs())      # checked now, not at step()
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.init_noise_sigma = 1.0
        self.order = 2 if method in _m.TWO_STAGE_METHODS else 1
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    def _method_kwargs(self) -> dict:
        names = {"eta": "eta", "s_noise": "s_noise", "solver_type": "solver_type", "lms_order": "order", "r": "r"}
        allowed = _m.METHOD_OPTIONS[self.config.method]
        given = {opt: getattr(self.config, key) for key, opt in names.items() if getattr(self.config, key) is not None}
        extra = sorted(set(given) - set(allowed))
        if extra:
            raise ValueError(f"method {self.config.method!r} takes no option {', '.join(extra)}")
        return given

    # ------------------------------------------------------------------------------------ the schedule

    @property
    def step_index(self):
        """The index into `timesteps` of the next model call (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the run at timesteps[begin_index] (img2img); it must be a step's first model call."""
        self._begin_index = int(begin_index)

    def _train_sigmas(self) -> np.ndarray:
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None):
        """Build the grid (as DPMSolverMultistepScheduler does) and the method's table on it, once."""
        n_train = self.config.num_train_timesteps
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            grid = np.asarray(sigmas, dtype=np.float64)
            steps_t = _sigma_to_t(grid, log_sigmas)
        elif timesteps is not None:          # integers, or fractional ones (HeunDiscreteScheduler's spacing)
            steps_t = np.asarray(timesteps, dtype=np.float64)
            if np.all(steps_t == np.round(steps_t)):
                steps_t = steps_t.astype(np.int64)
            grid = np.interp(steps_t, np.arange(0, len(train_sigmas)), train_sigmas)
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            steps_t = _spaced_timesteps(int(num_inference_steps), n_train, self.config.timestep_spacing,
                                        self.config.steps_offset)
            grid = np.interp(steps_t, np.arange(0, len(train_sigmas)), train_sigmas)
            if self.config.use_karras_sigmas:
                grid = _karras(float(train_sigmas[-1]), float(train_sigmas[0]), int(num_inference_steps))
                steps_t = np.array([_sigma_to_t(s, log_sigmas) for s in grid]).round()
        last = train_sigmas[0] if self.config.final_sigmas_type == "sigma_min" else 0.0
        # float32 like diffusers' own σ's, so both schedulers run the same grid
        full = np.concatenate([grid, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(full)
        self._grid_t = steps_t
        self._log_sigmas = log_sigmas
        self._device = device
        self.num_inference_steps = len(steps_t)
        self._build(0)
        self._step_index = None
        self._begin_index = None

    def _build(self, start: int):
        """The table on sigmas[start:] (a run begun at step `start` has no history before it) and the call plan."""
        sig = self.sigmas[start:]
        # Karras σ's with final_sigmas_type="sigma_min" end on a repeated σ: diffusers' last step is then h = 0,
        # an identity step (the model is still called); the table covers the steps before it
        self._identity_last = len(sig) > 2 and float(sig[-1]) == float(sig[-2])
        if self._identity_last:
            sig = sig[:-1]
        table = _m.sigma_table(sig.double(), self.config.method, log_alpha=_log_alpha_vp, **self._options)
        K = len(table)
        # diffusers' lower_order_final acts on its last call, which is the identity step when there is one
        if self.config.method in _D_HISTORY and K > 1 and not self._identity_last and (
                self.config.final_sigmas_type == "zero" or (self.config.lower_order_final and K < 15)):
            table = _first_order_last_step(table)
        self._rounded = None
        if self.config.diffusers_rounding:
            table, self._rounded = _diffusers_rounded_2m(table, self.sigmas[start:])
        self._table, self._start = table, start
        c = table.lists()
        self._plan, ts = [], []
        for k in range(K):
            self._plan.append((k, 0))
            ts.append(float(self._grid_t[start + k]))
            if c["staged"][k]:
                self._plan.append((k, 1))
                on_grid = start + k + 1 < len(self._grid_t) and c["t_u"][k] == float(sig[k + 1])
                # a stage at the next grid level (heun) is called at that level's own timestep
                ts.append(float(self._grid_t[start + k + 1]) if on_grid else
                          float(_sigma_to_t(np.array(c["t_u"][k]), self._log_sigmas)))
        if self._identity_last:
            self._plan.append((K, 0))
            ts.append(float(self._grid_t[start + K]))
        if start == 0:
            self.timesteps = _as_timesteps(ts, self._device)
        self._hist, self._pending, self._noise = [], None, None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model sees the sample itself (diffusers' VP convention): nothing to scale."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """α_t x_0 + σ_t ε at (possibly fractional) training timesteps."""
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1).numpy()
        s = np.interp(t, np.arange(0, self.config.num_train_timesteps), self._train_sigmas().astype(np.float64))
        alpha = torch.tensor(1 / np.sqrt(1 + s * s), dtype=original_samples.dtype, device=original_samples.device)
        sig = torch.tensor(s / np.sqrt(1 + s * s), dtype=original_samples.dtype, device=original_samples.device)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        return alpha.reshape(shape) * original_samples + sig.reshape(shape) * noise

    # ------------------------------------------------------------------------------------------ step

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            index = self._begin_index
        else:
            hits = (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).nonzero()
            index = int(hits[0]) if len(hits) else 0
        if index >= len(self._plan) or self._plan[index][1] != 0:
            raise ValueError(f"a run must begin at a step's first model call; timesteps[{index}] is not one")
        k = self._plan[index][0]
        if k:
            plan = self._plan
            self._build(k)
            self._offset_plan = plan
        self._step_index = index

    def _resolve_seed(self, generator, batch: int):
        if self.config.seed is not None:
            return [int(self.config.seed)], False
        gens = generator if isinstance(generator, list) else [generator]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: a list must have one generator per row ({batch}), got {len(generator)}")
        seeds = [int(torch.randint(0, 2**63 - 1, (), generator=g, device=g.device if g is not None else "cpu"))
                 for g in gens]
        return seeds, isinstance(generator, list)

    def _draw(self, k: int, kind: str, like: torch.Tensor, generator) -> torch.Tensor:
        if self._noise is None:
            self._noise = self._resolve_seed(generator, like.shape[0])
        seeds, per_row = self._noise
        k_global = self._start + k
        step = {"churn": _m.CHURN_STEP_BASE + k_global, "stage": _m.STAGE_STEP_BASE + k_global, "step": k_global}[kind]
        if per_row:
            return torch.cat([_m.kernel_normal(s, 0, step, like[i:i + 1]) for i, s in enumerate(seeds)])
        return _m.kernel_normal(seeds[0], 0, step, like)

    def _to_denoised(self, model_output, sample, sigma_tilde: float):
        """x̂_0 from the model output at σ̃, formed as diffusers forms it (α_t, σ_t rounded in the sample's dtype
        from σ̃): in float32 at high σ̃ this conversion amplifies rounding by 1/α_t (~150 at t = 999), so forming
        it differently from diffusers would by itself move results by ~1e-5."""
        p = self.config.prediction_type
        if p == "sample":
            return model_output
        s = torch.tensor(sigma_tilde, dtype=sample.dtype)
        alpha = 1 / ((s ** 2 + 1) ** 0.5)
        sigma = s * alpha
        if p == "epsilon":
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One model call's update: returns the next state the model is called on (or the final sample)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index - self._plan_offset() >= len(self._plan):
            raise ValueError("step called after the last timestep; call set_timesteps to start a new run")
        k, stage = self._plan[self._step_index - self._plan_offset()]
        if k == len(self._table):                        # the repeated-σ identity step
            self._step_index += 1
            out = sample.to(model_output.dtype)
            return SchedulerOutput(prev_sample=out) if return_dict else (out,)
        c = self._table.lists()
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32     # as diffusers: upcast
        x = sample.to(dtype)
        D = self._to_denoised(model_output.to(dtype), x, c["t_u"][k] if stage else c["t"][k])
        if stage == 0:
            out = self._first_call(k, x, D, c, generator)
        else:
            out = self._second_call(k, D, c, generator)
        self._step_index += 1
        out = out.to(model_output.dtype)
        return SchedulerOutput(prev_sample=out) if return_dict else (out,)

    def _plan_offset(self) -> int:
        """Index in `timesteps` of the current plan's first call (non-zero for a run begun mid-schedule)."""
        if self._start == 0:
            return 0
        return next(i for i, (k, s) in enumerate(self._offset_plan) if k == self._start and s == 0)

    def _first_call(self, k, x, D0, c, generator):
        if c["staged"][k]:
            u = torch.mul(x, c["a_u"][k]).add_(D0, alpha=c["b_u"][k])
            if c["c_u"][k] != 0.0:
                u.add_(self._draw(k, "stage", x, generator), alpha=c["c_u"][k])
            self._pending = (x, D0)
            return u
        return self._finish(k, x, D0, None, c, generator)

    def _second_call(self, k, D1, c, generator):
        x, D0 = self._pending
        self._pending = None
        return self._finish(k, x, D0, D1, c, generator)

    def _finish(self, k, x, D0, D1, c, generator):
        """x' = A x + B₀ D_0 + Σ B₋ⱼ H₋ⱼ + B_1 D_1 + C z (fastdiff.methods.run_table's operations)."""
        if self._rounded is not None:                    # diffusers' expression, operation for operation
            A, q, half_q, inv_r0 = self._rounded[k]
            out = x * A - D0 * q
            if inv_r0 is not None:
                out = out - ((D0 - self._hist[0]) * inv_r0) * half_q
            self._hist = [D0]
            return out
        out = torch.mul(x, c["A"][k])
        if self.config.method in _D_HISTORY:
            # B₀ D_0 + Σ B₋ⱼ D₋ⱼ = (Σ B) D_0 + Σ B₋ⱼ (D₋ⱼ − D_0): the first-order step plus small corrections,
            # the association diffusers' DPM-Solver++ uses (so float32 rounding falls alike)
            out.add_(D0, alpha=sum(c["B"][k]))
            for j, Hj in enumerate(self._hist, start=1):
                if c["B"][k][j] != 0.0:
                    out.add_(Hj - D0, alpha=c["B"][k][j])
        else:
            out.add_(D0, alpha=c["B"][k][0])
            for j, Hj in enumerate(self._hist, start=1):
                if c["B"][k][j] != 0.0:
                    out.add_(Hj, alpha=c["B"][k][j])
        if D1 is not None:
            out.add_(D1, alpha=c["B1"][k])
        if c["C"][k] != 0.0:
            noise = self._draw(k, "step", x, generator)
            rho = c["rho"][k]
            if rho != 0.0:       # one Brownian path through the stage (dpmpp_sde), as fastdiff.methods.ContractNoise
                noise = noise.mul_(math.sqrt(1 - rho * rho)).add_(self._draw(k, "stage", x, generator), alpha=rho)
            out.add_(noise, alpha=c["C"][k])
        depth = self._table.history
        if depth:
            item = D0 if (c["hist_x"][k] == 0.0 and c["hist_d"][k] == 1.0) else \
                torch.add(torch.mul(x, c["hist_x"][k]), D0, alpha=c["hist_d"][k])
            self._hist = [item, *self._hist[: depth - 1]]
        return out

    def __len__(self):
        return self.config.num_train_timesteps


# ------------------------------------------------------------------------------ schedule helpers

def _betas(n, beta_start, beta_end, schedule, trained_betas) -> torch.Tensor:
    """diffusers' training betas (float32, the same values as its schedulers)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)
    raise ValueError(f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', got {schedule!r}")


def _spaced_timesteps(n: int, n_train: int, spacing: str, offset: int) -> np.ndarray:
    """diffusers' timestep spacings (Table 2 of Lin et al., 2023)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n_train // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    if spacing == "trailing":
        return np.arange(n_train, 0, -n_train / n).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _karras(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def _sigma_to_t(sigma, log_sigmas: np.ndarray):
    """diffusers' interpolation of a σ̃ to a (fractional) training timestep in log σ̃."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def _as_timesteps(ts, device) -> torch.Tensor:
    """Integer timesteps as int64 (what UNets and pipelines expect); fractional ones (stage calls) as float32."""
    if all(float(t).is_integer() for t in ts):
        return torch.tensor([int(t) for t in ts], dtype=torch.int64, device=device)
    return torch.tensor(ts, dtype=torch.float32, device=device)


def _diffusers_rounded_2m(table, sigmas32: torch.Tensor):
    """dpmpp_2m's coefficients as DPMSolverMultistepScheduler forms them: float32 tensor arithmetic on its float32
    σ's (α_t, σ_t, λ = log α − log σ, h, r all rounded in float32). Per step (A, q, ½q, 1/r₀ or None), used as
    x' = (A x − q D_0) − ½q·((D_0 − D₋₁)·(1/r₀)), diffusers' own expression and order of operations; the
    table's A and B are set to the same values (B = [−q − c, c], c = ½q/r₀) so it still describes the step."""
    import dataclasses

    def alpha_sigma(s):
        a = 1 / ((s ** 2 + 1) ** 0.5)
        return a, s * a

    A, B = table.A.clone(), table.B.clone()
    steps = []
    for k in range(len(table)):
        (a_t, s_t), (a_0, s_0) = alpha_sigma(sigmas32[k + 1]), alpha_sigma(sigmas32[k])
        lam_t, lam_0 = torch.log(a_t) - torch.log(s_t), torch.log(a_0) - torch.log(s_0)
        h = lam_t - lam_0
        q = a_t * (torch.exp(-h) - 1.0)
        A[k] = float(s_t / s_0)
        if B.shape[1] < 2 or float(B[k, 1]) == 0.0:
            B[k, 0] = -float(q)
            steps.append((float(s_t / s_0), float(q), None, None))
        else:
            a_1, s_1 = alpha_sigma(sigmas32[k - 1])
            r0 = (lam_0 - (torch.log(a_1) - torch.log(s_1))) / h
            c = float(0.5 * q) * float(1.0 / r0)
            B[k, 0], B[k, 1] = -float(q) - c, c
            steps.append((float(s_t / s_0), float(q), float(0.5 * q), float(1.0 / r0)))
    return dataclasses.replace(table, A=A, B=B, _lists=None), steps


def _first_order_last_step(table):
    """The last step collapsed to first order (diffusers' lower_order_final): the history terms moved onto D_0,
    whose B's sum to the first-order weight E for methods with D history."""
    import dataclasses

    B = table.B.clone()
    B[-1, 0] = B[-1].sum()
    B[-1, 1:] = 0.0
    return dataclasses.replace(table, B=B, _lists=None)
