"""The sampler: a float64 step table plus the loop  D = denoiser(x, t_k);  x = A_k x + B_k D + C_k z_k
(DESIGN.md, MATH.md §3). One function for every process, method, SDE/ODE and denoiser.

The noise of sample i at step k depends only on (seed, sample_offset + i, k): results do not change
with chunk_size, and sample(n=1000)[:100] equals sample(n=100) bit for bit.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

from . import _backend, _graphs, noise
from ._checks import check_choice
from .denoisers import Denoiser, PointCloud
from .processes import Process
from .schedules import check_times, time_grid
from .steps import step_table

_DEFAULT_CHUNK_ELEMS = 1 << 24    # samples × dims kept on the device at once when chunk_size is None


def sample(denoiser: Denoiser, process: Process | None = None, n: int | None = None, steps: int = 200,
           schedule: str = "uniform", method: str = "ei", ode: bool = False, t_end: float = 1e-3,
           final_denoise: bool = False, seed: int = 0, sample_offset: int = 0, return_trajectory: bool = False,
           progress: bool = False, callback=None, backend: str = "auto", *, x: torch.Tensor | None = None,
           times=None, eta: float | None = None, chunk_size: int | None = None, shape=None,
           device=None, dtype: torch.dtype = torch.float32, cuda_graph: bool = False):
    """Draw n samples by running the reverse SDE (ode=False) or the PF-ODE (ode=True) from T to t_end.

    denoiser       an analytic denoiser (PointCloud, GaussianMixture, Gaussian) or fd.from_model(...)
    process        defaults to denoiser.process (must be the same process if given)
    n / x          the number of samples drawn from the prior, or the initial noise x [M, ...] itself
    steps, schedule, t_end   the time grid (fd.time_grid); or `times`, an explicit decreasing grid
    method         "euler" | "ei" | "ei-x0";  eta in [0, 1] interpolates ODE (0) and SDE (1)
    final_denoise  return D(x, t_end) instead of x_{t_end} (score_sde's "noise removal")
    seed, sample_offset   the noise contract: sample i is global sample sample_offset + i
    return_trajectory     also return every x_k: [steps + 1, n, ...] (on the sample's device)
    progress       show a progress bar (tqdm if installed);  callback(info dict) after each step
    shape          per-sample shape (e.g. (3, 32, 32)); defaults to the denoiser's dimension
    cuda_graph     capture the per-step loop (model → affine step) in a CUDA graph and replay it (CUDA,
                   float32, Triton; graphs are cached across calls, so later calls with any seed only
                   replay; see fastdiff._graphs). A point cloud without a callback already runs its
                   whole trajectory in one kernel launch, so there is nothing to capture.
    On CUDA the loop never synchronises with the host: coefficients are kernel arguments and the noise
    is drawn in the kernel.
    Returns x [n, ...] (and the trajectory when asked).
    """
    process = _resolve_process(denoiser, process)
    check_choice(method, "method", ("euler", "ei", "ei-x0"))
    grid = check_times(process, times) if times is not None else time_grid(process, steps, schedule, t_end)
    table = step_table(process, grid, method, ode, eta)
    A, B, C = (col.tolist() for col in table.for_prediction(denoiser.prediction))
    t_list = table.t.tolist()
    if final_denoise and float(grid[-1]) <= 0:
        raise ValueError("final_denoise needs t_end > 0 (D is never evaluated at t = 0)")
    seed = noise._check_seed(seed)
    if int(sample_offset) < 0:
        raise ValueError(f"sample_offset must be >= 0, got {sample_offset}")

    x0, n, event_shape, device, dtype = _initial_state(denoiser, n, x, shape, device, dtype)
    d = math.prod(event_shape)
    # A point cloud with no per-step callback runs whole trajectories in one op (fused kernels where a
    # backend has them); anything else runs the loop with the backend's affine step.
    fused = isinstance(denoiser, PointCloud) and callback is None
    engine = _backend.select("pointcloud_sample" if fused else "affine_step", backend,
                             **_backend.facts(device=device, dtype=dtype, d=d))
    graphed = bool(cuda_graph) and not fused
    if cuda_graph and callback is not None:
        raise ValueError("cuda_graph=True cannot call a per-step callback (the captured loop runs without the "
                         "host); drop the callback or cuda_graph")
    if graphed:
        reasons = _graphs.refuse_reasons(device, dtype)
        if backend not in ("auto", "triton"):
            reasons.append(f"backend={backend!r}, but the captured loop uses the Triton affine step")
        if reasons:
            raise ValueError("cuda_graph=True cannot run: " + "; ".join(reasons))
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMS // d)
        if fused and progress:
            chunk_size = min(chunk_size, max(1, math.ceil(n / 20)))   # so the bar moves (results do not change)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if fused:
        alphas, sigmas = process.alpha(table.t).tolist(), table.sigma.tolist()

    bar = _Progress(len(t_list) * math.ceil(n / chunk_size), progress)
    outputs, trajectories = [], []
    for c0 in range(0, n, chunk_size):
        m = min(chunk_size, n - c0)
        offset = int(sample_offset) + c0
        if x0 is None:
            xc = process.prior(m, d, seed, offset, dtype=dtype, device=device)
        else:
            xc = x0[c0:c0 + m].reshape(m, d).to(dtype).clone()
        if graphed:
            xc, traj = _graphs.run_chunk(denoiser, xc, t_list, A, B, C, seed, offset, return_trajectory)
            bar.update(len(t_list))
        elif fused:
            traj = engine.pointcloud_sample(xc, denoiser.data, alphas, sigmas, A, B, C, seed, offset,
                                            denoiser.log_weights, denoiser.bandwidth, return_trajectory)
            bar.update(len(t_list))
        else:
            traj = [xc.clone()] if return_trajectory else None
            for k, t in enumerate(t_list):
                out = denoiser.predict(xc, t)
                if callback is not None:
                    callback({"step": k, "t": t, "x": xc, "prediction": out, "sample_offset": offset})
                engine.affine_step(xc, out, A[k], B[k], C[k], seed, k, offset, out=xc)
                if traj is not None:
                    traj.append(xc.clone())
                bar.update()
            traj = torch.stack(traj) if traj is not None else None
        if final_denoise:
            xc = denoiser.denoise(xc, float(grid[-1]))
        outputs.append(xc)
        if traj is not None:
            trajectories.append(traj)
    bar.close()

    result = torch.cat(outputs).view(n, *event_shape)
    if not bool(torch.isfinite(result).all()):
        warnings.warn("fastdiff.sample produced NaN or inf: the step table or the denoiser is unstable on this "
                      "grid (try more steps, method='ei-x0', or float64)", RuntimeWarning, stacklevel=2)
    if return_trajectory:
        return result, torch.cat(trajectories, dim=1).view(len(t_list) + 1, n, *event_shape)
    return result


def _resolve_process(denoiser, process):
    if not isinstance(denoiser, Denoiser):
        raise TypeError("denoiser must be a fastdiff denoiser (PointCloud, GaussianMixture, Gaussian or "
                        f"fd.from_model(...)), got {type(denoiser).__name__}")
    if process is None:
        return denoiser.process
    if not isinstance(process, Process):
        raise TypeError(f"process must be a fastdiff process, got {type(process).__name__}")
    if process is not denoiser.process and repr(process) != repr(denoiser.process):
        raise ValueError(f"process {process!r} differs from the denoiser's process {denoiser.process!r}")
    return process


def _initial_state(denoiser, n, x, shape, device, dtype):
    """(x or None, n, per-sample shape, device, dtype) from whichever of n / x / shape was given."""
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"x must be a tensor [M, ...] of initial noise, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        data = getattr(denoiser, "data", None)
        if isinstance(data, torch.Tensor) and data.device != x.device:
            raise ValueError(f"x is on device {x.device} but the denoiser's data is on device {data.device}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        if n is not None and int(n) != x.shape[0]:
            raise ValueError(f"n={n} disagrees with x, which has {x.shape[0]} rows")
        event_shape, device, dtype, n = tuple(x.shape[1:]), x.device, x.dtype, x.shape[0]
    else:
        if n is None or isinstance(n, bool) or int(n) < 1:
            raise ValueError(f"n must be a positive integer (or pass x=initial noise), got {n!r}")
        n = int(n)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if shape is not None:
            event_shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        elif getattr(denoiser, "event_shape", None) is not None:
            event_shape = denoiser.event_shape
        elif denoiser.dim is not None:
            event_shape = (denoiser.dim,)
        else:
            raise ValueError("cannot tell the sample shape: pass shape=(...) or x=initial noise, "
                             "or give fd.from_model an event_shape")
        if device is None:
            data = getattr(denoiser, "data", None)
            device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
    if denoiser.dim is not None and math.prod(event_shape) != denoiser.dim:
        raise ValueError(f"samples have {math.prod(event_shape)} dimensions but the denoiser expects {denoiser.dim}")
    return x, n, event_shape, torch.device(device), dtype


class _Progress:
    """tqdm when installed, else a line on stderr every 10 %; nothing when disabled."""

    def __init__(self, total, enabled):
        self.total, self.done, self.bar, self.enabled = total, 0, None, bool(enabled)
        if self.enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc="fastdiff.sample", unit="step")
            except ImportError:
                self.bar = None

    def update(self, steps: int = 1):
        if not self.enabled:
            return
        before, self.done = self.done, self.done + steps
        if self.bar is not None:
            self.bar.update(steps)
        elif self.done == self.total or self.done // max(1, self.total // 10) > before // max(1, self.total // 10):
            print(f"fastdiff.sample: {self.done}/{self.total} steps", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()
