"""Public kernel ops with backend dispatch. `backend="torch"` is the plain-torch reference."""
from __future__ import annotations

from .. import _backend
from ..reference.affine_step import affine_step as _affine_step_torch
from ..reference.posterior import posterior as _posterior_torch

__all__ = ["posterior", "affine_step"]


def posterior(x, data, alpha, sigma, log_weights=None, bandwidth: float = 0.0, *, backend: str = "auto"):
    """Point-cloud posterior mean D [M, d] and log-sum-exp L [M] (MATH.md §5); see reference.posterior."""
    _backend.select("posterior", backend, x=x, data=data)
    return _posterior_torch(x, data, alpha, sigma, log_weights, bandwidth)


def affine_step(x, D, A, B, C, seed: int, step: int, sample_offset: int = 0, *, out=None, backend: str = "auto"):
    """x_s = A·x + B·D + C·z, z from the noise contract (pass out=x for in place)."""
    _backend.select("affine_step", backend, x=x, D=D)
    return _affine_step_torch(x, D, A, B, C, seed, step, sample_offset, out)
