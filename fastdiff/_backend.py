"""Backend registry and selection (DESIGN.md "Backends and dispatch").

Each backend says why it cannot run an op on given inputs (`refuse_reasons`); `auto` picks the first
backend in preference order that has no reason to refuse; an explicitly requested backend that
refuses raises with its reasons: never a silent fallback. `FASTDIFF_BACKEND` overrides `auto`.
Nothing here imports a compiled module or queries a GPU driver at import time.
"""
from __future__ import annotations

import os


class Backend:
    name = "?"
    ops: tuple = ()

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this installation (empty when it can)."""
        return []

    def refuse_reasons(self, op: str, **inputs) -> list[str]:
        """Why this backend cannot run `op` on these inputs (empty when it can)."""
        reasons = list(self.unavailable_reasons())
        if op not in self.ops:
            reasons.append(f"op {op!r} is not implemented by the {self.name} backend")
        return reasons


class TorchBackend(Backend):
    """The plain-torch reference: any device, float32 and float64."""

    name = "torch"
    ops = ("posterior", "affine_step", "sample")


class _NotYetBuilt(Backend):
    """A backend this release does not ship yet; kept in the registry so `fastdiff info` can say so."""

    def __init__(self, name, what):
        self.name, self.what = name, what

    def unavailable_reasons(self):
        return [f"{self.what} are not part of this fastdiff release yet"]


BACKENDS: dict[str, Backend] = {
    "triton": _NotYetBuilt("triton", "Triton GPU kernels"),
    "cuda": _NotYetBuilt("cuda", "the compiled CUDA kernels (fastdiff._C)"),
    "cpu": _NotYetBuilt("cpu", "the compiled C++ CPU kernels (fastdiff._C)"),
    "torch": TorchBackend(),
}
PREFERENCE = ("triton", "cuda", "cpu", "torch")   # fastest first; `auto` takes the first that accepts


def select(op: str, backend: str = "auto", **inputs) -> Backend:
    """The backend that will run `op`, or a ValueError explaining why none (or not the requested) can."""
    requested = backend
    if backend == "auto":
        backend = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
        reasons = BACKENDS[backend].refuse_reasons(op, **inputs)
        if reasons:
            source = " (from FASTDIFF_BACKEND)" if requested == "auto" else ""
            raise ValueError(f"backend {backend!r}{source} cannot run {op}: " + "; ".join(reasons))
        return BACKENDS[backend]
    refusals = {}
    for name in PREFERENCE:
        reasons = BACKENDS[name].refuse_reasons(op, **inputs)
        if not reasons:
            return BACKENDS[name]
        refusals[name] = reasons
    raise ValueError(f"no backend can run {op}: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in refusals.items()))


def describe() -> dict[str, list[str]]:
    """{backend name: reasons it is unavailable} ([] = available), for `fastdiff info`."""
    return {name: BACKENDS[name].unavailable_reasons() for name in PREFERENCE}
