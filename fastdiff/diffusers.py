"""A diffusers scheduler running fastdiff's method tables: `FastdiffScheduler` (needs `pip install diffusers`).

    from fastdiff.diffusers import FastdiffScheduler
    pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config, method="dpmpp_2m")

It reads the pipeline's training schedule (betas, prediction_type, timestep spacing) from the config and runs
any method of fastdiff.methods on diffusers' discrete VP schedule: x_t = α_t x_0 + σ_t ε with σ̃ = σ_t/α_t =
√((1 − ᾱ_t)/ᾱ_t) and α_t = (1 + σ̃²)^(−1/2), so a step is k-diffusion's step on the σ̃-grid lifted by x = α x̃
(MATH.md §3b). The model output (epsilon, v_prediction or sample) is turned into D = x̂_0 at each call.

With method="dpmpp_2m" it is DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2): first
order on the first step and (lower_order_final, euler_at_final or final_sigmas_type="zero") on the last. Not bit-exact:
diffusers forms every coefficient as a float32 tensor from float32 σ's (α_t, σ_t, λ_t, e^{−h} all rounded in
float32), while fastdiff forms each in float64 once and rounds only the final coefficient, so the two differ by
float32 coefficient rounding (measured ~1e-7 relative after 10 steps of a UNet; tested ≤ 1e-6; up to ~5e-6
on the beta grid, whose steps are large).

Two-stage methods (heun, dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde) evaluate the model twice per
step, as diffusers' HeunDiscreteScheduler does: `timesteps` holds both evaluation times of each step (the
second one fractional where its σ̃ is between training timesteps) and `order` is 2. Churn (s_churn) is not
offered here: it adds noise before the model call, which a scheduler's step() cannot do for the first step
(use fastdiff.k_diffusion for it).

Noise (ancestral and SDE methods) follows fastdiff's counter-based contract: row i of the batch is sample i,
its noise at step k depends only on (seed, i, k) (batch-invariant). The seed is the config's `seed` if set;
else one 63-bit seed (in [0, 2**63 − 1)) drawn from the `generator` given to the first step() of a run (a list
of generators gives each row its own seed, with sample index 0); else one drawn from torch's default generator.
A stock pipeline draws its latents from its generator before the first step(), by as much as the batch needs,
so only `seed` (or a list of generators) makes the noise independent of the batch size.
"""
from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping

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
# DPMSolverMultistepScheduler's (learned: the model also outputs variance channels, dropped here) and
# DDPMScheduler's (its own ancestral variance; nothing to do for these methods, as in DPMSolverMultistepScheduler)
# values DPMSolverMultistepScheduler accepts for the keys `method` supersedes
ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis")
SOLVER_TYPES = ("midpoint", "heun", "logrho", "bh1", "bh2")
# the config keys that make set_timesteps build its own σ̃ grid (diffusers' precedence: Karras, Lu, the others)
GRID_FLAGS = ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas")
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large",
                  "fixed_large_log")
# a method's own config keys: a FastdiffScheduler config switched to another method drops them
METHOD_KEYS = ("eta", "s_noise", "solver_type", "lms_order", "r", "diffusers_rounding")
# k-diffusion's option names that the scheduler does not take under that name (diffusers would drop them silently)
NOT_SCHEDULER_OPTIONS = {
    "s_churn": "churn is not offered by the scheduler (it adds noise before a step's first model call); use "
               "fastdiff.k_diffusion's samplers",
    "s_tmin": "churn's window; churn is not offered by the scheduler (use fastdiff.k_diffusion)",
    "s_tmax": "churn's window; churn is not offered by the scheduler (use fastdiff.k_diffusion)",
    "order": "the scheduler's key for sample_lms's order is lms_order",
}
# methods whose history is past D's, so a first-order step is the row collapsed onto D_0 (its B's sum to E)
_D_HISTORY = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde")
# float32 ulps within which a spaced grid's last σ̃ counts as σ_min repeated, for two-stage methods (see _build):
# the λ grid's exp of float32 logs lands 1 ulp off σ_min, while a real last step is over 1e-3 relative (measured
# on every flagged grid up to 3000 steps), far outside 4 ulps (2.4e-7)
_ULPS_AT_SIGMA_MIN = 4


def _check_output(model_output, sample, variance_type):
    """model_output is the model's output for `sample` (its shape; with learned variance, extra channels)."""
    for name, v in (("model_output", model_output), ("sample", sample)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    mo, sa = tuple(model_output.shape), tuple(sample.shape)
    learned = variance_type in ("learned", "learned_range") and len(mo) > 1 and len(sa) > 1
    ok = mo == sa or (learned and len(mo) == len(sa) and mo[0] == sa[0] and mo[2:] == sa[2:] and mo[1] >= sa[1])
    if not ok:
        raise ValueError(f"model_output has shape {mo} but sample has shape {sa}: step() takes the model's output "
                         f"for this sample, row for row")


def _refuse_non_vp(config):
    """A flow-matching (FlowMatch*: `shift`) or EDM (EDM*, consistency models: `sigma_data`) scheduler's config:
    not diffusers' beta (VP) schedule this scheduler runs, so refused, naming what gave it away. So is an
    EulerDiscreteScheduler config with timestep_type='continuous' and v_prediction: its model is conditioned on
    c_noise = 0.25 log σ̃ (EDM's), not on the training timestep this scheduler passes."""
    name = str(config.get("_class_name") or "")
    key = next((k for k in ("shift", "sigma_data") if k in config), None)
    if name.startswith(("FlowMatch", "EDM")) or key is not None:
        what = f"{name}'s config" if name else f"a config with {key!r}"
        raise ValueError(f"{what} is a flow-matching or EDM schedule, not a beta (VP) schedule: FastdiffScheduler "
                         f"runs diffusers' VP schedules only (fastdiff.k_diffusion runs any σ grid)")
    # EulerDiscreteScheduler uses continuous timesteps only with v_prediction (else the integer ones, as here)
    if config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction":
        raise ValueError("timestep_type='continuous' (with prediction_type='v_prediction'): the model takes EDM's "
                         "continuous timestep 0.25·log σ̃, not a training timestep; FastdiffScheduler calls the model "
                         "with diffusers' VP training timesteps only (fastdiff.k_diffusion runs an EDM-style model)")


def _log_alpha_vp(sigma_tilde: torch.Tensor) -> torch.Tensor:
    """log α of diffusers' VP schedules at σ̃ = σ/α: α = (1 + σ̃²)^(−1/2)."""
    return -0.5 * torch.log1p(sigma_tilde * sigma_tilde)


class FastdiffScheduler(SchedulerMixin, ConfigMixin):
    """diffusers scheduler for every fastdiff method (`method` config key; see fastdiff.methods.NEW_METHODS).

    Config keys: DPMSolverMultistepScheduler's, so that from_config keeps a pipeline's schedule whole: the
    training schedule (num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
    rescale_betas_zero_snr), prediction_type (epsilon, v_prediction, sample) with variance_type (learned
    variance channels are dropped) and thresholding (dynamic_thresholding_ratio, sample_max_value), the grid
    (timestep_spacing, steps_offset, lambda_min_clipped, use_karras_sigmas, use_exponential_sigmas,
    use_beta_sigmas, use_lu_lambdas, final_sigmas_type) and the last step (lower_order_final, euler_at_final),
    all as diffusers applies them. Superseded by `method`: algorithm_type and solver_order (the source
    scheduler's own method), and solver_type except for dpmpp_2m_sde (fastdiff's dpmpp_2m is the midpoint 2M;
    solver_type='heun' with it is refused). Refused: flow matching (use_flow_sigmas, use_dynamic_shifting,
    prediction_type='flow_prediction'; flow_shift and time_shift_type only act with them), and an Euler config's
    timestep_type='continuous' with v_prediction (EDM's timestep input). An Euler config's sigma_min / sigma_max
    bound the Karras, exponential and beta grids, as in DPMSolverMultistepScheduler.

    fastdiff's own keys: method, its options (eta, s_noise, solver_type, lms_order (k-diffusion's `order` of
    sample_lms), r; None = k-diffusion's default; solver_type defaults to 'midpoint', k-diffusion's and
    DPMSolverMultistepScheduler's default, and None is stored as 'midpoint'), seed (an integer in [0, 2**64), a
    numpy integer included), and diffusers_rounding (dpmpp_2m only: form the
    coefficients in float32 as DPMSolverMultistepScheduler does, for results within float32 op rounding of it;
    default False: exact float64 coefficients).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers if not e.name.startswith("EDM")]   # VP schedules
    order = 1

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_config, with three checks it does not make: a flow-matching or EDM scheduler's config
        (or an Euler one with continuous v_prediction timesteps) is refused (it is not a beta schedule, and its keys
        would be dropped with at most a warning); a k-diffusion option name the scheduler does not take (s_churn,
        order, ...) is refused instead of ignored, as a keyword or as a config key (also from_pretrained's); and a
        new `method` given over a FastdiffScheduler's config drops the old method's options (eta, r, ...)."""
        if config is None and "pretrained_model_name_or_path" in kwargs:       # diffusers' deprecated forms
            config = kwargs.pop("pretrained_model_name_or_path")
        if isinstance(config, (str, os.PathLike)):
            config = cls.load_config(config)
        given = dict(kwargs)
        if isinstance(config, Mapping):
            _refuse_non_vp({**config, **kwargs})
            switched = "method" in kwargs and "method" in config and kwargs["method"] != config["method"]
            if switched:
                config = {k: v for k, v in config.items() if k not in METHOD_KEYS}
            # the config's keys are settings too (a mapping, or the scheduler_config.json from_pretrained read),
            # but not those the source scheduler left at their defaults, which diffusers drops itself
            defaults = set(config.get("_use_default_values") or ())
            given = {**{k: v for k, v in config.items() if k not in defaults}, **kwargs}
        for name, why in NOT_SCHEDULER_OPTIONS.items():
            if name in given:
                raise ValueError(f"{name}: {why}")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, use_karras_sigmas: bool = False,
                 final_sigmas_type: str = "zero", lower_order_final: bool = True, method: str = "dpmpp_2m",
                 eta: float | None = None, s_noise: float | None = None, solver_type: str = "midpoint",
                 lms_order: int | None = None, r: float | None = None, seed: int | None = None,
                 diffusers_rounding: bool = False,
                 # the rest of DPMSolverMultistepScheduler's keys, so that from_config keeps them (see SUPERSEDED)
                 solver_order: int = 2, algorithm_type: str = "dpmsolver++", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 euler_at_final: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 use_lu_lambdas: bool = False, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 lambda_min_clipped: float = -math.inf, variance_type: str | None = None,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        if method not in _m.NEW_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, _m.NEW_METHODS))}")
        if prediction_type == "flow_prediction" or use_flow_sigmas or use_dynamic_shifting:
            key = ("prediction_type='flow_prediction'" if prediction_type == "flow_prediction" else
                   "use_flow_sigmas=True" if use_flow_sigmas else "use_dynamic_shifting=True")
            raise ValueError(f"{key}: flow-matching schedules are not offered; FastdiffScheduler runs diffusers' "
                             f"VP (beta) schedules")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be None or one of {', '.join(VARIANCE_TYPES[1:])}, "
                             f"got {variance_type!r}")
        # as diffusers: one of these three; use_lu_lambdas may join them (precedence: Karras, Lu, the others)
        flags = {"use_karras_sigmas": use_karras_sigmas, "use_exponential_sigmas": use_exponential_sigmas,
                 "use_beta_sigmas": use_beta_sigmas}
        grids = [k for k, on in flags.items() if on]
        if len(grids) > 1:
            raise ValueError(f"only one of {', '.join(grids)} may be set")
        if algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type must be one of {', '.join(ALGORITHM_TYPES)} (superseded by method), "
                             f"got {algorithm_type!r}")
        if solver_type not in (None,) + SOLVER_TYPES:
            raise ValueError(f"solver_type must be None or one of {', '.join(SOLVER_TYPES)}, got {solver_type!r}")
        if solver_type is None:
            # stored as DPMSolverMultistepScheduler's default (the same variant): a saved null would make the config
            # unloadable by DPMSolverMultistep, UniPC, DEIS and DPMSolverSinglestep, which refuse None
            solver_type = "midpoint"
            self.register_to_config(solver_type=solver_type)
        if use_beta_sigmas:
            try:
                import scipy.stats  # noqa: F401
            except ImportError as exc:
                raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy)") from exc
        if thresholding and not 0 <= dynamic_thresholding_ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1] (a quantile), "
                             f"got {dynamic_thresholding_ratio}")
        if thresholding and not sample_max_value > 0:
            raise ValueError(f"sample_max_value must be > 0, got {sample_max_value}")
        if seed is not None:
            try:        # an int or a numpy integer (operator.index); not a bool, which would pass as 0 or 1
                as_int = None if isinstance(seed, (bool, np.bool_)) else operator.index(seed)
            except TypeError:
                as_int = None
            if as_int is None or not 0 <= as_int < 2**64:
                raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
            if type(seed) is not int:         # a plain int in the config, so that save_config can write it
                self.register_to_config(seed=as_int)
        if diffusers_rounding and method != "dpmpp_2m":
            raise ValueError(f"diffusers_rounding reproduces DPMSolverMultistepScheduler's float32 coefficients: "
                             f"it needs method='dpmpp_2m', got {method!r}")
        self._options = _m.method_options(method, **self._method_kwargs())      # checked now, not at step()
        self.betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = _rescale_zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0 ** -24      # as diffusers: near 0 so the first σ̃ (4096) is finite
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
        # solver_type is also DPMSolverMultistepScheduler's key (its 2M variant; default "midpoint"), so configs
        # converted from it carry one: fastdiff's dpmpp_2m is the midpoint variant, and methods that are not
        # DPM-Solver++ have no such choice (the source scheduler's choice of its own method, like algorithm_type)
        st = given.get("solver_type")
        if st is not None and "solver_type" not in allowed:
            if self.config.method == "dpmpp_2m" and st == "heun":
                raise ValueError("solver_type='heun': DPMSolverMultistepScheduler's heun variant of 2M is not "
                                 "offered; method 'dpmpp_2m' is its midpoint variant (pass solver_type='midpoint')")
            del given["solver_type"]
        elif st in ("logrho", "bh1", "bh2"):          # DEIS / UniPC names, which diffusers maps to midpoint
            given["solver_type"] = "midpoint"
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
        try:
            ok = not isinstance(begin_index, bool) and int(begin_index) == begin_index and begin_index >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"begin_index must be an integer >= 0, got {begin_index!r}")
        if self.num_inference_steps is not None and begin_index >= len(self.timesteps):
            raise ValueError(f"begin_index must be below len(timesteps) = {len(self.timesteps)}, got {begin_index}")
        self._begin_index = int(begin_index)

    def _train_sigmas(self) -> np.ndarray:
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def set_timesteps(self, num_inference_steps: int = None, device=None, timesteps=None, sigmas=None):
        """Build the grid (as DPMSolverMultistepScheduler does) and the method's table on it, once.

        `sigmas` (σ̃'s, decreasing): a list ending in 0, or in the config's final σ̃ (the training σ_min with
        final_sigmas_type="sigma_min"), is the whole grid, final σ̃ included, as EulerDiscreteScheduler and
        diffusers' AysSchedules take it: len(sigmas) − 1 steps. Any other list is the σ̃ of each step's first
        call, and the config's final σ̃ is appended (DPMSolverMultistepScheduler's convention): len(sigmas) steps.
        """
        n_train = self.config.num_train_timesteps
        if timesteps is not None and (sigmas is not None or num_inference_steps is not None):
            other = "sigmas" if sigmas is not None else "num_inference_steps"
            raise ValueError(f"pass one of num_inference_steps, timesteps and sigmas (as diffusers' schedulers "
                             f"refuse), got timesteps with {other}")
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        last = train_sigmas[0] if self.config.final_sigmas_type == "sigma_min" else 0.0
        whole = False           # the given sigmas hold the final σ̃ too
        if sigmas is not None:
            grid = np.asarray(sigmas, dtype=np.float64)
            if grid.ndim != 1 or len(grid) < 1:
                raise ValueError(f"sigmas must be a 1-d list of σ̃'s, got {sigmas!r}")
            # compared in float32, the precision the grid is kept in (a float32 σ_min read back as a float matches)
            whole = bool(grid[-1] == 0.0 or np.float32(grid[-1]) == np.float32(last))
            if whole:
                if len(grid) < 2:
                    raise ValueError(f"sigmas ending in the final σ̃ {float(grid[-1])!r} must hold at least one step "
                                     f"(two values), got {sigmas!r}")
                grid, last = grid[:-1], grid[-1]
            if num_inference_steps is not None and int(num_inference_steps) != len(grid):
                raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with the {len(grid)} steps of "
                                 f"the {len(sigmas)} sigmas given" + (" (the last is the final σ̃)" if whole else ""))
            steps_t = _sigma_to_t(grid, log_sigmas)
        elif timesteps is not None:          # integers, or fractional ones (HeunDiscreteScheduler's spacing)
            flags = self._grid_flags()
            if flags:                        # as diffusers: the grid flag would be silently ignored
                raise ValueError(f"timesteps= cannot be used with {flags[0]}=True (it makes its own grid)")
            steps_t = np.asarray(timesteps, dtype=np.float64)
            if steps_t.ndim != 1 or len(steps_t) < 1 or not np.all(np.diff(steps_t) < 0) or steps_t[0] > n_train - 1 \
                    or steps_t[-1] < 0:
                raise ValueError(f"timesteps must be strictly decreasing within [0, {n_train - 1}], got {timesteps!r}")
            if np.all(steps_t == np.round(steps_t)):
                steps_t = steps_t.astype(np.int64)
            grid = np.interp(steps_t, np.arange(0, len(train_sigmas)), train_sigmas)
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            n = int(num_inference_steps)
            grid, steps_t = self._spaced_grid(n, train_sigmas, log_sigmas)
        # float32 like diffusers' own σ's, so both schedulers run the same grid
        full = np.concatenate([grid, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(full)
        self._grid_t = steps_t
        self._spaced = sigmas is None and timesteps is None        # the grid is the config's, not the caller's
        self._log_sigmas = log_sigmas
        self._device = device
        self.num_inference_steps = len(steps_t)
        self._build(0)
        self._step_index = None
        self._begin_index = None

    def _grid_flags(self) -> list[str]:
        return [k for k in GRID_FLAGS if getattr(self.config, k)]

    def _spaced_grid(self, n: int, train_sigmas: np.ndarray, log_sigmas: np.ndarray):
        """(σ̃ grid, timesteps) of n steps as DPMSolverMultistepScheduler.set_timesteps forms them."""
        cfg = self.config
        if self._grid_flags():
            lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
            # as DPMSolverMultistepScheduler: a config's own sigma_min / sigma_max (an EulerDiscreteScheduler's,
            # kept by from_config) bound the Karras, exponential and beta grids when set (the λ grid ignores them)
            lo = lo if cfg.get("sigma_min") is None else float(cfg["sigma_min"])
            hi = hi if cfg.get("sigma_max") is None else float(cfg["sigma_max"])
            if cfg.use_karras_sigmas:
                grid = _karras(hi, lo, n)
            elif cfg.use_lu_lambdas:  # uniform in λ = −log σ̃ (Lu et al., 2022), from diffusers' float32 logs
                grid = np.exp(np.linspace(float(log_sigmas[-1]), float(log_sigmas[0]), n))
            elif cfg.use_exponential_sigmas:
                grid = np.exp(np.linspace(math.log(hi), math.log(lo), n))
            else:
                grid = _beta_grid(hi, lo, n)
            steps_t = _sigma_to_t(grid, log_sigmas)
            # diffusers rounds the Karras and Lu timesteps (not for the cosine schedule), then casts all to int64
            if (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and cfg.beta_schedule != "squaredcos_cap_v2":
                steps_t = steps_t.round()
            return grid, np.trunc(steps_t).astype(np.int64)
        n_train = cfg.num_train_timesteps
        # timesteps whose λ = log α − log σ is below lambda_min_clipped are left out (diffusers, for cosine)
        lam = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        last = n_train - int(torch.searchsorted(torch.flip(lam, [0]), torch.tensor(cfg.lambda_min_clipped,
                                                                                   dtype=lam.dtype)))
        if n > last and cfg.timestep_spacing != "trailing":       # trailing steps by n_train / n instead
            raise ValueError(f"num_inference_steps ({n}) must not exceed the number of training timesteps "
                             f"({last}{' after lambda_min_clipped' if last < n_train else ''})")
        steps_t = _spaced_timesteps(n, n_train, last, cfg.timestep_spacing, cfg.steps_offset)
        if np.any(np.diff(steps_t) >= 0):
            raise ValueError(f"num_inference_steps={n} repeats timesteps on the {cfg.timestep_spacing!r} spacing of "
                             f"{last} training timesteps; use fewer steps")
        return np.interp(steps_t, np.arange(0, len(train_sigmas)), train_sigmas), steps_t

    def _build(self, start: int):
        """The table on sigmas[start:] (a run begun at step `start` has no history before it) and the call plan."""
        sig = self.sigmas[start:]
        # Karras σ's with final_sigmas_type="sigma_min" end on a repeated σ: diffusers' last step is then h = 0,
        # an identity step (the model is still called); the table covers the steps before it
        # (Lu σ's are exp of float32 logs: the grid's last may round one ulp below σ_min, a step of h ≈ −1e-7 in
        # diffusers, taken here as that identity step; so is a config's sigma_min below the training σ_min, from
        # which diffusers steps back up to σ_min: a table's σ's only decrease)
        self._identity_last = len(sig) >= 2 and (float(sig[-1]) == float(sig[-2]) or (
            self._spaced and self.config.final_sigmas_type == "sigma_min" and float(sig[-1]) > float(sig[-2])))
        # ... or one ulp above it (SD's betas), a step of h ≈ 1e-7 that a two-stage method would spend two model
        # calls on: for those, a last grid σ within a few float32 ulps of σ_min is the repeated σ, so they make
        # 2n − 1 calls as on the Karras grid. Single-stage methods keep diffusers' tiny step (one call either way,
        # and diffusers_rounding stays bit for bit DPMSolverMultistepScheduler's run)
        if (len(sig) >= 2 and not self._identity_last and self._spaced and self._grid_flags()
                and self.config.final_sigmas_type == "sigma_min" and self.order == 2):
            ulp = float(np.spacing(np.float32(float(sig[-1]))))
            self._identity_last = abs(float(sig[-2]) - float(sig[-1])) <= _ULPS_AT_SIGMA_MIN * ulp
        if self._identity_last:
            sig = sig[:-1]
        if len(sig) >= 2:
            table = _m.sigma_table(sig.double(), self.config.method, log_alpha=_log_alpha_vp, **self._options)
        else:                               # a run begun at the identity step (img2img at a low strength)
            table = _no_steps(self.config.method, self._options)
        K = len(table)
        # diffusers' lower_order_final acts on its last call, which is the identity step when there is one; it
        # counts the whole schedule's calls (len(timesteps)), also in a run begun mid-schedule
        if self.config.method in _D_HISTORY and K > 1 and not self._identity_last and (
                self.config.final_sigmas_type == "zero" or self.config.euler_at_final or
                (self.config.lower_order_final and len(self._grid_t) < 15)):
            table = _first_order_last_step(table)
        self._rounded = None
        if self.config.diffusers_rounding and K:
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
            # the σ̃ of every call, indexed like timesteps (add_noise's, as diffusers' sigmas[step_index])
            self._call_sigmas = [c["t_u"][k] if stage else float(self.sigmas[k]) for k, stage in self._plan]
        self._hist, self._pending, self._noise = [], None, None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model sees the sample itself (diffusers' VP convention): nothing to scale."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """α_t x_0 + σ_t ε. After set_timesteps, with DPMSolverMultistepScheduler's precedence: without a
        begin_index, each row at the σ̃ of the call its timestep begins in `timesteps` (a two-stage method's
        fractional stage timestep: its stage's σ̃); with one (img2img, inpainting), every row at the σ̃ of the
        run's next model call (step_index, else begin_index; after a stage call, the stage's σ̃). That is not the
        training σ̃ at the timestep on grids off the training timesteps (Karras, exponential, beta, Lu); timesteps
        not in `timesteps`, and any before set_timesteps, are at the training σ̃ (interpolated for fractional ones).
        """
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
        train = np.interp(t.numpy(), np.arange(0, self.config.num_train_timesteps), self._train_sigmas())
        s = torch.tensor(train, dtype=torch.float64)
        if self.num_inference_steps is not None:
            plan = self._full_plan
            # diffusers: a begin_index means a pipeline that noises to the run's own position (its next call);
            # without one, the timesteps given are the positions (differential img2img, per-row timesteps)
            fixed = None if self._begin_index is None else \
                self._step_index if self._step_index is not None else self._begin_index
            for j, tj in enumerate(t.tolist()):
                i = fixed if fixed is not None else self._index_of(tj)
                if i is not None and i < len(plan):
                    s[j] = self._call_sigmas[i]
        # α and σ formed from σ̃ in the sample's dtype, as diffusers forms them; for a 16-bit sample in float32,
        # then rounded: σ̃² overflows float16 from σ̃ ≈ 256 (zero-terminal-SNR's σ̃ = 4096 would give α = σ = 0)
        dtype = original_samples.dtype
        s = s.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        alpha = 1 / ((s ** 2 + 1) ** 0.5)
        sig = s * alpha
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha, sig = (v.to(original_samples.device, dtype).reshape(shape) for v in (alpha, sig))
        return alpha * original_samples + sig * noise

    # ------------------------------------------------------------------------------------------ step

    def _init_step_index(self, timestep):
        if self._begin_index is not None:
            index = self._begin_index
        else:
            index = self._index_of(timestep)
            if index is None:
                raise ValueError(f"timestep {_show(timestep)} is not one of this schedule's timesteps; step() "
                                 f"must be called with the timesteps set_timesteps made (or use set_begin_index)")
        if index >= len(self._plan) or self._plan[index][1] != 0:
            raise ValueError(f"a run must begin at a step's first model call; timesteps[{index}] is not one")
        k = self._plan[index][0]
        if k:
            plan = self._plan
            self._build(k)
            self._offset_plan = plan
        self._step_index = index

    def _index_of(self, timestep):
        """The index in `timesteps` where a run at `timestep` begins (None if it is not there): a two-stage method
        may call the model twice at one timestep (a stage at the next grid level, then that step's first call),
        and a run begins at a step's first call."""
        hits = [int(i) for i in (self.timesteps.cpu() == torch.as_tensor(timestep).cpu()).reshape(-1).nonzero()]
        plan = self._full_plan
        firsts = [i for i in hits if plan[i][1] == 0]
        return firsts[0] if firsts else (hits[0] if hits else None)

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
        cfg = self.config
        p = cfg.prediction_type
        if cfg.variance_type in ("learned", "learned_range") and model_output.ndim > 1:
            # the model's extra variance channels: keep the mean's (diffusers keeps 3, i.e. RGB pixel models)
            model_output = model_output[:, : sample.shape[1]]
        if p == "sample":        # a copy: D_0 is kept for later calls, and a model may reuse its output buffer
            x0 = model_output.clone()
        else:
            s = torch.tensor(sigma_tilde, dtype=sample.dtype)
            alpha = 1 / ((s ** 2 + 1) ** 0.5)
            sigma = s * alpha
            x0 = (sample - sigma * model_output) / alpha if p == "epsilon" else alpha * sample - sigma * model_output
        if cfg.thresholding:
            x0 = _threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One model call's update: returns the next state the model is called on (or the final sample)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        _check_output(model_output, sample, self.config.variance_type)
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

    @property
    def _full_plan(self) -> list:
        """The plan of the whole run, indexed like `timesteps` (a run begun mid-schedule keeps it aside)."""
        return self._offset_plan if self._start else self._plan

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


def _spaced_timesteps(n: int, n_train: int, last: int, spacing: str, offset: int) -> np.ndarray:
    """diffusers' timestep spacings (Table 2 of Lin et al., 2023) over the first `last` training timesteps."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + offset
    if spacing == "trailing":
        return np.arange(last, 0, -n_train / n).round().copy().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _karras(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / 7.0), sigma_max ** (1 / 7.0)
    return (hi + ramp * (lo - hi)) ** 7.0


def _beta_grid(sigma_max: float, sigma_min: float, n: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """The beta-quantile grid of Lee et al. (2024), "Beta Sampling is All You Need", with diffusers' a = b = 0.6."""
    import scipy.stats
    q = scipy.stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return sigma_min + q * (sigma_max - sigma_min)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023), Algorithm 1: shift and scale √ᾱ so the last timestep has zero SNR and the first keeps
    its value (float32 operations in diffusers' order, so the schedule is the same)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root ** 2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def _threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al., 2022): per sample, s = the `ratio` quantile of |x̂_0| clamped to
    [1, max_value]; x̂_0 is clipped to [−s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(work, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def _sigma_to_t(sigma, log_sigmas: np.ndarray):
    """diffusers' interpolation of a σ̃ to a (fractional) training timestep in log σ̃."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def _show(t) -> str:
    return repr(t.item()) if isinstance(t, torch.Tensor) and t.numel() == 1 else repr(t)


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


def _no_steps(method, options):
    """A table of no steps (of `method`, for the history depth): a run whose only call is the identity step."""
    import dataclasses

    one = _m.sigma_table(torch.tensor([1.0, 0.0], dtype=torch.float64), method, log_alpha=_log_alpha_vp, **options)
    rows = {f.name: getattr(one, f.name)[:0] for f in dataclasses.fields(one)
            if isinstance(getattr(one, f.name), torch.Tensor) and f.name != "times"}
    return dataclasses.replace(one, times=one.times[:1], _lists=None, **rows)


def _first_order_last_step(table):
    """The last step collapsed to first order (diffusers' lower_order_final): the history terms moved onto D_0,
    whose B's sum to the first-order weight E for methods with D history."""
    import dataclasses

    B = table.B.clone()
    B[-1, 0] = B[-1].sum()
    B[-1, 1:] = 0.0
    return dataclasses.replace(table, B=B, _lists=None)
