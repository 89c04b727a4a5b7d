"""Triton affine sampler update x ← A·x + B·D + C·z (MATH.md §3) with z drawn in-kernel from the noise
contract (fastdiff.noise): one read of x and D, one write, in place or out of place.

A, B, C are Python numbers (one step for every row, as the sampler uses them: passed as kernel arguments,
so a step costs no host-to-device copy and no synchronisation) or [M] tensors (per-row time, read from a
small [M, 3] table). Row i is global sample sample_offset + i.

For CUDA-graph capture the noise counters (seed and sample_offset words) may instead live in a device
tensor (`noise_counters`): a captured graph then replays with any seed and offset, because only the
tensor's contents change between replays, not the kernel's arguments.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _common as C
from ._philox import normal_tile, sample_index_words


# ================================================================ kernels
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _affine_step_kernel(x_ptr, D_ptr, out_ptr, coef_ptr, coef_stride, a, b, c, ctr_ptr, M, d, stride_x, stride_D,
                        stride_o, seed_lo: tl.int64, seed_hi: tl.int64, step: tl.int64, off_lo: tl.int64,
                        off_hi: tl.int64, HAS_NOISE: tl.constexpr, PER_ROW: tl.constexpr, CTR_PTR: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rmask = rows < M
    mask = rmask[:, None] & (cols < d)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    D = tl.load(D_ptr + rows64[:, None] * stride_D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        cp = coef_ptr + rows64 * coef_stride
        A = tl.load(cp + 0, mask=rmask, other=0.0)
        B = tl.load(cp + 1, mask=rmask, other=0.0)
        out = A[:, None] * x + B[:, None] * D
    else:
        out = a * x + b * D
    if HAS_NOISE:
        if CTR_PTR:   # counters from device memory (graph replay with a new seed / offset)
            seed_lo = tl.load(ctr_ptr + 0)
            seed_hi = tl.load(ctr_ptr + 1)
            off_lo = tl.load(ctr_ptr + 2)
            off_hi = tl.load(ctr_ptr + 3)
        i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
        z = normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, tl.program_id(1) * (BK // 4), BK // 4)
        if PER_ROW:
            Cn = tl.load(cp + 2, mask=rmask, other=0.0)
            out = out + Cn[:, None] * z
        else:
            out = out + c * z
    # In place (out is x) the store may use another thread↔element layout than the loads: every load of
    # the tile is ordered before any store.
    tl.debug_barrier()
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=mask)


# ================================================================ launcher
def coefficient_table(A, B, Cc, M, device):
    """float32 [R, 3] of (A, B, C), R = 1 (numbers) or M (any of them per-row); and whether noise is needed."""
    cols = [C.per_row64(v, n, M, device) for v, n in ((A, "A"), (B, "B"), (Cc, "C"))]
    R = max(c.numel() for c in cols)
    table = torch.stack([c.expand(R) for c in cols], 1).to(torch.float32).contiguous()
    has_noise = not (cols[2].numel() == 1 and float(cols[2][0]) == 0.0)
    return table, has_noise


def _number(v, name):
    """A finite Python float, or None when v is a tensor (per-row coefficients)."""
    if isinstance(v, torch.Tensor):
        return None
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    return f


def noise_counters(seed, sample_offset, device) -> torch.Tensor:
    """The int64 [4] device tensor (seed words, sample_offset words) read by affine_step(counters=...)."""
    return torch.tensor([*C.words(C.check_seed(seed)), *C.words(C.check_offset(sample_offset, 0))],
                        dtype=torch.int64, device=device)


def launch_affine_step(x, D, out, coef, has_noise, seed, step, sample_offset, config=None, scalars=None,
                       counters=None):
    M, d = x.shape
    cfg = config or C.affine_config(d)
    s_lo, s_hi = C.words(seed)
    o_lo, o_hi = C.words(sample_offset)
    per_row = scalars is None
    a, b, c = (0.0, 0.0, 0.0) if per_row else scalars
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(d, cfg["BK"]))
    with C.device_guard(x.device):      # the tensors' GPU, not the current one
        _affine_step_kernel[grid](x, D, out, x if coef is None else coef,
                                  0 if coef is None or coef.shape[0] == 1 else coef.stride(0), a, b, c,
                                  x if counters is None else counters, M, d,
                                  x.stride(0), D.stride(0), out.stride(0), s_lo, s_hi, step, o_lo, o_hi,
                                  HAS_NOISE=has_noise, PER_ROW=per_row, CTR_PTR=counters is not None,
                                  BM=cfg["BM"], BK=cfg["BK"], num_warps=cfg["num_warps"])
    return out


# ================================================================ public function
def affine_step(x, D, A, B, C_, seed, step, sample_offset=0, out=None, *, config=None, counters=None,
                check_finite=True):
    """x_s = A·x + B·D + C·z with z = fd.noise.normal(seed, sample_offset + row, step, d) (float32).

    x float32 [M, d]; D [M, d] float32/float16/bfloat16; A, B, C numbers or [M] tensors;
    out: None (new tensor), x itself (in place) or another float32 [M, d] tensor.
    counters: None, or noise_counters(seed, sample_offset, device), which then replaces seed and
    sample_offset (read on the device, for CUDA-graph replay).
    check_finite: scan x for NaN/inf first (a host synchronisation; the sampler's loop turns it off).
    config: a launch configuration dict replacing the heuristic's (tests only; rows and tiles are independent).
    """
    C.check_x(x, finite=check_finite)
    if not isinstance(D, torch.Tensor) or D.shape != x.shape or D.dtype not in C.DATA_DTYPES:
        raise ValueError(f"D must be a float32/float16/bfloat16 tensor of x's shape {tuple(x.shape)}, got "
                         f"{getattr(D, 'dtype', type(D))} {tuple(getattr(D, 'shape', ()))}")
    if D.device != x.device:
        raise ValueError(f"tensors must be on one device, got x on {x.device}, D on {D.device}")
    if out is None:
        out = torch.empty_like(x)
    elif not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x ({tuple(x.shape)}, {x.dtype}, {x.device})")
    elif out.ndim != 2 or out.stride(1) != 1:
        raise ValueError("out must have contiguous rows (stride 1 along d)")
    if counters is not None and (not isinstance(counters, torch.Tensor) or counters.dtype != torch.int64
                                 or counters.shape != (4,) or counters.device != x.device):
        raise ValueError("counters must be the int64 [4] tensor of noise_counters(seed, sample_offset, x.device)")
    seed, step = C.check_seed(seed), C.check_step(step)
    M = x.shape[0]
    sample_offset = C.check_offset(sample_offset, M)
    scalars = tuple(_number(v, n) for v, n in ((A, "A"), (B, "B"), (C_, "C")))
    if None in scalars:     # per-row coefficients: a small [M, 3] table
        coef, has_noise = coefficient_table(A, B, C_, M, x.device)
        scalars = None
    else:                   # numbers go in as kernel arguments: no copy, no synchronisation
        coef, has_noise = None, scalars[2] != 0.0
    if M == 0:
        return out
    xc = x if x.stride(1) == 1 else x.contiguous()
    Dc = D if D.stride(1) == 1 else D.contiguous()
    return launch_affine_step(xc, Dc, out, coef, has_noise, seed, step, sample_offset, config, scalars, counters)
