"""Suite `step`: the fused affine sampler update x_s = A·x + B·D + C·z with z from fastdiff's counter-based
noise, against the eager torch update a user writes, `A*x + B*D + C*torch.randn_like(x)`.

Providers: fastdiff[<backend>] (the backend's affine_step into a preallocated output, as the sampler's loop
calls it, for every backend whose refuse_reasons("affine_step", x=, D=) is empty; the public
fastdiff.ops.affine_step adds a NaN/inf scan of x per call, one more read of x and a device
synchronisation) and `torch eager (randn)`.
Throughput is GB/s of compulsory traffic: read x and D, write the result (3·M·d·4 bytes); the ceiling is
the copy bandwidth measured in the same run (roofline_fraction = achieved GB/s / copy GB/s).
"""
from __future__ import annotations

import torch

from .. import _backend
from .common import (
    Case,
    Context,
    backend_refusal,
    cleanup,
    describe_error,
    fastdiff_backends,
    fastdiff_provider,
    fill_speedups,
)
from .timing import measure

SUITE = "step"
REF = fastdiff_provider("torch")
A, B, C = 0.98, 0.015, 0.12


TARGET = (1 << 20, 64, "issue 3")      # (M, d, label): 2²⁶ float32 elements per tensor, on CUDA


def sizes(ctx: Context):
    """[(M, d, target label or None)] with M·d elements per tensor."""
    if ctx.cuda:
        totals = (1 << 20, 1 << 24) if ctx.quick else (1 << 20, 1 << 22, 1 << 24, 1 << 26)
    else:
        totals = (1 << 14, 1 << 18) if ctx.quick else (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)
    dims = (3, 3072) if ctx.quick else (3, 64, 3072)
    out = [(max(1, n // d), d, None) for d in dims for n in totals if n // d >= 1]
    if ctx.cuda and not ctx.quick:
        out = [(M, d, TARGET[2] if (M, d) == TARGET[:2] else lbl) for M, d, lbl in out]
        if not any((M, d) == TARGET[:2] for M, d, _ in out):
            out.append(TARGET)
    return out


def providers(ctx: Context):
    out = []
    for name in fastdiff_backends():
        def fd_step(x, D, out, step, _impl=_backend.BACKENDS[name]):
            return _impl.affine_step(x, D, A, B, C, 1234, step, 0, out)
        out.append((fastdiff_provider(name), name, fd_step, name in ("torch", "cpu")))

    def eager(x, D, out, step):
        return A * x + B * D + C * torch.randn_like(x)
    out.append(("torch eager (randn)", None, eager, True))
    return out


def cases(ctx: Context) -> list[Case]:
    todo = sorted(sizes(ctx), key=lambda s: s[2] is None)       # the target first (stable otherwise)
    out = [Case(SUITE, f"step M={M} d={d}" + (f" (target, {lbl})" if lbl else ""),
                lambda ctx, M=M, d=d, lbl=lbl: run_case(ctx, M, d, lbl)) for M, d, lbl in todo]
    out.append(Case(SUITE, "step: speedups", lambda ctx: fill_speedups([r for r in ctx.rows if r["suite"] == SUITE],
                                                                          REF)))
    return out


def _stepping(fn, x, D, out):
    """One call of the step per timed call, each with a new step counter (fresh noise every time)."""
    counter = iter(range(10**9))
    return lambda: fn(x, D, out, next(counter))


def run_case(ctx: Context, M: int, d: int, target: str | None = None):
    if "step_providers" not in ctx.cache:
        ctx.cache["step_providers"] = providers(ctx)
    g = torch.Generator().manual_seed(M * 31 + d)
    x = torch.randn(M, d, generator=g).to(ctx.device)
    D = torch.randn(M, d, generator=g).to(ctx.device)
    out = torch.empty_like(x)
    nbytes = 3 * M * d * 4
    copy = ctx.ceilings.get("copy")
    for name, backend, fn, warm_first in ctx.cache["step_providers"]:
        if backend is not None:
            reasons = backend_refusal(backend, "affine_step", x=x, D=D, out=out)
            if reasons:
                ctx.note(SUITE, name, "; ".join(reasons))
                continue
        if ctx.progress is not None:
            ctx.progress.start(f"step M={M} d={d} {name}")
        failed = False
        try:
            t = measure(_stepping(fn, x, D, out), ctx.device, ctx.policy, warm_first=warm_first)
        except Exception as exc:
            kind = "skipped" if backend is not None and isinstance(exc, ValueError) else "error"
            ctx.note(SUITE, name, f"failed at M={M} d={d}: {describe_error(exc)}", kind=kind)
            failed = True
        if failed:
            cleanup(ctx.device)
            continue
        gbs = nbytes / t.median_s / 1e9
        ctx.timing_row(t, suite=SUITE, op="affine_step", provider=name, backend=backend, case=f"M={M} d={d}",
                       shape=f"M={M},d={d}", M=M, d=d, n_elems=M * d, dtype="float32", throughput=gbs, unit="GB/s",
                       ceiling="copy" if copy else None, ceiling_throughput=copy.value if copy else None,
                       roofline_fraction=gbs / copy.value if copy else None, target=target)
    del x, D, out
    cleanup(ctx.device)
