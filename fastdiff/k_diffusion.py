"""k-diffusion's samplers, drop-in: the same function names, arguments, defaults and callback dicts.

    import fastdiff.k_diffusion as K
    x = K.sample_dpmpp_2m(model, x, sigmas)          # was k_diffusion.sampling.sample_dpmpp_2m

model(x, sigma * s_in, **extra_args) is called exactly where k-diffusion calls it, and callback gets
{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}. Each step is one row of a float64 table built once from the
grid (fastdiff.methods, MATH.md §3b): with a `noise_sampler` and a float64 grid the results equal
k-diffusion's to float64 rounding (tested to 1e-12 relative against k_diffusion.sampling). On a float32 grid
(get_sigmas_karras's default) k-diffusion computes each step's coefficients (log, expm1, the ancestral split) in
float32, fastdiff in float64 from the same grid values: a float64 x then differs at float32's rounding (up to
~1e-6 relative), fastdiff's being the more accurate. noise_sampler is called at every step k-diffusion calls it,
also where its draw is multiplied by 0 (eta = 0, s_noise = 0), and may return a tensor that broadcasts to x.

The one intended difference: the noise when no `noise_sampler` is given. k-diffusion draws torch.randn_like(x)
(a BrownianTreeNoiseSampler for dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde), so a sample's noise depends on the
batch it is in. Here it follows fastdiff's counter-based contract (fastdiff.noise): row i of x is sample
sample_offset + i, and its noise depends only on (seed, that index, step), never on the batch size or device.
seed=None draws one seed in [0, 2⁶³ − 1) from torch's default generator, so torch.manual_seed still governs a
run (that draw is all these samplers take from torch's global generator; k-diffusion's draw from it at every
step); pass seed= (any integer in [0, 2⁶⁴)) to fix it. The step indices of each noise use are in
fastdiff.methods. euler, heun and dpm_2 take noise_sampler= too (k-diffusion uses randn_like for their churn
noise); it is called as noise_sampler(sigma, sigma_hat) for the churn noise of each step that churns.

The callback's tensors are for reading (previews, logs). Editing d['x'] or d['denoised'] in place is seen by
the step, but for euler, heun, dpm_2 and lms not as in k-diffusion, which forms those steps' derivative
(x − denoised)/σ before the callback, while here the whole step A x + B denoised is formed after it.

As in k-diffusion: a model output or noise of a wider dtype than x widens the run from there (x + d·dt
promotes: a float32 model on a float16 x returns float32); eta=None is η = 0 where k-diffusion's
get_ancestral_step makes it so; a model may return one output buffer at every call (each step uses D before the
next call), and every call gets an input tensor of its own; the churn window s_tmin ≤ σ ≤ s_tmax is compared in
the grid's dtype.

Also different on purpose: a one-step grid to 0 works for dpmpp_2m_sde and dpmpp_3m_sde (k-diffusion raises
UnboundLocalError); sigmas on a GPU are read back to the host once per call (k-diffusion reads them at
every step); a grid must decrease (k-diffusion also runs increasing grids); a list of σ's is read as float64;
eta < 0, s_noise < 0, s_churn < 0 and r outside (0, 1] are refused (k-diffusion runs them); None for an option
k-diffusion computes with raises TypeError naming it, as k-diffusion's arithmetic does (eta=None is η = 0
where k-diffusion makes it so, see above).
Not provided (module __getattr__ says why): sample_dpm_fast, sample_dpm_adaptive and their DPMSolver and
PIDStepSizeController (adaptive, not table methods), log_likelihood, and the Brownian-tree noise samplers.
"""
from __future__ import annotations

import math

import torch

from . import methods as _m
from ._checks import MAX_SAMPLES, MAX_SEED, as_real, check_int

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
    "get_sigmas_vp", "append_zero", "to_d", "get_ancestral_step", "default_noise_sampler",
    "linear_multistep_coeff",
]

# k-diffusion names this module does not provide, and why (module __getattr__ says so instead of a bare
# AttributeError)
_NOT_PROVIDED = {
    "sample_dpm_fast": "an adaptive-order method, not a table of steps",
    "sample_dpm_adaptive": "an adaptive step-size method, not a table of steps",
    "DPMSolver": "the class behind sample_dpm_fast/sample_dpm_adaptive",
    "PIDStepSizeController": "sample_dpm_adaptive's step-size controller",
    "log_likelihood": "an ODE log-likelihood, not a sampler",
    "BrownianTreeNoiseSampler": "k-diffusion's Brownian-tree noise; without a noise_sampler the samplers here draw "
                                "fastdiff's batch-independent noise (seed=)",
    "BatchedBrownianTree": "the tree behind BrownianTreeNoiseSampler",
}


def __getattr__(name):
    if name in _NOT_PROVIDED:
        raise AttributeError(f"fastdiff.k_diffusion does not provide {name} ({_NOT_PROVIDED[name]}); import it from "
                             f"k_diffusion.sampling if you need it (a k-diffusion noise sampler can be passed as "
                             f"noise_sampler= to the samplers here)")
    raise AttributeError(f"module 'fastdiff.k_diffusion' has no attribute {name!r}")


# ----------------------------------------------------------------------------- k-diffusion's grid helpers

def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Constructs the noise schedule of Karras et al. (2022) (as k-diffusion does)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Constructs an exponential noise schedule."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """Constructs an polynomial in log sigma noise schedule."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """Constructs a continuous VP noise schedule."""
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas)


def to_d(x, sigma, denoised):
    """Converts a denoiser output to a Karras ODE derivative."""
    if sigma.ndim > x.ndim:
        raise ValueError(f'input has {sigma.ndim} dims but target_dims is {x.ndim}, which is less')
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def default_noise_sampler(x):
    """k-diffusion's noise sampler: torch.randn_like(x) at every call (noise that depends on the batch)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def linear_multistep_coeff(order, t, i, j):
    """∫ from t[i] to t[i + 1] of the Lagrange basis polynomial j on the nodes t[i], t[i − 1], …, t[i − order + 1]
    (the coefficient of the j-th most recent derivative in sample_lms); exact, where k-diffusion uses scipy's
    adaptive quad."""
    if order - 1 > i:
        raise ValueError(f'Order {order} too high for step {i}')
    if not 0 <= j < order:
        raise ValueError(f'j must index one of the {order} nodes (0 <= j < order), got {j}')
    return _m._lms_coefficients([float(v) for v in t], i, order)[j]


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


# ----------------------------------------------------------------------------------------- the runner

def _check_x(x):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise TypeError(f"x must be a floating tensor [batch, ...], got "
                        f"{getattr(x, 'dtype', None) or type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")


def _resolve_seed(seed, table) -> int:
    if seed is not None:
        return check_int(seed, "seed", 0, MAX_SEED)
    needs_noise = any(bool((col != 0).any()) for col in (table.C, table.C_churn, table.c_u))
    # from torch's default (CPU) generator, so torch.manual_seed governs the run as it does k-diffusion's
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if needs_noise else 0


def _progress(total, disable):
    if disable:
        return None, None
    try:
        from tqdm.auto import tqdm
    except ImportError:             # tqdm is optional (the `progress` extra): no bar, same results
        return None, None
    bar = tqdm(total=total, disable=disable)
    return bar, (lambda k: bar.update())


def _run(method, model, x, sigmas, extra_args, callback, disable, noise_sampler, seed, sample_offset,
         noise_args=None, **options):
    """Run `method` on k-diffusion's σ-grid `sigmas` (read back to the host once)."""
    _check_x(x)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable as noise_sampler(sigma, sigma_next), got "
                        f"{type(noise_sampler).__name__}")
    if not isinstance(sigmas, torch.Tensor):               # a list or array: float64, not torch's default float32
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64 if isinstance(sigmas, (list, tuple)) else None)
    for name, value in options.items():
        _required(value, name)                             # k-diffusion computes with each of them (and fails)
    if sigmas.shape == (1,):
        return x                                           # no steps: k-diffusion's loop returns x as given
    host = _m._check_sigmas(sigmas)                        # the call's one read-back of the grid
    for bound in ("s_tmin", "s_tmax"):
        if bound in options:
            options[bound] = _in_dtype(options[bound], bound, sigmas.dtype)
    table = _m.sigma_table(host, method, **options)
    gammas = _gammas(host.tolist(), options) if options.get("s_churn") else None
    extra_args = {} if extra_args is None else extra_args
    c = table.lists()
    s_in = x.new_ones([x.shape[0]])

    model_dtype = [x.dtype]

    def denoise(xk, k, stage):
        out = model(xk, s_in * (c["t_u"][k] if stage else c["t"][k]), **extra_args)
        # a wider floating output widens the run (run_table's promote, as x + d·dt does in k-diffusion)
        out = _like(out, xk, "model must return the denoised x")
        model_dtype[0] = out.dtype
        return out

    if noise_sampler is None:
        offset = check_int(sample_offset, "sample_offset", 0, MAX_SAMPLES)
        if offset + x.shape[0] >= MAX_SAMPLES:
            raise ValueError(f"sample_offset + the batch size must be < 2**63 (global sample indices are int64), "
                             f"got sample_offset={offset} with a batch of {x.shape[0]}")
        noise = _m.ContractNoise(table, _resolve_seed(seed, table), offset, x.shape[0], x.device, kernels=True)
    else:
        args = noise_args(sigmas) if noise_args is not None else None

        def noise(k, kind, like):
            if kind == "churn":
                a, b = sigmas[k], sigmas[k] * (gammas[k] + 1)
            elif args is not None:
                a, b = args(k, kind)
            else:
                a, b = sigmas[k], sigmas[k + 1]
            return _like(noise_sampler(a, b), like, "noise_sampler must return")

    cb = None
    if callback is not None:
        def cb(k, xk, D0):
            sigma_hat = sigmas[k] * (gammas[k] + 1) if gammas is not None and gammas[k] > 0 else sigmas[k]
            callback({'x': xk, 'i': k, 'sigma': sigmas[k], 'sigma_hat': sigma_hat, 'denoised': D0})

    calls = _noise_calls(method, host, table, options, gammas) if noise_sampler is not None else frozenset()
    bar, progress = _progress(len(table), disable)
    try:
        with torch.no_grad():
            out = _m.run_table(table, denoise, x, noise, cb, progress, promote=True, noise_calls=calls)
    finally:
        if bar is not None:
            bar.close()
    if method in ("dpmpp_2m_sde", "dpmpp_3m_sde") and float(host[-1]) == 0.0:
        out = out.to(model_dtype[0])       # k-diffusion's last step is x = denoised: the model's dtype
    return out


def _like(v, like, what):
    """v as a tensor of like's shape (a broadcastable one expanded, as k-diffusion's arithmetic broadcasts)."""
    ok = isinstance(v, torch.Tensor) and v.is_floating_point() and v.device == like.device
    if ok and v.shape != like.shape:
        try:
            ok = torch.broadcast_shapes(v.shape, like.shape) == like.shape
        except RuntimeError:
            ok = False
        if ok:
            v = v.expand(like.shape)
    if not ok:
        raise TypeError(f"{what} a floating tensor like x ({tuple(like.shape)} on {like.device}, or one that "
                        f"broadcasts to it), got {_describe(v)}")
    return v


def _noise_calls(method, host, table, options, gammas):
    """The (step, kind) pairs at which k-diffusion calls its noise_sampler even where the draw is multiplied by 0
    (eta = 0 in the ancestral samplers and dpmpp_sde, s_noise = 0 anywhere): a stateful noise sampler shared
    with a later call then sees the same calls as under k-diffusion. The churn noise (a fastdiff extension for
    euler, heun and dpm_2) is called wherever a step churns."""
    K = len(host) - 1
    nonzero = [float(host[k + 1]) > 0 for k in range(K)]
    if method in ("euler_ancestral", "dpmpp_2s_ancestral"):
        return frozenset((k, "step") for k in range(K) if nonzero[k])
    if method == "dpm_2_ancestral":                 # its noise comes with the DPM-Solver-2 branch (σ_down > 0)
        staged = table.lists()["staged"]
        return frozenset((k, "step") for k in range(K) if staged[k])
    if method == "dpmpp_sde":
        return frozenset((k, kind) for k in range(K) if nonzero[k] for kind in ("stage", "step"))
    if method in ("dpmpp_2m_sde", "dpmpp_3m_sde"):  # `if eta:` in k-diffusion
        return frozenset((k, "step") for k in range(K) if nonzero[k] and options["eta"])
    if gammas is not None:
        return frozenset((k, "churn") for k in range(K) if gammas[k] > 0)
    return frozenset()


def _describe(v):
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    return type(v).__name__


def _in_dtype(bound, name, dtype):
    """A churn bound rounded to the grid's dtype: k-diffusion tests s_tmin <= sigmas[i] <= s_tmax on the grid's
    tensor, which rounds the bound, so a bound equal to a float32 grid value churns there as in k-diffusion."""
    v = as_real(bound, name)
    # an integer grid compares in torch's default dtype (an int tensor against a Python float promotes so)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    return v if dtype == torch.float64 else torch.tensor(v, dtype=dtype).item()


def _gammas(sl, options):
    """k-diffusion's churn γ per step (the callback's sigma_hat and the churn noise's arguments)."""
    o = _m.method_options("edm_euler", **{k: options[k] for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")})
    K = len(sl) - 1
    return [min(o["s_churn"] / K, 2 ** 0.5 - 1) if o["s_tmin"] <= sl[i] <= o["s_tmax"] else 0. for i in range(K)]


def _churn_run(method, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
               noise_sampler, seed, sample_offset):
    return _run(method, model, x, sigmas, extra_args, callback, disable, noise_sampler, seed, sample_offset,
                s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


# --------------------------------------------------------------------------------------- the samplers

def _ancestral_eta(eta):
    """eta=None is η = 0 where k-diffusion tests `if not eta` (get_ancestral_step), not the default η = 1."""
    return 0.0 if eta is None else eta


def _required(value, name):
    """None where k-diffusion computes with the value (and fails): refused, not replaced by the default."""
    if value is None:
        raise TypeError(f"{name} must be a number, got None")
    return value


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, noise_sampler=None, seed=None, sample_offset=0):
    """Algorithm 2 (Euler steps) of Karras et al. (2022): fastdiff method "edm_euler"."""
    return _churn_run("edm_euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                      s_noise, noise_sampler, seed, sample_offset)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, seed=None, sample_offset=0):
    """Ancestral sampling with Euler method steps: fastdiff method "euler_ancestral"."""
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=_ancestral_eta(eta), s_noise=s_noise)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., *, noise_sampler=None, seed=None, sample_offset=0):
    """Algorithm 2 (Heun steps) of Karras et al. (2022): fastdiff method "heun"."""
    return _churn_run("heun", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                      s_noise, noise_sampler, seed, sample_offset)


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, noise_sampler=None, seed=None, sample_offset=0):
    """DPM-Solver-2 steps with Karras et al.'s churn: fastdiff method "dpm_2"."""
    return _churn_run("dpm_2", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                      s_noise, noise_sampler, seed, sample_offset)


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, seed=None, sample_offset=0):
    """Ancestral sampling with DPM-Solver second-order steps: fastdiff method "dpm_2_ancestral"."""
    return _run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=_ancestral_eta(eta), s_noise=s_noise)


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep in σ (coefficients integrated exactly): fastdiff method "lms"."""
    return _run("lms", model, x, sigmas, extra_args, callback, disable, None, 0, 0, order=order)


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, seed=None, sample_offset=0):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps: fastdiff method "dpmpp_2s_ancestral"."""
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=_ancestral_eta(eta), s_noise=s_noise)


def _sde_noise_args(r):
    """noise_sampler's arguments in dpmpp_sde, computed from the caller's grid tensor exactly as k-diffusion
    does (a Brownian-tree sampler's value depends on their last bit); on the grid's device, no host read."""
    def make(sigmas):
        def args(k, kind):
            t, t_next = sigmas[k].log().neg(), sigmas[k + 1].log().neg()
            s = t + (t_next - t) * r
            return t.neg().exp(), (s if kind == "stage" else t_next).neg().exp()
        return args
    return make


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, seed=None, sample_offset=0):
    """DPM-Solver++ (stochastic): fastdiff method "dpmpp_sde". Without noise_sampler its two noises per step
    are the contract's pair with the Brownian path's correlation (fastdiff.methods)."""
    return _run("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed, sample_offset,
                noise_args=_sde_noise_args(r), eta=_ancestral_eta(eta), s_noise=s_noise, r=r)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): fastdiff method "dpmpp_2m"."""
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, None, 0, 0)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', *, seed=None, sample_offset=0):
    """DPM-Solver++(2M) SDE: fastdiff method "dpmpp_2m_sde"."""
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError('solver_type must be \'heun\' or \'midpoint\'')
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=_required(eta, "eta"), s_noise=s_noise, solver_type=solver_type)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, seed=None, sample_offset=0):
    """DPM-Solver++(3M) SDE: fastdiff method "dpmpp_3m_sde"."""
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=_required(eta, "eta"), s_noise=s_noise)
