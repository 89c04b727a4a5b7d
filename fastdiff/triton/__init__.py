"""Triton kernels of fastdiff (DESIGN.md "Kernels"): posterior, affine_step, pointcloud_step,
pointcloud_sample, each checked against the plain-torch reference.

Importing this package imports neither Triton nor a GPU driver: the kernels are compiled (decorated)
when an op is first called, so set TRITON_INTERPRET=1 before the first call to run them on CPU tensors
under the Triton interpreter. `refuse_reasons(op, **inputs)` says why an op cannot run on given inputs.

All ops compute in float32: x, D, L and outputs are float32; data may be stored in float32, float16 or
bfloat16 (upcast on load); per-step/per-row coefficients are prepared in float64 on the host side.
"""
from __future__ import annotations

import importlib.util

import torch

from . import _common

OPS = ("posterior", "affine_step", "pointcloud_step", "pointcloud_sample")

__all__ = ["posterior", "affine_step", "pointcloud_step", "pointcloud_sample", "refuse_reasons",
           "table_columns", "OPS"]


def posterior(x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
    """Point-cloud posterior mean D [M, d] and log-sum-exp L [M] (MATH.md §5), float32.

    x float32 [M, d]; data [N, d] float32/float16/bfloat16; alpha, sigma numbers or [M] tensors;
    log_weights [N] (−inf allowed) or None; bandwidth v ≥ 0 (kernel-density data)."""
    from ._posterior import posterior as _f
    return _f(x, data, alpha, sigma, log_weights, bandwidth)


def affine_step(x, D, A, B, C, seed, step, sample_offset=0, out=None):
    """x_s = A·x + B·D + C·z, z = fd.noise.normal(seed, sample_offset + row, step, d) computed in-kernel.

    x float32 [M, d]; D [M, d] float32/float16/bfloat16; A, B, C numbers or [M] tensors;
    out None (new tensor), x (in place) or a float32 [M, d] tensor."""
    from ._affine_step import affine_step as _f
    return _f(x, D, A, B, C, seed, step, sample_offset, out)


def pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                    bandwidth=0.0, out=None):
    """posterior then affine_step fused in one kernel: x_s = A·x + B·D(x; α, σ) + C·z."""
    from ._pointcloud_step import pointcloud_step as _f
    return _f(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out)


def pointcloud_sample(x, data, table_t_alpha_sigma_A_B_C, seed, sample_offset=0, log_weights=None,
                      bandwidth=0.0, return_trajectory=False):
    """The whole trajectory in one launch: for k = 0..K−1, x ← A_k x + B_k D(x; α_k, σ_k) + C_k z_k.

    table_t_alpha_sigma_A_B_C: [K, 6] tensor or six [K] tensors (see table_columns). Returns x_K, and
    the trajectory [K + 1, M, d] (x_0 first) when return_trajectory."""
    from ._pointcloud_sample import pointcloud_sample as _f
    return _f(x, data, table_t_alpha_sigma_A_B_C, seed, sample_offset, log_weights, bandwidth, return_trajectory)


def table_columns(process, table, prediction="x0") -> torch.Tensor:
    """The [K, 6] float64 table (t, α(t), σ(t), A, B, C) that pointcloud_sample takes, from a StepTable."""
    A, B, C = table.for_prediction(prediction)
    t = table.t
    return torch.stack([t, process.alpha(t), table.sigma, A, B, C], 1)


# ---------------------------------------------------------------- refusals
def _unavailable() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    return []


def _device_reasons(tensors) -> list[str]:
    reasons = []
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append("tensors are on different devices: " + ", ".join(sorted(map(str, devices))))
    for dev in devices:
        if dev.type == "cuda":
            if getattr(torch.version, "hip", None):
                reasons.append("the Triton kernels are only built and tested for NVIDIA GPUs (this is ROCm)")
        elif dev.type == "cpu":
            if not _common.interpreting():
                reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set (the Triton kernels need "
                               "a CUDA device, or the interpreter for tests)")
        else:
            reasons.append(f"device type {dev.type!r} is not supported by the Triton kernels")
    return reasons


def _dtype_reason(name, t, allowed) -> list[str]:
    if t.dtype not in allowed:
        names = "/".join(str(a).replace("torch.", "") for a in allowed)
        extra = (" (the kernels compute in float32; float64 runs on the torch backend)"
                 if t.dtype == torch.float64 else "")
        return [f"{name} has dtype {str(t.dtype).replace('torch.', '')}, the Triton kernels take {names}{extra}"]
    return []


def _small_sigma_reason(inputs) -> list[str]:
    """The logits overflow float32 when 1/(2c) > 1e30; only checked when alpha and sigma are given."""
    sigma, alpha = inputs.get("sigma"), inputs.get("alpha", 1.0)
    if sigma is None:
        return []
    try:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
        v = float(inputs.get("bandwidth", 0.0) or 0.0)
        c = a * a * v + s * s                      # broadcasts scalar against per-row
        if c.numel() and float((0.5 / c).max()) > _common.INV2C_MAX:
            return ["sigma is so small that 1/(2c) overflows float32 logits (the torch backend switches to float64)"]
    except (TypeError, ValueError, RuntimeError):
        return []
    return []


def refuse_reasons(op: str, **inputs) -> list[str]:
    """Why the Triton backend cannot run `op` on these inputs ([] = it can). Never raises for bad inputs
    (those raise in the op itself with a message naming the argument); never touches a GPU driver beyond
    what the tensors' devices imply.

    Recognised inputs: x, data, D, out (tensors), alpha, sigma, bandwidth (to detect a σ too small for
    float32 logits). Unknown keys are ignored."""
    reasons = list(_unavailable())
    if op not in OPS:
        reasons.append(f"op {op!r} is not implemented by the triton backend (it has {', '.join(OPS)})")
    tensors = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k in ("x", "data", "D", "out")]
    reasons += _device_reasons(tensors)
    x = inputs.get("x")
    if isinstance(x, torch.Tensor):
        reasons += _dtype_reason("x", x, (torch.float32,))
        if x.ndim != 2:
            reasons.append(f"x must be [M, d] (flatten event dimensions first), got shape {tuple(x.shape)}")
    for name in ("data", "D"):
        t = inputs.get(name)
        if isinstance(t, torch.Tensor):
            reasons += _dtype_reason(name, t, _common.DATA_DTYPES)
    out = inputs.get("out")
    if isinstance(out, torch.Tensor):
        reasons += _dtype_reason("out", out, (torch.float32,))
    if op in ("posterior", "pointcloud_step", "pointcloud_sample"):
        reasons += _small_sigma_reason(inputs)
    return reasons

