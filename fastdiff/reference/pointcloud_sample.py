"""Plain-torch whole trajectory of a point cloud: every row of a kernel step table (fastdiff._table)."""
from __future__ import annotations

import math

import torch

from .. import _table, noise
from .affine_step import affine_step
from .posterior import posterior


def pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False):
    """For k = 0..K−1: x ← A_k x + B0_k D_k + B1_k D_{k−1} + B2_k D_{k−2} + C_k z_k, D_k the posterior mean at
    (alpha_k, sigma_k), z_k the noise contract at step k; a row that churns or has a stage runs as
    fastdiff._table's docstring writes it (_staged_row). x [M, d] is updated in place; table is the float64
    [K, WIDTH] CPU tensor of fastdiff._table. Returns the trajectory [K+1, M, d] when asked, else None.

    A one-step row (B1 = B2 = 0, no churn, no stage) is exactly pointcloud_step(..., out=x); the history terms are
    added after it, term by term, so one-step tables keep their bits."""
    rows = table.tolist()            # one host read: the per-step numbers are Python floats from here on
    traj = [x.clone()] if return_trajectory else None
    history: list[torch.Tensor] = []     # D_{k−1}, D_{k−2}: kept only while a later row uses them
    keep = _history_kept(rows)
    for k, row in enumerate(rows):
        if _table.row_is_one_step(row):
            D, _ = posterior(x, data, row[_table.ALPHA], row[_table.SIGMA], log_weights, bandwidth)
            affine_step(x, D, row[_table.A], row[_table.B0], row[_table.C], seed, k, sample_offset, x)
        else:
            D = _staged_row(x, data, row, seed, k, sample_offset, log_weights, bandwidth)
        for j, col in enumerate(_table.MULTISTEP):
            if row[col] != 0.0:
                x.add_(history[j], alpha=row[col])
        if keep:
            history = [D, *history][:keep]
        if traj is not None:
            traj.append(x.clone())
    return torch.stack(traj) if traj is not None else None


def _staged_row(x, data, row, seed, k, sample_offset, log_weights, bandwidth):
    """One churned or two-stage row, in place in x, in the table executor's order (fastdiff.methods.run_table):
    x̂ = P x + Cchurn z_churn; D at x̂; u = Ux x̂ + UD D + Uz z_stage and D_u at u (BU != 0); then
    x ← A x̂ + B0 D + BU D_u + C w with w = rho z_stage + √(1 − rho²) z_k (formed in float64, then rounded).
    Returns D (the row's history item)."""
    M, d = x.shape
    idx = torch.arange(sample_offset, sample_offset + M, dtype=torch.int64, device=x.device)

    def draw(step):
        return noise.normal(seed, idx, step, d, dtype=torch.float64, device=x.device)
    P, Cc = row[_table.P], row[_table.CCHURN]
    xh = x.mul(P) if P != 1.0 else x.clone()
    if Cc != 0.0:
        xh.add_(draw(_table.CHURN_STEP_BASE + k).to(x.dtype), alpha=Cc)
    D, _ = posterior(xh, data, row[_table.ALPHA], row[_table.SIGMA], log_weights, bandwidth)
    staged, rho = row[_table.BU] != 0.0, row[_table.RHO]
    zs = draw(_table.STAGE_STEP_BASE + k) if (staged and row[_table.UZ] != 0.0) or rho != 0.0 else None
    out = torch.add(xh.mul(row[_table.A]), D, alpha=row[_table.B0])
    if staged:
        u = torch.add(xh.mul(row[_table.UX]), D, alpha=row[_table.UD])
        if row[_table.UZ] != 0.0:
            u.add_(zs.to(x.dtype), alpha=row[_table.UZ])
        Du, _ = posterior(u, data, row[_table.ALPHA_U], row[_table.SIGMA_U], log_weights, bandwidth)
        out.add_(Du, alpha=row[_table.BU])
    C = row[_table.C]
    if C != 0.0:
        w = draw(k)
        if rho != 0.0:
            w = w.mul(math.sqrt(1.0 - rho * rho)).add_(zs, alpha=rho)
        out.add_(w.to(x.dtype), alpha=C)
    x.copy_(out)
    return D


def _history_kept(rows) -> int:
    """How many past D's the table ever uses (0, 1 or 2)."""
    used = [j + 1 for j, col in enumerate(_table.MULTISTEP) if any(r[col] != 0.0 for r in rows)]
    return max(used, default=0)
