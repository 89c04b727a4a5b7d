"""fastdiff.diffusers.FastdiffScheduler in diffusers loops, with a tiny UNet2DModel built here (nothing downloaded).

With method="dpmpp_2m" it matches DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) within
1e-6 relative in float32 (not bit for bit: diffusers rounds every coefficient, λ included, in float32; see the
module docstring); every other method runs in the same loops, two-stage ones with two calls per step.
"""
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'fastdiff[diffusers]')")

import fastdiff.diffusers as FD  # noqa: E402
import fastdiff.methods as M  # noqa: E402
from fastdiff.diffusers import FastdiffScheduler  # noqa: E402

RTOL32 = 1e-6


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=3).eval()


class GaussianEps:
    """The exact noise prediction of data N(m, v I) under the discrete VP schedule (a cheap stand-in for a
    network where only the scheduler is under test): ε̂ = σ(x − αm)/(α²v + σ²), v̂ and x̂_0 likewise."""

    def __init__(self, scheduler, prediction_type="epsilon", m=0.3, v=0.25):
        self.sig = scheduler._train_sigmas().astype("float64")
        self.prediction_type, self.m, self.v = prediction_type, m, v

    def __call__(self, x, t, class_labels=None):
        s = float(np.interp(float(t), np.arange(len(self.sig)), self.sig))
        alpha, sigma = 1 / math.sqrt(1 + s * s), s / math.sqrt(1 + s * s)
        eps = sigma * (x - alpha * self.m) / (alpha * alpha * self.v + sigma * sigma)
        if class_labels is not None:                 # a "conditional" model: labels shift the data mean a little
            eps = eps - 0.05 * sigma * class_labels.view(-1, 1, 1, 1).to(x.dtype)
        x0 = (x - sigma * eps) / alpha
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[self.prediction_type]
        return types.SimpleNamespace(sample=out)


def ddpm_loop(unet, scheduler, n, generator=None, batch=1):
    """DDPMPipeline's loop: no input scaling, the step's generator."""
    scheduler.set_timesteps(n)
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    labels = torch.zeros(batch, dtype=torch.int64)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, class_labels=labels).sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def sd_loop(unet, scheduler, n, guidance=3.0, batch=1, scale=1.0):
    """StableDiffusionPipeline's loop: classifier-free guidance on a doubled batch, scale_model_input,
    set_timesteps(device=), step(..., return_dict=False)[0]."""
    scheduler.set_timesteps(n, device="cpu")
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma * scale
    labels = torch.cat([torch.zeros(batch, dtype=torch.int64), torch.full((batch,), 2, dtype=torch.int64)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([x] * 2), t)
            uncond, cond = unet(inp, t, class_labels=labels).sample.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x, return_dict=False)[0]
    return x


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def base_config(**kw):
    return diffusers.DDPMScheduler(num_train_timesteps=1000, **kw).config


def pair(final="zero", prediction_type="epsilon", diffusers_rounding=False, **kw):
    cfg = base_config(prediction_type=prediction_type)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                            final_sigmas_type=final, **kw)
    return ref, FastdiffScheduler.from_config(cfg, method="dpmpp_2m", final_sigmas_type=final,
                                              diffusers_rounding=diffusers_rounding, **kw)


# (loop, steps, final sigma): below and above diffusers' lower_order_final threshold (15 steps)
UNET_CASES = [(ddpm_loop, 6, "zero"), (sd_loop, 16, "zero"), (sd_loop, 6, "sigma_min"), (ddpm_loop, 16, "sigma_min")]


@pytest.mark.parametrize("loop,n,final", UNET_CASES, ids=[f"{c[0].__name__}-{c[1]}-{c[2]}" for c in UNET_CASES])
def test_dpmpp_2m_matches_dpm_solver_multistep_on_a_unet(unet, loop, n, final):
    ref, ours = pair(final)
    a, b = loop(unet, ref, n), loop(unet, ours, n)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert a.dtype == b.dtype == torch.float32
    assert rel(b, a) <= RTOL32
    assert rel(a, torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))) > 0.1


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_predictions_on_a_unet(unet, prediction_type):
    ref, ours = pair(prediction_type=prediction_type)
    assert rel(ddpm_loop(unet, ours, 8), ddpm_loop(unet, ref, 8)) <= RTOL32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_diffusers_rounding_is_bit_exact_everywhere(prediction_type, final):
    """diffusers_rounding=True forms dpmpp_2m's coefficients in float32 as diffusers does and applies them in its
    order of operations: bit for bit equal, on the exact Gaussian model, in both loops, 5 to 25 steps, on the
    linspace / Karras / trailing / leading grids."""
    for kw in ({}, {"use_karras_sigmas": True}, {"timestep_spacing": "trailing"},
               {"timestep_spacing": "leading", "steps_offset": 1}):
        ref, ours = pair(final, prediction_type, diffusers_rounding=True, **kw)
        model = GaussianEps(ours, prediction_type)
        for n in (5, 14, 25):
            for loop in (ddpm_loop, sd_loop):
                a, b = loop(model, ref, n, batch=2), loop(model, ours, n, batch=2)
                assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
                assert torch.equal(a, b), (kw, n, loop.__name__)


def test_diffusers_rounding_on_a_unet(unet):
    ref, ours = pair("zero", diffusers_rounding=True)
    assert torch.equal(sd_loop(unet, ref, 8), sd_loop(unet, ours, 8))


def test_stock_ddpm_pipeline_accepts_it(unet):
    plain = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = diffusers.DDPMPipeline(unet=plain, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000))
    pipe.scheduler = FastdiffScheduler.from_config(pipe.scheduler.config, method="dpmpp_2m_sde", seed=5)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np").images
    b = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np").images
    assert a.shape == (2, 8, 8, 3) and (a == b).all()                    # seeded: reproducible
    ref = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, FastdiffScheduler) and "DPMSolverMultistepScheduler" in \
        [c.__name__ for c in pipe.scheduler.compatibles]
    assert ref.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps


@pytest.mark.parametrize("method", M.NEW_METHODS)
def test_every_method_runs_in_both_loops(method):
    cfg = base_config()
    s = FastdiffScheduler.from_config(cfg, method=method, seed=3)
    unet = GaussianEps(s)
    n = 6
    out = sd_loop(unet, s, n, batch=2)
    calls = len(s.timesteps)
    assert s.order == (2 if method in M.TWO_STAGE_METHODS else 1)
    # two-stage: two calls per step except the last step to σ = 0 (an Euler step)
    assert calls == (2 * n - 1 if method in M.TWO_STAGE_METHODS else n)
    assert torch.isfinite(out).all() and out.shape == (2, 3, 8, 8)
    again = sd_loop(unet, FastdiffScheduler.from_config(cfg, method=method, seed=3), n, batch=2)
    assert torch.equal(out, again)
    b = ddpm_loop(unet, s, n, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(b).all()


def _heun_pair_run(dtype):
    cfg = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                  beta_schedule="linear").config
    ref = diffusers.HeunDiscreteScheduler.from_config(cfg)
    ours = FastdiffScheduler.from_config(cfg, method="heun")
    model = GaussianEps(ours)
    ref.set_timesteps(6)
    if dtype == torch.float64:                # no float32 coefficient rounding left on diffusers' side either
        ref.sigmas = ref.sigmas.double()
    ours.set_timesteps(timesteps=ref.timesteps.unique_consecutive().numpy())    # its 6 (fractional) timesteps
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert torch.equal(ref.sigmas.unique_consecutive().float(), ours.sigmas)
    s_max = float(ours.sigmas[0])
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = []
    # diffusers starts at x̃_T = σ̃_max z, i.e. x_T = α_T σ̃_max z here
    for sch, start in ((ref, s_max * z), (ours, s_max / math.sqrt(1 + s_max * s_max) * z)):
        x = start.to(dtype)
        for t in sch.timesteps:
            x = sch.step(model(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
        results.append(x)
    return results


def test_heun_matches_diffusers_heun():
    """diffusers' HeunDiscreteScheduler runs k-diffusion's Heun on the scaled state x̃ = x/α; lifted, it is ours.
    On its grid (its fractional timesteps), from its start, two calls per step: in float64 equal to 1e-12. In
    float32 the two work in different coordinates (x̃ = x/α, α_T ≈ 0.04), so their roundings differ and are
    amplified by up to 1/α: within 1e-5 (measured 2.4e-6)."""
    ours64, ref64 = _heun_pair_run(torch.float64)[::-1]
    assert ours64.dtype == torch.float64 and rel(ours64, ref64) <= 1e-12
    ours32, ref32 = _heun_pair_run(torch.float32)[::-1]
    assert rel(ours32, ref32) <= 1e-5


def test_noise_is_batch_invariant_and_follows_the_seed():
    cfg = base_config()
    for method in ("euler_ancestral", "dpmpp_sde", "dpmpp_3m_sde"):
        s = FastdiffScheduler.from_config(cfg, method=method, seed=11)
        s.set_timesteps(4)
        x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        eps = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.1
        full, part = x.clone(), x[1:3].clone()
        for t in s.timesteps:
            full = s.step(eps, t, full).prev_sample
        s.set_timesteps(4)
        for t in s.timesteps:
            part = s.step(eps[1:3], t, part).prev_sample
        # rows 1, 2 of the batch of 5 are samples 1, 2; alone they are samples 0, 1: the contract keys by row
        seeded = FastdiffScheduler.from_config(cfg, method=method, seed=11)
        seeded.set_timesteps(4)
        xs = x[:2].clone()
        for t in seeded.timesteps:
            xs = seeded.step(eps[:2], t, xs).prev_sample
        assert torch.equal(full[:2], xs), method
        assert not torch.allclose(part, full[1:3]), method               # different sample indices
    # a generator (not the config seed) picks the seed: the same generator seed gives the same run
    s = FastdiffScheduler.from_config(cfg, method="euler_ancestral")
    unet = GaussianEps(s)
    r1 = ddpm_loop(unet, s, 4, generator=torch.Generator().manual_seed(9))
    r2 = ddpm_loop(unet, s, 4, generator=torch.Generator().manual_seed(9))
    r3 = ddpm_loop(unet, s, 4, generator=torch.Generator().manual_seed(10))
    assert torch.equal(r1, r2) and not torch.allclose(r1, r3)


def test_add_noise_and_begin_index():
    cfg = base_config()
    s = FastdiffScheduler.from_config(cfg, method="dpmpp_2m")
    unet = GaussianEps(s)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([10, 700])
    ab = s.alphas_cumprod[t].double()
    want = ab.sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - ab).sqrt().view(-1, 1, 1, 1) * z.double()
    assert torch.allclose(s.add_noise(x0, z, t).double(), want, rtol=1e-6, atol=1e-6)
    # img2img: start at step 3 of 8 (the table restarts there: first order, as DPMSolverMultistep does)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2)
    results = []
    for sch in (ref, s):
        sch.set_timesteps(8)
        sch.set_begin_index(3)
        x = sch.add_noise(x0, z, sch.timesteps[3:4])
        labels = torch.zeros(2, dtype=torch.int64)
        with torch.no_grad():
            for tt in sch.timesteps[3:]:
                x = sch.step(unet(x, tt, class_labels=labels).sample, tt, x).prev_sample
        results.append(x)
    assert rel(results[1], results[0]) <= RTOL32


def test_named_errors():
    cfg = base_config()
    with pytest.raises(ValueError, match="method"):
        FastdiffScheduler.from_config(cfg, method="rk4")
    with pytest.raises(ValueError, match="prediction_type"):
        FastdiffScheduler.from_config(cfg, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="solver_type"):
        FastdiffScheduler.from_config(cfg, method="dpmpp_2m", solver_type="heun")
    with pytest.raises(ValueError, match="seed"):
        FastdiffScheduler.from_config(cfg, seed=-3)
    s = FastdiffScheduler.from_config(cfg)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 3, 8, 8), 999, torch.zeros(1, 3, 8, 8))
    s.set_timesteps(2)
    x = torch.ones(1, 3, 8, 8)
    for t in s.timesteps:
        x = s.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="after the last timestep"):
        s.step(torch.zeros_like(x), s.timesteps[-1], x)
    assert math.isfinite(float(x.abs().max()))


# DPMSolverMultistepScheduler keys a pipeline's config may carry: each applied as diffusers applies it
DPM_KEYS = [
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"use_exponential_sigmas": True},
    {"use_lu_lambdas": True},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "leading"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9},
    {"thresholding": True, "sample_max_value": 0.8},                     # below 1: diffusers clamps s to it
    {"use_lu_lambdas": True, "use_exponential_sigmas": True},            # diffusers' precedence: Lu
    {"use_beta_sigmas": True},
]


@pytest.mark.parametrize("kw", DPM_KEYS, ids=["-".join(f"{k}={v}" for k, v in kw.items()) for kw in DPM_KEYS])
def test_dpm_solver_config_keys_are_kept_and_applied(kw):
    """from_config of a DPMSolverMultistepScheduler config keeps every key and applies it as diffusers does:
    the same betas, timesteps and σ's, and with diffusers_rounding the same samples bit for bit."""
    if kw.get("use_beta_sigmas"):
        pytest.importorskip("scipy")
    ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **kw)
    ours = FastdiffScheduler.from_config(ref.config, method="dpmpp_2m", diffusers_rounding=True)
    for key, value in kw.items():
        assert getattr(ours.config, key) == value, key
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    model = GaussianEps(ours, m=0.6, v=0.5)
    for n in (7, 20):
        for loop in (ddpm_loop, sd_loop):
            a, b = loop(model, ref, n, batch=2), loop(model, ours, n, batch=2)
            assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas), n
            assert torch.equal(a, b), (n, loop.__name__)
    if kw.get("thresholding"):               # the thresholding acted: without it the result differs
        plain = FastdiffScheduler.from_config(ref.config, method="dpmpp_2m", thresholding=False)
        assert rel(ddpm_loop(model, plain, 7, batch=2), ddpm_loop(model, ours, 7, batch=2)) > 1e-3


def test_cosine_karras_timesteps_as_diffusers():
    """Karras σ's on the cosine schedule: diffusers does not round their timesteps but truncates them to int64;
    so does fastdiff. (diffusers 0.42's own step then fails on the repeated timesteps: IndexError.)"""
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    ours = FastdiffScheduler.from_config(ref.config)
    for n in (7, 20):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    assert torch.isfinite(sd_loop(GaussianEps(ours), ours, 20)).all()


@pytest.mark.parametrize("kw", [{"beta_schedule": "squaredcos_cap_v2"}, {"beta_start": 0.001}])
def test_lu_grid_ending_at_sigma_min(kw):
    """λ-uniform σ's are exp of float32 logs, so the last may round one ulp above σ_min: diffusers then takes a
    step of h ≈ −1e-7, fastdiff the identity step it takes on an exactly repeated σ (within 1e-6)."""
    ref = diffusers.DPMSolverMultistepScheduler(use_lu_lambdas=True, final_sigmas_type="sigma_min", **kw)
    ours = FastdiffScheduler.from_config(ref.config, diffusers_rounding=True)
    model = GaussianEps(ours)
    a, b = sd_loop(model, ref, 10, batch=2), sd_loop(model, ours, 10, batch=2)
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    assert float(ours.sigmas[-2]) < float(ours.sigmas[-1])           # the case: the last σ above σ_min
    assert rel(b, a) <= RTOL32


@pytest.mark.parametrize("grid", ["use_exponential_sigmas", "use_karras_sigmas", "use_lu_lambdas"])
def test_add_noise_at_the_grids_sigma(grid):
    """img2img on a grid off the training timesteps: add_noise noises to the σ̃ the run steps from (the grid's,
    not the training σ̃ at the truncated or rounded timestep), as diffusers does: the same bits."""
    ref = diffusers.DPMSolverMultistepScheduler(**{grid: True})
    ours = FastdiffScheduler.from_config(ref.config, diffusers_rounding=True)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model = GaussianEps(ours)
    for begin in (True, False):
        results = []
        for sch in (ref, ours):
            sch.set_timesteps(10)
            if begin:
                sch.set_begin_index(4)
            x = sch.add_noise(x0, z, sch.timesteps[4:5].repeat(2))
            results.append(x)
            for t in sch.timesteps[4:]:
                x = sch.step(model(x, t).sample, t, x).prev_sample
            results.append(x)
        assert all(torch.equal(a, b) for a, b in zip(results[:2], results[2:], strict=True)), (grid, begin)
    train = FastdiffScheduler.from_config(ref.config)            # before set_timesteps: the training σ̃
    t = ours.timesteps[4:5].repeat(2)
    ab = train.alphas_cumprod[t].view(-1, 1, 1, 1)
    at_t = train.add_noise(x0, z, t)
    assert torch.allclose(at_t, ab.sqrt() * x0 + (1 - ab).sqrt() * z, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(at_t, results[0], rtol=1e-6, atol=1e-6)     # the grid's σ̃ is not t's


def test_learned_variance_channels_are_dropped():
    """variance_type='learned': the model outputs ε and a variance per channel; the step uses ε's channels."""
    cfg = base_config()
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, variance_type="learned_range")
    ours = FastdiffScheduler.from_config(ref.config, diffusers_rounding=True)
    plain = FastdiffScheduler.from_config(cfg, diffusers_rounding=True)
    eps = GaussianEps(ours)

    def learned(x, t, class_labels=None):
        out = eps(x, t).sample
        return types.SimpleNamespace(sample=torch.cat([out, torch.full_like(out, 7.0)], dim=1))

    a, b, c = (ddpm_loop(learned, ref, 6), ddpm_loop(learned, ours, 6), ddpm_loop(eps, plain, 6))
    assert torch.equal(a, b) and torch.equal(b, c)


def test_method_supersedes_the_source_schedulers_method():
    """algorithm_type and solver_order describe the source scheduler's own method; its solver_type ('midpoint'
    by default) applies to dpmpp_2m_sde and is the variant fastdiff's dpmpp_2m is."""
    src = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3).config
    assert FastdiffScheduler.from_config(src, method="euler_ancestral")._options == {"eta": 1.0, "s_noise": 1.0}
    assert FastdiffScheduler.from_config(src, method="dpmpp_2m")._options == {}
    heun = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun").config
    assert FastdiffScheduler.from_config(heun, method="dpmpp_2m_sde")._options["solver_type"] == "heun"
    assert FastdiffScheduler.from_config(heun, method="lms")._options == {"order": 4}
    with pytest.raises(ValueError, match="solver_type='heun'"):
        FastdiffScheduler.from_config(heun, method="dpmpp_2m")
    unipc = diffusers.UniPCMultistepScheduler().config                       # solver_type 'bh2'
    assert FastdiffScheduler.from_config(unipc, method="dpmpp_2m_sde")._options["solver_type"] == "midpoint"


@pytest.mark.parametrize("kw,key", [({"use_flow_sigmas": True}, "use_flow_sigmas"),
                                    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
                                    ({"prediction_type": "flow_prediction"}, "flow_prediction"),
                                    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas"),
                                    ({"algorithm_type": "dpm"}, "algorithm_type"),
                                    ({"solver_type": "rk4"}, "solver_type"),
                                    ({"variance_type": "wide"}, "variance_type"),
                                    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5},
                                     "dynamic_thresholding_ratio")])
def test_settings_not_offered_are_refused_by_name(kw, key):
    with pytest.raises(ValueError, match=key):
        FastdiffScheduler.from_config(base_config(), **kw)


def test_a_run_begins_at_a_steps_first_call():
    """heun calls the model at the next grid level's timestep for its stage, so that timestep appears twice; a
    run begun there without set_begin_index begins at the step (the second), as set_begin_index would."""
    s = FastdiffScheduler.from_config(base_config(), method="heun")
    model = GaussianEps(s)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    results = []
    for begin in (False, True):
        s.set_timesteps(5)
        ts = s.timesteps
        i = next(j for j in range(1, len(ts)) if ts[j] == ts[j - 1])        # the stage, then the step
        if begin:
            s.set_begin_index(i)
        x = x0.clone()
        for t in ts[i:]:
            x = s.step(model(x, t).sample, t, x).prev_sample
        results.append(x)
    assert torch.equal(results[0], results[1]) and torch.isfinite(results[0]).all()


def test_bad_timesteps_and_indices_are_named():
    s = FastdiffScheduler.from_config(base_config())
    s.set_timesteps(5)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="timestep 998 is not one of"):
        s.step(torch.zeros_like(x), 998, x)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(5)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(None)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        s.set_timesteps(timesteps=[10, 500, 999])
    with pytest.raises(ValueError, match="num_inference_steps=1000 repeats timesteps"):
        s.set_timesteps(1000)                    # linspace(0, 999, 1001) rounds two steps onto one timestep
    s.set_timesteps(999)                         # every training timestep but one: still fine
    assert len(s.timesteps) == 999
    karras = FastdiffScheduler.from_config(base_config(), use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        karras.set_timesteps(timesteps=[999, 500, 10])


def _img2img(sch, model, n, begin, x0, z):
    """An img2img pipeline's loop: set_timesteps, set_begin_index, add_noise at the first timestep left."""
    sch.set_timesteps(n)
    sch.set_begin_index(begin)
    x = sch.add_noise(x0, z, sch.timesteps[begin:begin + 1])
    with torch.no_grad():
        for t in sch.timesteps[begin:]:
            x = sch.step(model(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("n,begin,kw", [(20, 10, {}), (16, 6, {}), (20, 19, {"use_karras_sigmas": True}),
                                        (20, 18, {"use_karras_sigmas": True}), (2, 1, {"use_karras_sigmas": True})])
def test_img2img_keeps_diffusers_last_step_bit_for_bit(n, begin, kw):
    """lower_order_final counts the whole schedule's steps (diffusers' len(timesteps) < 15), not the steps left;
    a run begun at a Karras grid's repeated-σ identity step (a low strength) runs it. Both as diffusers, bits."""
    cfg = base_config()
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                            final_sigmas_type="sigma_min", **kw)
    ours = FastdiffScheduler.from_config(ref.config, method="dpmpp_2m", diffusers_rounding=True)
    model = GaussianEps(ours)
    x0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    a, b = _img2img(ref, model, n, begin, x0, z), _img2img(ours, model, n, begin, x0, z)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", M.NEW_METHODS)
def test_every_method_begins_at_the_identity_step(method):
    s = FastdiffScheduler.from_config(base_config(), method=method, use_karras_sigmas=True,
                                      final_sigmas_type="sigma_min", seed=3)
    s.set_timesteps(6)
    last = len(s.timesteps) - 1
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = _img2img(s, GaussianEps(s), 6, last, x0, torch.zeros_like(x0) + 0.1)
    assert torch.isfinite(out).all()


def test_add_noise_after_a_stage_call_is_at_the_stages_sigma():
    """Inpainting re-noises the known region to timesteps[i + 1] after call i: for a two-stage method's stage call
    that is the stage's σ̃ (as diffusers' Heun uses sigmas[step_index]), not the training σ̃ of its timestep."""
    s = FastdiffScheduler.from_config(base_config(), method="heun", use_karras_sigmas=True)
    s.set_timesteps(5)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = GaussianEps(s)
    x0, z = torch.zeros_like(x) + 0.5, torch.ones_like(x)
    c = s._table.lists()
    x = s.step(model(x, s.timesteps[0]).sample, s.timesteps[0], x).prev_sample
    got = s.add_noise(x0, z, s.timesteps[1:2])
    sig = torch.tensor(c["t_u"][0], dtype=torch.float32)
    alpha = 1 / (sig ** 2 + 1) ** 0.5
    assert torch.equal(got, alpha * x0 + sig * alpha * z)


def test_configs_that_are_not_a_vp_schedule_are_refused():
    for cls in ("FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"):
        with pytest.raises(ValueError, match="flow-matching or EDM"):
            FastdiffScheduler.from_config(getattr(diffusers, cls)().config, method="dpmpp_2m")
    assert "EDMEulerScheduler" not in FastdiffScheduler._compatibles


def test_switching_method_drops_the_old_methods_options():
    s = FastdiffScheduler.from_config(base_config(), method="dpmpp_sde", r=0.4, eta=0.5, seed=9)
    t = FastdiffScheduler.from_config(s.config, method="heun")
    assert t.config.r is None and t.config.eta is None and t.config.seed == 9
    u = FastdiffScheduler.from_config(s.config, eta=0.7)                 # the same method keeps its options
    assert u.config.r == 0.4 and u.config.eta == 0.7


@pytest.mark.parametrize("key", ["s_churn", "s_tmin", "s_tmax", "order"])
def test_k_diffusion_option_names_are_refused_not_dropped(key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        FastdiffScheduler.from_config(base_config(), method="heun" if key != "order" else "lms", **{key: 1.0})


def test_set_timesteps_takes_one_of_its_grids():
    s = FastdiffScheduler.from_config(base_config(), method="dpmpp_2m")
    with pytest.raises(ValueError, match="pass one of"):
        s.set_timesteps(5, timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="pass one of"):
        s.set_timesteps(timesteps=[999, 500, 10], sigmas=[10.0, 1.0, 0.1])
    with pytest.raises(ValueError, match="disagrees"):
        s.set_timesteps(5, sigmas=[10.0, 1.0, 0.1])
    s.set_timesteps(3, sigmas=[10.0, 1.0, 0.1])
    assert len(s.timesteps) == 3


def test_step_checks_the_model_output_against_the_sample():
    s = FastdiffScheduler.from_config(base_config(), method="dpmpp_2m")
    s.set_timesteps(4)
    x = torch.randn(2, 3, 8, 8)
    before = x.clone()
    for bad in (torch.randn(1, 3, 8, 8), torch.randn(3, 8, 8), torch.randn(2, 3, 4, 4)):
        with pytest.raises(ValueError, match="model_output has shape"):
            s.step(bad, s.timesteps[0], x)
    assert torch.equal(x, before)
    assert s.step(torch.randn(2, 3, 8, 8), s.timesteps[0], x).prev_sample.shape == x.shape   # still usable


def test_a_saved_flow_matching_config_is_refused_by_path(tmp_path):
    diffusers.FlowMatchEulerDiscreteScheduler().save_config(tmp_path)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler's config is a flow-matching"):
        FastdiffScheduler.from_config(str(tmp_path), method="dpmpp_2m")


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_3m_sde", "heun"])
def test_a_sample_predicting_model_may_return_one_output_buffer(method):
    """D_0 is kept for later calls (the history, a stage): a copy, so a model returning one buffer is safe."""
    runs = []
    for static in (False, True):
        s = FastdiffScheduler.from_config(base_config(prediction_type="sample"), method=method, seed=1)
        model, buf = GaussianEps(s, "sample"), torch.empty(2, 3, 8, 8)

        def call(x, t, class_labels=None, model=model, buf=buf, static=static):
            out = model(x, t, class_labels=class_labels).sample
            return types.SimpleNamespace(sample=buf.copy_(out) if static else out)
        runs.append(ddpm_loop(call, s, 6, batch=2))
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ review of the scheduler (items 1-10)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class Counted:
    """A model that counts its calls (a two-stage method's call count is the claim under test)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, class_labels=None):
        self.calls += 1
        return self.model(x, t, class_labels=class_labels)


def test_a_saved_config_loads_back_into_diffusers_solver_schedulers(tmp_path):
    """solver_type defaults to 'midpoint' (DPMSolverMultistepScheduler's default, the variant dpmpp_2m is) and
    None is stored as 'midpoint': a saved null is refused by DPMSolverMultistep, UniPC, DEIS and DPMSolverSinglestep,
    so swapping back after save_pretrained, or after a pipeline reload, would raise."""
    want = {"DPMSolverMultistepScheduler": "midpoint", "UniPCMultistepScheduler": "bh2",   # each one's own name
            "DEISMultistepScheduler": "logrho", "DPMSolverSinglestepScheduler": "midpoint"}
    for given in ({}, {"solver_type": None}):
        s = FastdiffScheduler.from_config(base_config(), method="heun", **given)
        assert s.config.solver_type == "midpoint"
        folder = tmp_path / f"s{len(given)}"
        s.save_pretrained(folder)
        reloaded = FastdiffScheduler.from_pretrained(folder)
        assert reloaded.config.solver_type == "midpoint" and reloaded.config.method == "heun"
        for name, solver_type in want.items():
            cls = getattr(diffusers, name)
            assert cls.from_pretrained(folder).config.solver_type == solver_type, name
            assert cls.from_config(reloaded.config).config.solver_type == solver_type, name
    # an older saved config holding null loads as 'midpoint'
    path = tmp_path / "s1" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "solver_type": None}))
    old = FastdiffScheduler.from_pretrained(tmp_path / "s1")
    assert old.config.solver_type == "midpoint"
    assert diffusers.DPMSolverMultistepScheduler.from_config(old.config).config.solver_type == "midpoint"
    # midpoint is also k-diffusion's default for dpmpp_2m_sde, the one method it applies to
    assert FastdiffScheduler.from_config(base_config(), method="dpmpp_2m_sde")._options["solver_type"] == "midpoint"
    with pytest.raises(ValueError, match=r"pass solver_type='midpoint'\)$"):
        FastdiffScheduler.from_config(base_config(), method="dpmpp_2m", solver_type="heun")


def test_add_noise_mid_run_without_begin_index_looks_up_each_timestep():
    """As DPMSolverMultistepScheduler: with no begin_index each row is noised at its own timestep's σ̃ (differential
    img2img, per-row timesteps), also mid-run; with one, every row at the run's next call (inpainting)."""
    ref, ours = pair()
    model = GaussianEps(ours)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    for begin in (False, True):
        got = []
        for sch in (ref, ours):
            sch.set_timesteps(10)
            if begin:
                sch.set_begin_index(0)
            x = z.clone()
            for t in sch.timesteps[:3]:
                x = sch.step(model(x, t).sample, t, x).prev_sample
            assert sch.step_index == 3 and (sch.begin_index is not None) == begin
            got.append(sch.add_noise(x0, z, sch.timesteps[[0, 5, 8]]))
        assert torch.equal(got[0], got[1]), begin
        sig = ours.sigmas[[3, 3, 3] if begin else [0, 5, 8]]
        alpha = (1 / (sig ** 2 + 1) ** 0.5).view(-1, 1, 1, 1)
        assert torch.equal(got[1], alpha * x0 + sig.view(-1, 1, 1, 1) * alpha * z), begin
    # a two-stage method's fractional stage timestep is looked up as its stage call: at the stage's σ̃
    s = FastdiffScheduler.from_config(base_config(), method="dpm_2")
    s.set_timesteps(5)
    x = x0[:1].clone()
    for t in s.timesteps[:3]:
        x = s.step(GaussianEps(s)(x, t).sample, t, x).prev_sample
    assert not float(s.timesteps[1]).is_integer()
    sig = torch.tensor(s._table.lists()["t_u"][0], dtype=torch.float32)
    alpha = 1 / (sig ** 2 + 1) ** 0.5
    assert torch.equal(s.add_noise(x0[:1], z[:1], s.timesteps[1:2]), alpha * x0[:1] + sig * alpha * z[:1])


@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"])
def test_an_euler_configs_sigma_min_and_max_bound_the_grid(grid):
    """An EulerDiscreteScheduler config's sigma_min / sigma_max (kept by from_config) bound the Karras,
    exponential and beta grids, as DPMSolverMultistepScheduler applies them (the λ grid ignores them there too):
    the same σ's and timesteps, and with diffusers_rounding the same samples bit for bit."""
    if grid == "use_beta_sigmas":
        pytest.importorskip("scipy")
    cfg = diffusers.EulerDiscreteScheduler(**SD_BETAS, sigma_min=0.1, sigma_max=10.0).config
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, **{grid: True})
    ours = FastdiffScheduler.from_config(cfg, diffusers_rounding=True, **{grid: True})
    assert ours.config.sigma_min == 0.1 and ours.config.sigma_max == 10.0
    model = GaussianEps(ours)
    for n in (6, 20):
        a, b = sd_loop(model, ref, n, batch=2), sd_loop(model, ours, n, batch=2)
        assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas), n
        assert torch.equal(a, b), n
        bounded = grid != "use_lu_lambdas"
        assert (float(ours.sigmas[0]) == 10.0) == bounded and (float(ours.sigmas[-2]) == pytest.approx(0.1)) == bounded


def test_add_noise_in_16_bit_at_zero_terminal_snr():
    """α, σ are formed in float32 for a 16-bit sample, then rounded: in float16 σ̃² at zero-terminal-SNR's t = 999
    (σ̃ = 4096) overflows, which made α = σ = 0 and the noised latent 0. float32 and float64 samples keep
    DPMSolverMultistepScheduler's own bits."""
    cfg = base_config(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg)
    ours = FastdiffScheduler.from_config(cfg)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([999, 990, 900])
    for set_grid in (False, True):                # the training σ̃'s, then the grid's
        if set_grid:
            ref.set_timesteps(10)
            ours.set_timesteps(10)
            t = ours.timesteps[[0, 1, 2]]
            for dtype in (torch.float32, torch.float64):
                assert torch.equal(ours.add_noise(x0.to(dtype), z.to(dtype), t),
                                   ref.add_noise(x0.to(dtype), z.to(dtype), t)), dtype
        sig = ours.add_noise(torch.zeros(3, 1), torch.ones(3, 1), t)      # float32: σ_t per row
        alpha = ours.add_noise(torch.ones(3, 1), torch.zeros(3, 1), t)
        assert float(sig[0]) == pytest.approx(1.0, abs=1e-7) and float(alpha[0]) == pytest.approx(1 / 4096, rel=1e-3)
        for dtype in (torch.float16, torch.bfloat16):
            y = ours.add_noise(x0.to(dtype), z.to(dtype), t)
            assert y.dtype == dtype
            want = alpha.to(dtype).view(-1, 1, 1, 1) * x0.to(dtype) + sig.to(dtype).view(-1, 1, 1, 1) * z.to(dtype)
            assert torch.equal(y, want), (dtype, set_grid)
            assert float(y[0].abs().max()) > 0.9 * float(z[0].abs().max())     # ≈ z, not the zeros of before


def test_set_timesteps_sigmas_ending_in_the_final_sigma_are_the_whole_grid():
    """set_timesteps(sigmas=...) with a list ending in 0 (diffusers' AysSchedules, 11 values for 10 steps) or in the
    config's final σ̃ takes it whole, as EulerDiscreteScheduler does: no appended final σ̃, so no repeated 0 (an
    extra model call) and no σ_min after 0 (refused as increasing). Other lists get the final σ̃ appended."""
    from diffusers.schedulers.scheduling_utils import AysSchedules
    ays = AysSchedules["StableDiffusionSigmas"]
    cfg = base_config(**SD_BETAS)
    ref = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(sigmas=ays)
    ours = FastdiffScheduler.from_config(cfg, method="edm_euler")
    ours.set_timesteps(sigmas=ays)
    assert len(ours.timesteps) == len(ref.timesteps) == 10 and torch.equal(ours.sigmas, ref.sigmas)
    assert torch.allclose(ours.timesteps, ref.timesteps, rtol=1e-6, atol=0)
    # the same run: diffusers' Euler works on x̃ = x/α (start σ̃_max z), fastdiff on x = α x̃; both end at x̂_0
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    models, outs = [Counted(GaussianEps(ours)), Counted(GaussianEps(ours))], []
    for sch, model, x in zip((ref, ours), models, (z * ays[0], z * ays[0] / math.sqrt(1 + ays[0] ** 2)), strict=True):
        for t in sch.timesteps:
            x = sch.step(model(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
        outs.append(x)
    assert models[0].calls == models[1].calls == 10
    assert rel(outs[1], outs[0]) <= RTOL32
    heun = FastdiffScheduler.from_config(cfg, method="heun")
    heun.set_timesteps(sigmas=ays)
    assert len(heun.timesteps) == 19                                       # 2n − 1, as diffusers' Heun
    at_min = FastdiffScheduler.from_config(cfg, method="dpmpp_2m", final_sigmas_type="sigma_min")
    at_min.set_timesteps(sigmas=ays)                                       # ends in 0: to 0, not to σ_min
    assert len(at_min.timesteps) == 10 and float(at_min.sigmas[-1]) == 0.0
    # a list ending in the config's own final σ̃ (σ_min), as read back from a float32 grid
    sigma_min = float(at_min._train_sigmas()[0])
    ending = [*ays[:-1], sigma_min]
    at_min.set_timesteps(sigmas=ending)
    assert torch.equal(at_min.sigmas, torch.tensor(ending, dtype=torch.float32)) and len(at_min.timesteps) == 10
    to_zero = FastdiffScheduler.from_config(cfg, method="dpmpp_2m")         # there σ_min is a step: 0 appended
    to_zero.set_timesteps(sigmas=ending)
    assert len(to_zero.timesteps) == 11 and float(to_zero.sigmas[-1]) == 0.0
    to_zero.set_timesteps(10, sigmas=ays)
    assert len(to_zero.timesteps) == 10
    with pytest.raises(ValueError, match=r"num_inference_steps=11 disagrees with the 10 steps .* the final σ̃"):
        to_zero.set_timesteps(11, sigmas=ays)
    with pytest.raises(ValueError, match="sigmas ending in the final σ̃ 0.0 must hold at least one step"):
        to_zero.set_timesteps(sigmas=[0.0])


@pytest.mark.parametrize("method", M.TWO_STAGE_METHODS)
def test_two_stage_methods_on_the_lu_grid_to_sigma_min_make_2n_minus_1_calls(method):
    """On the λ grid of SD's (and linear 0.00085..0.012) betas the last σ̃ rounds one float32 ulp above σ_min: a
    two-stage method takes it as the repeated σ̃ (an identity last step) and makes 2n − 1 model calls, as on the
    Karras grid, not 2n with the last two spent on a step of ~2e-9."""
    for schedule in ("scaled_linear", "linear"):
        cfg = base_config(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
        ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, use_lu_lambdas=True, final_sigmas_type="sigma_min")
        s = FastdiffScheduler.from_config(ref.config, method=method, seed=3)
        model = Counted(GaussianEps(s))
        for n in (6, 25):
            ref.set_timesteps(n)
            s.set_timesteps(n)
            assert torch.equal(s.sigmas, ref.sigmas)                       # the grid itself is unchanged
            last, sigma_min = float(s.sigmas[-2]), float(s.sigmas[-1])
            assert 0 < last - sigma_min <= 4 * float(torch.finfo(torch.float32).eps) * sigma_min   # the case
            assert len(s.timesteps) == 2 * n - 1 and int(s.timesteps[-1]) == int(ref.timesteps[-1]) == 0
            model.calls = 0
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
            for t in s.timesteps:
                before, x = x, s.step(model(x, t).sample, t, x).prev_sample
            assert model.calls == 2 * n - 1
            assert torch.equal(x, before) and torch.isfinite(x).all()      # the last call: the identity step


def test_single_stage_methods_keep_diffusers_tiny_last_step_on_the_lu_grid():
    cfg = base_config(**SD_BETAS)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, use_lu_lambdas=True, final_sigmas_type="sigma_min")
    ours = FastdiffScheduler.from_config(ref.config, diffusers_rounding=True)
    model = GaussianEps(ours)
    for n in (6, 25):
        a, b = sd_loop(model, ref, n, batch=2), sd_loop(model, ours, n, batch=2)
        assert len(ours.timesteps) == n and torch.equal(ref.timesteps, ours.timesteps) and torch.equal(a, b)


def test_dpmpp_2m_on_the_beta_grid_is_within_the_readmes_bound():
    """The beta grid's large steps take float32 coefficient rounding past 1e-6 (measured 4.5e-6): the README
    states that bound for it, beside the 1e-6 of the other grids."""
    pytest.importorskip("scipy")
    cfg = base_config(**SD_BETAS)
    worst = 0.0
    for final in ("zero", "sigma_min"):
        ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, use_beta_sigmas=True, final_sigmas_type=final)
        ours = FastdiffScheduler.from_config(ref.config)
        model = GaussianEps(ours)
        for n in (5, 10, 20, 30):
            worst = max(worst, rel(ddpm_loop(model, ours, n, batch=2), ddpm_loop(model, ref, n, batch=2)))
    assert RTOL32 < worst <= 5e-6
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Coming from k-diffusion or diffusers")[1].split("\n## ")[0]
    assert "1e-6 (up to ~5e-6 on the beta grid" in section


@pytest.mark.parametrize("key", ["s_churn", "s_tmin", "s_tmax", "order"])
def test_k_diffusion_option_names_in_the_config_are_refused(key, tmp_path):
    """Not only as keywords: in the config mapping and in a saved scheduler_config.json (from_pretrained) too;
    a key the source scheduler left at its default (_use_default_values) is not a setting, and is dropped."""
    method = "lms" if key == "order" else "heun"
    with pytest.raises(ValueError, match=f"^{key}:"):
        FastdiffScheduler.from_config({**base_config(), "method": method, key: 2})
    FastdiffScheduler.from_config(base_config(), method=method).save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: 2}))
    with pytest.raises(ValueError, match=f"^{key}:"):
        FastdiffScheduler.from_pretrained(tmp_path)
    cfg = {**base_config(), "method": method, key: 0, "_use_default_values": [key]}
    s = FastdiffScheduler.from_config(cfg)
    assert s.config.method == method and key not in s.config


def test_continuous_timesteps_of_an_euler_config_are_refused():
    """EulerDiscreteScheduler with timestep_type='continuous' and v_prediction calls its model at 0.25 log σ̃ (EDM's
    conditioning), not at a training timestep: refused by name. With epsilon Euler uses the training timesteps."""
    cont = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_type="continuous", prediction_type="v_prediction")
    for config, kw in ((cont.config, {}), (diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_type="continuous")
                                           .config, {"prediction_type": "v_prediction"})):
        with pytest.raises(ValueError, match=r"^timestep_type='continuous' .*0\.25·log σ̃, not a training timestep"):
            FastdiffScheduler.from_config(config, method="edm_euler", **kw)
    eps = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_type="continuous").config
    ref = diffusers.DPMSolverMultistepScheduler.from_config(eps)
    ours = FastdiffScheduler.from_config(eps, method="edm_euler")
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps.tolist() == [999, 799, 599, 400, 200]


def test_seed_takes_numpy_integers_not_bools(tmp_path):
    for bad in (True, False, np.True_, 1.0, -1, 2**64):
        with pytest.raises(ValueError, match=r"^seed must be None or an integer in \[0, 2\*\*64\)"):
            FastdiffScheduler.from_config(base_config(), method="euler_ancestral", seed=bad)
    runs = []
    for seed in (5, np.int64(5), np.uint64(5)):
        s = FastdiffScheduler.from_config(base_config(), method="euler_ancestral", seed=seed)
        assert type(s.config.seed) is int and s.config.seed == 5
        runs.append(ddpm_loop(GaussianEps(s), s, 4))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    top = FastdiffScheduler.from_config(base_config(), seed=np.uint64(2**64 - 1))
    top.save_config(tmp_path)                                              # a plain int: JSON writes it
    assert FastdiffScheduler.from_pretrained(tmp_path).config.seed == 2**64 - 1
    # a seed drawn from a generator is 63-bit (randint below 2**63 − 1), as the module docstring says
    assert "one 63-bit seed" in FD.__doc__ and "64-bit seed" not in FD.__doc__
