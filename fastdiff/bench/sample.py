"""Suite `sample`: end-to-end sampling of the same denoiser by fastdiff and by the loops users would
otherwise run, same grid, same number of steps, same initial noise, and the quality of what comes out.

Setting: the pure VE process (σ = t, k-diffusion's and diffusers' Euler convention), σ from 80 down to
1e-3 on the Karras grid, the 2-D swiss roll as a kernel density (bandwidth 0.05; 500 points for the
regular cases, 10⁴ for the target cases) so its true density is known. Denoisers, each shared by every
sampler of a case:
  pointcloud   the exact denoiser of that density (fd.PointCloud)
  mlp          a small MLP (3 hidden layers of 128, EDM preconditioning) trained for a few seconds on it
Pairs of equivalent samplers (MATH.md §3):
  euler ODE    fd.sample(method="euler", ode=True)  |  k_diffusion.sampling.sample_euler
               |  diffusers EulerDiscreteScheduler(prediction_type="sample").set_timesteps(sigmas=grid)
  ancestral    fd.sample(method="ei-x0", ode=False) |  k_diffusion.sampling.sample_euler_ancestral
               (diffusers' EulerAncestralDiscreteScheduler takes no custom sigmas: not comparable)
  dpmpp_2m     fd.sample(method="dpmpp_2m")          |  k_diffusion.sampling.sample_dpmpp_2m
               |  diffusers EDMDPMSolverMultistepScheduler(dpmsolver++, solver_order=2), the same Karras grid
               plus a zero-length last step (see diffusers_multistep; DPMSolverMultistepScheduler cannot take the
               grid: not comparable)
  dpmpp_2m_sde fd.sample(method="dpmpp_2m_sde")      |  k_diffusion.sampling.sample_dpmpp_2m_sde (its default
               BrownianTree noise); diffusers' sde-dpmsolver++ cannot run the grid (see diffusers_multistep)
A point cloud's dpmpp peers run two models each: fastdiff's own PointCloud.denoise and a naive torch denoiser
(naive_pointcloud_denoiser: cdist / logsumexp / matmul in float32, what a user writes without fastdiff); the
provider names say which.
Every fastdiff backend runs through fd.sample(..., backend=name); a point cloud goes through the fused
whole-trajectory op pointcloud_sample (fd.sample picks the fused path for a method where the backend has
one). The reference is fd.sample(..., backend="torch").

The `mlp loop` case is a user network's loop (M = 1024, d = 2, 1000 steps on CUDA; ancestral SDE):
fd.sample(fd.from_model(mlp, ...), cuda_graph=True) (the whole loop captured in a CUDA graph and replayed),
the same with cuda_graph=False, and a hand-written eager torch loop of the same model and update
(`D = mlp(x, σ_k); x = A_k x + B_k D + C_k torch.randn_like(x)`), which is what ratios are taken against.

Image-sized point clouds (CPU full runs): `pointcloud d=784/dpmpp_2m` and `pointcloud d=3072/dpmpp_2m`, 100 steps
of dpmpp_2m on the same grid, N standard normal points in d dimensions (|y| ≈ √d, like flattened 28×28 and
32×32×3 images) with the same kernel bandwidth, every fastdiff backend (fastdiff[cpu]: the fused trajectory) against
k-diffusion's loop with fastdiff's PointCloud.denoise and with the naive torch denoiser, and diffusers' EDM
scheduler with the naive denoiser; the torch reference over REF_STEPS_CPU steps, scaled. Sizes (HIGH_D_CPU) keep a
run to seconds. These rows have no KL/W2 (2-D histogram metrics); max |x − x_first| says the samplers agree.

Reported: samples/s (n / median time of a whole run), KL(samples ‖ true density) on a 50×50 histogram over
[-1.6, 1.6]², W2 to exact draws (1000-point subsets) and, for the ODE, max |x − x_first| (the same deterministic
map from the same noise: should be at float32 round-off). A row `exact draws (floor)` gives the metrics
of exact samples of the same size: the floor of both estimators. The roofline of a point-cloud run is
`steps` times the posterior bound at (M = n, N, d = 2); of an MLP run, its matmul FLOPs at the fp32 rate.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import torch

from .common import (
    Case,
    Context,
    backend_refusal,
    cleanup,
    describe_error,
    fastdiff_backends,
    fastdiff_provider,
    fill_speedups,
    kdiffusion_sampling,
    optional_import,
)
from .timing import measure, measure_interleaved

SUITE = "sample"
T, T_END, BANDWIDTH = 80.0, 1e-3, 0.05**2
N_DATA, N_DATA_TARGET = 500, 10_000
GRID = ((-1.6, 1.6), (-1.6, 1.6))
REF = fastdiff_provider("torch")
EAGER_LOOP = "torch eager loop (randn)"
MLP_WIDTH = 128
METHODS = {"euler ODE": ("euler", True), "ancestral SDE": ("ei-x0", False),
           "dpmpp_2m": ("dpmpp_2m", False), "dpmpp_2m_sde": ("dpmpp_2m_sde", False)}
DETERMINISTIC = ("euler ODE", "dpmpp_2m")          # max |x − x_first| is reported for these
# k-diffusion's sampler for each method (k_diffusion.sampling.<name>, called with its defaults)
KDIFFUSION = {"euler ODE": "sample_euler", "ancestral SDE": "sample_euler_ancestral",
              "dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde"}
MULTISTEP = ("dpmpp_2m", "dpmpp_2m_sde")            # issue 14: peers with both point-cloud denoisers
NAIVE = "naive torch denoiser"
# The MLP's evaluations with no sampler around them (the same inputs and σ's a loop evaluates): what any loop
# costs at least, so peer-loop time / this time bounds the speedup any sampler can have over that loop.
MODEL_ALONE = "model evaluations alone (bound)"
EDM_SCHEDULER = "diffusers EDMDPMSolverMultistepScheduler"
SIGMA_DATA = 0.5                                     # the MLP's EDM preconditioning (and diffusers' EDM scheduler)


def settings(ctx: Context):
    if ctx.quick:
        return {"ns": (500,), "steps": 20, "train_iters": 150, "w2_n": 500, "loop": (256, 50)}
    # W2 on 1000-point subsets: exact assignment in about a second without POT (scipy), a fraction with it
    if ctx.cuda:
        return {"ns": (10_000, 100_000), "steps": 100, "train_iters": 3000, "w2_n": 1000, "loop": (1024, 1000)}
    return {"ns": (1_000, 10_000), "steps": 100, "train_iters": 2000, "w2_n": 1000, "loop": (1024, 1000)}


# The torch reference at the issue-3 size (n = 10⁵, N = 10⁴, 1000 steps) is ~35 000 small launches a step:
# minutes a run. Its cost per step does not depend on the step, so on CUDA it is timed over the first
# REF_STEPS steps of the same grid and scaled by steps / REF_STEPS (the row says so; no KL/W2 for it).
REF_STEPS = 100
# The same on the CPU for issue 14's point-cloud target (N = M = 10⁴, 100 steps): the torch reference runs the
# posterior step by step, tens of seconds a step on 2 threads; it is not what that target compares against.
REF_STEPS_CPU = 10


# Issue 15: point clouds at image sizes on the CPU, (d, n queries, N data points), 100 steps of HIGH_D_METHOD (the
# method with the most peers). The work per step is n·N·d; at these sizes the direct CPU kernel runs the 100 steps in
# about a second on one thread, the torch reference ~1 s a step (hence REF_STEPS_CPU steps, scaled).
HIGH_D_CPU = ((784, 128, 2048), (3072, 64, 1024))
HIGH_D_METHOD, HIGH_D_STEPS = "dpmpp_2m", 100


# Targets against the peers' loops (issue 14): these target cases run the peers too (the others time fastdiff only).
PEER_TARGETS = ("issue 14",)
# Issue 14's sizes: the MLP at M = 1024, d = 2 and the point cloud at N = M = 10⁴, both 100 steps of dpmpp_2m.
TARGET_STEPS_I14 = 100


def target_cases(ctx: Context):
    """[(denoiser, method, n, steps, N data points, label)]: the targets' exact sizes."""
    if ctx.quick:
        return []
    if ctx.cuda:
        return [("pointcloud", "ancestral SDE", 100_000, 1000, N_DATA_TARGET, "issue 3"),
                ("pointcloud", "ancestral SDE", 10_000, 200, N_DATA_TARGET, "issue 4")]
    return [("pointcloud", "ancestral SDE", 10_000, 200, N_DATA_TARGET, "issue 4"),
            ("mlp", "dpmpp_2m", 1024, TARGET_STEPS_I14, N_DATA, "issue 14"),
            ("pointcloud", "dpmpp_2m", 10_000, TARGET_STEPS_I14, N_DATA_TARGET, "issue 14")]


# ----------------------------------------------------------------------------------------- setup
class MLP(torch.nn.Module):
    """D(x, σ) = c_skip x + c_out F(c_in x, log σ / 4) (EDM preconditioning, σ_data = 0.5)."""

    def __init__(self, width: int = MLP_WIDTH, sigma_data: float = 0.5):
        super().__init__()
        self.sd = sigma_data
        self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, 2))

    def forward(self, x, sigma):
        s = sigma.reshape(-1, 1).to(x.dtype)
        sd2 = self.sd**2
        c_skip = sd2 / (s * s + sd2)
        c_out = s * self.sd / (s * s + sd2).sqrt()
        c_in = 1 / (s * s + sd2).sqrt()
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, s.log() / 4], 1))


MLP_FLOPS = 2 * (3 * MLP_WIDTH + 2 * MLP_WIDTH * MLP_WIDTH + 2 * MLP_WIDTH)    # per sample per evaluation


def train_mlp(data: torch.Tensor, iters: int, device) -> MLP:
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = MLP().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, iters))
    data = data.to(device)
    lo, hi = math.log(T_END), math.log(T)
    for _ in range(iters):
        idx = torch.randint(data.shape[0], (1024,), generator=g).to(device)
        y = data[idx] + math.sqrt(BANDWIDTH) * torch.randn(1024, 2, generator=g).to(device)
        sigma = torch.exp(lo + (hi - lo) * torch.rand(1024, generator=g)).to(device)
        x = y + sigma[:, None] * torch.randn(1024, 2, generator=g).to(device)
        s = sigma[:, None]
        weight = (s * s + 0.25) / (s * 0.5) ** 2        # EDM loss weight: unit weight on F
        loss = (weight * (net(x, sigma) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def setup(ctx: Context):
    if "sample_setup" in ctx.cache:
        return ctx.cache["sample_setup"]
    import fastdiff as fd
    st = settings(ctx)
    process = fd.PureVE(T=T)
    S = {"fd": fd, "process": process, "st": st, "datasets": {}, "grids": {}}
    dataset(ctx, S, N_DATA)
    if ctx.progress is not None:
        ctx.progress.start(f"sample: training the MLP denoiser ({st['train_iters']} Adam steps)")
    S["net"] = net = train_mlp(S["datasets"][N_DATA]["data64"].float(), st["train_iters"], ctx.device)
    S["mlp"] = fd.from_model(net, process, prediction="x0", time_input="sigma")
    ctx.cache["sample_setup"] = S
    return S


def dataset(ctx: Context, S, N: int):
    """The swiss-roll kernel density with N points: its true density, the point cloud, exact draws."""
    if N in S["datasets"]:
        return S["datasets"][N]
    fd, process = S["fd"], S["process"]
    data64 = fd.datasets.swiss_roll(N, seed=0, dtype=torch.float64)
    truth = fd.PointCloud(data64, process, bandwidth=BANDWIDTH)
    g = torch.Generator().manual_seed(1)
    w2_n = S["st"]["w2_n"]
    ref_draws = data64[torch.randint(N, (w2_n,), generator=g)] + math.sqrt(BANDWIDTH) * torch.randn(
        w2_n, 2, generator=g, dtype=torch.float64)
    S["datasets"][N] = out = {
        "N": N, "data64": data64, "density": _memo_density(truth), "ref_draws": ref_draws,
        "cloud": fd.PointCloud(data64.float().to(ctx.device), process, bandwidth=BANDWIDTH), "floor": {}}
    return out


def highd_dataset(ctx: Context, S, d: int, N: int):
    """N standard normal points in d dimensions as a point cloud with the suite's bandwidth (no true density:
    the image-sized cases report speed and agreement, not KL/W2)."""
    key = ("highd", d, N)
    if key not in S["datasets"]:
        g = torch.Generator().manual_seed(d)
        data = torch.randn(N, d, generator=g, dtype=torch.float32)
        S["datasets"][key] = {"N": N, "d": d, "cloud": S["fd"].PointCloud(data.to(ctx.device), S["process"],
                                                                          bandwidth=BANDWIDTH)}
    return S["datasets"][key]


def _memo_density(truth):
    """The true density, remembered for the last points asked: kl_histogram evaluates it on the same quadrature
    nodes for every row (40 000 nodes × N points in float64, most of a quick row's cost otherwise)."""
    last = {}

    def density(z):
        if "z" not in last or last["z"].shape != z.shape or not torch.equal(last["z"], z):
            last["z"], last["f"] = z.clone(), truth.data_log_prob(z).exp()
        return last["f"]
    return density


def grid(S, steps: int):
    if steps not in S["grids"]:
        S["grids"][steps] = S["fd"].time_grid(S["process"], steps, "karras", T_END)
    return S["grids"][steps]


def exact_draws(DS, n: int):
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(DS["N"], (n,), generator=g)
    return DS["data64"][idx] + math.sqrt(BANDWIDTH) * torch.randn(n, 2, generator=g, dtype=torch.float64)


def metrics(S, DS, x: torch.Tensor):
    fd = S["fd"]
    x = x.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        return float("nan"), float("nan")
    kl = fd.metrics.kl_histogram(x, density=DS["density"], bins=50, range=GRID)
    try:
        w2 = fd.metrics.w2(x, DS["ref_draws"], max_n=S["st"]["w2_n"], seed=0)
    except ImportError:
        w2 = fd.metrics.sliced_w2(x, DS["ref_draws"])
    return kl, w2


# ----------------------------------------------------------------------------------------- samplers
def fd_sampler(ctx: Context, S, den, method: str, times, backend: str, **extra):
    """fd.sample(den, x=xT, ...) on `backend` (a point cloud runs the backend's whole-trajectory op)."""
    fd = S["fd"]
    m, ode = METHODS[method]

    def run(xT):
        return fd.sample(den, x=xT.clone(), times=times, method=m, ode=ode, seed=7, backend=backend, **extra)
    return run


def samplers(ctx: Context, S, den_name: str, den, method: str, times, peers: bool = True):
    """[(provider, backend, fn(xT) -> samples, warm_first)] for one denoiser and method."""
    out = []
    for name in fastdiff_backends():
        out.append((fastdiff_provider(name), name, fd_sampler(ctx, S, den, method, times, name),
                    name in ("torch", "cpu")))
    if not peers:
        return out
    sig = times.to(torch.float32).to(ctx.device)
    if den_name == "pointcloud":
        def model(x, sigma):
            return den.denoise(x, float(sigma.reshape(-1)[0]))
    else:
        net = S["net"]

        def model(x, sigma):
            return net(x, sigma.reshape(-1)[:1].expand(x.shape[0]) if sigma.numel() == 1 else sigma)
    if den_name == "mlp":
        out.append((MODEL_ALONE, None, model_alone(ctx, S["net"], times), not ctx.cuda))
    multistep = method in MULTISTEP
    # the models each peer loop runs, labelled: a point cloud's multistep peers run both fastdiff's own denoiser
    # and the naive torch one a user would write without fastdiff, so both ratios are visible
    if den_name == "pointcloud" and multistep:
        naive = naive_pointcloud_denoiser(den.data, BANDWIDTH)
        k_models = [(" + fastdiff PointCloud.denoise", model), (f" + {NAIVE}", naive)]
        d_models = [(f" + {NAIVE}", naive)]
    else:
        k_models = d_models = [("", model)]
    K, reason = kdiffusion_sampling()
    if K is None:
        ctx.note(SUITE, "k-diffusion", reason)
    else:
        fn = getattr(K, KDIFFUSION[method])
        for suffix, m in k_models:
            out.append((f"k-diffusion {KDIFFUSION[method]}{suffix}", None,
                        lambda xT, fn=fn, m=m: fn(m, xT.clone(), sig, disable=True), not ctx.cuda))
    sched_mod, reason = optional_import("diffusers", "pip install diffusers")
    if sched_mod is None:
        ctx.note(SUITE, "diffusers", reason)
    elif method == "euler ODE":
        sched = sched_mod.EulerDiscreteScheduler(prediction_type="sample")
        sigmas = times.tolist()

        def diffusers_loop(xT):
            sched.set_timesteps(sigmas=sigmas, device=ctx.device)
            x = xT.clone()
            for i, t in enumerate(sched.timesteps):
                sched.scale_model_input(x, t)           # the loop's usual call; D takes the unscaled x
                pred = model(x, sched.sigmas[i].reshape(1).to(x.dtype))
                x = sched.step(pred, t, x, return_dict=False)[0]
            return x
        out.append(("diffusers EulerDiscreteScheduler", None, diffusers_loop, not ctx.cuda))
    elif multistep:
        out += diffusers_multistep(ctx, S, sched_mod, den_name, method, times, d_models)
    else:
        ctx.note(SUITE, "diffusers EulerAncestralDiscreteScheduler", "set_timesteps takes no custom sigmas, so "
                 "it cannot run the same grid: not compared", kind="not comparable")
    return out


def model_alone(ctx: Context, net, times):
    """MODEL_ALONE's timed function: net(x, σ_k) at each of the grid's first K σ's (one evaluation a step, as every
    method the MLP cases run), the σ tensors built beforehand, the outputs dropped. It returns no samples."""
    sigmas = [s.reshape(1).to(torch.float32).to(ctx.device) for s in times[:-1]]

    def run(xT):
        s_in = xT.new_ones(xT.shape[0])
        for s in sigmas:
            net(xT, s * s_in)
        return None
    return run


def naive_pointcloud_denoiser(data: torch.Tensor, bandwidth: float):
    """What a user writes without fastdiff: D(x, σ) of the kernel density (points y_i, variance `bandwidth`)
    under the suite's VE process (α = 1), in float32 with stock torch ops, the whole [M, N] logit matrix at once:
    w = softmax_i(−|x − y_i|² / 2c) (cdist, logsumexp), c = σ² + bandwidth, D = (σ² Σ w_i y_i + bandwidth x) / c."""
    y = data.to(torch.float32)

    def denoise(x, sigma):
        # a 0-dim tensor: no host sync per step (k-diffusion's σ is on the device, diffusers' on the CPU)
        s2 = sigma.reshape(-1)[0].to(device=x.device, dtype=torch.float32).square()
        c = s2 + bandwidth
        logits = torch.cdist(x, y).square_().div_(-2 * c)
        w = (logits - torch.logsumexp(logits, 1, keepdim=True)).exp_()
        return (s2 * (w @ y) + bandwidth * x) / c
    return denoise


def diffusers_multistep(ctx: Context, S, sched_mod, den_name: str, method: str, times, models):
    """diffusers' DPM-Solver++(2M) loops on the suite's grid, or notes saying why a scheduler cannot run it.

    DPMSolverMultistepScheduler takes no custom sigmas: its grid comes from its discrete training schedule (integer
    timesteps, float32 alphas_cumprod), which cannot hold the Karras grid 80 → 1e-3. EDMDPMSolverMultistepScheduler
    (the same solver for the VE / EDM parametrisation) builds exactly that Karras grid (sigma_min, sigma_max, rho = 7;
    computed in float32) and appends a last σ: 0 (one more step, to 0) or sigma_min. With sigma_min and
    num_inference_steps = K + 1 it runs the suite's K steps followed by one zero-length step, which leaves x
    unchanged (to float32 rounding: its σ is recomputed) and costs one more model evaluation. Its model is
    EDM's F: the loop feeds c_in·x and c_noise = log(σ)/4 and the scheduler forms D = c_skip x + c_out F
    (σ_data = 0.5, the MLP's own preconditioning; a point cloud's D is converted to F = (D − c_skip x) / c_out)."""
    ctx.note(SUITE, "diffusers DPMSolverMultistepScheduler", "set_timesteps takes only a step count or integer "
             "timesteps of its discrete training schedule (float32 alphas_cumprod), so it cannot run the Karras grid "
             "σ = 80 → 1e-3: not compared; EDMDPMSolverMultistepScheduler (the same solver, VE/EDM form) runs it",
             kind="not comparable")
    if method == "dpmpp_2m_sde":
        # the zero-length last step goes from the float32 Karras σ_K (just below 1e-3) up to sigma_min = 1e-3 exactly:
        # h < 0 there, and sde-dpmsolver++'s noise scale sqrt(1 − e^{−2h}) is NaN
        ctx.note(SUITE, f"{EDM_SCHEDULER} (sde-dpmsolver++)", "cannot run the suite's grid (K steps ending at "
                 "σ = 1e-3): its final σ is 0 (one more step) or sigma_min, and with sigma_min its zero-length last "
                 "step has h < 0 after float32 rounding, where the SDE noise scale sqrt(1 − e^(−2h)) is NaN: "
                 "not compared",
                 kind="not comparable")
        return []
    steps = times.numel() - 1
    sched = sched_mod.EDMDPMSolverMultistepScheduler(
        sigma_min=float(times[-1]), sigma_max=float(times[0]), sigma_data=SIGMA_DATA, rho=7.0,
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min")
    sched.set_timesteps(steps + 1, device=ctx.device)
    if not torch.allclose(sched.sigmas[:-1].double(), times.double().cpu(), rtol=1e-5, atol=0.0):
        ctx.note(SUITE, EDM_SCHEDULER, "its Karras grid differs from the suite's beyond float32 rounding: not compared",
                 kind="not comparable")
        return []
    net = S["net"]
    out = []
    for suffix, model in models:
        if den_name == "pointcloud":
            def F(x_in, x, sigma, c_noise, model=model):
                c_skip, c_out = _edm_skip_out(sigma)
                return (model(x, sigma) - c_skip * x) / c_out
        else:
            def F(x_in, x, sigma, c_noise):
                return net.net(torch.cat([x_in, c_noise.reshape(1, 1).expand(x.shape[0], 1)], 1))

        def loop(xT, F=F):
            sched.set_timesteps(steps + 1, device=ctx.device)
            x = xT.clone()
            for i, t in enumerate(sched.timesteps):
                x_in = sched.scale_model_input(x, t)
                x = sched.step(F(x_in, x, sched.sigmas[i], t), t, x, return_dict=False)[0]
            return x
        out.append((f"{EDM_SCHEDULER}{suffix}", None, loop, not ctx.cuda))
    return out


def _edm_skip_out(sigma):
    sd2 = SIGMA_DATA**2
    return sd2 / (sigma * sigma + sd2), sigma * SIGMA_DATA / (sigma * sigma + sd2).sqrt()


def loop_samplers(ctx: Context, S, times):
    """The `mlp loop` case: fd.sample with and without cuda_graph on every backend, and the eager loop."""
    fd = S["fd"]
    method = "ancestral SDE"
    out = []
    for name in fastdiff_backends():
        out.append((fastdiff_provider(name), name, fd_sampler(ctx, S, S["mlp"], method, times, name),
                    name in ("torch", "cpu")))
    for name in fastdiff_backends():
        out.append((f"{fastdiff_provider(name)} cuda_graph", name,
                    fd_sampler(ctx, S, S["mlp"], method, times, name, cuda_graph=True), False))
    m, ode = METHODS[method]
    table = fd.step_table(S["process"], times, m, ode)
    A, B, C = (col.tolist() for col in table.for_prediction("x0"))
    sig = S["process"].sigma(table.t).to(torch.float32).to(ctx.device)
    net = S["net"]

    def eager(xT):
        x = xT.clone()
        M = x.shape[0]
        for k in range(len(A)):
            D = net(x, sig[k].expand(M))
            x = A[k] * x + B[k] * D + C[k] * torch.randn_like(x)
        return x
    out.append((EAGER_LOOP, None, eager, True))
    return out


# ----------------------------------------------------------------------------------------- the suite
def cases(ctx: Context) -> list[Case]:
    st = settings(ctx)
    out = []        # the targets first: a run with a time limit measures them before anything else
    n_loop, steps_loop = st["loop"]
    loop_target = None if ctx.quick or not ctx.cuda else "issue 3"
    loop_case = Case(SUITE, f"sample mlp loop n={n_loop} steps={steps_loop}" +
                     (f" (target, {loop_target})" if loop_target else ""),
                     lambda ctx: run_loop_case(ctx, n_loop, steps_loop, loop_target))
    if loop_target:             # the quickest target first
        out.append(loop_case)
    for den, method, n, steps, N, label in target_cases(ctx):
        out.append(Case(SUITE, f"sample {den} {method} n={n} steps={steps} N={N} (target, {label})",
                        lambda ctx, den=den, method=method, n=n, steps=steps, N=N, label=label:
                        run_case(ctx, den, method, n, steps, N, target=label)))
    if not loop_target:
        out.append(loop_case)
    for den in ("pointcloud", "mlp"):
        for method in METHODS:
            for n in st["ns"]:
                out.append(Case(SUITE, f"sample {den} {method} n={n}",
                                lambda ctx, den=den, method=method, n=n: run_case(ctx, den, method, n,
                                                                                  st["steps"], N_DATA)))
    for d, n, N in highd_cases(ctx):
        out.append(Case(SUITE, f"sample pointcloud d={d} {HIGH_D_METHOD} n={n} steps={HIGH_D_STEPS} N={N}",
                        lambda ctx, d=d, n=n, N=N: run_highd_case(ctx, d, n, N, HIGH_D_STEPS)))
    out.append(Case(SUITE, "sample: speedups", speedups))
    return out


def highd_cases(ctx: Context):
    """[(d, n, N)]: the image-sized point clouds of a full CPU run (issue 15)."""
    return [] if ctx.quick or ctx.cuda else list(HIGH_D_CPU)


def speedups(ctx: Context):
    rows = [r for r in ctx.rows if r["suite"] == SUITE]
    fill_speedups([r for r in rows if r["op"] != "mlp loop"], REF)
    fill_speedups([r for r in rows if r["op"] == "mlp loop"], EAGER_LOOP)


def sample_roofline(ctx: Context, den: str, n: int, steps: int, N: int, seconds: float, d: int = 2):
    c = ctx.ceilings
    if not c or not all(k in c for k in ("fma", "exp", "copy")):
        return None, None, None
    if den == "pointcloud":
        M = n
        bounds = {"fma": 4 * d * M * N / (c["fma"].value * 1e9), "exp": M * N / (c["exp"].value * 1e9),
                  "copy": 4 * (2 * M * d + N * d + M) / (c["copy"].value * 1e9)}
        name = max(bounds, key=bounds.get)
        per_run = steps * bounds[name]
    else:
        name, per_run = "fma", steps * n * MLP_FLOPS / (c["fma"].value * 1e9)
    return name, n / per_run, per_run / seconds


def _policy(ctx: Context):
    # a run of ~50 ms (the MLP cases, whose ratios are within 10% of each other) gets ~30 reps instead of ~10:
    # on a shared 2-core machine the median of 10 moved the MLP ratios by ±10% from run to run
    return replace(ctx.policy, warmup=1, min_reps=2 if ctx.quick else 3, max_reps=10 if ctx.quick else 30,
                   min_time=ctx.policy.min_time if ctx.quick else 2.0, sample_time=0.0,
                   max_time=ctx.policy.max_time * 2)


def _floor_row(ctx, S, DS, op, case, n, steps, target):
    if n not in DS["floor"]:    # the estimators' floor: exact draws of the same size
        DS["floor"][n] = metrics(S, DS, exact_draws(DS, n))
    kl0, w20 = DS["floor"][n]
    ctx.add_row(suite=SUITE, op=op, provider="exact draws (floor)", case=case,
                shape=f"n={n},N={DS['N']},d=2,steps={steps}", N=DS["N"], d=2, n_elems=n, steps=steps, dtype="float32",
                kl=kl0, w2=w20, target=target,
                note="exact samples of the true density: the floor of the KL and W2 estimators at this n")


def row_note(provider: str) -> str | None:
    """What a peer row runs beyond its name (None for the others)."""
    notes = []
    if provider == MODEL_ALONE:
        notes.append("the MLP's forward at the grid's σ's with no sampler around it (one evaluation a step, as every "
                     "loop here makes): no samples, no KL/W2; a peer loop's time over this one bounds the speedup any "
                     "sampler can have over that loop with this model")
    if provider.startswith(EDM_SCHEDULER):
        notes.append("the suite's Karras grid (σ computed by diffusers in float32) plus one zero-length last step "
                     "(σ_min to σ_min: x unchanged to float32 rounding, one more model evaluation); dpmsolver++, "
                     "solver_order=2")
    if provider.startswith("k-diffusion sample_dpmpp_2m_sde"):
        notes.append("k-diffusion's default noise: BrownianTreeNoiseSampler (torchsde)")
    if provider.endswith(NAIVE):
        notes.append(f"{NAIVE}: stock torch in float32, the whole [M, N] logit matrix at once (cdist, logsumexp, "
                     "matmul); not fastdiff's kernels")
    elif provider.endswith("fastdiff PointCloud.denoise"):
        notes.append("the peer's loop calling fastdiff's own point-cloud denoiser each step")
    return "; ".join(notes) or None


def _sample_into(last: dict, fn, xT):
    """One timed run; its samples are kept in last["x"] for the metrics."""
    with torch.no_grad():
        last["x"] = fn(xT)


def _measure_together(ctx, provs, xT, policy) -> dict:
    """{provider: (Timing or the exception its first call raised, its last samples {"x": ...})}, the providers
    that ran timed by measure_interleaved."""
    import time
    out, runs = {}, []
    for provider, _backend, fn, _warm in provs:
        last: dict = {}
        call = partial(_sample_into, last, fn, xT)
        try:
            t0 = time.perf_counter()
            call()
            if ctx.cuda:
                torch.cuda.synchronize()
            runs.append((provider, call, last, time.perf_counter() - t0))
        except Exception as exc:          # reported by the caller's handlers, as a measured provider's would be
            out[provider] = (exc, last)
    if runs:
        timings = measure_interleaved([r[1] for r in runs], ctx.device, policy)
        for (provider, _call, last, first), t in zip(runs, timings, strict=True):
            out[provider] = (replace(t, first_s=first), last)
    return out


def _time_providers(ctx, S, DS, provs, xT, *, op, case, den, n, steps, target, compare_ode, scaled=None):
    """Time each provider on the whole run; a provider in `scaled` ({name: factor}) runs a prefix of the grid
    and its times are multiplied by the factor (its samples are not the run's: no KL/W2)."""
    first_out = None
    scaled = scaled or {}
    policy = _policy(ctx)
    d = DS.get("d", 2)
    quality = d == 2        # KL/W2 are 2-D histogram metrics (the swiss roll); image-sized clouds have none

    def refusal(backend):
        if backend is None:
            return None
        op_name = "pointcloud_sample" if den == "pointcloud" else "affine_step"
        return backend_refusal(backend, op_name, x=xT, data=DS["cloud"].data if den == "pointcloud" else None)

    # the MLP cases (runs of ~50 ms whose ratios are within 10% of each other) are timed together, round by
    # round, so that the machine's drift does not fall on one provider; a point cloud's runs take seconds, and a
    # scaled provider runs a prefix of the grid (the slow reference), so those are timed one at a time
    together = {} if den == "pointcloud" or ctx.out_of_time() else _measure_together(
        ctx, [p for p in provs if not refusal(p[1]) and p[0] not in scaled], xT, policy)
    for provider, backend, fn, warm_first in provs:
        if ctx.out_of_time():
            ctx.note(SUITE, provider, f"not run on {case}: the run's time limit was reached", kind="skipped")
            continue
        reasons = refusal(backend)
        if reasons:
            ctx.note(SUITE, provider, "; ".join(reasons))
            continue
        if ctx.progress is not None:
            ctx.progress.start(f"sample {case} {provider}")
        last = {}
        failed = False
        try:
            if provider in together:
                t, last = together[provider]
                if isinstance(t, Exception):
                    raise t
            else:
                t = measure(partial(_sample_into, last, fn, xT), ctx.device, policy, warm_first=warm_first)
            factor = scaled.get(provider)
            kl = w2 = None
            if factor is not None:      # timed on a prefix of the grid: its samples are not the run's
                t = replace(t, **{k: getattr(t, k) * factor
                                  for k in ("median_s", "q25_s", "q75_s", "min_s", "first_s")})
            elif quality and last["x"] is not None:      # MODEL_ALONE returns no samples
                kl, w2 = metrics(S, DS, last["x"])
        except (ValueError, TypeError) as exc:
            # a backend refusing (ValueError), or fd.sample without a keyword this harness passes (TypeError)
            kind = "skipped" if backend is not None else "error"
            ctx.note(SUITE, provider, f"{den}: {describe_error(exc, 300)}", kind=kind)
            failed = True
        except Exception as exc:
            kind = "skipped" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
            ctx.note(SUITE, provider, f"failed on {case}: {describe_error(exc)}", kind=kind)
            failed = True
        if failed:
            cleanup(ctx.device)
            continue
        diff = None
        if compare_ode and provider not in scaled and last["x"] is not None:
            if first_out is None:
                first_out = last["x"]
            diff = float((last["x"].double() - first_out.double()).abs().max())
        ceiling, bound, frac = sample_roofline(ctx, den, n, steps, DS["N"], t.median_s, d)
        ctx.timing_row(t, suite=SUITE, op=op, provider=provider, backend=backend, case=case,
                       shape=f"n={n},N={DS['N']},d={d},steps={steps}", N=DS["N"], d=d, n_elems=n, steps=steps,
                       dtype="float32", throughput=n / t.median_s, unit="samples/s", ceiling=ceiling,
                       ceiling_throughput=bound, roofline_fraction=frac, kl=kl, w2=w2, max_abs_diff=diff,
                       target=target, note=row_note(provider) if provider not in scaled else
                       f"extrapolated: timed over the first {round(steps / scaled[provider])} of {steps} steps "
                       f"(the cost of a step does not depend on the step) and scaled by {scaled[provider]:g}")
        if row_note(provider):      # once per provider in the report's notes too (each row's note is in the CSV)
            ctx.note(SUITE, provider, row_note(provider), kind="how measured")
        del last
    cleanup(ctx.device)


def run_case(ctx: Context, den: str, method: str, n: int, steps: int, N: int, target: str | None = None):
    S = setup(ctx)
    DS = dataset(ctx, S, N)
    times = grid(S, steps)
    case = f"{den} {method} n={n} steps={steps}" + (f" N={N}" if N != N_DATA else "")
    op = f"{den}/{method}"
    denoiser = DS["cloud"] if den == "pointcloud" else S["mlp"]
    xT = S["process"].prior(n, 2, seed=3, dtype=torch.float32, device=ctx.device)
    _floor_row(ctx, S, DS, op, case, n, steps, target)
    provs = samplers(ctx, S, den, denoiser, method, times, peers=target is None or target in PEER_TARGETS)
    scaled = {}
    ref_steps = REF_STEPS if ctx.cuda else REF_STEPS_CPU if den == "pointcloud" and target in PEER_TARGETS else None
    if ref_steps is not None and steps > ref_steps:
        provs = [(p, b, fd_sampler(ctx, S, denoiser, method, times[:ref_steps + 1], b), w) if p == REF else (p, b, f, w)
                 for p, b, f, w in provs]
        scaled[REF] = steps / ref_steps
    _time_providers(ctx, S, DS, provs, xT, op=op, case=case, den=den, n=n, steps=steps, target=target,
                    compare_ode=method in DETERMINISTIC, scaled=scaled)


def run_highd_case(ctx: Context, d: int, n: int, N: int, steps: int):
    """An image-sized point cloud (issue 15): HIGH_D_METHOD with every peer of a point cloud, the torch reference
    timed over REF_STEPS_CPU steps and scaled (about a second a step at these sizes)."""
    S = setup(ctx)
    DS = highd_dataset(ctx, S, d, N)
    times = grid(S, steps)
    method = HIGH_D_METHOD
    xT = S["process"].prior(n, d, seed=3, dtype=torch.float32, device=ctx.device)
    provs = samplers(ctx, S, "pointcloud", DS["cloud"], method, times)
    scaled = {}
    if steps > REF_STEPS_CPU:
        provs = [(p, b, fd_sampler(ctx, S, DS["cloud"], method, times[:REF_STEPS_CPU + 1], b), w) if p == REF
                 else (p, b, f, w) for p, b, f, w in provs]
        scaled[REF] = steps / REF_STEPS_CPU
    _time_providers(ctx, S, DS, provs, xT, op=f"pointcloud d={d}/{method}", case=f"pointcloud d={d} {method} n={n} "
                    f"steps={steps} N={N}", den="pointcloud", n=n, steps=steps, target=None,
                    compare_ode=method in DETERMINISTIC, scaled=scaled)


def run_loop_case(ctx: Context, n: int, steps: int, target: str | None):
    S = setup(ctx)
    DS = dataset(ctx, S, N_DATA)
    times = grid(S, steps)
    case = f"mlp loop n={n} steps={steps}"
    xT = S["process"].prior(n, 2, seed=3, dtype=torch.float32, device=ctx.device)
    _floor_row(ctx, S, DS, "mlp loop", case, n, steps, target)
    _time_providers(ctx, S, DS, loop_samplers(ctx, S, times), xT, op="mlp loop", case=case, den="mlp", n=n,
                    steps=steps, target=target, compare_ode=False)
