"""Triton whole-trajectory point-cloud sampler: every step k of a step table (MATH.md §3)
  D_k = posterior(x; α_k, σ_k),  x ← A_k·x + B0_k·D_k + C_k·z_k + B1_k·D_{k−1} + B2_k·D_{k−2}
(z_k: noise contract, step index k) in one kernel launch, x updated in place. The table is fastdiff._table's
float64 [K, WIDTH] layout; the multistep terms (B1, B2: DPM-Solver++(2M)/(3M), docs/math.md §3b) are added after
the step's update, B1 term then B2 term, as fastdiff.reference.pointcloud_sample adds them. A churned or two-stage
row (fastdiff._table's docstring) runs its churn, both posteriors of the step (at x̂ and at the stage point u) and
its correlated noise in the same launch (STAGES; at large d the stage draw is drawn again where it is used rather
than kept).
The kernels read per-step float32 records derived from the table on the host (see step_records, history_records,
stage_records); no host sync between steps.

Small d: each program keeps its [BM, DP] queries, and the last HIST D's, in registers for the whole trajectory.
Large d: queries cannot stay on chip (BM × d floats); each program owns its rows of x (the state), of a scratch
accumulator and of HIST + 1 D slots (step k writes D_k into slot k mod (HIST + 1)), all L2-resident, and runs
all steps on them without leaving the kernel; a staged step keeps D_k and u in two more L2-resident rows (sbuf).
HIST = 0 and STAGES = False (one-step tables) compile the kernels as before.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _table
from . import _common as C
from . import posterior as _posterior
from ._philox import normal_tile, sample_index_words
from .posterior import large_reduce, small_reduce, small_row_tile


# ================================================================ kernels
@triton.jit
def _step_record(tab_ptr, k):
    tp = tab_ptr + k * 10           # _common.NPAR
    return (tl.load(tp + 0), tl.load(tp + 1), tl.load(tp + 2), tl.load(tp + 3), tl.load(tp + 4),
            tl.load(tp + 5), tl.load(tp + 6), tl.load(tp + 7), tl.load(tp + 8), tl.load(tp + 9))


NSTAGE = 20    # stage_records: P, Cchurn, Ux, UD, Uz, BU, rho, √(1 − rho²), churns, staged, then the stage
#               posterior's reduction record (a, c1, c2, k2, cy, cx, draws, -, -, k2_lo at alphaU, sigmaU), whose
#               unused slot 6 (the record's A) holds whether the row draws its stage noise (Uz or rho != 0)
STAGE_STEP = tl.constexpr(_table.STAGE_STEP_BASE)
CHURN_STEP = tl.constexpr(_table.CHURN_STEP_BASE)


@triton.jit
def _stage_record(st_ptr, k):
    sp = st_ptr + k * 20            # NSTAGE
    return (tl.load(sp + 0), tl.load(sp + 1), tl.load(sp + 2), tl.load(sp + 3), tl.load(sp + 4),
            tl.load(sp + 5), tl.load(sp + 6), tl.load(sp + 7), tl.load(sp + 8), tl.load(sp + 9),
            tl.load(sp + 10), tl.load(sp + 11), tl.load(sp + 12), tl.load(sp + 13), tl.load(sp + 14),
            tl.load(sp + 15), tl.load(sp + 19), tl.load(sp + 16))


@triton.jit
def _history_record(hist_ptr, k):
    return tl.load(hist_ptr + 2 * k), tl.load(hist_ptr + 2 * k + 1)      # B1, B2 of step k (history_records)


# per-call values: never recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _pointcloud_sample_small_kernel(x_ptr, data_ptr, lw_ptr, tab_ptr, hist_ptr, stage_ptr, traj_ptr, M, N, d, K,
                                    stride_x, stride_y, traj_stride: tl.int64, seed_lo: tl.int64,
                                    seed_hi: tl.int64, off_lo: tl.int64, off_hi: tl.int64, save_traj: tl.int32,
                                    HIST: tl.constexpr, STAGES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                    DP: tl.constexpr):
    # x is updated in place: this program's rows are read once here and written once at the end (no other
    # program touches them), the whole trajectory runs in registers in between.
    rows, rows64, rmask, cols, mask, x = small_row_tile(x_ptr, M, d, stride_x, BM, DP)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    zero = tl.zeros([BM], tl.float32)
    H1 = tl.zeros([BM, DP], tl.float32)             # D_{k−1}, D_{k−2} (HIST > 0; unread while their B is 0)
    H2 = tl.zeros([BM, DP], tl.float32)
    for k in range(K):
        a, c1, c2, k2, cy, cx, A, B, Cn, _ = _step_record(tab_ptr, k)
        k64 = tl.cast(k, tl.int64)
        if STAGES:                                  # x̂ = P x + Cchurn z_churn
            P, Cc, Ux, UD, Uz, BU, rho, keep, churns, staged, aU, c1U, c2U, k2U, cyU, cxU, _, draws = \
                _stage_record(stage_ptr, k)
            if churns != 0.0:
                zc = normal_tile(seed_lo, seed_hi, k64 + CHURN_STEP, i_lo, i_hi, 0, DP // 4)
                x = tl.where(mask, P * x + Cc * zc, 0.0)
        acc, m, s = small_reduce(x, zero + a, zero + c1, zero + c2, zero + k2, data_ptr, stride_y, lw_ptr, N, d,
                                 BM, BN, DP)
        D = (acc / s).to(tl.float32) * cy + cx * x
        xn = A * x + B * D
        if STAGES:                                  # the stage point u, D_u, and the correlated step noise
            zs = tl.zeros([BM, DP], tl.float32)
            if draws != 0.0:
                zs = normal_tile(seed_lo, seed_hi, k64 + STAGE_STEP, i_lo, i_hi, 0, DP // 4)
            if staged != 0.0:
                u = tl.where(mask, Ux * x + UD * D + Uz * zs, 0.0)
                acc_u, m_u, s_u = small_reduce(u, zero + aU, zero + c1U, zero + c2U, zero + k2U, data_ptr, stride_y,
                                               lw_ptr, N, d, BM, BN, DP)
                xn += BU * ((acc_u / s_u).to(tl.float32) * cyU + cxU * u)
            if Cn != 0.0:
                z = normal_tile(seed_lo, seed_hi, k64, i_lo, i_hi, 0, DP // 4)
                if rho != 0.0:
                    z = rho * zs + keep * z
                xn += Cn * z
        elif Cn != 0.0:
            xn += Cn * normal_tile(seed_lo, seed_hi, k64, i_lo, i_hi, 0, DP // 4)
        if HIST > 0:                                # the multistep terms, after the one-step update
            b1, b2 = _history_record(hist_ptr, k)
            if b1 != 0.0:
                xn += b1 * H1
            if HIST > 1:
                if b2 != 0.0:
                    xn += b2 * H2
                H2 = H1
            H1 = D
        x = tl.where(mask, xn, 0.0)                 # padding columns must stay 0 (they enter distances)
        if save_traj != 0:
            tl.store(traj_ptr + (k + 1) * traj_stride + rows64[:, None] * d + cols[None, :], x, mask=mask)
    tl.debug_barrier()                              # in place: every load of x before the store
    tl.store(x_ptr + rows64[:, None] * stride_x + cols[None, :], x, mask=mask)


# per-call values: never recompile
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "off_lo", "off_hi"])
def _pointcloud_sample_large_kernel(data_ptr, lw_ptr, tab_ptr, hist_ptr, stage_ptr, x_ptr, acc_ptr, dbuf_ptr,
                                    sbuf_ptr, traj_ptr, M, N, d, K, stride_y, traj_stride: tl.int64,
                                    slot_stride: tl.int64, kappa, delta2, tau2, seed_lo: tl.int64, seed_hi: tl.int64,
                                    off_lo: tl.int64, off_hi: tl.int64, save_traj: tl.int32, HIST: tl.constexpr,
                                    STAGES: tl.constexpr, SCREEN_TF32: tl.constexpr, BM: tl.constexpr,
                                    BN: tl.constexpr, BK: tl.constexpr, BKE: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    for k in range(K):
        if STAGES:
            _large_staged_step(data_ptr, lw_ptr, tab_ptr, hist_ptr, stage_ptr, x_ptr, acc_ptr, dbuf_ptr, sbuf_ptr,
                               traj_ptr, k, rows, rmask, rows64, i_lo, i_hi, N, d, stride_y, traj_stride, slot_stride,
                               kappa, delta2, tau2, seed_lo, seed_hi, save_traj, HIST, SCREEN_TF32, BM, BN, BK, BKE)
        else:
            _large_one_step(data_ptr, lw_ptr, tab_ptr, hist_ptr, x_ptr, acc_ptr, dbuf_ptr, traj_ptr, k, rows, rmask,
                            rows64, i_lo, i_hi, N, d, stride_y, traj_stride, slot_stride, kappa, delta2, tau2,
                            seed_lo, seed_hi, save_traj, HIST, SCREEN_TF32, BM, BN, BK, BKE)
        tl.debug_barrier()                          # the next step reads these rows through other layouts


@triton.jit
def _history_terms(xn, Dk, dbuf_ptr, hist_ptr, k, tile, mask, slot_stride, HIST: tl.constexpr):
    """xn + B1 D_{k−1} + B2 D_{k−2}; D_k into slot k mod (HIST + 1), D_{k−j} from slot k − j."""
    if HIST > 0:
        b1, b2 = _history_record(hist_ptr, k)
        if b1 != 0.0:
            xn += b1 * tl.load(dbuf_ptr + ((k + HIST) % (HIST + 1)) * slot_stride + tile, mask=mask, other=0.0)
        if HIST > 1:
            if b2 != 0.0:
                xn += b2 * tl.load(dbuf_ptr + ((k + HIST - 1) % (HIST + 1)) * slot_stride + tile, mask=mask,
                                   other=0.0)
        tl.store(dbuf_ptr + (k % (HIST + 1)) * slot_stride + tile, Dk, mask=mask)
    return xn


@triton.jit
def _large_staged_step(data_ptr, lw_ptr, tab_ptr, hist_ptr, stage_ptr, x_ptr, acc_ptr, dbuf_ptr, sbuf_ptr, traj_ptr,
                       k, rows, rmask, rows64, i_lo, i_hi, N, d, stride_y, traj_stride, slot_stride, kappa, delta2,
                       tau2, seed_lo, seed_hi, save_traj, HIST: tl.constexpr, SCREEN_TF32: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKE: tl.constexpr):
    """Step k of a table with churned or two-stage rows, on this program's rows of x (in memory): the churn in
    place, D_k at x̂ into sbuf slot 0 and the stage point u into slot 1, D_u at u (acc), then the update with the
    correlated noise and the multistep terms. One-step rows take the same path (churns = staged = 0, rho = 0:
    the same operations as _large_one_step, D_k through memory)."""
    a, c1, c2, k2, cy, cx, A, B, Cn, k2_lo = _step_record(tab_ptr, k)
    P, Cc, Ux, UD, Uz, BU, rho, keep, churns, staged, aU, c1U, c2U, k2U, cyU, cxU, k2U_lo, _ = \
        _stage_record(stage_ptr, k)
    zero = tl.zeros([BM], tl.float32)
    k64 = tl.cast(k, tl.int64)
    S = slot_stride                                 # sbuf: [2, M, d] (D_k, u)
    if churns != 0.0:
        for k0 in range(0, d, BK):
            kk = k0 + tl.arange(0, BK)
            mask = rmask[:, None] & (kk < d)[None, :]
            xptr = x_ptr + rows64[:, None] * d + kk[None, :]
            zc = normal_tile(seed_lo, seed_hi, k64 + CHURN_STEP, i_lo, i_hi, k0 // 4, BK // 4)
            xh = P * tl.load(xptr, mask=mask, other=0.0) + Cc * zc
            tl.debug_barrier()
            tl.store(xptr, xh, mask=mask)
        tl.debug_barrier()                          # the reduction reads x̂ through other layouts
    m, s = large_reduce(x_ptr, d, rows, rmask, zero + a, zero + c1, zero + c2, zero + k2, zero + k2_lo, data_ptr,
                        stride_y, lw_ptr, acc_ptr, d, N, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK, BKE)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (kk < d)[None, :]
        tile = rows64[:, None] * d + kk[None, :]
        xk = tl.load(x_ptr + tile, mask=mask, other=0.0)
        acc = tl.load(acc_ptr + tile, mask=mask, other=0.0)
        Dk = (acc / s[:, None]).to(tl.float32) * cy + cx * xk              # acc, s float64
        tl.store(sbuf_ptr + tile, Dk, mask=mask)
        if staged != 0.0:
            zs = normal_tile(seed_lo, seed_hi, k64 + STAGE_STEP, i_lo, i_hi, k0 // 4, BK // 4)
            tl.store(sbuf_ptr + S + tile, Ux * xk + UD * Dk + Uz * zs, mask=mask)
    tl.debug_barrier()                              # the stage reduction reads u (and overwrites acc)
    s_u = s
    if staged != 0.0:
        m_u, s_u = large_reduce(sbuf_ptr + S, d, rows, rmask, zero + aU, zero + c1U, zero + c2U, zero + k2U,
                                zero + k2U_lo, data_ptr, stride_y, lw_ptr, acc_ptr, d, N, d, kappa, delta2, tau2,
                                SCREEN_TF32, BM, BN, BK, BKE)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (kk < d)[None, :]
        tile = rows64[:, None] * d + kk[None, :]
        xk = tl.load(x_ptr + tile, mask=mask, other=0.0)
        Dk = tl.load(sbuf_ptr + tile, mask=mask, other=0.0)
        xn = A * xk + B * Dk
        if staged != 0.0:
            u = tl.load(sbuf_ptr + S + tile, mask=mask, other=0.0)
            acc = tl.load(acc_ptr + tile, mask=mask, other=0.0)
            xn += BU * ((acc / s_u[:, None]).to(tl.float32) * cyU + cxU * u)
        if Cn != 0.0:
            z = normal_tile(seed_lo, seed_hi, k64, i_lo, i_hi, k0 // 4, BK // 4)
            if rho != 0.0:
                z = rho * normal_tile(seed_lo, seed_hi, k64 + STAGE_STEP, i_lo, i_hi, k0 // 4, BK // 4) + keep * z
            xn += Cn * z
        xn = _history_terms(xn, Dk, dbuf_ptr, hist_ptr, k, tile, mask, slot_stride, HIST)
        tl.debug_barrier()                          # loads of the tile before its stores
        tl.store(x_ptr + tile, xn, mask=mask)
        if save_traj != 0:
            tl.store(traj_ptr + (k + 1) * traj_stride + tile, xn, mask=mask)


@triton.jit
def _large_one_step(data_ptr, lw_ptr, tab_ptr, hist_ptr, x_ptr, acc_ptr, dbuf_ptr, traj_ptr, k, rows, rmask, rows64,
                    i_lo, i_hi, N, d, stride_y, traj_stride, slot_stride, kappa, delta2, tau2, seed_lo, seed_hi,
                    save_traj, HIST: tl.constexpr, SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, BKE: tl.constexpr):
    """Step k of a table of one-step rows on this program's rows of x (in memory)."""
    a, c1, c2, k2, cy, cx, A, B, Cn, k2_lo = _step_record(tab_ptr, k)
    zero = tl.zeros([BM], tl.float32)
    m, s = large_reduce(x_ptr, d, rows, rmask, zero + a, zero + c1, zero + c2, zero + k2, zero + k2_lo, data_ptr,
                        stride_y, lw_ptr, acc_ptr, d, N, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK, BKE)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (kk < d)[None, :]
        tile = rows64[:, None] * d + kk[None, :]
        xk = tl.load(x_ptr + tile, mask=mask, other=0.0)
        acc = tl.load(acc_ptr + tile, mask=mask, other=0.0)
        Dk = (acc / s[:, None]).to(tl.float32) * cy + cx * xk              # acc, s float64
        xn = A * xk + B * Dk
        if Cn != 0.0:
            xn += Cn * normal_tile(seed_lo, seed_hi, tl.cast(k, tl.int64), i_lo, i_hi, k0 // 4, BK // 4)
        xn = _history_terms(xn, Dk, dbuf_ptr, hist_ptr, k, tile, mask, slot_stride, HIST)
        tl.debug_barrier()                          # loads of the tile before its stores
        tl.store(x_ptr + tile, xn, mask=mask)
        if save_traj != 0:
            tl.store(traj_ptr + (k + 1) * traj_stride + tile, xn, mask=mask)


# ================================================================ launcher
def step_records(table, bandwidth, device) -> torch.Tensor:
    """float32 [K, NPAR] per-step records (a, c1, c2, k2, cy, cx, A, B0, C) on device, from the float64 [K, 17]
    table (fastdiff._table columns).

    Why derived records and not the table itself: the kernels need 1/(2c)·log2(e), 1 − α (the (x − y) + (1 − α)y
    form of the distance), 1 − α²v/c and αv/c, which must be formed in float64 (1 − α for α near 1, 1/(2c)
    for small σ lose digits in float32) and the GPU has no fast float64. So they are computed here once per
    call (K records, the same code as the posterior's per-row records: _common.reduction_params) and
    cast to float32, which is what the kernels compute in."""
    K = table.shape[0]
    par = C.reduction_params(table[:, _table.ALPHA], table[:, _table.SIGMA], bandwidth, K, "cpu")
    par[:, 6] = table[:, _table.A]
    par[:, 7] = table[:, _table.B0]
    par[:, 8] = table[:, _table.C]
    return C.as_f32_table(par).to(device)


def history_depth(table) -> int:
    """How many past D's a [K, 17] table uses (csrc/common/table.h history_depth): 2 when some B2 is nonzero,
    else 1 when some B1 is, else 0 (one-step tables: the kernels without history code)."""
    if bool(table[:, _table.B2].any()):
        return 2
    return 1 if bool(table[:, _table.B1].any()) else 0


def history_records(table, device) -> torch.Tensor:
    """float32 [K, 2] (B1, B2) per step on device: the coefficients of D_{k−1} and D_{k−2}."""
    return table[:, [_table.B1, _table.B2]].to(torch.float32).contiguous().to(device)


def stage_records(table, bandwidth, device) -> torch.Tensor | None:
    """float32 [K, NSTAGE] per-step records of a table with churned or two-stage rows (None without any): P,
    Cchurn, Ux, UD, Uz, BU, rho, √(1 − rho²), whether the row churns, whether it has a stage, then the stage
    posterior's reduction record at (alphaU, sigmaU), formed in float64 as step_records forms the step's (rows
    without a stage get the record of α = σ = 1, never read), with whether the row draws its stage noise in the
    record's unused slot 6 (NSTAGE)."""
    if not _table.uses_stages(table):
        return None
    K = table.shape[0]
    staged = table[:, _table.BU] != 0
    rec = torch.zeros(K, NSTAGE, dtype=torch.float64)
    for j, col in enumerate((_table.P, _table.CCHURN, _table.UX, _table.UD, _table.UZ, _table.BU, _table.RHO)):
        rec[:, j] = table[:, col]
    rec[:, 7] = torch.sqrt(1.0 - table[:, _table.RHO] ** 2)
    rec[:, 8] = ((table[:, _table.P] != 1) | (table[:, _table.CCHURN] != 0)).to(torch.float64)
    rec[:, 9] = staged.to(torch.float64)
    one = torch.ones(K, dtype=torch.float64)
    aU = torch.where(staged, table[:, _table.ALPHA_U], one)
    sU = torch.where(staged, table[:, _table.SIGMA_U], one)
    rec[:, 10:] = C.reduction_params(aU, sU, bandwidth, K, "cpu")
    rec[:, 16] = ((staged & (table[:, _table.UZ] != 0)) | (table[:, _table.RHO] != 0)).to(torch.float64)
    return C.as_f32_table(rec).to(device)


def launch_pointcloud_sample(x, data, lw2, tab, seed, sample_offset, traj, screen_tf32=None, config=None,
                             hist=None, stages=None):
    """x [M, d] float32 contiguous, updated in place; tab: step_records; traj None or [K + 1, M, d];
    hist: None (a one-step table) or history_records of a table of history_depth >= 1; stages: None or
    stage_records."""
    M, d = x.shape
    N, K = data.shape[0], tab.shape[0]
    s_lo, s_hi = C.words(seed)
    o_lo, o_hi = C.words(sample_offset)
    save = traj is not None
    traj_arg = traj if save else x
    traj_stride = M * d
    if save:
        traj[0].copy_(x)
    depth = 0 if hist is None else 1 + int(bool(hist[:, 1].any()))
    hist_arg = tab if hist is None else hist       # (unread when depth is 0)
    stage_arg = tab if stages is None else stages  # (unread without STAGES)
    if d <= C.SMALL_D_MAX:
        cfg = config or C.small_config(d)
        with C.device_guard(x.device):      # the tensors' GPU, not the current one
            _pointcloud_sample_small_kernel[(triton.cdiv(M, cfg["BM"]),)](
                x, data, lw2, tab, hist_arg, stage_arg, traj_arg, M, N, d, K, x.stride(0), data.stride(0),
                traj_stride, s_lo, s_hi, o_lo, o_hi, int(save), HIST=depth, STAGES=stages is not None,
                BM=cfg["BM"], BN=cfg["BN"], DP=cfg["DP"], num_warps=cfg["num_warps"])
        return traj
    tf32 = _posterior.SCREEN_TF32 if screen_tf32 is None else bool(screen_tf32)
    cfg = config or C.large_config(d)
    acc = _posterior._scratch(x.shape, x.device)     # the float64 accumulator (rule 4: sums merged in double)
    dbuf = torch.empty((depth + 1, M, d), dtype=x.dtype, device=x.device) if depth else x   # D slots (unread at 0)
    # a staged step's D_k and stage point u (unread without STAGES)
    sbuf = torch.empty((2, M, d), dtype=x.dtype, device=x.device) if stages is not None else x
    with C.device_guard(x.device):      # the tensors' GPU, not the current one
        _pointcloud_sample_large_kernel[(triton.cdiv(M, cfg["BM"]),)](
            data, lw2, tab, hist_arg, stage_arg, x, acc, dbuf, sbuf, traj_arg, M, N, d, K, data.stride(0),
            traj_stride, M * d, C.screen_kappa(d, tf32), C.screen_delta2(N), C.SCREEN_TAU2, s_lo, s_hi, o_lo, o_hi,
            int(save), HIST=depth, STAGES=stages is not None, SCREEN_TF32=tf32, BM=cfg["BM"], BN=cfg["BN"],
            BK=cfg["BK"], BKE=cfg["BKE"], num_warps=cfg["num_warps"])
    return traj


# ================================================================ public function
def pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False):
    """The backend op (the contract of fastdiff.ops.pointcloud_sample's backends): every step of `table` on
    the point cloud `data`, x [M, d] (float32, contiguous) UPDATED IN PLACE.

    table: the float64 [K, WIDTH] CPU tensor of fastdiff._table; B1/B2 add the D's of the last two steps after
    the step's update; churned and two-stage rows run as fastdiff._table's docstring writes them. Step k draws
    its noise with step index k; row i is global sample sample_offset + i. Returns the trajectory [K + 1, M, d]
    (x_0 first) when return_trajectory, else None. Validated by fastdiff.ops, not here."""
    return run_pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory)


def run_pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                          return_trajectory=False, *, screen_tf32=None, config=None):
    """pointcloud_sample with the knobs of the tests: screen_tf32 (large d) and config, a launch configuration
    replacing the heuristic's (fewer, larger interpreter programs; rows are independent, so the result does
    not depend on BM)."""
    C.check_limits("pointcloud_sample", x, data)
    tab = step_records(table, bandwidth, x.device)
    hist = history_records(table, x.device) if history_depth(table) else None
    stages = stage_records(table, bandwidth, x.device)
    M, d = x.shape
    traj = torch.empty(tab.shape[0] + 1, M, d, dtype=x.dtype, device=x.device) if return_trajectory else None
    if M == 0:
        return traj
    lw2 = C.log_weights2(log_weights, data.shape[0], x.device)
    return launch_pointcloud_sample(x, data.contiguous(), lw2, tab, seed, sample_offset, traj, screen_tf32, config,
                                    hist, stages)
