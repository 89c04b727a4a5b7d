"""Triton whole-trajectory point-cloud sampler: every step k of a step table (MATH.md §3)
  D = posterior(x; α_k, σ_k),  x ← A_k·x + B_k·D + C_k·z_k     (z_k: noise contract, step index k)
in one kernel launch. The table lives on the device as float32 records; no host sync between steps.

Small d: each program keeps its [BM, DP] queries in registers for the whole trajectory.
Large d: queries cannot stay on chip (BM × d floats); each program owns its rows of `out` (the state)
and of a scratch accumulator, both L2-resident, and runs all steps on them without leaving the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from ._philox import normal_tile, sample_index_words
from ._posterior import large_reduce, small_reduce, small_row_tile


# ================================================================ kernels
@triton.jit
def _step_record(tab_ptr, k):
    tp = tab_ptr + k * 9
    return (tl.load(tp + 0), tl.load(tp + 1), tl.load(tp + 2), tl.load(tp + 3), tl.load(tp + 4),
            tl.load(tp + 5), tl.load(tp + 6), tl.load(tp + 7), tl.load(tp + 8))


# per-call values: never recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi", "first_step"])
def _pointcloud_sample_small_kernel(x_ptr, data_ptr, lw_ptr, tab_ptr, out_ptr, traj_ptr, M, N, d, K,
                                    stride_x, stride_y, traj_stride: tl.int64, seed_lo: tl.int64,
                                    seed_hi: tl.int64, off_lo: tl.int64, off_hi: tl.int64,
                                    first_step: tl.int64, save_traj: tl.int32,
                                    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    rows, rows64, rmask, cols, mask, x = small_row_tile(x_ptr, M, d, stride_x, BM, DP)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    zero = tl.zeros([BM], tl.float32)
    for k in range(K):
        a, c1, c2, k2, cy, cx, A, B, Cn = _step_record(tab_ptr, k)
        acc, m, s = small_reduce(x, zero + c1, zero + c2, zero + k2, data_ptr, stride_y, lw_ptr, N, d, BM, BN, DP)
        D = acc * (cy / s)[:, None] + cx * x
        xn = A * x + B * D
        if Cn != 0.0:
            xn += Cn * normal_tile(seed_lo, seed_hi, first_step + k, i_lo, i_hi, 0, DP // 4)
        x = tl.where(mask, xn, 0.0)                 # padding columns must stay 0 (they enter distances)
        if save_traj != 0:
            tl.store(traj_ptr + (k + 1) * traj_stride + rows64[:, None] * d + cols[None, :], x, mask=mask)
    tl.store(out_ptr + rows64[:, None] * d + cols[None, :], x, mask=mask)


# per-call values: never recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi", "first_step"])
def _pointcloud_sample_large_kernel(data_ptr, lw_ptr, tab_ptr, out_ptr, acc_ptr, traj_ptr, M, N, d, K,
                                    stride_y, traj_stride: tl.int64, kappa, delta2, tau2,
                                    seed_lo: tl.int64, seed_hi: tl.int64, off_lo: tl.int64, off_hi: tl.int64,
                                    first_step: tl.int64, save_traj: tl.int32,
                                    SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                    BK: tl.constexpr, BKE: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    zero = tl.zeros([BM], tl.float32)
    for k in range(K):
        a, c1, c2, k2, cy, cx, A, B, Cn = _step_record(tab_ptr, k)
        m, s = large_reduce(out_ptr, d, rows, rmask, zero + a, zero + c1, zero + c2, zero + k2, data_ptr, stride_y,
                            lw_ptr, acc_ptr, d, N, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK, BKE)
        fy = cy / s
        for k0 in range(0, d, BK):
            kk = k0 + tl.arange(0, BK)
            mask = rmask[:, None] & (kk < d)[None, :]
            xptr = out_ptr + rows64[:, None] * d + kk[None, :]
            xk = tl.load(xptr, mask=mask, other=0.0)
            acc = tl.load(acc_ptr + rows64[:, None] * d + kk[None, :], mask=mask, other=0.0)
            xn = A * xk + B * (acc * fy[:, None] + cx * xk)
            if Cn != 0.0:
                xn += Cn * normal_tile(seed_lo, seed_hi, first_step + k, i_lo, i_hi, k0 // 4, BK // 4)
            tl.debug_barrier()                      # loads of the tile before its stores
            tl.store(xptr, xn, mask=mask)
            if save_traj != 0:
                tl.store(traj_ptr + (k + 1) * traj_stride + rows64[:, None] * d + kk[None, :], xn, mask=mask)
        tl.debug_barrier()                          # the next step reads these rows through other layouts


# ================================================================ launcher
def step_records(table, device) -> torch.Tensor:
    """float32 [K, NPAR] per-step records (a, b, k2, cy, cx, A, B, C) from the columns t, α, σ, A, B, C.

    `table` is a [K, 6] tensor or a sequence of six [K] tensors/lists (float32 or float64)."""
    if isinstance(table, torch.Tensor):
        if table.ndim != 2 or table.shape[1] != 6:
            raise ValueError(f"table must be [K, 6] (t, alpha, sigma, A, B, C), got {tuple(table.shape)}")
        cols = table.unbind(1)
    else:
        cols = list(table)
        if len(cols) != 6:
            raise ValueError(f"table must have the six columns t, alpha, sigma, A, B, C; got {len(cols)}")
    cols = [torch.as_tensor(c).to(device=device, dtype=torch.float64).reshape(-1) for c in cols]
    K = cols[0].numel()
    if K < 1 or any(c.numel() != K for c in cols):
        raise ValueError(f"table columns must be non-empty and of one length, got {[c.numel() for c in cols]}")
    for c, n in zip(cols, ("t", "alpha", "sigma", "A", "B", "C"), strict=True):
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"table column {n} contains NaN or inf")
    _t, alpha, sigma, A, B, Cc = cols
    return alpha, sigma, A, B, Cc


def build_table(alpha, sigma, A, B, Cc, bandwidth, device):
    K = alpha.numel()
    par = C.reduction_params(alpha, sigma, bandwidth, K, device, "pointcloud_sample")
    par[:, 6], par[:, 7], par[:, 8] = A, B, Cc
    return C.as_f32_table(par)


def launch_pointcloud_sample(x, data, lw2, tab, K, seed, sample_offset, traj, first_step=0, screen_tf32=None,
                             config=None):
    from . import _posterior

    M, d = x.shape
    N = data.shape[0]
    s_lo, s_hi = C.words(seed)
    o_lo, o_hi = C.words(sample_offset)
    out = torch.empty_like(x) if d <= C.SMALL_D_MAX else x.clone()
    save = traj is not None
    traj_arg = traj if save else out
    traj_stride = M * d
    if traj is not None:
        traj[0].copy_(x)
    if d <= C.SMALL_D_MAX:
        cfg = config or C.small_config(d)
        with C.device_guard(x.device):      # the tensors' GPU, not the current one
            _pointcloud_sample_small_kernel[(triton.cdiv(M, cfg["BM"]),)](
                x, data, lw2, tab, out, traj_arg, M, N, d, K, x.stride(0), data.stride(0), traj_stride,
                s_lo, s_hi, o_lo, o_hi, first_step, int(save),
                BM=cfg["BM"], BN=cfg["BN"], DP=cfg["DP"], num_warps=cfg["num_warps"])
        return out
    tf32 = _posterior.SCREEN_TF32 if screen_tf32 is None else bool(screen_tf32)
    cfg = config or C.large_config(d)
    acc = torch.empty_like(x)
    with C.device_guard(x.device):      # the tensors' GPU, not the current one
        _pointcloud_sample_large_kernel[(triton.cdiv(M, cfg["BM"]),)](
            data, lw2, tab, out, acc, traj_arg, M, N, d, K, data.stride(0), traj_stride,
            C.screen_kappa(d, tf32), C.screen_delta2(N), C.SCREEN_TAU2, s_lo, s_hi, o_lo, o_hi, first_step, int(save),
            SCREEN_TF32=tf32, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BKE=cfg["BKE"], num_warps=cfg["num_warps"])
    return out


# ================================================================ public function
def pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False, *, first_step=0, screen_tf32=None, config=None):
    """Run every step of `table` on the point cloud `data` from x [M, d] (float32; not modified).

    table: columns (t, alpha, sigma, A, B, C) of the K steps, as a [K, 6] tensor or six [K] tensors
    (float32/float64, e.g. from fastdiff.triton.table_columns(process, step_table)); step k draws its
    noise with step index first_step + k, row i is global sample sample_offset + i, exactly as
    fastdiff.sample. Returns x_K [M, d], and the trajectory [K + 1, M, d] when asked.
    config: a launch configuration dict replacing the heuristic's (tests: fewer, larger interpreter programs;
    rows are independent, so the result does not depend on BM).
    """
    C.check_x(x)
    data = C.check_data(data, x.shape[1], x.device)
    M, d = x.shape
    seed = C.check_seed(seed)
    sample_offset = C.check_offset(sample_offset, M)
    alpha, sigma, A, B, Cc = step_records(table, x.device)
    K = alpha.numel()
    first_step = C.check_step(first_step)
    C.check_step(first_step + K - 1)
    lw2 = C.log_weights2(log_weights, data.shape[0], x.device)
    tab = build_table(alpha, sigma, A, B, Cc, bandwidth, x.device)
    C.check_float32_range(x, data, alpha, sigma, bandwidth, "pointcloud_sample", table=(A, B, Cc))
    traj = torch.empty(K + 1, M, d, dtype=torch.float32, device=x.device) if return_trajectory else None
    if M == 0:
        out = x.clone()
    else:
        out = launch_pointcloud_sample(x.contiguous(), data, lw2, tab, K, seed, sample_offset, traj,
                                       first_step, screen_tf32, config)
    return (out, traj) if return_trajectory else out
