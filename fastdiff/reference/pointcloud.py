"""Plain-torch fused point-cloud step and whole trajectories: posterior, then the affine update."""
from __future__ import annotations

import torch

from .affine_step import affine_step
from .posterior import posterior


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                    bandwidth=0.0, out=None):
    """x_s = A x + B D(x) + C z for the point cloud `data` at (alpha, sigma)."""
    D, _ = posterior(x, data, alpha, sigma, log_weights, bandwidth)
    return affine_step(x, D, A, B, C, seed, step, sample_offset, out=out)


def pointcloud_sample(x, data, alpha, sigma, A, B, C, seed, sample_offset=0, log_weights=None, bandwidth=0.0,
                      return_trajectory=False):
    """Every step k of a table (alpha, sigma, A, B, C: sequences of K floats); x [M, d] is updated in place.

    Returns the trajectory [K+1, M, d] when asked, else None.
    """
    traj = [x.clone()] if return_trajectory else None
    for k in range(len(A)):
        pointcloud_step(x, data, float(alpha[k]), float(sigma[k]), float(A[k]), float(B[k]), float(C[k]), seed, k,
                        sample_offset, log_weights, bandwidth, out=x)
        if traj is not None:
            traj.append(x.clone())
    return torch.stack(traj) if traj is not None else None
