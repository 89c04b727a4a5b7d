"""Small input checks shared by the public API: every message names the offending argument."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_time(t, name: str = "t", T: float | None = None, allow_zero: bool = False):
    """Return `t` as a Python float or a float64 tensor, checked to lie in (0, T] (or [0, T])."""
    if isinstance(t, torch.Tensor):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.ndim > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D per-row tensor, got shape {tuple(t.shape)}")
        t64 = t.to(torch.float64)
        if not bool(torch.isfinite(t64).all()):
            raise ValueError(f"{name} contains NaN or inf")
        if t64.numel():
            _check_range(float(t64.min()), name, T, allow_zero)
            _check_range(float(t64.max()), name, T, allow_zero)
        return t64
    try:
        tf = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}") from None
    if not math.isfinite(tf):
        raise ValueError(f"{name} must be finite, got {tf}")
    _check_range(tf, name, T, allow_zero)
    return tf


def _check_range(v: float, name: str, T: float | None, allow_zero: bool):
    low_ok = v >= 0 if allow_zero else v > 0
    # Allow a hair of rounding above T: grids computed in float64 may land on T(1 + 1e-15).
    high_ok = T is None or v <= T * (1 + 1e-12)
    if not (low_ok and high_ok):
        interval = f"[0, {T}]" if allow_zero else f"(0, {T}]"
        raise ValueError(f"{name} must lie in {interval}, got {v}")


def check_points(x, name: str = "x", dim: int | None = None) -> torch.Tensor:
    """A finite float32/float64 tensor of shape [M, d] (d == dim when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [M, d], got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (the data dimension), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_cloud(x, data, log_weights=None):
    """Queries x [M, d] (finite float32/float64) against a point cloud data [N, d], N >= 1, on one device."""
    check_points(x, "x")
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or not data.is_floating_point():
        raise ValueError(f"data must be a floating tensor of shape [N, d], got {getattr(data, 'shape', type(data))}")
    if data.shape[0] == 0:
        raise ValueError("data must contain at least one point")
    if data.shape[1] != x.shape[1]:
        raise ValueError(f"x has d={x.shape[1]} columns but data has d={data.shape[1]}")
    check_same_device(x=x, data=data, log_weights=log_weights)


def per_row64(value, name: str, M: int, device) -> torch.Tensor:
    """A scalar or [M] value (alpha, sigma, a coefficient) as a finite float64 tensor of shape [1] or [M]."""
    v = torch.as_tensor(value, dtype=torch.float64, device=device) if not isinstance(value, torch.Tensor) \
        else value.to(device=device, dtype=torch.float64)
    if v.ndim == 0:
        v = v.reshape(1)
    if v.ndim != 1 or v.numel() not in (1, M):
        raise ValueError(f"{name} must be a scalar or have shape [M]=[{M}], got {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return v


def check_same_device(**tensors):
    devices = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value
