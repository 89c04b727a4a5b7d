"""The sampler loop for a user network captured in a CUDA graph: `fd.sample(..., cuda_graph=True)`.

Eager, each of K steps costs the host one model call's worth of kernel launches plus the update's; for
small networks the GPU waits on the host. Captured once, the K steps replay as one graph launch.

What makes a captured graph reusable across calls: the step coefficients are kernel arguments (the
same for every call on the same grid), and the noise counters (seed and sample_offset words) are read
from a small device tensor that is rewritten before each replay. So a graph is keyed on the denoiser,
the table and the chunk's shape, never on the seed or offset: drawing more samples, or with another
seed, replays the same graph. The update is the Triton affine step (it reads those counters).

A multistep method (dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, euler_ancestral, edm_euler without churn: the methods
one affine step per model call expresses) also keeps its last one or two D's: H + 1 buffers allocated in the graph's
pool and rotated by the Python loop during capture, so the graph bakes in which buffer is D_{k−1} at step k and
replays the same rotation (nothing copied). D_k is the model's output turned into x0 in the graph (History). As
for the first-order loop, the graph does not check D (the eager loop raises on a non-finite D; a graph cannot
read it back): a network that returns NaN shows only in fd.sample's final NaN warning.

Usual CUDA-graph rules apply to the model: no host synchronisation (`.item()`, printing tensors, data-
dependent Python control flow) and no re-allocated parameters between calls (in-place optimiser updates
are fine; they are seen at replay).
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from dataclasses import dataclass

import torch

_CACHE: OrderedDict = OrderedDict()
CACHE_SIZE = 4     # graphs hold their own memory pool; keep a few (LRU)


@dataclass
class _Captured:
    denoiser: object
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor            # the static input/output buffer, updated in place by the graph
    counters: torch.Tensor     # int64 [4]: seed and sample_offset words, read by the kernels
    traj: torch.Tensor | None  # [K + 1, M, d] when a trajectory is recorded


def refuse_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the captured loop cannot run for samples on `device` with `dtype` ([] = it can)."""
    reasons = []
    if torch.device(device).type != "cuda":
        reasons.append(f"the samples are on {device}; CUDA graphs need CUDA tensors (pass device='cuda' or x on "
                       "the GPU)")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is available")
    if dtype != torch.float32:
        reasons.append(f"dtype is {dtype}; the captured loop's update kernel computes in float32")
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed (the captured loop uses the Triton affine step)")
    return reasons


@dataclass(frozen=True)
class History:
    """What a multistep loop adds to the captured steps: B1[k], B2[k] (the coefficients of D_{k−1}, D_{k−2}),
    how many past D's it keeps (depth: 0, 1 or 2), and how D_k comes from the model's output: the prediction kind
    and α_k, σ_k (D = (x − σ ε)/α for eps, (x + σ² s)/α for score, the output itself for x0)."""
    B1: tuple
    B2: tuple
    depth: int
    prediction: str
    alpha: tuple
    sigma: tuple

    def x0_into(self, k, x, out, buf):
        if self.prediction == "x0":
            return buf.copy_(out)
        sigma = self.sigma[k]
        return torch.add(x, out, alpha=-sigma if self.prediction == "eps" else sigma * sigma, out=buf).div_(
            self.alpha[k])


def clear_cache():
    """Drop every captured graph (and the memory their pools hold)."""
    _CACHE.clear()


def _steps(x, denoiser, t_list, A, B, C, counters, ks, traj=None, hist: History | None = None):
    """Steps ks of the loop on x in place (the body that is captured). With a History, D_k goes into the first
    of depth + 1 buffers (zeroed: a warm-up that starts past step 0 reads zeros, never unset memory), the step adds
    B1 D_{k−1} and B2 D_{k−2} from the others, and the buffers rotate (D_k becomes D_{k−1}), as the eager loop
    (fastdiff.sampling._HistoryRun) does."""
    from .triton.affine_step import run_affine_step
    bufs = [torch.zeros_like(x) for _ in range(hist.depth + 1)] if hist is not None else []
    for k in ks:
        out = denoiser.predict(x, t_list[k])
        history: tuple = ()
        if hist is not None:
            out = hist.x0_into(k, x, out, bufs[0])
            history = tuple((b, bufs[j + 1]) for j, b in enumerate((hist.B1[k], hist.B2[k])[:hist.depth]) if b != 0.0)
        run_affine_step(x, out, A[k], B[k], C[k], 0, k, 0, out=x, counters=counters, history=history)
        if hist is not None:
            bufs.insert(0, bufs.pop())          # D_k → D_{k−1} → D_{k−2}; the oldest is next step's D
        if traj is not None:
            traj[k + 1].copy_(x)


def _warm_steps(C, hist: History | None) -> list[int]:
    """The steps a warm-up runs so that every affine-step kernel variant the loop launches is compiled before
    capture: the first three, and the first step of each other variant (noise or not, B1 D_{k−1} or not, B2
    D_{k−2} or not: e.g. dpmpp_2m's last step to σ = 0, without noise or history)."""
    def variant(k):
        return (C[k] == 0.0, hist is not None and hist.B1[k] != 0.0, hist is not None and hist.B2[k] != 0.0)
    K = len(C)
    warm = set(range(min(K, 3)))
    seen = {variant(k) for k in warm}
    for k in range(3, K):
        if variant(k) not in seen:
            seen.add(variant(k))
            warm.add(k)
    return sorted(warm)


def _capture(denoiser, xc, t_list, A, B, C, want_traj, hist=None) -> _Captured:
    from .triton.affine_step import noise_counters
    K = len(t_list)
    x = xc.clone()
    counters = noise_counters(0, 0, x.device)
    # Warm up outside the capture on a side stream: lazy initialisation (cuBLAS handles, autotuning) and
    # Triton's compilation of every kernel variant the loop uses (with and without noise) must not
    # happen while capturing.
    # (The step and counter arguments are not specialised on their values, so steps 1, 2, ... reuse step
    # 0's compiled kernel; the first steps and every other variant are warmed up anyway: _warm_steps.)
    warm = _warm_steps(C, hist)
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        scratch = x.clone()
        for _ in range(2):
            _steps(scratch, denoiser, t_list, A, B, C, counters, warm, hist=hist)
    torch.cuda.current_stream(x.device).wait_stream(side)
    traj = torch.empty((K + 1, *x.shape), dtype=x.dtype, device=x.device) if want_traj else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop(x, traj, denoiser, t_list, A, B, C, counters, hist)
    return _Captured(denoiser, graph, x, counters, traj)


def loop(x, traj, denoiser, t_list, A, B, C, counters, hist: History | None = None):
    """What the graph captures: every step on x in place, the states into traj [K + 1, ...] when given (tests run
    it uncaptured on the CPU, where the Triton interpreter runs the affine step)."""
    if traj is not None:
        traj[0].copy_(x)
    _steps(x, denoiser, t_list, A, B, C, counters, range(len(t_list)), traj, hist)


def run_chunk(denoiser, xc, t_list, A, B, C, seed, sample_offset, want_traj, hist: History | None = None):
    """Run every step on the chunk xc [m, d] by replaying a (cached) captured graph; returns (x, traj or None).

    Equal to the eager loop with the Triton affine step: same kernels, same noise counters (with a History, the
    multistep loop of fastdiff.sampling._HistoryRun on the triton backend)."""
    key = (id(denoiser), tuple(t_list), tuple(A), tuple(B), tuple(C), tuple(xc.shape), xc.dtype, xc.device,
           bool(want_traj), hist)
    entry = _CACHE.get(key)
    if entry is None or entry.denoiser is not denoiser:
        entry = _capture(denoiser, xc, t_list, A, B, C, want_traj, hist)
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    from .triton.affine_step import noise_counters
    entry.x.copy_(xc)
    entry.counters.copy_(noise_counters(seed, sample_offset, xc.device))
    entry.graph.replay()
    return entry.x.clone(), (entry.traj.clone() if entry.traj is not None else None)
