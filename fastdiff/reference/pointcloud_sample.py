"""Plain-torch whole trajectory of a point cloud: every row of a kernel step table (fastdiff._table)."""
from __future__ import annotations

import torch

from .. import _table
from .affine_step import affine_step
from .posterior import posterior


def pointcloud_sample(x, data, table, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False):
    """For k = 0..K−1: x ← A_k x + B0_k D_k + B1_k D_{k−1} + B2_k D_{k−2} + C_k z_k, D_k the posterior mean at
    (alpha_k, sigma_k), z_k the noise contract at step k. x [M, d] is updated in place; table is the float64
    [K, 8] CPU tensor of fastdiff._table. Returns the trajectory [K+1, M, d] when asked, else None.

    A one-step row (B1 = B2 = 0) is exactly pointcloud_step(..., out=x); the history terms are added after it,
    term by term, so one-step tables keep their bits."""
    rows = table.tolist()            # one host read: the per-step numbers are Python floats from here on
    traj = [x.clone()] if return_trajectory else None
    history: list[torch.Tensor] = []     # D_{k−1}, D_{k−2}: kept only while a later row uses them
    keep = _history_kept(rows)
    for k, row in enumerate(rows):
        D, _ = posterior(x, data, row[_table.ALPHA], row[_table.SIGMA], log_weights, bandwidth)
        affine_step(x, D, row[_table.A], row[_table.B0], row[_table.C], seed, k, sample_offset, x)
        for j, col in enumerate(_table.MULTISTEP):
            if row[col] != 0.0:
                x.add_(history[j], alpha=row[col])
        if keep:
            history = [D, *history][:keep]
        if traj is not None:
            traj.append(x.clone())
    return torch.stack(traj) if traj is not None else None


def _history_kept(rows) -> int:
    """How many past D's the table ever uses (0, 1 or 2)."""
    used = [j + 1 for j, col in enumerate(_table.MULTISTEP) if any(r[col] != 0.0 for r in rows)]
    return max(used, default=0)
