"""Triton kernels of fastdiff (DESIGN.md "Kernels"): one module per op, fastdiff.triton.posterior,
.affine_step, .pointcloud_step, .pointcloud_sample, each exposing the op function of the same name with the
backend contract every backend shares (fastdiff._C, fastdiff.reference): arguments validated and normalised
by fastdiff.ops, x updated in place by pointcloud_sample. Each is checked against the plain-torch reference.

Importing this package imports neither Triton nor a GPU driver: the kernels are compiled (decorated)
when an op module is first imported, so set TRITON_INTERPRET=1 before that to run them on CPU tensors
under the Triton interpreter. `refuse_reasons(op, **inputs)` says why an op cannot run on given inputs.

All ops compute in float32: x, L and outputs are float32; data and D may be stored in float32, float16 or
bfloat16 (upcast on load) or float64 (rounded to float32 on load, as every backend reads them in x's dtype);
per-step/per-row coefficients are prepared in float64 on the host side.
"""
from __future__ import annotations

import importlib.util

import torch

from . import _common

OPS = ("posterior", "affine_step", "pointcloud_step", "pointcloud_sample")

# No op functions here: each op is the function of the same name in its submodule, fastdiff.triton.<op>
# (importlib.import_module(f"fastdiff.triton.{op}").<op>), whose import would replace a package attribute of
# that name.
__all__ = ["refuse_reasons", "OPS"]


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


def _shape_facts(inputs):
    """(M, N, d) from the tensors x and data, or from the facts M, N, d (a sampler choosing before it has
    tensors); None where unknown."""
    x, data = inputs.get("x"), inputs.get("data")
    M, N, d = inputs.get("M"), inputs.get("N"), inputs.get("d")
    if isinstance(x, torch.Tensor) and x.ndim == 2:
        M, d = x.shape
    if isinstance(data, torch.Tensor) and data.ndim == 2:
        N = data.shape[0]
    return M, N, d


def refuse_reasons(op: str, **inputs) -> list[str]:
    """Why the Triton backend cannot run `op` on these inputs ([] = it can). Never raises for bad inputs
    (fastdiff.ops validates them, with messages naming the argument); never touches a GPU driver beyond
    what the tensors' devices imply.

    Recognised inputs: x, data, D, out (tensors), M, N, d (sizes, when there are no tensors yet; checked
    against the kernels' limits in _common), alpha, sigma, bandwidth (to detect a σ too small for float32
    logits). Unknown keys are ignored."""
    reasons = list(_unavailable())
    if op not in OPS:
        reasons.append(f"op {op!r} is not implemented by the triton backend (it has {', '.join(OPS)})")
    tensors = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k in ("x", "data", "D", "out")]
    reasons += _device_reasons(tensors)
    x = inputs.get("x")
    if isinstance(x, torch.Tensor):
        reasons += _dtype_reason("x", x, _common.X_DTYPES)
        if x.ndim != 2:
            reasons.append(f"x must be [M, d] (flatten event dimensions first), got shape {tuple(x.shape)}")
    for name in ("data", "D"):
        t = inputs.get(name)
        if isinstance(t, torch.Tensor):
            reasons += _dtype_reason(name, t, _common.DATA_DTYPES)
    out = inputs.get("out")
    if isinstance(out, torch.Tensor):
        reasons += _dtype_reason("out", out, _common.X_DTYPES)
    reasons += _common.limit_reasons(op, *_shape_facts(inputs))
    if op in ("posterior", "pointcloud_step", "pointcloud_sample"):
        reasons += _small_sigma_reason(inputs)
    return reasons
