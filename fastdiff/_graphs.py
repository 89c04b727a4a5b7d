"""The sampler loop for a user network captured in a CUDA graph: `fd.sample(..., cuda_graph=True)`.

Eager, each of K steps costs the host one model call's worth of kernel launches plus the update's; for
small networks the GPU waits on the host. Captured once, the K steps replay as one graph launch.

What makes a captured graph reusable across calls: the step coefficients are kernel arguments (the
same for every call on the same grid), and the noise counters (seed and sample_offset words) are read
from a small device tensor that is rewritten before each replay. So a graph is keyed on the denoiser,
the table and the chunk's shape, never on the seed or offset: drawing more samples, or with another
seed, replays the same graph. The update is the Triton affine step (it reads those counters).

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


def clear_cache():
    """Drop every captured graph (and the memory their pools hold)."""
    _CACHE.clear()


def _steps(x, denoiser, t_list, A, B, C, counters, ks, traj=None):
    from .triton.affine_step import run_affine_step
    for k in ks:
        out = denoiser.predict(x, t_list[k])
        run_affine_step(x, out, A[k], B[k], C[k], 0, k, 0, out=x, counters=counters)
        if traj is not None:
            traj[k + 1].copy_(x)


def _capture(denoiser, xc, t_list, A, B, C, want_traj) -> _Captured:
    from .triton.affine_step import noise_counters
    K = len(t_list)
    x = xc.clone()
    counters = noise_counters(0, 0, x.device)
    # Warm up outside the capture on a side stream: lazy initialisation (cuBLAS handles, autotuning) and
    # Triton's compilation of every kernel variant the loop uses (with and without noise) must not
    # happen while capturing.
    # (The step and counter arguments are not specialised on their values, so steps 1, 2, ... reuse step
    # 0's compiled kernel; the first steps and the other noise variant are warmed up anyway.)
    warm = sorted(set(range(min(K, 3))) | set([k for k in range(1, K) if (C[k] == 0.0) != (C[0] == 0.0)][:1]))
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        scratch = x.clone()
        for _ in range(2):
            _steps(scratch, denoiser, t_list, A, B, C, counters, warm)
    torch.cuda.current_stream(x.device).wait_stream(side)
    traj = torch.empty((K + 1, *x.shape), dtype=x.dtype, device=x.device) if want_traj else None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if traj is not None:
            traj[0].copy_(x)
        _steps(x, denoiser, t_list, A, B, C, counters, range(K), traj)
    return _Captured(denoiser, graph, x, counters, traj)


def run_chunk(denoiser, xc, t_list, A, B, C, seed, sample_offset, want_traj):
    """Run every step on the chunk xc [m, d] by replaying a (cached) captured graph; returns (x, traj or None).

    Equal to the eager loop with the Triton affine step: same kernels, same noise counters."""
    key = (id(denoiser), tuple(t_list), tuple(A), tuple(B), tuple(C), tuple(xc.shape), xc.dtype, xc.device,
           bool(want_traj))
    entry = _CACHE.get(key)
    if entry is None or entry.denoiser is not denoiser:
        entry = _capture(denoiser, xc, t_list, A, B, C, want_traj)
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    from .triton.affine_step import noise_counters
    entry.x.copy_(xc)
    entry.counters.copy_(noise_counters(seed, sample_offset, xc.device))
    entry.graph.replay()
    return entry.x.clone(), (entry.traj.clone() if entry.traj is not None else None)
