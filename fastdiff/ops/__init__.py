"""Public kernel ops with backend dispatch (DESIGN.md "Kernels"). `backend="torch"` is the plain-torch
reference; `auto` picks the fastest backend that accepts the inputs (see fastdiff._backend)."""
from __future__ import annotations

import torch

from .. import _backend
from .._checks import check_cloud, check_points, check_same_device

__all__ = ["posterior", "affine_step", "pointcloud_step", "pointcloud_sample"]


def _check_sigma(sigma):
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("sigma must be finite and positive (D is never evaluated at t = 0)")


def posterior(x, data, alpha, sigma, log_weights=None, bandwidth: float = 0.0, *, backend: str = "auto"):
    """Point-cloud posterior mean D [M, d] and log-sum-exp L [M] (MATH.md §5).

    alpha, sigma: scalars or per-row [M]; data may be stored in any float dtype (upcast to x's).
    """
    check_cloud(x, data, log_weights)
    _check_sigma(sigma)
    return _backend.select("posterior", backend, **_backend.facts(x)).posterior(
        x, data, alpha, sigma, log_weights, bandwidth)


def affine_step(x, D, A, B, C, seed: int, step: int, sample_offset: int = 0, *, out=None, backend: str = "auto"):
    """x_s = A·x + B·D + C·z with z from the noise contract (row i is global sample sample_offset + i).
    Pass out=x for an in-place update."""
    check_points(x, "x")
    if not isinstance(D, torch.Tensor) or D.shape != x.shape:
        raise ValueError(f"D must have the shape of x {tuple(x.shape)}, got {getattr(D, 'shape', type(D))}")
    check_same_device(x=x, D=D, out=out)
    return _backend.select("affine_step", backend, **_backend.facts(x)).affine_step(
        x, D, A, B, C, seed, step, sample_offset, out=out)


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed: int, step: int, sample_offset: int = 0,
                    log_weights=None, bandwidth: float = 0.0, *, out=None, backend: str = "auto"):
    """The fused step: D of the point cloud at scalar (alpha, sigma), then x_s = A x + B D + C z."""
    check_cloud(x, data, log_weights)
    _check_sigma(sigma)
    return _backend.select("pointcloud_step", backend, **_backend.facts(x)).pointcloud_step(
        x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out=out)


def pointcloud_sample(x, data, alpha, sigma, A, B, C, seed: int, sample_offset: int = 0, log_weights=None,
                      bandwidth: float = 0.0, return_trajectory: bool = False, *, backend: str = "auto"):
    """Every step of a table (alpha, sigma, A, B, C: [K] each) for a point cloud; x is updated in place.
    Returns the trajectory [K+1, M, d] when asked, else None."""
    check_cloud(x, data, log_weights)
    _check_sigma(sigma)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is updated in place)")
    K = len(A)
    for name, v in (("alpha", alpha), ("sigma", sigma), ("B", B), ("C", C)):
        if len(v) != K:
            raise ValueError(f"{name} must have the table length K={K}, got {len(v)}")
    return _backend.select("pointcloud_sample", backend, **_backend.facts(x)).pointcloud_sample(
        x, data, alpha, sigma, A, B, C, seed, sample_offset, log_weights, bandwidth, return_trajectory)
