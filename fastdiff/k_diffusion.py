"""k-diffusion's samplers, drop-in: the same function names, arguments, defaults and callback dicts.

    import fastdiff.k_diffusion as K
    x = K.sample_dpmpp_2m(model, x, sigmas)          # was k_diffusion.sampling.sample_dpmpp_2m

model(x, sigma * s_in, **extra_args) is called exactly where k-diffusion calls it, and callback gets
{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}. Each step is one row of a float64 table built once from the
grid (fastdiff.methods, MATH.md §3b): with a `noise_sampler` the results equal k-diffusion's to float64
rounding (tested to 1e-12 relative against k_diffusion.sampling).

The one intended difference: the noise when no `noise_sampler` is given. k-diffusion draws torch.randn_like(x)
(a BrownianTreeNoiseSampler for dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde), so a sample's noise depends on the
batch it is in. Here it follows fastdiff's counter-based contract (fastdiff.noise): row i of x is sample
sample_offset + i, and its noise depends only on (seed, that index, step), never on the batch size or device.
seed=None draws one 64-bit seed from torch's default generator (so torch.manual_seed still governs a run);
pass seed= to fix it. The step indices of each noise use are in fastdiff.methods. euler, heun and dpm_2 take
noise_sampler= too (k-diffusion uses randn_like for their churn noise); it is called as
noise_sampler(sigma, sigma_hat) for the churn noise of a step.

The callback's tensors are for reading (previews, logs). Editing d['x'] or d['denoised'] in place is seen by
the step, but for euler, heun, dpm_2 and lms not as in k-diffusion, which forms those steps' derivative
(x − denoised)/σ before the callback, while here the whole step A x + B denoised is formed after it.

Also different on purpose: a one-step grid to 0 works for dpmpp_2m_sde and dpmpp_3m_sde (k-diffusion raises
UnboundLocalError), and sigmas on a GPU are read back to the host once per call (k-diffusion reads them at
every step). Not provided: sample_dpm_fast and sample_dpm_adaptive (adaptive, not table methods).
"""
from __future__ import annotations

import math

import torch

from . import methods as _m

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
    "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde", "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
    "get_sigmas_vp", "append_zero", "to_d", "get_ancestral_step",
]


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
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


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
        s = int(seed)
        if isinstance(seed, bool) or s != seed or not 0 <= s < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        return s
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
    if torch.as_tensor(sigmas).shape == (1,):
        return x                                           # no steps: k-diffusion's loop returns x as given
    host = _m._check_sigmas(sigmas)                        # the call's one read-back of the grid
    if x.shape[0] == 0:
        return x.clone()                                   # an empty batch: nothing to sample
    table = _m.sigma_table(host, method, **options)
    sigmas = torch.as_tensor(sigmas)                       # the caller's grid (its device), for the dicts
    gammas = _gammas(host.tolist(), options) if options.get("s_churn") else None
    extra_args = {} if extra_args is None else extra_args
    c = table.lists()
    s_in = x.new_ones([x.shape[0]])

    def denoise(xk, k, stage):
        out = model(xk, s_in * (c["t_u"][k] if stage else c["t"][k]), **extra_args)
        return out if out.dtype == xk.dtype else out.to(xk.dtype)

    if noise_sampler is None:
        offset = int(sample_offset)
        if offset < 0:
            raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")
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
            z = noise_sampler(a, b)
            return z if z.dtype == like.dtype else z.to(like.dtype)

    cb = None
    if callback is not None:
        def cb(k, xk, D0):
            sigma_hat = sigmas[k] * (gammas[k] + 1) if gammas is not None and gammas[k] > 0 else sigmas[k]
            callback({'x': xk, 'i': k, 'sigma': sigmas[k], 'sigma_hat': sigma_hat, 'denoised': D0})

    bar, progress = _progress(len(table), disable)
    try:
        with torch.no_grad():
            return _m.run_table(table, denoise, x, noise, cb, progress)
    finally:
        if bar is not None:
            bar.close()


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

def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, noise_sampler=None, seed=None, sample_offset=0):
    """Algorithm 2 (Euler steps) of Karras et al. (2022): fastdiff method "edm_euler"."""
    return _churn_run("edm_euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax,
                      s_noise, noise_sampler, seed, sample_offset)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, seed=None, sample_offset=0):
    """Ancestral sampling with Euler method steps: fastdiff method "euler_ancestral"."""
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=eta, s_noise=s_noise)


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
                sample_offset, eta=eta, s_noise=s_noise)


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep in σ (coefficients integrated exactly): fastdiff method "lms"."""
    return _run("lms", model, x, sigmas, extra_args, callback, disable, None, 0, 0, order=order)


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, seed=None, sample_offset=0):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps: fastdiff method "dpmpp_2s_ancestral"."""
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=eta, s_noise=s_noise)


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
                noise_args=_sde_noise_args(r), eta=eta, s_noise=s_noise, r=r)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): fastdiff method "dpmpp_2m"."""
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, None, 0, 0)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', *, seed=None, sample_offset=0):
    """DPM-Solver++(2M) SDE: fastdiff method "dpmpp_2m_sde"."""
    if solver_type not in {'heun', 'midpoint'}:
        raise ValueError('solver_type must be \'heun\' or \'midpoint\'')
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=eta, s_noise=s_noise, solver_type=solver_type)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, seed=None, sample_offset=0):
    """DPM-Solver++(3M) SDE: fastdiff method "dpmpp_3m_sde"."""
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, noise_sampler, seed,
                sample_offset, eta=eta, s_noise=s_noise)
