"""Triton affine sampler update x ← A·x + B·D + C·z (MATH.md §3) with z drawn in-kernel from the noise
contract (fastdiff.noise): one read of x and D, one write, in place or out of place.

A, B, C are Python numbers (one step for every row, as the sampler uses them: passed as kernel arguments,
so a step costs no host-to-device copy and no synchronisation). Row i is global sample sample_offset + i.

For CUDA-graph capture the noise counters (seed and sample_offset words) may instead live in a device
tensor (`noise_counters`): a captured graph then replays with any seed and offset, because only the
tensor's contents change between replays, not the kernel's arguments.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._philox import normal_tile, sample_index_words


# ================================================================ kernels
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _affine_step_kernel(x_ptr, D_ptr, out_ptr, a, b, c, ctr_ptr, M, d, stride_x, stride_D, stride_o,
                        seed_lo: tl.int64, seed_hi: tl.int64, step: tl.int64, off_lo: tl.int64, off_hi: tl.int64,
                        HAS_NOISE: tl.constexpr, CTR_PTR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rmask = rows < M
    mask = rmask[:, None] & (cols < d)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    D = tl.load(D_ptr + rows64[:, None] * stride_D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = a * x + b * D
    if HAS_NOISE:
        if CTR_PTR:   # counters from device memory (graph replay with a new seed / offset)
            seed_lo = tl.load(ctr_ptr + 0)
            seed_hi = tl.load(ctr_ptr + 1)
            off_lo = tl.load(ctr_ptr + 2)
            off_hi = tl.load(ctr_ptr + 3)
        i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
        z = normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, tl.program_id(1) * (BK // 4), BK // 4)
        out = out + c * z
    # In place (out is x) the store may use another thread↔element layout than the loads: every load of
    # the tile is ordered before any store.
    tl.debug_barrier()
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=mask)


# ================================================================ launcher
def noise_counters(seed, sample_offset, device) -> torch.Tensor:
    """The int64 [4] device tensor (seed words, sample_offset words) read by run_affine_step(counters=...)."""
    return torch.tensor([*_common.words(seed), *_common.words(sample_offset)], dtype=torch.int64, device=device)


def launch_affine_step(x, D, out, a, b, c, seed, step, sample_offset, config=None, counters=None):
    M, d = x.shape
    cfg = config or _common.affine_config(d)
    s_lo, s_hi = _common.words(seed)
    o_lo, o_hi = _common.words(sample_offset)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(d, cfg["BK"]))
    with _common.device_guard(x.device):      # the tensors' GPU, not the current one
        _affine_step_kernel[grid](x, D, out, a, b, c, x if counters is None else counters, M, d,
                                  x.stride(0), D.stride(0), out.stride(0), s_lo, s_hi, step, o_lo, o_hi,
                                  HAS_NOISE=c != 0.0, CTR_PTR=counters is not None,
                                  BM=cfg["BM"], BK=cfg["BK"], num_warps=cfg["num_warps"])
    return out


# ================================================================ public function
def affine_step(x, D, A, B, C, seed, step, sample_offset=0, out=None):
    """The backend op (the contract of fastdiff.ops.affine_step's backends): x_s = A·x + B·D + C·z with
    z = fd.noise.normal(seed, sample_offset + row, step, d), float32.

    x float32 [M, d] contiguous; D [M, d] float32/float16/bfloat16 contiguous; A, B, C Python floats (kernel
    arguments: a step costs no host-to-device copy and no synchronisation); out None (a new tensor), x itself
    (in place) or another contiguous float32 [M, d] tensor. Validated by fastdiff.ops, not here."""
    return run_affine_step(x, D, A, B, C, seed, step, sample_offset, out)


def run_affine_step(x, D, A, B, C, seed, step, sample_offset=0, out=None, *, config=None, counters=None):
    """affine_step with the knobs of the CUDA-graph loop and the tests.
    counters: None, or noise_counters(seed, sample_offset, device), which then replaces seed and sample_offset
    (read on the device, for CUDA-graph replay). config: a launch configuration replacing the heuristic's
    (tests only; rows and tiles are independent)."""
    _common.check_limits("affine_step", x)
    if out is None:
        out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    return launch_affine_step(x, D, out, float(A), float(B), float(C), seed, step, sample_offset, config, counters)
