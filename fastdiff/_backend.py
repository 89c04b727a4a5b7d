"""Backend registry, selection and lazy loading of fastdiff._C (DESIGN.md "Backends and dispatch").

Each backend says why it cannot run an op on given inputs (`refuse_reasons`); `auto` takes the first
backend in the device's preference order with no reason to refuse; an explicitly requested backend that
refuses raises with its reasons: never a silent fallback. `FASTDIFF_BACKEND` overrides `auto`.
Inputs are described by facts (device, dtype, d), so a sampler can choose before it has tensors.
Nothing here imports a compiled module or queries a GPU driver at import time.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

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
    """One backend: its op functions, looked up by name (`backend.posterior(...)`), each with the signature of
    fastdiff.reference's function of that name, and `refuse_reasons` for inputs it cannot run.

    Every backend's ops take the same normalised arguments from fastdiff.ops (the one caller), which has
    validated them already (docs/design.md, "One contract per op"):
      posterior(x, data, alpha, sigma, log_weights, bandwidth) -> (D, L)
      affine_step(x, D, A, B, C, seed, step, sample_offset, out, D1, B1, D2, B2) -> out, or a new tensor when out
        is None (D1, D2: the multistep history, None with B1/B2 = 0.0 when unused, added after the one-step update)
      pointcloud_step(x, data, alpha, sigma, A, B, C, seed, step, sample_offset, log_weights, bandwidth, out)
      pointcloud_sample(x, data, table, seed, sample_offset, log_weights, bandwidth, return_trajectory)
    x [M >= 1, d] contiguous; alpha, sigma float64 tensors [1] or [M] on x's device; A, B, C, bandwidth Python
    floats; seed, step, sample_offset Python ints; out None or a contiguous tensor like x (possibly x itself);
    table the float64 [K, _table.WIDTH] CPU tensor of fastdiff._table; pointcloud_sample updates x in place and
    returns the trajectory [K + 1, M, d] or None. No backend converts or re-checks what fastdiff.ops has checked.
    """

    name = "?"
    ops: tuple = ()
    posterior: Callable[..., Any]
    affine_step: Callable[..., Any]
    pointcloud_step: Callable[..., Any]
    pointcloud_sample: Callable[..., Any]

    def __getattr__(self, op):
        if op not in OPS:
            raise AttributeError(op)
        return self._op(op)

    def _op(self, op: str) -> Callable[..., Any]:
        raise NotImplementedError

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
    """The plain-torch reference (fastdiff.reference): any device, float32 and float64."""

    name = "torch"
    ops = OPS

    def _op(self, op):
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


def cpu_isa() -> str | None:
    """What the CPU posterior kernels run on: "AMX" (the AMX-BF16 screen, available and on), "AVX-512 VNNI" (the
    screen's 8-bit integer dots), else the widest vector ISA fastdiff._C was compiled for ("AVX-512", "AVX2",
    ...); None without fastdiff._C. Benchmarks name the CPU by it: one model string covers CPUs with and without
    AVX-512 or AMX."""
    cfg = build_config()
    if cfg is None:
        return None
    amx = extension().cpu_amx()
    if amx["available"] and amx["enabled"]:
        return "AMX"
    return "AVX-512 VNNI" if amx.get("int8_screen") else str(cfg.get("cpu_simd", "?"))


class _CompiledBackend(Backend):
    """Shared by the `cpu` and `cuda` backends: the ops of fastdiff._C, called as they are."""

    ops = OPS
    device_type = "?"

    def _op(self, op):
        return getattr(extension(), op)

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

    def refuse_reasons(self, op, device=None, dtype=None, d=None, table=None, **_):
        reasons = super().refuse_reasons(op)
        usable = not reasons
        if device is not None and torch.device(device).type != self.device_type:
            reasons.append(f"inputs are on {device}, the {self.name} backend runs on {self.device_type} tensors")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            reasons.append(f"dtype {dtype} is not float32 or float64")
        if usable and self.device_type == "cuda" and d is not None and op != "affine_step":
            max_d = extension().build_config()["cuda_max_d"]     # the kernels' own limit (csrc), stated once
            if d > max_d:
                reasons.append(f"d={d} exceeds the CUDA point-cloud kernels' limit of {max_d}")
        return reasons


class CpuBackend(_CompiledBackend):
    """C++ kernels (OpenMP, vectorised) in fastdiff._C."""

    name, device_type = "cpu", "cpu"


class CudaBackend(_CompiledBackend):
    """CUDA C++ kernels in fastdiff._C."""

    name, device_type = "cuda", "cuda"


class TritonBackend(Backend):
    """Triton kernels (fastdiff.triton.<op>), imported on first use. They compute in float32 on CUDA tensors
    (or on CPU tensors under TRITON_INTERPRET=1, for tests)."""

    name = "triton"
    ops = OPS

    def _module(self, op=None):
        # imported on first use (never at fastdiff import time)
        return importlib.import_module("fastdiff.triton" + ("" if op is None else f".{op}"))

    def _op(self, op):
        return getattr(self._module(op), op)

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
        if d is not None:
            inputs["d"] = d
        return reasons + mod.refuse_reasons(op, **inputs)


BACKENDS: dict[str, Backend] = {"triton": TritonBackend(), "cuda": CudaBackend(), "cpu": CpuBackend(),
                                "torch": TorchBackend()}


def select(op: str, backend: str = "auto", **facts) -> Backend:
    """The backend that will run `op`, or a ValueError explaining why none (or not the requested) can."""
    requested = backend
    if backend == "auto":
        backend = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if backend != "auto":
        source = " (from FASTDIFF_BACKEND)" if requested == "auto" else ""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}{source}; choose 'auto' or one of {', '.join(BACKENDS)}")
        reasons = BACKENDS[backend].refuse_reasons(op, **facts)
        if reasons:
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
