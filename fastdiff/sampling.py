"""The sampler: a float64 step table plus the loop  D = denoiser(x, t_k);  x = A_k x + B_k D + C_k z_k
(DESIGN.md, MATH.md §3). One function for every process, method, SDE/ODE and denoiser.

The noise of sample i at step k depends only on (seed, sample_offset + i, k): results do not change
with chunk_size, and sample(n=1000)[:100] equals sample(n=100) bit for bit.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections import OrderedDict

import torch

from . import _backend, _graphs, ops
from . import methods as _methods
from ._checks import check_choice, check_flag
from .denoisers import Denoiser, PointCloud
from .processes import Process
from .schedules import DEFAULT_SCHEDULE, DEFAULT_T_END, as_integer, check_times, time_grid
from .steps import step_table

_DEFAULT_CHUNK_ELEMS = 1 << 24    # samples × dims kept on the device at once when chunk_size is None
_PROGRESS_CHUNKS = 20             # with progress=True a fused point cloud runs in about this many chunks
# Backends whose ops.posterior + ops.affine_step, step by step, equal their ops.pointcloud_sample bit for bit
# (tests/test_sampling.py::test_point_cloud_with_a_no_op_callback_equals_the_fused_run), so a progress bar
# can count steps there without changing the result.
_STEPWISE_EXACT = ("cpu", "torch")
_MIN_PROGRESS_ROWS = 64           # fewer rows per chunk than this: count steps instead (see _sample)
# Host memory per step of the grid: the float64 grid and step table with their temporaries (~30 columns)
# plus the Python float lists of the per-step loop (4 lists × 32 bytes), rounded up.
_HOST_BYTES_PER_STEP = 512
# Global sample indices: the noise counters are 64-bit, but the prior and the torch reference hold them in
# int64 (with an exclusive end), so fd.sample keeps sample_offset + n < 2**63 on every backend.
_MAX_INDEX = 2**63


class GridWarning(UserWarning):
    """The time grid is known to be poor: on unit-Gaussian data the sampler's exact output variance (the
    1-D Gaussian oracle) is far from 1. Silence with warnings.simplefilter("ignore", fd.GridWarning)."""


def sample(denoiser: Denoiser, process: Process | None = None, *, n: int | None = None, steps: int = 200,
           schedule: str = DEFAULT_SCHEDULE, method: str = "ei", ode: bool = False, t_end: float = DEFAULT_T_END,
           final_denoise: bool = False, seed: int = 0, sample_offset: int = 0, return_trajectory: bool = False,
           progress: bool = False, callback=None, backend: str = "auto", x: torch.Tensor | None = None,
           times=None, eta: float | None = None, chunk_size: int | None = None, shape=None,
           device=None, dtype: torch.dtype = torch.float32, cuda_graph: bool = False,
           s_churn: float | None = None, s_tmin: float | None = None, s_tmax: float | None = None,
           s_noise: float | None = None, solver_type: str | None = None, order: int | None = None,
           r: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw n samples by running the reverse SDE (ode=False) or the PF-ODE (ode=True) from T to t_end.

    Every parameter after `process` is keyword-only (fd.sample(cloud, n=1000, steps=50)).

    Each step k = 0..K−1 evaluates the denoiser at (x_k, t_k) and forms x_{k+1} = A_k x_k + B_k·out + C_k z_k
    from a float64 step table (fd.step_table), z_k from the noise contract (fastdiff.noise). The multistep and
    two-stage methods (k-diffusion's, below) run one float64 table too (fastdiff.methods.method_table): a step
    adds the last one or two D's (kept in buffers allocated once) and, for two-stage methods, a second D.

    denoiser       an analytic denoiser (PointCloud, GaussianMixture, Gaussian) or fd.from_model(...)
    process        defaults to denoiser.process (must be the same process if given)
    n              the number of samples drawn from the prior N(0, process.prior_std² I); or give x
    steps          K, the number of steps (an integer >= 1); ignored when `times` is given
    schedule       the grid: "logsnr" (default: good on every process from ~10 steps), "uniform",
                   "quadratic", "exponential", "karras" (see fd.time_grid)
    method         "ei" (default, exponential integrator with the score frozen), "euler", "ei-x0" (D frozen:
                   DDIM / DPM-Solver++(1) / the DDPM posterior), or one of k-diffusion's samplers, run on any
                   process through σ̃ = σ/α, x̃ = x/α (k-diffusion's name in brackets where it differs):
                   "edm_euler" (sample_euler, with churn), "euler_ancestral", "heun", "dpm_2",
                   "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
                   "dpmpp_3m_sde", "lms". A point cloud without a callback runs every method but lms fused,
                   like ei: one ops.pointcloud_sample call per chunk with the method's kernel table
                   (MethodTable.kernel_table; the last D's stay in the kernel, a two-stage step's second D is
                   taken in the same call), equal to the table executor up to rounding, on every backend (cpu,
                   cuda, triton, torch). Any other denoiser
                   (a model, GaussianMixture, Gaussian) runs five of them (edm_euler without churn,
                   euler_ancestral, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde) as one fused ops.affine_step per
                   step on the chosen backend (cpu, cuda, triton, torch): D_k from the model, in-kernel noise,
                   and the history (B₋₁, D_{k−1}), (B₋₂, D_{k−2}) in buffers allocated once per chunk and
                   rotated, equal to the table executor up to rounding. Otherwise (two-stage methods and churn
                   with a model, lms, a point cloud with a callback) they run the torch table executor
                   (fastdiff.methods.run_table), a point cloud's D from ops.posterior on the chosen backend step
                   by step; cuda_graph=True refuses them. With a model, cuda_graph=True captures the five
                   methods' loop (D_k and the history buffers inside the graph).
                   Their options (an option a method does not take raises ValueError naming its valid ones):
                   eta (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde,
                   dpmpp_3m_sde), s_noise (those, and the churn methods), s_churn/s_tmin/s_tmax (edm_euler,
                   heun, dpm_2), solver_type (dpmpp_2m_sde), order (lms), r (dpmpp_sde). Each defaults
                   to k-diffusion's value.
    ode            False: the reverse SDE (eta = 1); True: the probability-flow ODE (eta = 0; for k-diffusion's
                   methods: no noise of any kind, so eta and s_churn must be 0 or unset). ode, final_denoise,
                   return_trajectory, progress and cuda_graph take True or False only
    t_end          the last time of the grid, in (0, T); default 1e-3
    final_denoise  return D(x_K, t_end) instead of x_K (score_sde's "noise removal")
    seed           an integer in [0, 2**64): the noise contract's key
    sample_offset  row i is global sample sample_offset + i (an integer >= 0, sample_offset + n < 2**63), so
                   a run split over calls or machines reproduces the single run bit for bit
    return_trajectory   also return every x_k: [K + 1, n, ...] on the sample's device (memory is checked
                   up front: a run that cannot fit raises ValueError before allocating)
    progress       show a progress bar on stderr (tqdm if installed, else a line every 10 %). A point cloud
                   counts finished samples (each runs all K steps in one kernel call; the rows are split into
                   ~20 chunks so the bar moves); under 1280 samples on the cpu or torch backend it counts
                   the K steps instead (run step by step through the same ops), except for the MATH.md §3b
                   methods the whole-trajectory kernels run (all but lms), which count samples as above. Any
                   other denoiser counts the K steps of each chunk. None of this changes the results.
    callback       callback(info) is called once per step k, after the denoiser has been evaluated at
                   (x_k, t_k) and before the update, with info = {"step": k, "t": t_k (float),
                   "x": x_k (the live [m, d] state of the current chunk, before step k's update),
                   "prediction": the denoiser's output at (x_k, t_k) (D for a point cloud),
                   "sample_offset": the global index of the chunk's first row}. Modifying info["x"] in place
                   changes the run; copy what you keep (the buffers are reused). For k-diffusion's methods
                   "t" is where D_0 is evaluated (t̂ after churn), "x" the state there (x̂), "prediction" the
                   denoiser's native output and info["denoised"] its D = E[X_0 | x̂] (what the table uses);
                   a two-stage method's second evaluation is not reported (as in k-diffusion).
                   With euler/ei/ei-x0, a point cloud with a callback runs the same backend kernels step by
                   step (ops.posterior + ops.affine_step) instead of one whole-trajectory call; on the cpu and
                   torch backends the results are identical bit for bit.
    backend        "auto" (default) or a named backend ("cpu", "torch", "cuda", "triton"); one that cannot
                   run the inputs raises ValueError with its reasons (never a silent fallback). With
                   k-diffusion's methods it picks a point cloud's posterior, and another denoiser's affine step
                   for the five methods above; for the others, such a denoiser needs "auto" or "torch" (the
                   step is the torch table executor)
    x              the initial state itself, [M, ...] float32/float64 (any strides; it is copied, never
                   modified); its device and dtype are used, and n, shape, and a dtype other than the default
                   float32, if given, must agree with it
    times          an explicit strictly decreasing grid [K + 1] (replaces steps, schedule, t_end); without x it
                   must start at T (the start is drawn from the prior, the law at T); with x drawn at times[0]
                   it may start lower (img2img)
    eta            in [0, 1]: interpolates the ODE (0) and the SDE (1); default from `ode`. For k-diffusion's
                   methods it is their eta (>= 0, default 1, or 0 with ode=True): the share of ancestral noise
    s_churn        churn of Karras et al.'s Algorithm 2 (edm_euler, heun, dpm_2; >= 0, default 0): each step
                   with s_tmin <= σ̃ <= s_tmax first raises the noise level to σ̂ = σ̃ (1 + γ),
                   γ = min(s_churn / K, √2 − 1), with fresh noise scaled by s_noise; σ̂ must stay within the
                   process's range of σ/α (else ValueError)
    s_tmin         (churn) the lowest σ̃ = σ/α that is churned (default 0)
    s_tmax         (churn) the highest σ̃ that is churned (default inf)
    s_noise        the scale of the fresh noise (churn and ancestral methods; default 1)
    solver_type    dpmpp_2m_sde's second-order correction: "midpoint" (default) or "heun"
    order          lms's order (an integer >= 1, default 4)
    r              dpmpp_sde's stage position in log σ̃, in (0, 1] (default 1/2)
    chunk_size     rows run at once (an integer >= 1; default 2**24 // d); results do not depend on it
    shape          the per-sample shape (e.g. (3, 32, 32)); defaults to the denoiser's dimension
    device         "cpu" or "cuda[:i]" for samples drawn from the prior (default: the point cloud's device,
                   else the CPU); must match x's device when x is given
    dtype          torch.float32 (default) or torch.float64 for samples drawn from the prior
    cuda_graph     capture the per-step loop (model → affine step) in a CUDA graph and replay it (CUDA,
                   float32, Triton; graphs are cached across calls, so later calls with any seed only
                   replay; see fastdiff._graphs). A point cloud without a callback already runs its
                   whole trajectory in one kernel launch, so there is nothing to capture.

    Autograd: sampling runs under torch.no_grad() (as k-diffusion's samplers do): the result has no grad_fn.
    A model that needs gradients inside (guidance, a potential's score) opens torch.enable_grad() itself.
    Grids: when the 1-D Gaussian oracle says the grid is poor (unit-Gaussian data would come out with
    variance outside [1/4, 4]) a GridWarning is issued; it costs one pass over the K step coefficients
    (every method, k-diffusion's too: fastdiff.methods.unit_gaussian_variance).
    On CUDA the loop never synchronises with the host: coefficients are kernel arguments and the noise
    is drawn in the kernel.
    Returns x [n, ...], or (x, trajectory [K + 1, n, ...]) with return_trajectory=True.
    """
    options = {name: value for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax),
                                                ("s_noise", s_noise), ("solver_type", solver_type),
                                                ("order", order), ("r", r)) if value is not None}
    with torch.no_grad():
        return _sample(denoiser, process, n, steps, schedule, method, ode, t_end, final_denoise, seed, sample_offset,
                       return_trajectory, progress, callback, backend, x, times, eta, chunk_size, shape, device,
                       dtype, cuda_graph, options)


def _check_method_options(method, eta, options):
    """ValueError, naming the valid choices, for an unknown method or an option the method does not take."""
    check_choice(method, "method", _methods.ALL_METHODS)
    allowed = ("eta",) if method in _methods.FIRST_ORDER_METHODS else tuple(_methods.METHOD_OPTIONS[method])
    given = sorted(options) + (["eta"] if eta is not None else [])
    refused = [name for name in given if name not in allowed]
    if refused:
        raise ValueError(f"method {method!r} takes no {', '.join(refused)}; its options are "
                         f"{', '.join(allowed) or 'none'} (see help(fastdiff.sample))")


def _sample(denoiser, process, n, steps, schedule, method, ode, t_end, final_denoise, seed, sample_offset,
            return_trajectory, progress, callback, backend, x, times, eta, chunk_size, shape, device, dtype,
            cuda_graph, options=None):
    process = _resolve_process(denoiser, process)
    options = options or {}
    for name, flag in (("ode", ode), ("final_denoise", final_denoise), ("return_trajectory", return_trajectory),
                       ("progress", progress), ("cuda_graph", cuda_graph)):
        check_flag(flag, name)
    _check_method_options(method, eta, options)
    table_method = method not in _methods.FIRST_ORDER_METHODS      # a MATH.md §3b method: the table executor
    seed = as_integer(seed, "seed", 0, 2**64 - 1)
    sample_offset = as_integer(sample_offset, "sample_offset", 0, _MAX_INDEX - 1)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(info), got {type(callback).__name__}")
    if times is not None:
        times = check_times(process, times)
        K = times.numel() - 1
        if x is None and float(times[0]) < process.T * (1 - 1e-12):
            # the start is drawn from the prior, the law at T: a run begun lower would start from the wrong law
            raise ValueError(f"times[0]={float(times[0])} is below T={process.T}, but without x= the run starts "
                             "from the prior, the law at T: start the grid at T, or pass x= drawn at times[0] "
                             "(img2img: x = α(t)·x0 + σ(t)·z)")
    else:
        K = as_integer(steps, "steps", 1)
    x0, n, event_shape, device, dtype = _initial_state(denoiser, n, x, shape, device, dtype)
    if sample_offset + n >= _MAX_INDEX:
        raise ValueError(f"sample_offset + n must be < 2**63 (global sample indices are held in int64), "
                         f"got {sample_offset} + {n}")
    d = math.prod(event_shape)
    cloud = isinstance(denoiser, PointCloud)
    op = "posterior" if cloud and table_method else "pointcloud_sample" if cloud else "affine_step"
    engine = _backend.select(op, backend, **_backend.facts(device=device, dtype=dtype, d=d))
    # A point cloud runs whole trajectories in one op (fused kernels where a backend has them), unless a
    # callback needs every step, or a progress bar has too few rows to split into chunks (each chunk repeats
    # every step's fixed cost) and the backend's step-by-step ops give the fused op's bits (cpu, torch:
    # tested). Step by step costs ~2x the fused op on the CPU, so larger runs split their rows instead.
    # A §3b method's table executor rounds differently from the fused op, so a progress bar never switches it.
    few_rows = n < _PROGRESS_CHUNKS * _MIN_PROGRESS_ROWS
    stepwise = cloud and (callback is not None or (bool(progress) and few_rows and engine.name in _STEPWISE_EXACT
                                                   and not table_method))
    fused = cloud and not stepwise and not table_method     # (a §3b method's, once its table is known)
    graphed = bool(cuda_graph) and not cloud
    if cuda_graph and callback is not None:
        raise ValueError("cuda_graph=True cannot call a per-step callback (the captured loop runs without the "
                         "host); drop the callback or cuda_graph")
    if graphed:
        reasons = _graphs.refuse_reasons(device, dtype)
        if backend not in ("auto", "triton"):
            reasons.append(f"backend={backend!r}, but the captured loop uses the Triton affine step")
        if reasons:
            raise ValueError("cuda_graph=True cannot run: " + "; ".join(reasons))
    auto_chunk = chunk_size is None
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMS // d)
    else:
        chunk_size = as_integer(chunk_size, "chunk_size", 1)
    chunk_size = min(chunk_size, n)
    # first without the table executor's extra buffers: the grid itself is [K + 1] and must not be built
    # (80 GB for K = 1e10) before a run that cannot fit is refused
    _check_memory(K, n, d, chunk_size, dtype, device, return_trajectory)
    grid = times if times is not None else time_grid(process, K, schedule, t_end)
    if final_denoise and float(grid[-1]) <= 0:
        raise ValueError("final_denoise needs t_end > 0 (D is never evaluated at t = 0)")
    if table_method:
        mtable, unit_var = _method_table(process, grid, method, ode, eta, options)
        _check_x0_range(denoiser, mtable, dtype, method)
        _warn_if_poor_table(process, mtable, unit_var)
        _check_memory(K, n, d, chunk_size, dtype, device, return_trajectory, mtable.history + 4)
        kernel_table = _fused_method_table(mtable, process, engine, device, dtype, d) if cloud and not stepwise \
            else None
        fused = kernel_table is not None
        run: _Run | _TableRun
        if fused:     # the whole trajectory in one op, like euler / ei / ei-x0
            run = _Run(denoiser, engine, mtable, None, None, None, seed, None, return_trajectory, False, True,
                       kernel_table)
        elif not cloud and mtable.affine_step_refusal() is None:    # model → one fused affine step with history
            run = _HistoryRun(denoiser, engine, mtable, seed, callback, return_trajectory, graphed=graphed)
        else:
            if cuda_graph:
                why = mtable.kernel_table_refusal() if cloud else mtable.affine_step_refusal()
                raise ValueError(f"cuda_graph=True: method {method!r} runs the torch table executor here "
                                 f"(fastdiff.methods.run_table){f': {why}' if why else ''}, which has no captured "
                                 "loop; drop cuda_graph")
            if not cloud and backend not in ("auto", "torch"):
                raise ValueError(f"method {method!r} steps with the torch table executor here: the affine-step "
                                 f"kernels cannot express its table ({mtable.affine_step_refusal()}); "
                                 f"backend={backend!r} has no kernel for it (use backend='auto' or 'torch')")
            run = _TableRun(denoiser, engine, mtable, seed, callback, return_trajectory)
    else:
        _check_memory(K, n, d, chunk_size, dtype, device, return_trajectory)
        table = step_table(process, grid, method, ode, eta)
        _warn_if_poor_grid(process, table)
        A, B, C = table.for_prediction(denoiser.prediction)
        run = _Run(denoiser, engine, table, A, B, C, seed, callback, return_trajectory, graphed, fused)
    if fused and progress and auto_chunk:
        chunk_size = min(chunk_size, max(1, math.ceil(n / _PROGRESS_CHUNKS)))   # so the bar moves

    result = torch.empty((n, d), dtype=dtype, device=device)
    trajectory = torch.empty((K + 1, n, d), dtype=dtype, device=device) if return_trajectory else None
    chunks = math.ceil(n / chunk_size)
    bar = _Progress(progress, total=n if fused else K, unit="sample" if fused else "step",
                    desc=f"fastdiff.sample ({K} steps each)" if fused else "fastdiff.sample")
    for i, c0 in enumerate(range(0, n, chunk_size)):
        m = min(chunk_size, n - c0)
        offset = sample_offset + c0
        if x0 is None:
            xc = process.prior(m, d, seed, offset, dtype=dtype, device=device)
        else:   # a fresh contiguous copy: the kernels update it in place, the caller's x stays untouched
            xc = torch.empty((m, d), dtype=dtype, device=device).copy_(x0[c0:c0 + m].reshape(m, d))
        if not fused and chunks > 1:
            bar.new_pass(f"fastdiff.sample chunk {i + 1}/{chunks}")
        traj: torch.Tensor | None = None
        if isinstance(run, _TableRun):   # the executor writes the chunk's trajectory in place
            xc = run.chunk(xc, offset, bar, None if trajectory is None else trajectory[:, c0:c0 + m])
        else:
            xc, traj = run.chunk(xc, offset, bar)
        if final_denoise:
            xc = run.denoise(xc, float(grid[-1]))
        result[c0:c0 + m] = xc
        if trajectory is not None and traj is not None:
            trajectory[:, c0:c0 + m] = traj.view(K + 1, m, d)
        del traj
    bar.close()

    result = result.view(n, *event_shape)
    if not bool(torch.isfinite(result).all()):
        warnings.warn("fastdiff.sample produced NaN or inf: the step table or the denoiser is unstable on this "
                      "grid (try more steps, method='ei-x0', or float64)", RuntimeWarning, stacklevel=3)
    if trajectory is not None:
        return result, trajectory.view(K + 1, n, *event_shape)
    return result


class _Run:
    """One chunk's trajectory on the chosen path: the fused whole-trajectory op (point cloud, no callback),
    the point cloud's step-by-step ops (with a callback), a captured CUDA graph, or the model loop."""

    def __init__(self, denoiser, engine, table, A, B, C, seed, callback, want_traj, graphed, fused,
                 kernel_table=None):
        self.den, self.engine, self.seed, self.callback = denoiser, engine, seed, callback
        self.want_traj, self.graphed, self.fused = want_traj, graphed, fused
        self.t = table.t.tolist()
        self.lists: tuple[list[float], list[float], list[float]] | None = None
        if fused:     # the whole trajectory in one op: the kernel table, built once, goes down as it is
            self.kernel_table = kernel_table if kernel_table is not None else \
                table.kernel_table(denoiser.process, denoiser.prediction)
        else:         # a step per op: the per-step numbers, read once as Python floats (kernel arguments)
            self.lists = (A.tolist(), B.tolist(), C.tolist())
            if isinstance(denoiser, PointCloud):
                self.alpha_list = denoiser.process.alpha(table.t).tolist()
                self.sigma_list = table.sigma.tolist()

    def chunk(self, xc, offset, bar):
        if self.graphed:
            assert self.lists is not None
            A, B, C = self.lists
            out = _graphs.run_chunk(self.den, xc, self.t, A, B, C, self.seed, offset, self.want_traj)
            bar.update(len(self.t))
            return out
        if self.fused:
            # Through fastdiff.ops with the chosen backend: the same entry (checks, precision rule) as the
            # step-by-step point-cloud path below, so both give the same numbers.
            cloud = self.den
            traj = ops.pointcloud_sample(xc, cloud.data, self.kernel_table, self.seed, offset, cloud.log_weights,
                                         cloud.bandwidth, self.want_traj, backend=self.engine.name)
            bar.update(xc.shape[0])
            return xc, traj
        return xc, self._loop(xc, offset, bar)

    def _loop(self, xc, offset, bar):
        assert self.lists is not None                                # (built for every non-fused run)
        A, B, C = self.lists
        traj = [xc.clone()] if self.want_traj else None
        cloud = self.den if isinstance(self.den, PointCloud) else None
        for k, t in enumerate(self.t):
            if cloud is not None:
                out, _ = ops.posterior(xc, cloud.data, self.alpha_list[k], self.sigma_list[k], cloud.log_weights,
                                       cloud.bandwidth, backend=self.engine.name)
            else:
                out = self.den.predict(xc, t).detach()          # a model may build a graph under enable_grad
            if self.callback is not None:
                self.callback({"step": k, "t": t, "x": xc, "prediction": out, "sample_offset": offset})
            # A model's output is not scanned for NaN/inf per step (on CUDA the scan waits for the GPU): the result
            # is checked once at the end. A point cloud's D is finite by construction, but scanning it is cheap.
            ops.affine_step(xc, out, A[k], B[k], C[k], self.seed, k, offset, out=xc, backend=self.engine.name,
                            check_values=cloud is not None)
            if traj is not None:
                traj.append(xc.clone())
            bar.update()
        return torch.stack(traj) if traj is not None else None

    def denoise(self, xc, t_end):
        return _final_denoise(self.den, self.engine, xc, t_end)


def _fused_method_table(mtable, process, engine, device, dtype, d):
    """The kernel step table of a §3b method for the point cloud's whole-trajectory op, or None when the table
    executor runs it instead: a table the kernel rows cannot express (churn, two stages, lms; see
    MethodTable.kernel_table_refusal), or one the chosen backend's kernel does not take (its refuse_reasons)."""
    table = mtable.kernel_table(process)
    if table is None:
        return None
    facts = _backend.facts(device=device, dtype=dtype, d=d)
    return None if engine.refuse_reasons("pointcloud_sample", table=table, **facts) else table


def _x0_from(prediction, x, out, alpha, sigma, into=None):
    """D = (x − σ ε)/α or (x + σ² s)/α, in a new tensor or `into` (the range is checked up front:
    _check_x0_range)."""
    return torch.add(x, out, alpha=-sigma if prediction == "eps" else sigma * sigma, out=into).div_(alpha)


# An eps or score network's D = (x − σ ε)/α carries the network's rounding times σ/α: beyond this σ/α (or below
# this α, where x − σ ε ≈ α D underflows) D overflows or is lost in the working type, while the table still
# multiplies it by a coefficient small enough to give a finite step. The first-order methods never form D.
_X0_RANGE = {torch.float32: 1e30, torch.float64: 1e290}


def _check_x0_range(denoiser, table, dtype, method):
    if isinstance(denoiser, PointCloud) or denoiser.prediction == "x0":
        return
    process = denoiser.process
    tt = torch.cat([table.t, table.t_u[table.staged]])
    la = process._log_alpha(tt)
    worst_alpha = float(torch.exp(la.min()))
    worst_ratio = float(torch.exp(0.5 * torch.log(process._sigma2(tt)) - la).max())
    limit = _X0_RANGE[dtype]
    if worst_alpha < 1 / limit or worst_ratio > limit:
        raise ValueError(f"method {method!r} forms D = E[X_0 | x] from the network's {denoiser.prediction} "
                         f"output, which needs α >= {1 / limit:g} and σ/α <= {limit:g} in {dtype}; on this grid "
                         f"α reaches {worst_alpha:.3g} and σ/α {worst_ratio:.3g}. Use dtype=torch.float64, an x0 "
                         "network, a smaller T, or method 'ei'/'ei-x0'/'euler' (they never form D)")


def _final_denoise(den, engine, xc, t_end):
    if isinstance(den, PointCloud):
        alpha, sigma = den.process.alpha(t_end), den.process.sigma(t_end)
        return ops.posterior(xc, den.data, alpha, sigma, den.log_weights, den.bandwidth, backend=engine.name)[0]
    return den.denoise(xc, t_end)


class _TableRun:
    """One chunk of a MATH.md §3b method: fastdiff.methods.run_table (torch) with the contract noise, D from the
    point cloud's ops.posterior on the chosen backend or from the denoiser's prediction turned into x0."""

    def __init__(self, denoiser, engine, table, seed, callback, want_traj):
        self.den, self.engine, self.table, self.seed = denoiser, engine, table, seed
        self.callback, self.want_traj = callback, want_traj
        self.cols = table.lists()
        process = denoiser.process
        # α and σ where D_0 (t) and D_1 (t_u) are evaluated, as Python floats (no tensor read inside the loop)
        self.at = {}
        for stage, name in ((0, "t"), (1, "t_u")):
            tt = getattr(table, name)
            self.at[stage] = (torch.exp(process._log_alpha(tt)).tolist(), torch.sqrt(process._sigma2(tt)).tolist())
        self.native = None

    def _time(self, k, stage):
        return self.cols["t_u" if stage else "t"][k]

    def _denoise(self, xk, k, stage):
        alpha, sigma = self.at[stage][0][k], self.at[stage][1][k]
        den = self.den
        if isinstance(den, PointCloud):
            D = ops.posterior(xk, den.data, alpha, sigma, den.log_weights, den.bandwidth, backend=self.engine.name)[0]
            native = D
        else:
            native = den.predict(xk, self._time(k, stage)).detach()    # a model may build a graph under enable_grad
            D = native if den.prediction == "x0" else _x0_from(den.prediction, xk, native, alpha, sigma)
        if stage == 0:
            self.native = native
        return D

    def chunk(self, xc, offset, bar, traj):
        noise = _methods.ContractNoise(self.table, self.seed, offset, xc.shape[0], xc.device,
                                       kernels=self.engine.name != "torch")
        cb = None
        if self.callback is not None:
            def cb(k, xk, D0):
                self.callback({"step": k, "t": self.cols["t"][k], "x": xk, "prediction": self.native,
                               "denoised": D0, "sample_offset": offset})
        return _methods.run_table(self.table, self._denoise, xc, noise, cb, lambda k: bar.update(),
                                  reuse_state=True, trajectory=traj)

    def denoise(self, xc, t_end):
        return _final_denoise(self.den, self.engine, xc, t_end)


class _HistoryRun(_TableRun):
    """One chunk of a §3b method the affine-step kernels express (no churn, one stage, history = D, H ≤ 2) with a
    user model: per step D_k = the model's x0 (as _TableRun._denoise forms it), then ONE fused
    ops.affine_step(x, D_k, A, B0, C, history=((B1, D_{k−1}), (B2, D_{k−2}))) in place on the chosen backend,
    noise in-kernel at step k (the executor's draw). D_k is written into one of H + 1 buffers allocated per chunk,
    which rotate (never copied) so that D_k becomes D_{k−1}; a callback sees the executor's info dict, and its
    in-place edit of `denoised` reaches the history as there. Equal to the executor up to rounding (the history
    terms are added after the one-step update instead of before the noise). graphed: the same loop captured in a
    CUDA graph and replayed (fastdiff._graphs, the Triton affine step)."""

    def __init__(self, denoiser, engine, table, seed, callback, want_traj, graphed=False):
        super().__init__(denoiser, engine, table, seed, callback, want_traj)
        self.graphed = graphed

    def graph_history(self):
        """The loop's fastdiff._graphs.History (B1, B2, depth, and how D_k comes from the model's output)."""
        B = self.cols["B"]
        K = len(self.table)
        return _graphs.History(tuple(B[k][1] if self.table.history >= 1 else 0.0 for k in range(K)),
                               tuple(B[k][2] if self.table.history >= 2 else 0.0 for k in range(K)),
                               self.table.history, self.den.prediction, tuple(self.at[0][0]), tuple(self.at[0][1]))

    def chunk(self, xc, offset, bar, traj):
        c, den, depth = self.cols, self.den, self.table.history
        if self.graphed:
            K = len(self.table)
            t_list = [self._time(k, 0) for k in range(K)]
            B0 = [c["B"][k][0] for k in range(K)]
            x, tr = _graphs.run_chunk(den, xc, t_list, c["A"], B0, c["C"], self.seed, offset, traj is not None,
                                      self.graph_history())
            if traj is not None:
                traj.copy_(tr)
            bar.update(K)
            return xc.copy_(x)
        # D_k, D_{k−1}, D_{k−2}; an x0 model with no history needs none (its output is D_k itself)
        bufs = [torch.empty_like(xc) for _ in range(depth + 1)] if depth or den.prediction != "x0" else []
        if traj is not None:
            traj[0].copy_(xc)
        # the table's columns are finite (method_table checks), the counters were checked when the run started,
        # xc is this chunk's own contiguous copy and D_k passes the executor's check: the step is checked once
        step = ops.affine_stepper(xc, self.seed, offset, len(self.table), backend=self.engine.name)
        for k in range(len(self.table)):
            D = self._denoise_into(xc, k, bufs[0] if bufs else None)
            if self.callback is not None:
                self.callback({"step": k, "t": c["t"][k], "x": xc, "prediction": self.native, "denoised": D,
                               "sample_offset": offset})
            B = c["B"][k]
            history = tuple((B[j], bufs[j]) for j in range(1, depth + 1) if B[j] != 0.0)
            step(k, D, c["A"][k], B[0], c["C"][k], history)
            if depth:
                bufs.insert(0, bufs.pop())          # D_k → D_{k−1} → D_{k−2}; the oldest is next step's D
            if traj is not None:
                traj[k + 1].copy_(xc)
            bar.update()
        return xc

    def _denoise_into(self, xk, k, buf):
        """D_k at t_k into buf (the model's output copied, or its eps/score output converted there), or the x0
        model's output itself when buf is None."""
        alpha, sigma = self.at[0][0][k], self.at[0][1][k]
        den = self.den
        native = _methods._checked(den.predict(xk, self._time(k, 0)).detach(), xk, "denoise")   # the executor's check
        self.native = native
        if den.prediction == "x0":
            return native if buf is None else buf.copy_(native)
        return _x0_from(den.prediction, xk, native, alpha, sigma, into=buf)


def _resolve_process(denoiser, process):
    if not isinstance(denoiser, Denoiser):
        raise TypeError("denoiser must be a fastdiff denoiser (PointCloud, GaussianMixture, Gaussian or "
                        f"fd.from_model(...)), got {type(denoiser).__name__}")
    if process is None:
        return denoiser.process
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fastdiff process, got {type(process).__name__}")
    if process is not denoiser.process and process._key() != denoiser.process._key():
        same_print = " (they print the same, but their β callables are different objects)" \
            if repr(process) == repr(denoiser.process) else ""
        raise ValueError(f"process {process!r} differs from the denoiser's process {denoiser.process!r}{same_print}")
    return process


def check_device(device, name: str = "device") -> torch.device:
    """A torch.device fastdiff can sample on: the CPU, or an existing CUDA device; anything else (a typo,
    "meta", "cpu:1", CUDA without a GPU) raises ValueError naming `name`."""
    shown = repr(str(device)) if isinstance(device, torch.device) else repr(device)   # 'meta', not device(type=...)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} {shown} is not a device: use 'cpu' or 'cuda' (or 'cuda:<index>')") from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            raise ValueError(f"{name} {shown} does not exist: the CPU is device 'cpu' (index 0 only)")
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {shown} is not available: torch sees no CUDA device here "
                             "(torch.cuda.is_available() is False); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {shown} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise ValueError(f"{name} {shown} is not supported: fastdiff samples on 'cpu' or 'cuda' devices")


def _shape_arg(shape) -> tuple:
    """fd.sample's shape= (an integer or a sequence of them, each >= 1) as a tuple."""
    dims = (shape,) if not isinstance(shape, (tuple, list, torch.Size)) else shape
    return tuple(as_integer(s, "shape", 1) for s in dims)


def _initial_state(denoiser, n, x, shape, device, dtype):
    """(x or None, n, per-sample shape, device, dtype) from whichever of n / x / shape was given."""
    data = getattr(denoiser, "data", None)
    data_device = data.device if isinstance(data, torch.Tensor) else getattr(denoiser, "device", None)
    if not isinstance(data_device, torch.device):     # (a streamed cloud names the device it reduces on)
        data_device = None
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"x must be a tensor [M, ...] of initial noise, got {getattr(x, 'shape', type(x))}")
        check_device(x.device, "x's device")
        if device is not None and check_device(device) != x.device:
            raise ValueError(f"device {device!r} differs from x's device {x.device}; drop device= or move x")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        if data_device is not None and data_device != x.device:
            raise ValueError(f"x is on device {x.device} but the denoiser's data is on device {data_device}")
        if x.shape[0] == 0 or math.prod(x.shape[1:]) == 0:
            raise ValueError(f"x must have at least one row and one dimension, got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        if n is not None and as_integer(n, "n", 1) != x.shape[0]:
            raise ValueError(f"n={n} disagrees with x, which has {x.shape[0]} rows")
        if shape is not None:
            if _shape_arg(shape) != tuple(x.shape[1:]):
                raise ValueError(f"shape={_shape_arg(shape)} disagrees with x's per-sample shape {tuple(x.shape[1:])}; "
                                 "drop shape= (x gives it)")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if dtype != torch.float32 and dtype != x.dtype:      # (float32 is the default: x's dtype wins over it)
            raise ValueError(f"dtype={dtype} disagrees with x's dtype {x.dtype}; drop dtype= (x gives it)")
        event_shape, device, dtype, n = tuple(x.shape[1:]), x.device, x.dtype, x.shape[0]
    else:
        if n is None:
            raise ValueError("n must be a positive integer (or pass x=initial noise), got None")
        n = as_integer(n, "n", 1)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if shape is not None:
            event_shape = _shape_arg(shape)
        elif getattr(denoiser, "event_shape", None) is not None:
            event_shape = denoiser.event_shape
        elif denoiser.dim is not None:
            event_shape = (denoiser.dim,)
        else:
            raise ValueError("cannot tell the sample shape: pass shape=(...) or x=initial noise, "
                             "or give fd.from_model an event_shape")
        if device is None:
            device = data_device if data_device is not None else torch.device("cpu")
        device = check_device(device)
        if data_device is not None and data_device != device:
            raise ValueError(f"device {device} differs from the point cloud's data device {data_device}; "
                             "build the PointCloud from data on the device you sample on")
    if denoiser.dim is not None and math.prod(event_shape) != denoiser.dim:
        raise ValueError(f"samples have {math.prod(event_shape)} dimensions but the denoiser expects {denoiser.dim}")
    return x, n, event_shape, torch.device(device), dtype


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None (then the check is skipped)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_memory(K, n, d, chunk, dtype, device, want_traj, table_buffers=0):
    """Refuse, before allocating anything, a run whose buffers cannot fit: the step table (host), the result,
    the chunk's working buffers and (when asked) the trajectory [K + 1, n, d] (on the sample's device).
    table_buffers: the table executor's extra state-sized buffers (history, stage, second state, noise)."""
    item = torch.empty((), dtype=dtype).element_size()
    parts = {f"step table for {K} steps": K * _HOST_BYTES_PER_STEP}
    dev = {f"samples [{n}, {d}]": n * d * item,      # x, D, prior temporaries, and the executor's buffers
           f"working buffers for a chunk of {chunk} rows": chunk * d * ((4 + table_buffers) * item + 64)}
    if want_traj:
        dev[f"trajectory [{K + 1}, {n}, {d}]"] = (K + 1) * (n + chunk) * d * item   # the whole one + one chunk's
    budgets: list[tuple[str, dict, int | None]] = []
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budgets.append(("GPU memory free", dev, free))
    else:
        parts.update(dev)
    budgets.append(("host memory available", parts, _available_host_bytes()))
    for label, items, available in budgets:
        need = sum(items.values())
        if available is not None and need > available:
            detail = ", ".join(f"{k}: {_gib(v)}" for k, v in items.items())
            raise ValueError(f"fastdiff.sample would need about {_gib(need)} ({detail}) but only {_gib(available)} of "
                             f"{label}; use fewer steps, a smaller n, or return_trajectory=False")


def unit_gaussian_variance(process, table) -> float:
    """The exact output variance of a step table on 1-D N(0, 1) data (the Gaussian oracle, MATH.md §6, as a
    scalar recursion: D(x) = m_k x with m_k = α/(α² + σ²), S ← (A + B m_k)² S + C²), summed in log space in
    O(K) vectorised float64 so a million steps cost milliseconds."""
    alpha = torch.exp(process._log_alpha(table.t))
    m = alpha / (alpha * alpha + table.sigma * table.sigma)
    log_p2 = torch.log((table.A + table.B * m) ** 2).clamp_min(-1e4)    # P = 0: contributes e^-1e4 = 0
    suffix = log_p2.sum() - torch.cumsum(log_p2, 0)                      # Σ_{j>k} log P_j²
    terms = torch.cat([(2 * math.log(process.prior_std) + log_p2.sum()).reshape(1),
                       torch.log(table.C * table.C) + suffix])
    return float(torch.logsumexp(terms, 0).exp())


def _warn_if_poor_grid(process, table, low: float = 0.25, high: float = 4.0):
    var = unit_gaussian_variance(process, table)
    hint = " or method='ei-x0'" if table.method != "ei-x0" and var > high else ""
    if not low <= var <= high:
        warnings.warn(
            f"fastdiff.sample: this grid is poor for {process!r} with method={table.method!r}, eta={table.eta}: "
            f"on unit-Gaussian data the sampler's exact output variance would be {var:.3g}, not 1 "
            f"(fd.gaussian_oracle). Use more steps{hint} (the default schedule, logsnr, is good from about 10 steps "
            f"on most processes; docs/defaults.md). "
            f"Silence with warnings.simplefilter('ignore', fd.GridWarning).", GridWarning, stacklevel=4)


# The last few (process, grid, method, options) → (MethodTable, its unit-Gaussian variance). Both are Python
# loops over the steps, ~20 µs a step together: as much as a small network's loop overhead, paid again by a
# caller that samples repeatedly on one grid. The table is frozen; the process is held, so its id stays its own,
# and its repr (its parameters) is in the key too. Grids of at most _TABLE_MEMO_STEPS steps: bounded memory.
_TABLE_MEMO: OrderedDict = OrderedDict()
_TABLE_MEMO_SIZE = 16
_TABLE_MEMO_STEPS = 4096


def _method_table(process, grid, method, ode, eta, options):
    key = None
    if grid.numel() <= _TABLE_MEMO_STEPS + 1:
        try:
            key = (id(process), repr(process), method, ode, eta, tuple(sorted(options.items())),
                   grid.numpy().tobytes())
            hash(key)
        except TypeError:                                   # an unhashable option value: no memo
            key = None
    hit = _TABLE_MEMO.get(key) if key is not None else None
    if hit is not None and hit[0] is process:
        return hit[1], hit[2]
    table = _methods.method_table(process, grid, method, ode=ode, eta=eta, **options)
    var = _methods.unit_gaussian_variance(table, process)
    if key is not None:
        while len(_TABLE_MEMO) >= _TABLE_MEMO_SIZE:
            try:
                _TABLE_MEMO.popitem(last=False)             # the oldest (one call: safe beside other threads)
            except KeyError:
                break
        _TABLE_MEMO[key] = (process, table, var)
    return table, var


def _warn_if_poor_table(process, table, var, low: float = 0.25, high: float = 4.0):
    """_warn_if_poor_grid for a MATH.md §3b method: the same test on `var`, the exact variance of its table."""
    if not low <= var <= high:
        shown = ", ".join(f"{k}={v!r}" for k, v in table.options.items())
        warnings.warn(
            f"fastdiff.sample: this grid is poor for {process!r} with method={table.method!r} "
            f"({shown or 'no options'}): "
            f"on unit-Gaussian data the sampler's exact output variance would be {var:.3g}, not 1 "
            f"(fd.gaussian_oracle). Use more steps (the default schedule, logsnr, is good from about 10 steps on "
            f"most processes; docs/defaults.md). "
            f"Silence with warnings.simplefilter('ignore', fd.GridWarning).", GridWarning, stacklevel=4)


class _Progress:
    """tqdm when installed, else a line on stderr every 10 %; nothing when disabled. For the model loop the
    bar counts the K steps of each chunk (restarted per chunk); for a point cloud it counts finished samples."""

    def __init__(self, enabled, total, unit, desc):
        self.enabled, self.total, self.unit, self.desc = bool(enabled), total, unit, desc
        self.done, self.bar = 0, None
        if self.enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def new_pass(self, desc):
        """Restart the count (a new chunk of the model loop)."""
        if not self.enabled:
            return
        self.done, self.desc = 0, desc
        if self.bar is not None:
            self.bar.reset(total=self.total)
            self.bar.set_description(desc)

    def update(self, count: int = 1):
        if not self.enabled:
            return
        before, self.done = self.done, self.done + count
        if self.bar is not None:
            self.bar.update(count)
            return
        tenth = max(1, self.total // 10)
        if self.done == self.total or self.done // tenth > before // tenth:
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
