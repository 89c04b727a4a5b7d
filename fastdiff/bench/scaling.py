"""Suite `scaling`: time and peak memory of the point-cloud reduction as N, M and d grow, with fitted
log–log slopes: the reduction's time is linear in N·M (slope 1) and it never materialises the M×N matrix
(its memory does not grow with N; mem_vs_MxN = peak bytes / bytes of an fp32 M×N matrix stays far below 1).
The straightforward torch version is measured beside it for contrast (memory slope ≈ 1 in N).

Peak memory: on CUDA the caching allocator's peak during one call above what was live before; on the CPU
the peak resident set (VmHWM, reset through /proc/self/clear_refs) during one call above the resident set
before it, measured in a worker process started with MALLOC_MMAP_THRESHOLD_=65536 so that every large
block is mapped on allocation and unmapped on free (otherwise freed memory is reused unseen).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial

import torch

from . import posterior as P
from .common import (
    Case,
    Context,
    backend_refusal,
    cleanup,
    describe_error,
    fastdiff_backends,
    fastdiff_provider,
    mem_cap,
)
from .timing import cuda_peak, measure

SUITE = "scaling"
NAIVE = "torch naive"


def sweeps(ctx: Context):
    """[(axis, [(M, N, d), ...])]"""
    if ctx.cuda and ctx.quick:
        base_M, base_N, d = 1024, 16384, 16
        Ns, Ms, ds = [4096, 16384, 65536], [256, 1024, 4096], [2, 16, 128]
        dM, dN = 1024, 16384
    elif ctx.cuda:
        base_M, base_N, d = 4096, 65536, 16
        Ns = [2**k for k in range(14, 21)]
        Ms = [2**k for k in range(10, 17)]
        ds = [2, 4, 8, 16, 32, 64, 128, 256, 512]
        dM, dN = 4096, 32768
    elif ctx.quick:
        base_M, base_N, d = 128, 1024, 16
        Ns, Ms, ds = [512, 1024, 4096], [64, 128, 512], [2, 16, 64]
        dM, dN = 128, 1024
    else:       # the torch reference streams [rows, 2048, d] differences: ~3e6 pairs/s per core at d = 16
        base_M, base_N, d = 128, 2048, 16
        Ns = [2**k for k in range(10, 17)]
        Ms = [2**k for k in range(6, 13)]
        ds = [2, 4, 8, 16, 32, 64, 128, 256]
        dM, dN = 256, 2048
    return [("N", [(base_M, n, d) for n in Ns]), ("M", [(m, base_N, d) for m in Ms]), ("d", [(dM, dN, k) for k in ds])]


def providers(ctx: Context):
    out = []
    for name in fastdiff_backends():
        def fd_post(x, y, alpha, sigma, _name=name):
            import fastdiff
            return fastdiff.ops.posterior(x, y, alpha, sigma, backend=_name)
        out.append((fastdiff_provider(name), name, fd_post, False))
    out.append((NAIVE, None, P.naive, True))
    return out


def _warm_first(name: str) -> bool:
    return name in (NAIVE, fastdiff_provider("torch"), fastdiff_provider("cpu"))


def cases(ctx: Context) -> list[Case]:
    out = []
    for axis, points in sweeps(ctx):
        out.append(Case(SUITE, f"scaling: {axis} sweep ({len(points)} points)",
                        lambda ctx, axis=axis, points=points: run_sweep(ctx, axis, points)))
    if not ctx.cuda:
        out.append(Case(SUITE, "scaling: peak memory on the CPU (worker process)", cpu_memory))
    out.append(Case(SUITE, "scaling: fits", fit_all))
    return out


def run_sweep(ctx: Context, axis: str, points):
    provs = providers(ctx)
    cap = mem_cap(ctx)
    todo = []      # (row, provider, backend, M, N, d) awaiting a CPU memory measurement
    for M, N, d in points:
        if ctx.out_of_time():
            ctx.note(SUITE, f"{axis} sweep", f"stopped before M={M} N={N} d={d}: the run's time limit was reached")
            break
        x, y = P.make_data(d, M, N, P.SIGMA_TIME, ctx.device)
        for name, backend, fn, materialises in provs:
            if backend is not None:
                reasons = backend_refusal(backend, "posterior", x=x, data=y)
                if reasons:
                    ctx.note(SUITE, name, "; ".join(reasons))
                    continue
            if materialises and 4 * 4 * M * N > cap:
                ctx.note(SUITE, name, f"skipped at M={M} N={N}: would materialise M×N "
                         f"({4 * 4 * M * N / 2**30:.1f} GiB > cap {cap / 2**30:.1f} GiB)")
                continue
            if ctx.progress is not None:
                ctx.progress.start(f"scaling {axis}: M={M} N={N} d={d} {name}")
            call = partial(fn, x, y, P.ALPHA, P.SIGMA_TIME)
            failed = False
            try:
                t = measure(call, ctx.device, ctx.policy, warm_first=_warm_first(name))
                peak = cuda_peak(call, ctx.device) if ctx.cuda else None
            except Exception as exc:
                kind = "skipped" if backend is not None and isinstance(exc, ValueError) else "error"
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    kind = "skipped"
                ctx.note(SUITE, name, f"failed at M={M} N={N} d={d}: {describe_error(exc)}", kind=kind)
                failed = True
            del call     # it holds x and y, which are freed before the next point's data are made
            if failed:
                cleanup(ctx.device)
                continue
            ceiling, bound, frac = P.roofline(ctx, M, N, d, t.median_s)
            row = ctx.timing_row(t, suite=SUITE, op=f"sweep {axis}", provider=name, backend=backend,
                                 case=f"{axis}: M={M} N={N} d={d}", shape=f"M={M},N={N},d={d}", M=M, N=N, d=d,
                                 n_elems=M * N, dtype="float32", throughput=M * N / t.median_s, unit="pairs/s",
                                 ceiling=ceiling, ceiling_throughput=bound, roofline_fraction=frac,
                                 peak_mem_bytes=peak, mem_vs_MxN=None if peak is None else peak / (4 * M * N))
            if peak is None:
                todo.append((row, name, backend, M, N, d))
        del x, y
        cleanup(ctx.device)
    ctx.cache.setdefault("scaling_mem_todo", []).extend(todo)


def cpu_memory(ctx: Context):
    """Peak memory of every CPU scaling point, in one worker process (started once: torch imports are slow)."""
    todo = ctx.cache.pop("scaling_mem_todo", [])
    if not todo:
        return
    peaks = cpu_peaks([(name, backend, M, N, d) for _, name, backend, M, N, d in todo])
    for (row, *_rest), peak in zip(todo, peaks, strict=True):
        if isinstance(peak, str):
            kind = "skipped" if "clear_refs" in peak else "error"
            ctx.note(SUITE, row["provider"], f"peak memory not measured: {peak}", kind=kind)
        elif peak is not None and peak >= 0:
            row["peak_mem_bytes"] = peak
            row["mem_vs_MxN"] = peak / (4 * row["M"] * row["N"])


def cpu_peaks(items):
    """Peak RSS increase of one call for each (provider, backend, M, N, d), measured in a worker process."""
    import fastdiff
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastdiff.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    try:
        payload = {"threads": torch.get_num_threads(), "items": items}
        proc = subprocess.run([sys.executable, "-m", "fastdiff.bench._memworker"], input=json.dumps(payload),
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            return [f"worker failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
                    ] * len(items)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return [f"worker failed: {type(exc).__name__}: {exc}"] * len(items)


def worker_main():
    """Run by cpu_peaks in a fresh process: read {"threads", "items"} as JSON on stdin, print peaks as JSON.
    Each (provider, d) is called once on a small input first, so lazy initialisation (loading the
    extension, thread pools) is not part of the peaks; each item is then called once."""
    from .timing import cpu_peak, cpu_peak_supported
    payload = json.loads(sys.stdin.read())
    items = payload["items"] if isinstance(payload, dict) else payload
    if isinstance(payload, dict) and payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    if not cpu_peak_supported():
        print(json.dumps(["/proc/self/clear_refs is not available (not Linux?)"] * len(items)))
        return
    provs = {name: fn for name, _, fn, _ in providers(None)}
    warm = set()
    out = []
    for name, _, M, N, d in items:
        fn = provs[name]
        try:
            if (name, d) not in warm:
                xs, ys = P.make_data(d, min(M, 64), min(N, 256), P.SIGMA_TIME, "cpu")
                fn(xs, ys, P.ALPHA, P.SIGMA_TIME)
                del xs, ys
                warm.add((name, d))
            x, y = P.make_data(d, M, N, P.SIGMA_TIME, "cpu")
            out.append(cpu_peak(partial(fn, x, y, P.ALPHA, P.SIGMA_TIME)))
            del x, y
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------- fits
def slope(xs, ys):
    """Least-squares slope of log y against log x (None with fewer than 2 usable points)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys, strict=True) if a and b and a > 0 and b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def fit_all(ctx: Context):
    fits = []
    rows = [r for r in ctx.rows if r["suite"] == SUITE]
    for axis in ("N", "M", "d"):
        for prov in dict.fromkeys(r["provider"] for r in rows if r["op"] == f"sweep {axis}"):
            rs = sorted((r for r in rows if r["op"] == f"sweep {axis}" and r["provider"] == prov),
                        key=lambda r: r[axis])
            xs = [r[axis] for r in rs]
            fits.append({"sweep": axis, "provider": prov, "points": len(rs),
                         "x": "d" if axis == "d" else "M·N",
                         "time_slope": slope(xs, [r["median_s"] for r in rs]),
                         "mem_slope": slope(xs, [r["peak_mem_bytes"] for r in rs]),
                         "mem_vs_MxN_at_largest": rs[-1]["mem_vs_MxN"] if rs else None})
    ctx.extra["fits"] = fits
