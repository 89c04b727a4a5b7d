"""Suite `posterior`: the point-cloud reduction (MATH.md §5), D = Σ w_i y_i and L = logsumexp_i a_i with
a_i = −|x − α y_i|²/(2σ²), against what a user would otherwise run.

Providers
  fastdiff[<backend>]   fastdiff.ops.posterior(..., backend=name) for every registered backend whose
                        refuse_reasons("posterior", ...) is empty (new backends appear by themselves)
  torch naive           the straightforward version: |x|² − 2α x·yᵀ + α²|y|² with one matmul, logsumexp,
                        softmax weights and a second matmul (materialises the M×N logits)
  torch.compile(naive)  the same function through torch.compile (default settings)
  torch chunked (cuBLAS fp32)   the best plain-torch version: queries in chunks of ≤ 2²⁶ logits, one
                        addmm per chunk for 2α x·yᵀ − α²|y|² (the |x|² term cancels in the softmax and is
                        added to L afterwards), softmax and a second matmul; fp32 products (TF32 off)
  sdpa                  F.scaled_dot_product_attention(q=x, k=y, v=y, scale=α/σ², fp32 additive bias
                        −α²|y|²/(2σ²)); on CUDA the memory-efficient backend is requested. Gives D only.
  keops                 pykeops LazyTensor: logsumexp and sumsoftmaxweight of −|x − αy|²/(2σ²)

Two timing regimes. The speed of a kernel that skips data points of negligible posterior weight (screening
with exact rescoring) depends on σ, so every d is timed at two points; each row says which (`sigma`,
`regime`, and `eff_points` = the median over up to EFF_QUERIES queries of 1/Σw², the effective number of
points sharing the weight, computed in float64):
  main   σ = SIGMA_TIME = 0.5 on the whole size ladder and the target shapes: the posterior is concentrated at
         large d (d ≥ 16 with this clustered data: one cluster of 8 points holds the weight; 1/Σw² ≈ 8) and
         spread at d = 2, 3 (1/Σw² ≈ 0.25 N and 0.1 N at the largest CPU shape).
  dense  σ = DENSE_SIGMA_PER_SQRT_D·√d at the largest ladder shape of each d, every provider: σ on the scale of
         the distances between data points (|y_i − y_j| ≈ √(2d)), so a good fraction of the points share the
         weight and none is negligible. Measured on this data (float64, up to 256 queries, the largest CPU
         shapes): 1/Σw² ≈ 0.48 N at d = 784 (σ = 28, 256 × 1024) and 0.50 N at d = 3072 (σ = 55.4, 128 × 512),
         0.46-0.67 N at d ≤ 64, all logits within ~5-7 nats of the largest. (A fixed σ = 10 is not dense there:
         1/Σw² ≈ 0.035 N at d = 784 and 8 points, one cluster, at d = 3072.)
Speedups are taken within a regime (the row's `case` names it).

Throughput is pairs per second (M·N / time). The roofline bound of one call is the largest of
  4d·M·N / fp32 FLOP rate (two d-long dot products per pair: the distance and the weighted sum),
  M·N / exp rate (one exponential per pair),  4(2Md + Nd + M) bytes / copy bandwidth,
and roofline_fraction = bound / measured time (1 = at the ceiling named in `ceiling`).

Accuracy (MATH.md §7): each provider also runs in float32 at small σ (1e-3) on data made of clusters of 8
points spread over ~σ (several points share the posterior weight, so errors in the logits move D), against
a float64 direct-difference brute force on the same float32 inputs:
  err_D       = max |D − D64| / (max|y| + 1e-12)                    (§7: ≤ 1e-4)
  err_L       = max |L − L64|  (nats)                                (§7: ≤ 1e-3 + 1e-6 |L64|, per query)
  err_D_sigma = max |D − D64| / σ                                    (the same error on the scale D moves on)
  accurate    = the §7 contract holds (D and L finite, both bounds met; D only for sdpa)
The accuracy runs on the smallest timed shape of each d, and on the target shapes themselves (ACC_QUERIES
queries against the full data set); `acc_shape` says which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .common import (
    Case,
    Context,
    backend_refusal,
    cleanup,
    describe_error,
    fastdiff_backends,
    fastdiff_provider,
    fill_speedups,
    ladder,
    mem_cap,
    optional_import,
)
from .timing import measure

SUITE = "posterior"
DIMS = (2, 3, 16, 64, 784, 3072)
QUICK_DIMS = (2, 64, 784)
SIGMA_TIME, ALPHA = 0.5, 0.9      # the main timing point (a pruning kernel's speed depends on σ: see DENSE_*)
DENSE_SIGMA_PER_SQRT_D = 1.0      # the dense timing point σ = √d: about half the points share the weight
EFF_QUERIES = 256                 # queries over which a row's eff_points (median 1/Σw²) is computed
SIGMA_ACC = 1e-3                  # accuracy point: the small-σ end of a sampling run (t_end = 1e-3)
CLUSTER = 8
TOL_D, TOL_L_ABS, TOL_L_REL = 1e-4, 1e-3, 1e-6     # MATH.md §7
ACC_QUERIES = 256
CHUNK_LOGITS = 1 << 26
REF = fastdiff_provider("torch")
NAIVE, COMPILED, CHUNKED, SDPA, KEOPS = ("torch naive", "torch.compile(naive)", "torch chunked (cuBLAS fp32)", "sdpa",
                                         "keops")
TORCH_ALTERNATIVES = (REF, NAIVE, COMPILED, CHUNKED)    # "the best torch reference" is the fastest of these

# The benchmark targets' exact shapes (d, M, N, label): measured in every full run on that device type.
TARGET_SHAPES = {
    "cuda": [(2, 65536, 65536, "issue 3"), (3072, 1024, 50000, "issue 3"), (2, 16384, 16384, "issue 4")],
    "cpu": [(2, 16384, 16384, "issue 4")],
}


@dataclass
class Provider:
    name: str
    backend: str | None
    fn: object                  # fn(x, y, alpha, sigma) -> (D, L or None)
    bytes_per_pair: float = 0   # memory it needs per (query, point) pair (0: bounded, streams)
    warm_first: bool = False    # its first call compiles nothing (see timing.measure)
    d_only: bool = False


# ----------------------------------------------------------------------------------------- sizes
def sizes(ctx: Context, d: int):
    if ctx.cuda:
        return ladder(d, 2.0**36, 2 if ctx.quick else 3)
    if ctx.quick:
        return ladder(d, 4e6, 2, k_min=4)
    return ladder(d, 5.4e8, 3)


def target_shapes(ctx: Context):
    return [] if ctx.quick else list(TARGET_SHAPES.get(ctx.device.type, []))


def sigma_dense(d: int) -> float:
    """The dense timing point: σ on the scale of the distances between data points (see the module docstring)."""
    return DENSE_SIGMA_PER_SQRT_D * math.sqrt(d)


def effective_points(x, y, alpha: float, sigma: float, queries: int = EFF_QUERIES) -> float:
    """Median over the first `queries` queries of 1/Σ_i w_i², in float64: how many data points share the posterior
    weight (1 = one-hot, N = uniform). Says which regime a timing row measured."""
    x64, y64 = x[:queries].double(), y.double()
    rows = max(1, (1 << 22) // max(1, y64.shape[0]))      # at most 2²² logits at a time
    eff = []
    for r0 in range(0, x64.shape[0], rows):
        logits = torch.cdist(x64[r0:r0 + rows], alpha * y64).square_().div_(-2.0 * sigma * sigma)
        w = torch.softmax(logits, 1)
        eff.append(1.0 / (w * w).sum(1))
    return float(torch.cat(eff).median())


# ----------------------------------------------------------------------------------------- data
def make_data(d: int, M: int, N: int, sigma: float, device, seed: int = 0):
    """N points in CLUSTER-point clusters around N/CLUSTER standard normal centres, spread SIGMA_ACC/√d per
    coordinate (so members are ~SIGMA_ACC apart in any d and share the posterior weight at σ = SIGMA_ACC);
    M queries x = α y_i + σ z at random data points. Generated on the CPU in float64 (the same numbers on
    every device), then moved."""
    g = torch.Generator().manual_seed(seed + 1000 * d + M)
    centres = torch.randn(max(1, N // CLUSTER), d, generator=g, dtype=torch.float64)
    y = centres.repeat_interleave(CLUSTER, 0)[:N]
    if y.shape[0] < N:
        y = torch.cat([y, torch.randn(N - y.shape[0], d, generator=g, dtype=torch.float64)])
    y = y + SIGMA_ACC / math.sqrt(d) * torch.randn(N, d, generator=g, dtype=torch.float64)
    idx = torch.randint(N, (M,), generator=g)
    x = ALPHA * y[idx] + sigma * torch.randn(M, d, generator=g, dtype=torch.float64)
    return x.float().to(device), y.float().to(device)


def brute_force64(x, y, alpha, sigma):
    """Float64 direct differences on the (float32) inputs, in blocks of at most 2²⁴ differences: (D, L)."""
    x64, y64 = x.double(), y.double()
    M, d = x64.shape
    N = y64.shape[0]
    rows = max(1, min(M, (1 << 22) // N))
    cols = max(1, min(N, (1 << 24) // (rows * d)))
    Ds, Ls = [], []
    for r0 in range(0, M, rows):
        xr = x64[r0:r0 + rows]
        a = torch.empty(xr.shape[0], N, dtype=torch.float64, device=x.device)
        for c0 in range(0, N, cols):
            diff = xr[:, None, :] - alpha * y64[None, c0:c0 + cols, :]
            a[:, c0:c0 + cols] = -(diff * diff).sum(-1) / (2 * sigma * sigma)
        L = torch.logsumexp(a, 1)
        Ds.append(torch.exp(a - L[:, None]) @ y64)
        Ls.append(L)
    return torch.cat(Ds), torch.cat(Ls)


# ----------------------------------------------------------------------------------------- providers
def naive(x, y, alpha, sigma):
    """What most people write: the |x|² − 2x·y + |y|² expansion, logsumexp, softmax and a matmul."""
    c2 = 2 * sigma * sigma
    sq = (x * x).sum(1, keepdim=True) - (2 * alpha) * (x @ y.T) + (alpha * alpha) * (y * y).sum(1)
    logits = -sq / c2
    L = torch.logsumexp(logits, 1)
    w = torch.exp(logits - L[:, None])
    return w @ y, L


def chunked(x, y, alpha, sigma, budget: int = CHUNK_LOGITS):
    """The best plain-torch version: fp32 cuBLAS/BLAS products in query chunks of ≤ budget logits. The
    per-query |x|² term is left out of the logits (it cancels in the softmax) and subtracted from L."""
    M, d = x.shape
    N = y.shape[0]
    c2 = 2.0 * float(sigma) ** 2
    alpha = float(alpha)
    bias = (y * y).sum(1) * (-(alpha * alpha) / c2)          # −α²|y|²/(2σ²)  [N]
    yT = y.T
    rows = max(1, min(M, budget // max(1, N)))
    D = torch.empty_like(x)
    L = torch.empty(M, dtype=x.dtype, device=x.device)
    for r0 in range(0, M, rows):
        xc = x[r0:r0 + rows]
        logits = torch.addmm(bias, xc, yT, beta=1.0, alpha=2.0 * alpha / c2)   # (2α x·y − α²|y|²)/(2σ²)
        Lc = torch.logsumexp(logits, 1)
        D[r0:r0 + rows] = torch.softmax(logits, 1) @ y
        L[r0:r0 + rows] = Lc - (xc * xc).sum(1) / c2
    return D, L


def make_sdpa(ctx: Context):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    refused = set()     # head dimensions the memory-efficient kernel refused (then PyTorch's own choice runs)

    def sdpa(x, y, alpha, sigma):
        M, d = x.shape
        N = y.shape[0]
        c = float(sigma) ** 2
        alpha = float(alpha)
        pad = (-d) % 8          # kernels want the head dimension aligned: zero columns change no dot product
        q = F.pad(x, (0, pad))[None, None]
        k = F.pad(y, (0, pad))[None, None]
        bias = (-(alpha * alpha) / (2 * c) * (y * y).sum(1)).to(torch.float32).view(1, 1, 1, N).expand(1, 1, M, N)
        if ctx.cuda and d not in refused:
            try:
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    out = F.scaled_dot_product_attention(q, k, k, attn_mask=bias, scale=alpha / c)
                return out[0, 0, :, :d], None
            except RuntimeError as exc:
                refused.add(d)
                ctx.note(SUITE, SDPA, f"d={d}: the memory-efficient backend refused "
                         f"({describe_error(exc, 160)}); PyTorch's default sdpa backend choice runs instead",
                         kind="fallback")
        out = F.scaled_dot_product_attention(q, k, k, attn_mask=bias, scale=alpha / c)
        return out[0, 0, :, :d], None

    return sdpa


def make_keops():
    lt, reason = optional_import("pykeops.torch", "pip install pykeops; needs a C++ compiler (and nvcc for CUDA)")
    if lt is None:
        return None, reason
    LazyTensor = lt.LazyTensor

    def keops(x, y, alpha, sigma):
        X = LazyTensor(x[:, None, :])
        Y = LazyTensor((alpha * y)[None, :, :])
        a = -X.sqdist(Y) / (2 * sigma * sigma)
        L = a.logsumexp(dim=1).view(-1)
        D = a.sumsoftmaxweight(LazyTensor(y[None, :, :]), dim=1)
        return D, L

    return keops, None


def compiled_naive(ctx: Context):
    if "compiled_naive" not in ctx.cache:
        try:    # every shape of the run may recompile: never fall back to eager silently at the cache limit
            import torch._dynamo.config as dcfg
            for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                        "accumulated_cache_size_limit"):
                if hasattr(dcfg, key):
                    setattr(dcfg, key, max(int(getattr(dcfg, key)), 256))
        except Exception:
            pass
        # dynamic shapes: one compilation serves the whole size ladder instead of one per (M, N)
        ctx.cache["compiled_naive"] = torch.compile(naive, dynamic=True)
    f = ctx.cache["compiled_naive"]
    scalars = {}

    def run(x, y, a, s):
        # α, σ go in as 0-d tensors (a new σ does not recompile), made once per value: no copy in the timed call
        key = (float(a), float(s), x.device)
        if key not in scalars:
            scalars[key] = (torch.tensor(a, device=x.device), torch.tensor(s, device=x.device))
        return f(x, y, *scalars[key])
    return run


def providers(ctx: Context) -> list[Provider]:
    out = []
    for name in fastdiff_backends():
        def fd_post(x, y, alpha, sigma, _name=name):
            import fastdiff
            return fastdiff.ops.posterior(x, y, alpha, sigma, backend=_name)
        out.append(Provider(fastdiff_provider(name), name, fd_post, warm_first=name in ("torch", "cpu")))
    out.append(Provider(NAIVE, None, naive, bytes_per_pair=16, warm_first=True))
    out.append(Provider(COMPILED, None, compiled_naive(ctx), bytes_per_pair=16))
    out.append(Provider(CHUNKED, None, chunked, warm_first=True))
    # the math backend (CPU, or a refusal on CUDA) materialises the bias and the weights
    out.append(Provider(SDPA, None, make_sdpa(ctx), bytes_per_pair=4 if ctx.cuda else 12, d_only=True))
    if ctx.quick:
        keops, reason = None, ("not in --quick runs: KeOps compiles one kernel per dimension d on first use "
                               "(~20-40 s each on a CPU); the full run measures it when pykeops is installed")
    else:
        keops, reason = make_keops()
    if keops is None:
        ctx.note(SUITE, KEOPS, reason)
    else:
        out.append(Provider(KEOPS, None, keops))
    return out


# ----------------------------------------------------------------------------------------- roofline
def roofline(ctx: Context, M: int, N: int, d: int, seconds: float):
    """(limiting ceiling, bound in pairs/s, fraction of it reached)."""
    c = ctx.ceilings
    if not c or not all(k in c for k in ("fma", "exp", "copy")):
        return None, None, None
    bounds = {
        "fma": 4 * d * M * N / (c["fma"].value * 1e9),
        "exp": M * N / (c["exp"].value * 1e9),
        "copy": 4 * (2 * M * d + N * d + M) / (c["copy"].value * 1e9),
    }
    name = max(bounds, key=bounds.get)
    return name, M * N / bounds[name], bounds[name] / seconds


def accuracy(fn, x, y, ref):
    """(err_D, err_L, err_D_sigma, accurate) of fn at (ALPHA, SIGMA_ACC) against ref = brute_force64(...)."""
    D, L = fn(x, y, ALPHA, SIGMA_ACC)
    D64, L64 = ref
    dD = (D.double() - D64).abs()
    finite = bool(torch.isfinite(D).all())
    ymax = float(y.double().abs().max())
    err = float(dD.max()) if finite else float("inf")
    err_D, err_D_sigma = err / (ymax + 1e-12), err / SIGMA_ACC
    err_L, ok_L = None, True
    if L is not None:
        dL = (L.double().reshape(-1) - L64).abs()
        if bool(torch.isfinite(L).all()):
            err_L = float(dL.max())
            ok_L = bool((dL <= TOL_L_ABS + TOL_L_REL * L64.abs()).all())
        else:
            err_L, ok_L = float("inf"), False
    ok = finite and err_D <= TOL_D and ok_L
    return err_D, err_L, err_D_sigma, ok


# ----------------------------------------------------------------------------------------- the suite
def cases(ctx: Context) -> list[Case]:
    dims = QUICK_DIMS if ctx.quick else DIMS
    out = []        # the targets' shapes first: a run with a time limit measures them before anything else
    for d, M, N, label in target_shapes(ctx):
        out.append(Case(SUITE, f"posterior d={d} M={M} N={N} (target, {label})",
                        lambda ctx, d=d, M=M, N=N, label=label: run_case(ctx, d, M, N, False, target=label)))
    for d in dims:
        for i, (M, N) in enumerate(sizes(ctx, d)):
            out.append(Case(SUITE, f"posterior d={d} M={M} N={N}",
                            lambda ctx, d=d, M=M, N=N, first=(i == 0): run_case(ctx, d, M, N, first)))
    # the dense regime after the whole ladder: a run with a time limit cuts these first, and a target read by shape
    # (benchmarks/targets.py finds the first matching row) reads the main timing point
    for d in dims:
        M, N = sizes(ctx, d)[-1]
        s = sigma_dense(d)
        out.append(Case(SUITE, f"posterior d={d} M={M} N={N} dense σ={s:.3g}",
                        lambda ctx, d=d, M=M, N=N, s=s: run_case(ctx, d, M, N, False, sigma=s, regime="dense")))
    out.append(Case(SUITE, "posterior: speedups", lambda ctx: fill_speedups(
        [r for r in ctx.rows if r["suite"] == SUITE], REF)))
    return out


def _accuracy_set(ctx: Context, d: int, M: int, N: int, key):
    if key not in ctx.cache:
        xa, ya = make_data(d, M, N, SIGMA_ACC, ctx.device, seed=1)
        ctx.cache[key] = {"x": xa, "y": ya, "ref": brute_force64(xa, ya, ALPHA, SIGMA_ACC), "results": {},
                          "shape": f"M={M},N={N},d={d}"}
    return ctx.cache[key]


def run_case(ctx: Context, d: int, M: int, N: int, accuracy_case: bool, target: str | None = None,
             sigma: float = SIGMA_TIME, regime: str = "main"):
    """Time every provider at (d, M, N) and σ = sigma (the main timing point, or the dense one); the accuracy
    columns are always those at σ = SIGMA_ACC (see the module docstring)."""
    if "posterior_providers" not in ctx.cache:
        ctx.cache["posterior_providers"] = providers(ctx)
    if target is not None:
        # accuracy on the target shape itself: ACC_QUERIES queries against the full data set
        acc = _accuracy_set(ctx, d, min(M, ACC_QUERIES), N, ("posterior_acc_target", d, M, N))
    elif accuracy_case:
        # accuracy at the smallest timed shape of each d; larger shapes of that d report it
        acc = _accuracy_set(ctx, d, M, N, ("posterior_acc", d))
    else:
        acc = ctx.cache.get(("posterior_acc", d))
    x, y = make_data(d, M, N, sigma, ctx.device)
    eff = effective_points(x, y, ALPHA, sigma)
    case = f"d={d} M={M} N={N}" + ("" if regime == "main" else f" σ={sigma:.3g} ({regime})")
    cap = mem_cap(ctx)
    for p in ctx.cache["posterior_providers"]:
        if p.backend is not None:
            reasons = backend_refusal(p.backend, "posterior", x=x, data=y)
            if reasons:
                ctx.note(SUITE, p.name, "; ".join(reasons))
                continue
        if p.bytes_per_pair and p.bytes_per_pair * M * N > cap:
            ctx.note(SUITE, p.name, f"skipped at M={M} N={N}: would materialise M×N matrices "
                     f"(~{p.bytes_per_pair * M * N / 2**30:.1f} GiB > cap {cap / 2**30:.1f} GiB)")
            continue
        if ctx.progress is not None:
            ctx.progress.start(f"posterior {case} {p.name}")
        err_D = err_L = err_Ds = ok = None
        failed = False
        try:
            if acc is not None:
                if p.name not in acc["results"]:
                    acc["results"][p.name] = accuracy(p.fn, acc["x"], acc["y"], acc["ref"])
                err_D, err_L, err_Ds, ok = acc["results"][p.name]
            t = measure(partial(p.fn, x, y, ALPHA, sigma), ctx.device, ctx.policy, warm_first=p.warm_first)
        except Exception as exc:
            # a refusal at call time, or torch.compile unusable here (no compiler): a note, not a harness error
            refusal = p.backend is not None and isinstance(exc, ValueError)
            kind = "skipped" if refusal or p.name == COMPILED else "error"
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
                kind = "skipped"
            ctx.note(SUITE, p.name, f"failed at {case}: {describe_error(exc)}", kind=kind)
            failed = True
        if failed:      # outside the except block: the traceback no longer holds the failed call's tensors
            cleanup(ctx.device)
            continue
        ceiling, bound, frac = roofline(ctx, M, N, d, t.median_s)
        ctx.timing_row(t, suite=SUITE, op="posterior", provider=p.name, backend=p.backend, case=case,
                       shape=f"M={M},N={N},d={d}", M=M, N=N, d=d, n_elems=M * N, dtype="float32",
                       sigma=sigma, regime=regime, eff_points=eff,
                       throughput=M * N / t.median_s, unit="pairs/s", ceiling=ceiling, ceiling_throughput=bound,
                       roofline_fraction=frac, err_D=err_D, err_L=err_L, err_D_sigma=err_Ds, accurate=ok,
                       acc_shape=None if acc is None else acc["shape"], target=target,
                       note="D only (sdpa returns no log-sum-exp)" if p.d_only else None)
    del x, y
    cleanup(ctx.device)
