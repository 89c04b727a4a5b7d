"""Which rows of a float32 point-cloud call run in float64 (the shared numeric rule, point 3).

Every backend keeps its logits finite (inv2c clamped to the largest finite value of the working type,
logits clamped at −max_finite), so no finite input gives NaN or inf. Clamping alone would still be
*wrong* for a float32 query whose squared distance to every point overflows: all points would share
equal weight. The ops layer therefore computes a float32 row in float64 when
  0.5/c > 1e30                                 (σ so small that float32 logits lose their meaning), or
  (max|x_i| + |α_i|·max|y|)²·d·0.5/c > 1e36    (the logits could overflow float32, whose limit is 3.4e38),
and casts the results back to float32. The decision is made per row (so row i's result never depends on
which other rows are computed with it) and the rows are dispatched as contiguous runs (so the noise of
row i stays that of global sample sample_offset + i). A run that needs float64 is sent to the backend
that `backend` selects for float64 inputs: `auto` may pick another backend for it; an explicit backend
that computes in float32 only (triton) raises and says why.
"""
from __future__ import annotations

import math

import torch

from . import _backend, _table
from ._checks import data_ends, per_row64

F32_SAFE_INV2C = 1e30     # beyond this 0.5/c a float32 call runs in float64 (the reference's original rule)
F32_SAFE_LOGIT = 1e36     # a bound on |logit| beyond which float32 could overflow (float32 max is 3.4e38)
NOISE_ABS_MAX = 6.0       # |z| of the noise contract is at most sqrt(−2 ln 2⁻²⁴) = 5.77


def _inv2c(a64, s64, bandwidth) -> torch.Tensor:
    """0.5/c per row in float64 (inf when c underflows: such rows always need float64)."""
    return 0.5 / (a64 * a64 * float(bandwidth) + s64 * s64)


def _needs64(xmax, a64, inv2c, ymax, d) -> torch.Tensor:
    """The rule's two conditions, per row (all float64 tensors broadcasting to [M])."""
    reach = xmax + a64.abs() * ymax
    return (inv2c > F32_SAFE_INV2C) | (reach * reach * d * inv2c > F32_SAFE_LOGIT)


def _one_time(v) -> bool:
    """A finite scalar time argument as the ops layer normalises it (a float64 tensor [1] on the CPU) or a number."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and v.dtype == torch.float64 and v.device.type == "cpu"
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _data_absmax(data) -> float:
    ends = data_ends(data)
    return 0.0 if ends is None else max(abs(ends[0]), abs(ends[1]))


def float64_rows(x, data, alpha, sigma, bandwidth=0.0, absmax=None) -> torch.Tensor:
    """Bool [M] (on the CPU): the float32 rows of one posterior / step evaluation that need float64.
    All False for float64 x. alpha, sigma: scalars or [M]. absmax: {"x": max|x|, "data": max|y|} when the caller
    has scanned them already (fastdiff.ops checks every value first)."""
    M, d = x.shape
    if x.dtype != torch.float32 or M == 0:
        return torch.zeros(M, dtype=torch.bool)
    if absmax and _one_time(alpha) and _one_time(sigma):   # the common call, in Python floats (same float64 rule)
        a, s = float(alpha), float(sigma)
        c = a * a * float(bandwidth) + s * s
        inv2c = 0.5 / c if c > 0 else math.inf
        reach = absmax["x"] + abs(a) * absmax["data"]
        need = inv2c > F32_SAFE_INV2C or reach * reach * d * inv2c > F32_SAFE_LOGIT
        if not need:
            return torch.zeros(M, dtype=torch.bool)
    a64 = per_row64(alpha, "alpha", M, "cpu")
    s64 = per_row64(sigma, "sigma", M, "cpu")
    ymax = absmax["data"] if absmax else _data_absmax(data)
    if a64.numel() == 1 and s64.numel() == 1:   # one time for the whole call: first the bound over every row
        if absmax:                                # (the per-row pass only when that bound fails)
            whole = absmax["x"]
        else:
            lo, hi = torch.aminmax(x.detach())
            whole = max(abs(float(lo)), abs(float(hi)))
        if not bool(_needs64(torch.tensor(whole, dtype=torch.float64), a64, _inv2c(a64, s64, bandwidth), ymax, d)):
            return torch.zeros(M, dtype=torch.bool)
    xmax = x.detach().abs().amax(1).to("cpu", torch.float64)
    return _needs64(xmax, a64, _inv2c(a64, s64, bandwidth), ymax, d).expand(M)


def float64_rows_trajectory(x, data, table, bandwidth=0.0, absmax=None) -> torch.Tensor:
    """Bool [M]: the float32 rows of a whole trajectory (a kernel step table, fastdiff._table) that need float64
    at some step. max|x_i| at step k is bounded from x_0 through the table:
    |x_{k+1}| ≤ |A_k||x̂_k| + (|B0_k| + |B1_k| + |B2_k|)·max_{j ≤ k} max|D_j| + |BU_k| max|D_u|
                + |C_k|·6·(|ρ| + √(1−ρ²)),
    |x̂_k| ≤ |P_k||x_k| + |Cchurn_k|·6 (and the stage point u likewise), with
    max|D_k| ≤ |1 − α_k²v/c_k|·max|y| + |α_k v/c_k|·|x_k| (D is a convex combination of data points, shrunk and
    pulled toward x for kernel-density data)."""
    M, d = x.shape
    if x.dtype != torch.float32 or M == 0:
        return torch.zeros(M, dtype=torch.bool)
    v = float(bandwidth)
    ymax = absmax["data"] if absmax else _data_absmax(data)
    xmax = x.detach().abs().amax(1).to("cpu", torch.float64)
    dmax_seen = torch.zeros_like(xmax)
    need = torch.zeros(M, dtype=torch.bool)
    def posterior_at(a, s, xmax):
        """need |= this posterior's float64 test; returns its bound on max|D|."""
        nonlocal need
        c = a * a * v + s * s
        inv2c = torch.tensor(0.5 / c if c > 0 else float("inf"), dtype=torch.float64)
        need |= _needs64(xmax, torch.tensor(a, dtype=torch.float64), inv2c, ymax, d)
        return abs(1 - a * a * v / c) * ymax + abs(a * v / c) * xmax if c > 0 else ymax + xmax

    for row in table.tolist():
        # a churned row evaluates D at x̂ = P x + Cchurn z; a staged one also D_u at u = Ux x̂ + UD D + Uz z_stage
        xmax = abs(row[_table.P]) * xmax + abs(row[_table.CCHURN]) * NOISE_ABS_MAX
        dmax = posterior_at(row[_table.ALPHA], row[_table.SIGMA], xmax)
        dmax_seen = torch.maximum(dmax_seen, dmax)
        du = 0.0
        if row[_table.BU] != 0.0:
            umax = abs(row[_table.UX]) * xmax + abs(row[_table.UD]) * dmax + abs(row[_table.UZ]) * NOISE_ABS_MAX
            du = abs(row[_table.BU]) * posterior_at(row[_table.ALPHA_U], row[_table.SIGMA_U], umax)
        rho = row[_table.RHO]
        w = NOISE_ABS_MAX * (abs(rho) + math.sqrt(max(0.0, 1.0 - rho * rho)))
        b = abs(row[_table.B0]) + abs(row[_table.B1]) + abs(row[_table.B2])
        xmax = abs(row[_table.A]) * xmax + b * dmax_seen + du + abs(row[_table.C]) * w
    return need


def saturate(t: torch.Tensor, dtype) -> torch.Tensor:
    """t cast to dtype, clamped to its finite range first (a float64 L of −5e39 becomes −max_float32, not −inf)."""
    fin = torch.finfo(dtype)
    return t.clamp(-fin.max, fin.max).to(dtype)


def runs(need: torch.Tensor):
    """[(start, stop, promote)]: maximal runs of consecutive rows with the same decision."""
    flags = need.tolist()
    out, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            out.append((start, i, bool(flags[start])))
            start = i
    return out


def _rows(value, r0, r1, M):
    """Rows r0:r1 of a per-row value (a scalar, or a [1] value, stays as it is)."""
    if not isinstance(value, torch.Tensor) and hasattr(value, "__len__"):
        value = torch.as_tensor(value, dtype=torch.float64)
    if isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() == M and M > 1:
        return value[r0:r1]
    return value


def _engine64(op, backend, x):
    try:
        return _backend.select(op, backend, **_backend.facts(device=x.device, dtype=torch.float64, d=x.shape[1]))
    except ValueError as exc:
        raise ValueError(f"{op}: some rows of these float32 inputs need float64 (0.5/c > {F32_SAFE_INV2C:g}, i.e. "
                         "sigma tiny, or |x| so large that float32 logits could overflow), and " + str(exc)) from None


def _data64(data):
    return data if data.dtype == torch.float64 else data.to(torch.float64)


def posterior(op_backend, backend, x, data, alpha, sigma, log_weights=None, bandwidth=0.0, absmax=None):
    """fastdiff.ops.posterior after validation: `op_backend` (selected for x) runs the float32 rows."""
    need = float64_rows(x, data, alpha, sigma, bandwidth, absmax)
    if not bool(need.any()):
        return op_backend.posterior(x, data, alpha, sigma, log_weights, bandwidth)
    M = x.shape[0]
    D, L = torch.empty_like(x), torch.empty(M, dtype=x.dtype, device=x.device)
    engine64, data64 = _engine64("posterior", backend, x), _data64(data)
    for r0, r1, promote in runs(need):
        a, s = _rows(alpha, r0, r1, M), _rows(sigma, r0, r1, M)
        if promote:
            Dr, Lr = engine64.posterior(x[r0:r1].to(torch.float64), data64, a, s, log_weights, bandwidth)
        else:
            Dr, Lr = op_backend.posterior(x[r0:r1], data, a, s, log_weights, bandwidth)
        D[r0:r1], L[r0:r1] = Dr, saturate(Lr, L.dtype)
    return D, L


def pointcloud_step(op_backend, backend, x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0,
                    log_weights=None, bandwidth=0.0, out=None, absmax=None):
    """fastdiff.ops.pointcloud_step after validation (out may be x)."""
    need = float64_rows(x, data, alpha, sigma, bandwidth, absmax)
    if not bool(need.any()):
        return op_backend.pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights,
                                          bandwidth, out)
    M = x.shape[0]
    engine64, data64 = _engine64("pointcloud_step", backend, x), _data64(data)
    results = []
    for r0, r1, promote in runs(need):     # compute every run before writing: out may alias x
        args = [_rows(v, r0, r1, M) for v in (alpha, sigma, A, B, C)]
        if promote:
            res = engine64.pointcloud_step(x[r0:r1].to(torch.float64), data64, *args, seed, step, sample_offset + r0,
                                           log_weights, bandwidth, None)
        else:
            res = op_backend.pointcloud_step(x[r0:r1], data, *args, seed, step, sample_offset + r0, log_weights,
                                             bandwidth, None)
        results.append((r0, r1, res))
    if out is None:
        out = torch.empty_like(x)
    for r0, r1, res in results:
        out[r0:r1] = res
    return out


def pointcloud_sample(op_backend, backend, x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False, absmax=None):
    """fastdiff.ops.pointcloud_sample after validation: x [M, d] contiguous, updated in place."""
    need = float64_rows_trajectory(x, data, table, bandwidth, absmax)
    if not bool(need.any()):
        return op_backend.pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth,
                                            return_trajectory)
    M, d = x.shape
    engine64, data64 = _engine64("pointcloud_sample", backend, x), _data64(data)
    traj = torch.empty(len(table) + 1, M, d, dtype=x.dtype, device=x.device) if return_trajectory else None
    for r0, r1, promote in runs(need):
        if promote:
            xw = x[r0:r1].to(torch.float64)
            tr = engine64.pointcloud_sample(xw, data64, table, seed, sample_offset + r0, log_weights,
                                            bandwidth, return_trajectory)
            x[r0:r1] = xw
        else:
            xw = x[r0:r1].contiguous()       # (rows of a contiguous x are contiguous: a view, updated in place)
            tr = op_backend.pointcloud_sample(xw, data, table, seed, sample_offset + r0, log_weights, bandwidth,
                                              return_trajectory)
        if traj is not None:
            traj[:, r0:r1] = tr
    return traj
