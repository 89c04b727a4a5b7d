"""Backend registry, selection and lazy loading of fastdiff._C (DESIGN.md "Backends and dispatch").

Each backend says why it cannot run an op on given inputs (`refuse_reasons`); `auto` takes the first
backend in the device's preference order with no reason to refuse; an explicitly requested backend that
refuses raises with its reasons: never a silent fallback. `FASTDIFF_BACKEND` overrides `auto`.
Inputs are described by facts (device, dtype, d), so a sampler can choose before it has tensors.
Nothing here imports a compiled module or queries a GPU driver at import time.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ._checks import check_counters

OPS = ("posterior", "affine_step", "pointcloud_step", "pointcloud_sample")

# `auto` order per device type. CPU: the C++ kernels beat the torch reference in benchmarks/results
# (posterior and whole-trajectory sampling). CUDA: provisional (no GPU measurement has been recorded yet):
# the fused CUDA kernels first, Triton next; re-rank from benchmarks/results once a GPU run exists.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
_DEFAULT_ORDER = ("torch",)


def facts(x=None, **extra):
    """The facts backends decide on, from a tensor x (and/or explicit device/dtype/d)."""
    out = dict(extra)
    if isinstance(x, torch.Tensor):
        out.setdefault("device", x.device)
        out.setdefault("dtype", x.dtype)
        if x.ndim == 2:
            out.setdefault("d", x.shape[1])
    return out


class Backend:
    name = "?"
    ops: tuple = ()
    # The ops named in OPS, looked up by name on the backend `select` returns: methods of the compiled and
    # Triton backends, fastdiff.reference's functions for the torch backend (its __getattr__).
    posterior: Callable[..., Any]
    affine_step: Callable[..., Any]
    pointcloud_step: Callable[..., Any]
    pointcloud_sample: Callable[..., Any]

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this installation (empty when it can)."""
        return []

    def refuse_reasons(self, op: str, **facts) -> list[str]:
        """Why this backend cannot run `op` for inputs with these facts (empty when it can)."""
        reasons = list(self.unavailable_reasons())
        if op not in self.ops:
            reasons.append(f"op {op!r} is not implemented by the {self.name} backend")
        return reasons


class TorchBackend(Backend):
    """The plain-torch reference: any device, float32 and float64."""

    name = "torch"
    ops = OPS

    def __getattr__(self, op):
        if op not in OPS:
            raise AttributeError(op)
        from . import reference
        return getattr(reference, op)


# -- fastdiff._C, loaded on first use; a failed load is remembered and explained ------------------------
_EXTENSION = None
_EXTENSION_ERROR: str | None = None


def extension():
    """The compiled module fastdiff._C, or RuntimeError saying why it is unavailable."""
    global _EXTENSION, _EXTENSION_ERROR
    if _EXTENSION is None and _EXTENSION_ERROR is None:
        try:
            import fastdiff._C as _C  # (by its full name: mypy then treats the compiled module as untyped)
            _EXTENSION = _C
        except Exception as exc:   # ImportError, or an undefined symbol from a torch mismatch
            _EXTENSION_ERROR = (f"fastdiff._C could not be loaded ({type(exc).__name__}: {exc}); it is built by "
                                "`pip install --no-build-isolation -e .` (FASTDIFF_BUILD_EXT=0 skips it), and must be "
                                "rebuilt after torch changes")
    if _EXTENSION is None:
        raise RuntimeError(_EXTENSION_ERROR)
    return _EXTENSION


def build_config() -> dict | None:
    """What fastdiff._C was built with, or None when it is not available."""
    try:
        return dict(extension().build_config())
    except RuntimeError:
        return None


class _CompiledBackend(Backend):
    """Shared by the `cpu` and `cuda` backends: ops from fastdiff._C on one device type."""

    ops = OPS
    device_type = "?"

    def unavailable_reasons(self):
        try:
            ext = extension()
        except RuntimeError as exc:
            return [str(exc)]
        if self.device_type == "cuda":
            if not ext.build_config()["cuda"]:
                return ["fastdiff._C was built without CUDA kernels (torch CPU build, no CUDA toolkit, or "
                        "FASTDIFF_BUILD_CUDA=0)"]
            if not torch.cuda.is_available():     # asked only when a backend is being chosen, never at import
                return ["no CUDA device is available"]
        return []

    def refuse_reasons(self, op, device=None, dtype=None, d=None, **_):
        reasons = super().refuse_reasons(op)
        if device is not None and torch.device(device).type != self.device_type:
            reasons.append(f"inputs are on {device}, the {self.name} backend runs on {self.device_type} tensors")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            reasons.append(f"dtype {dtype} is not float32 or float64")
        if self.device_type == "cuda" and d is not None and d > 12288 and op != "affine_step":
            reasons.append(f"d={d} exceeds the CUDA point-cloud kernels' limit of 12288")
        return reasons

    # Adapters: alpha/sigma as float64 tensors; tables as float64 tensors. The launchers (which the sampler
    # calls directly, fastdiff.ops calls them under autograd's forward) refuse inputs that require grad: the
    # kernels write through raw pointers, so autograd would see an identity and give a wrong gradient.
    def posterior(self, x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
        _refuse_grad("posterior", x=x, data=data, log_weights=log_weights)
        return extension().posterior(x, data, _f64(alpha), _f64(sigma), log_weights, float(bandwidth))

    def affine_step(self, x, D, A, B, C, seed, step, sample_offset=0, out=None):
        _refuse_grad("affine_step", x=x, D=D, out=out)
        seed, sample_offset, step = check_counters(seed, sample_offset, x.shape[0], step)
        return extension().affine_step(x, D, float(A), float(B), float(C), seed, step, sample_offset, out)

    def pointcloud_step(self, x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                        bandwidth=0.0, out=None):
        _refuse_grad("pointcloud_step", x=x, data=data, log_weights=log_weights, out=out)
        seed, sample_offset, step = check_counters(seed, sample_offset, x.shape[0], step)
        return extension().pointcloud_step(x, data, _f64(alpha), _f64(sigma), float(A), float(B), float(C), seed,
                                           step, sample_offset, log_weights, float(bandwidth), out)

    def pointcloud_sample(self, x, data, alpha, sigma, A, B, C, seed, sample_offset=0, log_weights=None,
                          bandwidth=0.0, return_trajectory=False):
        _refuse_grad("pointcloud_sample", x=x, data=data, log_weights=log_weights)
        seed, sample_offset, _ = check_counters(seed, sample_offset, x.shape[0], steps=len(A))
        return extension().pointcloud_sample(x, data, _f64(alpha), _f64(sigma), _f64(A), _f64(B), _f64(C), seed,
                                             sample_offset, log_weights, float(bandwidth), bool(return_trajectory))


def _refuse_grad(op, **tensors):
    """A kernel launcher has no autograd: refuse (rather than return a silently wrong gradient) when grad mode
    is on and an input requires grad."""
    if torch.is_grad_enabled():
        names = [k for k, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
        if names:
            raise ValueError(f"{op}: {', '.join(names)} requires grad, but the backend launchers have no autograd; "
                             "use fastdiff.ops (differentiable in x) or run under torch.no_grad()")


def _f64(v):
    return torch.as_tensor(v, dtype=torch.float64).reshape(-1)


class CpuBackend(_CompiledBackend):
    """C++ kernels (OpenMP, vectorised) in fastdiff._C."""

    name, device_type = "cpu", "cpu"


class CudaBackend(_CompiledBackend):
    """CUDA C++ kernels in fastdiff._C."""

    name, device_type = "cuda", "cuda"


class TritonBackend(Backend):
    """Triton kernels (fastdiff.triton), imported on first use. They compute in float32 on CUDA tensors
    (or on CPU tensors under TRITON_INTERPRET=1, for tests)."""

    name = "triton"
    ops = OPS

    def _module(self):
        from . import triton as mod  # lazy: never at fastdiff import time
        return mod

    def unavailable_reasons(self):
        try:
            self._module()
        except Exception as exc:
            return [f"fastdiff.triton could not be imported ({type(exc).__name__}: {exc})"]
        return []

    def refuse_reasons(self, op, device=None, dtype=None, d=None, **inputs):
        reasons = super().refuse_reasons(op)
        if reasons:
            return reasons
        mod = self._module()
        tensors_given = any(isinstance(inputs.get(k), torch.Tensor) for k in ("x", "data", "D", "out"))
        if device is not None and not tensors_given:     # (with tensors, the module names their devices)
            dev = torch.device(device)
            if dev.type == "cpu" and not mod._common.interpreting():
                reasons.append("inputs are on the CPU; the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 "
                               "for tests)")
            elif dev.type == "cuda" and not torch.cuda.is_available():
                reasons.append("no CUDA device is available")
            elif dev.type not in ("cpu", "cuda"):
                reasons.append(f"device type {dev.type!r} is not supported by the Triton kernels")
        if dtype is not None and dtype != torch.float32:
            reasons.append(f"dtype {dtype} is not float32 (the Triton kernels compute in float32; float64 runs on "
                           "the torch, cpu and cuda backends)")
        return reasons + mod.refuse_reasons(op, **inputs)

    def posterior(self, x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
        # fastdiff.ops.posterior (the only caller) has checked x for NaN/inf: no second scan and sync
        _refuse_grad("posterior", x=x, data=data, log_weights=log_weights)
        from .triton._posterior import posterior
        return posterior(x, data, alpha, sigma, log_weights, bandwidth, check_finite=False)

    def affine_step(self, x, D, A, B, C, seed, step, sample_offset=0, out=None):
        # callers (fastdiff.ops, the sampler) validate inputs or outputs: no per-step device sync here
        _refuse_grad("affine_step", x=x, D=D, out=out)
        seed, sample_offset, step = check_counters(seed, sample_offset, x.shape[0], step)
        from .triton._affine_step import affine_step
        return affine_step(x, D, A, B, C, seed, step, sample_offset, out, check_finite=False)

    def pointcloud_step(self, x, data, alpha, sigma, A, B, C, seed, step, sample_offset=0, log_weights=None,
                        bandwidth=0.0, out=None):
        _refuse_grad("pointcloud_step", x=x, data=data, log_weights=log_weights, out=out)
        seed, sample_offset, step = check_counters(seed, sample_offset, x.shape[0], step)
        return self._module().pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset,
                                              log_weights, bandwidth, out)

    def pointcloud_sample(self, x, data, alpha, sigma, A, B, C, seed, sample_offset=0, log_weights=None,
                          bandwidth=0.0, return_trajectory=False):
        """The backends' contract (x updated in place; the trajectory or None) over the Triton launcher,
        which takes a [K, 6] table (t unused) and returns a new x."""
        _refuse_grad("pointcloud_sample", x=x, data=data, log_weights=log_weights)
        seed, sample_offset, _ = check_counters(seed, sample_offset, x.shape[0], steps=len(A))
        columns = [torch.zeros(len(A), dtype=torch.float64)] + [_f64(v) for v in (alpha, sigma, A, B, C)]
        res = self._module().pointcloud_sample(x, data, columns, seed, sample_offset, log_weights, bandwidth,
                                               return_trajectory)
        out, traj = res if return_trajectory else (res, None)
        x.copy_(out)
        return traj


BACKENDS: dict[str, Backend] = {"triton": TritonBackend(), "cuda": CudaBackend(), "cpu": CpuBackend(),
                                "torch": TorchBackend()}


def select(op: str, backend: str = "auto", **facts) -> Backend:
    """The backend that will run `op`, or a ValueError explaining why none (or not the requested) can."""
    requested = backend
    if backend == "auto":
        backend = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        reasons = BACKENDS[backend].refuse_reasons(op, **facts)
        if reasons:
            source = " (from FASTDIFF_BACKEND)" if requested == "auto" else ""
            raise ValueError(f"backend {backend!r}{source} cannot run {op}: " + "; ".join(reasons))
        return BACKENDS[backend]
    device = facts.get("device")
    order = AUTO_ORDER.get(torch.device(device).type, _DEFAULT_ORDER) if device is not None else _DEFAULT_ORDER
    refusals = {}
    for name in order:
        reasons = BACKENDS[name].refuse_reasons(op, **facts)
        if not reasons:
            return BACKENDS[name]
        refusals[name] = reasons
    raise ValueError(f"no backend can run {op}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in refusals.items()))


def describe() -> dict[str, list[str]]:
    """{backend name: reasons it is unavailable} ([] = available), for `fastdiff info`."""
    return {name: b.unavailable_reasons() for name, b in BACKENDS.items()}
