"""fastdiff.diffusers.FastdiffScheduler in diffusers loops, with a tiny UNet2DModel built here (nothing downloaded).

With method="dpmpp_2m" it matches DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) within
1e-6 relative in float32 (not bit for bit: diffusers rounds every coefficient, λ included, in float32; see the
module docstring); every other method runs in the same loops, two-stage ones with two calls per step.
"""
import math
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'fastdiff[diffusers]')")

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
        import numpy as np
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
