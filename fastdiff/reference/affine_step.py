"""Plain-torch affine sampler update x_s = A·x + B·D + C·z (+ B1·D1 + B2·D2) with z from the noise contract
(DESIGN.md)."""
from __future__ import annotations

import torch

from .. import noise


def affine_step(x: torch.Tensor, D: torch.Tensor, A: float, B: float, C: float, seed: int, step: int,
                sample_offset: int = 0, out: torch.Tensor | None = None, D1: torch.Tensor | None = None,
                B1: float = 0.0, D2: torch.Tensor | None = None, B2: float = 0.0) -> torch.Tensor:
    """Row i of x is global sample sample_offset + i; its noise is noise.normal(seed, that index, step, d).

    Writes into `out` (which may be x itself, for an in-place update) or a new tensor. D1, D2 (None or [M, d]
    like D): the multistep history D_{k−1}, D_{k−2}; B1·D1 and then B2·D2 are added after the one-step update,
    term by term (as fastdiff.reference.pointcloud_sample does), and a zero coefficient adds and reads nothing,
    so without history every bit is the one-step update's.
    """
    if x.ndim != 2 or D.shape != x.shape:
        raise ValueError(f"x must be [M, d] and D the same shape; got {tuple(x.shape)} and {tuple(D.shape)}")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must match x ({tuple(x.shape)}, {x.dtype}); got {tuple(out.shape)}, {out.dtype}")
    A, B, C = float(A), float(B), float(C)
    if C != 0.0:
        idx = torch.arange(sample_offset, sample_offset + x.shape[0], dtype=torch.int64, device=x.device)
        z = noise.normal(seed, idx, step, x.shape[1], dtype=x.dtype, device=x.device)
        torch.add(torch.mul(x, A), D, alpha=B, out=out)
        out.add_(z, alpha=C)
    else:
        torch.add(torch.mul(x, A), D, alpha=B, out=out)
    for Dj, Bj in ((D1, float(B1)), (D2, float(B2))):
        if Dj is not None and Bj != 0.0:
            out.add_(Dj.to(out.dtype), alpha=Bj)
    return out
