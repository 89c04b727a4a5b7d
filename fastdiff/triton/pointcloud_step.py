"""Triton fused point-cloud sampler step: D = posterior(x) (MATH.md §5) then x ← A·x + B·D + C·z with z from
the noise contract, in one kernel.

Small d: D never leaves registers. Large d: the [BM, d] accumulator of the reduction cannot stay on chip,
so it lives in a float64 scratch [M, d] (L2-resident, one program per row block; float64: the posterior's
rule 4); the final D itself is never written, the epilogue streams acc, x and z into out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from . import posterior as _posterior
from ._philox import normal_tile, sample_index_words
from .posterior import _load_k2_lo, _load_params, large_reduce, small_rows_posterior


# ================================================================ kernels
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _pointcloud_step_small_kernel(x_ptr, data_ptr, lw_ptr, par_ptr, out_ptr, A, B, Cn, M, N, d,
                                  stride_x, stride_y, stride_o, par_stride,
                                  seed_lo: tl.int64, seed_hi: tl.int64, step: tl.int64, off_lo: tl.int64,
                                  off_hi: tl.int64, has_noise: tl.int32,
                                  BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    rows, rows64, rmask, cols, mask, x, D, m, s = small_rows_posterior(
        x_ptr, data_ptr, lw_ptr, par_ptr, M, N, d, stride_x, stride_y, par_stride, BM, BN, DP)
    out = A * x + B * D
    if has_noise != 0:
        i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
        out += Cn * normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, 0, DP // 4)
    tl.debug_barrier()                              # in place: loads before stores (see affine_step)
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _pointcloud_step_large_kernel(x_ptr, data_ptr, lw_ptr, par_ptr, acc_ptr, out_ptr, A, B, Cn, M, N, d,
                                  stride_x, stride_y, stride_acc, stride_o, par_stride,
                                  kappa, delta2, tau2, seed_lo: tl.int64, seed_hi: tl.int64, step: tl.int64,
                                  off_lo: tl.int64, off_hi: tl.int64, has_noise: tl.int32,
                                  SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                  BK: tl.constexpr, BKE: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    a, c1, c2, k2, cy, cx = _load_params(par_ptr, rows, par_stride, rmask)
    k2_lo = _load_k2_lo(par_ptr, rows, par_stride, rmask)
    m, s = large_reduce(x_ptr, stride_x, rows, rmask, a, c1, c2, k2, k2_lo, data_ptr, stride_y, lw_ptr, acc_ptr,
                        stride_acc, N, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK, BKE)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (kk < d)[None, :]
        xk = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        acc = tl.load(acc_ptr + rows64[:, None] * stride_acc + kk[None, :], mask=mask, other=0.0)
        D = (acc / s[:, None]).to(tl.float32) * cy[:, None] + cx[:, None] * xk   # acc, s float64: rounded once
        out = A * xk + B * D
        if has_noise != 0:
            out += Cn * normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, k0 // 4, BK // 4)
        tl.debug_barrier()                          # in place: loads before stores (see affine_step)
        tl.store(out_ptr + rows64[:, None] * stride_o + kk[None, :], out, mask=mask)


# ================================================================ launcher
def launch_pointcloud_step(x, data, lw2, par, A, B, Cn, out, seed, step, sample_offset, screen_tf32=None):
    M, d = x.shape
    N = data.shape[0]
    s_lo, s_hi = _common.words(seed)
    o_lo, o_hi = _common.words(sample_offset)
    par_stride = 0 if par.shape[0] == 1 else par.stride(0)
    has_noise = int(Cn != 0.0)
    if d <= _common.SMALL_D_MAX:
        cfg = _common.small_config(d)
        with _common.device_guard(x.device):      # the tensors' GPU, not the current one
            _pointcloud_step_small_kernel[(triton.cdiv(M, cfg["BM"]),)](
                x, data, lw2, par, out, A, B, Cn, M, N, d, x.stride(0), data.stride(0), out.stride(0), par_stride,
                s_lo, s_hi, step, o_lo, o_hi, has_noise,
                BM=cfg["BM"], BN=cfg["BN"], DP=cfg["DP"], num_warps=cfg["num_warps"])
        return out
    tf32 = _posterior.SCREEN_TF32 if screen_tf32 is None else bool(screen_tf32)
    cfg = _common.large_config(d)
    acc = _posterior._scratch(x.shape, x.device)     # the float64 accumulator (rule 4: sums merged in double)
    with _common.device_guard(x.device):      # the tensors' GPU, not the current one
        _pointcloud_step_large_kernel[(triton.cdiv(M, cfg["BM"]),)](
            x, data, lw2, par, acc, out, A, B, Cn, M, N, d, x.stride(0), data.stride(0), acc.stride(0), out.stride(0),
            par_stride, _common.screen_kappa(d, tf32), _common.screen_delta2(N), _common.SCREEN_TAU2,
            s_lo, s_hi, step, o_lo, o_hi, has_noise,
            SCREEN_TF32=tf32, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BKE=cfg["BKE"], num_warps=cfg["num_warps"])
    return out


# ================================================================ public function
def pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                    bandwidth=0.0, out=None):
    """The backend op (the contract of fastdiff.ops.pointcloud_step's backends): one fused sampler step on the
    point cloud `data`, x_s = A·x + B·D(x; α, σ) + C·z, float32.

    Equals affine_step(x, posterior(x, data, alpha, sigma, ...)[0], A, B, C, seed, step, sample_offset).
    alpha, sigma float64 [1] (or [M]); A, B, C Python floats (kernel arguments); out None (a new tensor),
    x (in place) or a contiguous float32 [M, d] tensor. Validated by fastdiff.ops, not here."""
    return run_pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth,
                               out)


def run_pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                        bandwidth=0.0, out=None, *, screen_tf32=None):
    """pointcloud_step with the large-d kernel's screening knob (tests)."""
    _common.check_limits("pointcloud_step", x, data)
    M = x.shape[0]
    if out is None:
        out = torch.empty_like(x)
    if M == 0:
        return out
    lw2 = _common.log_weights2(log_weights, data.shape[0], x.device)
    par = _common.as_f32_table(_common.reduction_params(alpha, sigma, bandwidth, M, x.device))
    return launch_pointcloud_step(x.contiguous(), data.contiguous(), lw2, par, float(A), float(B), float(C), out,
                                  seed, step, sample_offset, screen_tf32)
