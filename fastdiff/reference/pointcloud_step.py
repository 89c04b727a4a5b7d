"""Plain-torch fused point-cloud step: the posterior, then the affine update."""
from __future__ import annotations

from .affine_step import affine_step
from .posterior import posterior


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                    bandwidth=0.0, out=None):
    """x_s = A x + B D(x) + C z for the point cloud `data` at (alpha, sigma); out may be x."""
    D, _ = posterior(x, data, alpha, sigma, log_weights, bandwidth)
    return affine_step(x, D, A, B, C, seed, step, sample_offset, out)
