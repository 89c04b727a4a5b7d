"""Triton affine sampler update x ← A·x + B·D + C·z (MATH.md §3) with z drawn in-kernel from the noise
contract (fastdiff.noise): one read of x and D, one write, in place or out of place. The multistep history
(D1 = D_{k−1}, D2 = D_{k−2}, when given) is added after the one-step update: x ← x + B1·D1, then + B2·D2.

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
                        D1_ptr, b1, stride_1, D2_ptr, b2, stride_2,
                        HAS_NOISE: tl.constexpr, CTR_PTR: tl.constexpr, HAS_D1: tl.constexpr, HAS_D2: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr):
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
    # the history after the one-step update, term by term (the reference's order; absent terms read nothing)
    if HAS_D1:
        out = out + b1 * tl.load(D1_ptr + rows64[:, None] * stride_1 + cols[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
    if HAS_D2:
        out = out + b2 * tl.load(D2_ptr + rows64[:, None] * stride_2 + cols[None, :], mask=mask,
                                 other=0.0).to(tl.float32)
    # In place (out is x) the store may use another thread↔element layout than the loads: every load of
    # the tile is ordered before any store.
    tl.debug_barrier()
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=mask)


# ================================================================ launcher
def noise_counters(seed, sample_offset, device) -> torch.Tensor:
    """The int64 [4] device tensor (seed words, sample_offset words) read by run_affine_step(counters=...)."""
    return torch.tensor([*_common.words(seed), *_common.words(sample_offset)], dtype=torch.int64, device=device)


def launch_affine_step(x, D, out, a, b, c, seed, step, sample_offset, config=None, counters=None, D1=None, b1=0.0,
                       D2=None, b2=0.0):
    M, d = x.shape
    cfg = config or _common.affine_config(d)
    s_lo, s_hi = _common.words(seed)
    o_lo, o_hi = _common.words(sample_offset)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(d, cfg["BK"]))
    has1, has2 = D1 is not None and b1 != 0.0, D2 is not None and b2 != 0.0   # a zero coefficient reads nothing
    h1, h2 = (D1 if has1 else x), (D2 if has2 else x)
    with _common.device_guard(x.device):      # the tensors' GPU, not the current one
        _affine_step_kernel[grid](x, D, out, a, b, c, x if counters is None else counters, M, d,
                                  x.stride(0), D.stride(0), out.stride(0), s_lo, s_hi, step, o_lo, o_hi,
                                  h1, b1, h1.stride(0), h2, b2, h2.stride(0),
                                  HAS_NOISE=c != 0.0, CTR_PTR=counters is not None, HAS_D1=has1, HAS_D2=has2,
                                  BM=cfg["BM"], BK=cfg["BK"], num_warps=cfg["num_warps"])
    return out


# ================================================================ public function
def affine_step(x, D, A, B, C, seed, step, sample_offset=0, out=None, D1=None, B1=0.0, D2=None, B2=0.0):
    """The backend op (the contract of fastdiff.ops.affine_step's backends): x_s = A·x + B·D + C·z with
    z = fd.noise.normal(seed, sample_offset + row, step, d), float32, then x_s += B1·D1, then x_s += B2·D2
    (D1, D2: the multistep history like D, or None).

    x float32 [M, d] contiguous; D [M, d] float32/float16/bfloat16 contiguous; A, B, C Python floats (kernel
    arguments: a step costs no host-to-device copy and no synchronisation); out None (a new tensor), x itself
    (in place) or another contiguous float32 [M, d] tensor. Validated by fastdiff.ops, not here."""
    return run_affine_step(x, D, A, B, C, seed, step, sample_offset, out, history=((B1, D1), (B2, D2)))


def run_affine_step(x, D, A, B, C, seed, step, sample_offset=0, out=None, *, config=None, counters=None,
                    history=()):
    """affine_step with the knobs of the CUDA-graph loop and the tests.
    counters: None, or noise_counters(seed, sample_offset, device), which then replaces seed and sample_offset
    (read on the device, for CUDA-graph replay). config: a launch configuration replacing the heuristic's
    (tests only; rows and tiles are independent). history: up to two (B_j, D_j) pairs (D_j None or like D)."""
    _common.check_limits("affine_step", x)
    if out is None:
        out = torch.empty_like(x)
    if x.shape[0] == 0:
        return out
    (b1, D1), (b2, D2) = (list(history) + [(0.0, None)] * 2)[:2]
    return launch_affine_step(x, D, out, float(A), float(B), float(C), seed, step, sample_offset, config, counters,
                              D1, float(b1), D2, float(b2))
