"""The benchmark targets of this project's issues, evaluated from a run's rows: project bookkeeping, kept
here beside the committed runs rather than in the library. `fastdiff bench` loads this file when it runs from
a checkout of the repository (fastdiff.bench.report.load_targets); an installed package reports no targets.

Each target names the device type it applies to, the exact case it is read from (the suites measure
those shapes in every full run on that device) and what must hold. `evaluate(rows, device)` gives one
entry per target of that device: what was measured, what is required, and met = yes / no / not measured
(info: a comparison without a threshold). The measured backend order is fastdiff/bench/order.py's.
"""
from __future__ import annotations

import math

FD = "fastdiff[{}]"


def _fd(b):
    return FD.format(b)


def _find(rows, provider, **match):
    for r in rows:
        if r.get("provider") == provider and r.get("median_s") and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _fmt_x(v):
    return "–" if v is None else f"{v:.3g}×"


def _acc(r):
    if r is None or r.get("accurate") is None:
        return "accuracy not measured"
    s = "meets §7" if r["accurate"] else "**fails §7**"
    parts = [f"err_D {r['err_D']:.1e}" if r.get("err_D") is not None else None,
             f"err_L {r['err_L']:.1e}" if r.get("err_L") is not None else None]
    return s + " (" + ", ".join(p for p in parts if p) + ")"


def _entry(spec, measured, value, met, detail=""):
    return {"id": spec["id"], "issue": spec["issue"], "device": spec["device"], "target": spec["target"],
            "required": spec["required"], "measured": measured, "value": value,
            "met": met, "detail": detail}


def _not_measured(spec, why="not measured in this run"):
    return _entry(spec, "–", None, "not measured", why)


# ----------------------------------------------------------------------------------------- evaluators
def _posterior(d, M, N):
    return {"suite": "posterior", "d": d, "M": M, "N": N}


def _ratio(rows, match, fast, slow):
    a, b = _find(rows, fast, **match), _find(rows, slow, **match)
    if a is None or b is None:
        return None, a, b
    return b["median_s"] / a["median_s"], a, b


def _others(rows, match, names, ref):
    """'name: x× ref' for the other fastdiff backends measured on the same case (cuda vs triton)."""
    out = []
    for n in names:
        r = _find(rows, n, **match)
        if r is not None and ref is not None:
            out.append(f"{n} {ref['median_s'] / r['median_s']:.3g}×")
    return out


def t_rate(spec, rows):
    r = _find(rows, spec["provider"], **spec["match"])
    if r is None:
        return _not_measured(spec)
    v = r["throughput"]
    return _entry(spec, f"{v:.3g} {r['unit']}", v, "yes" if v >= spec["threshold"] else "no",
                  f"median {r['median_s'] * 1e3:.3g} ms; {_acc(r)}")


def t_speedup(spec, rows):
    v, a, b = _ratio(rows, spec["match"], spec["provider"], spec["versus"])
    if v is None:
        missing = spec["provider"] if a is None else spec["versus"]
        return _not_measured(spec, f"{missing} not measured on this case")
    extra = _others(rows, spec["match"], spec.get("also", ()), b)
    detail = f"{spec['provider']} {a['median_s']:.4g} s vs {spec['versus']} {b['median_s']:.4g} s"
    if extra:
        detail += "; vs the same reference: " + ", ".join(extra)
    if spec.get("threads_note") and a.get("threads"):
        detail += f"; {a['threads']} CPU thread(s)"
    met = v >= spec["threshold"] if spec.get("strict") is None else v > spec["threshold"]
    return _entry(spec, _fmt_x(v), v, "yes" if met else "no", detail)


def t_vs_best_torch(spec, rows):
    a = _find(rows, spec["provider"], **spec["match"])
    alts = [r for r in (_find(rows, n, **spec["match"]) for n in spec["versus"]) if r is not None]
    if a is None or not alts:
        return _not_measured(spec, f"{spec['provider'] if a is None else 'no torch alternative'} not measured")
    best = min(alts, key=lambda r: r["median_s"])
    v = best["median_s"] / a["median_s"]
    ok = v >= spec["threshold"] and a.get("accurate") is not False
    detail = (f"best torch alternative: {best['provider']} ({best['median_s']:.4g} s vs {a['median_s']:.4g} s); "
              f"{spec['provider']}: {_acc(a)}; " + "; ".join(f"{r['provider']}: {_acc(r)}" for r in alts))
    return _entry(spec, _fmt_x(v), v, "yes" if ok else "no", detail)


def t_faster(spec, rows):
    v, a, b = _ratio(rows, spec["match"], spec["provider"], spec["versus"])
    if v is None:
        missing = spec["provider"] if a is None else spec["versus"]
        return _not_measured(spec, f"{missing} not measured on this case")
    ok = v > 1.0 and (not spec.get("accuracy") or a.get("accurate") is not False)
    detail = f"{spec['provider']} {a['median_s']:.4g} s vs {spec['versus']} {b['median_s']:.4g} s"
    if spec.get("accuracy"):
        detail += f"; {spec['provider']}: {_acc(a)}; {spec['versus']}: {_acc(b)}"
    return _entry(spec, _fmt_x(v), v, "yes" if ok else "no", detail)


def t_accuracy(spec, rows):
    a = _find(rows, spec["provider"], **spec["match"])
    if a is None or a.get("accurate") is None:
        return _not_measured(spec)
    others = [r for r in (_find(rows, n, **spec["match"]) for n in spec["versus"]) if r is not None]
    detail = f"on {a.get('acc_shape')}; " + "; ".join(f"{r['provider']}: {_acc(r)}" for r in others)
    return _entry(spec, _acc(a), a.get("err_D"), "yes" if a["accurate"] else "no", detail)


def t_fraction(spec, rows):
    r = _find(rows, spec["provider"], **spec["match"])
    if r is None or r.get("roofline_fraction") is None:
        return _not_measured(spec)
    v = r["roofline_fraction"]
    extra = []
    for n in spec.get("also", ()):
        o = _find(rows, n, **spec["match"])
        if o is not None and o.get("roofline_fraction") is not None:
            extra.append(f"{n} {100 * o['roofline_fraction']:.0f}%")
    detail = f"{r['throughput']:.4g} GB/s of {r['ceiling_throughput']:.4g} GB/s copy bandwidth"
    if extra:
        detail += "; " + ", ".join(extra)
    return _entry(spec, f"{100 * v:.1f}%", v, "yes" if v >= spec["threshold"] else "no", detail)


def t_roofline(spec, rows):
    r = _find(rows, spec["provider"], **spec["match"])
    if r is None or r.get("roofline_fraction") is None:
        return _not_measured(spec)
    v = r["roofline_fraction"]
    detail = (f"{r['throughput']:.4g} pairs/s of the {r.get('ceiling')} bound {r['ceiling_throughput']:.4g} pairs/s "
              "(4d flops a pair: the distance and the weighted sum; a screening kernel that skips pairs can pass 100%)")
    return _entry(spec, f"{100 * v:.1f}%", v, "yes" if v >= spec["threshold"] else "no", detail)


def t_best_of(spec, rows):
    """The fastest of spec['providers'] against spec['versus']."""
    cands = [r for r in (_find(rows, n, **spec["match"]) for n in spec["providers"]) if r is not None]
    b = _find(rows, spec["versus"], **spec["match"])
    if not cands or b is None:
        why = "fd.sample(..., cuda_graph=True) not measured (see the notes)" if not cands else \
            f"{spec['versus']} not measured"
        return _not_measured(spec, why)
    a = min(cands, key=lambda r: r["median_s"])
    v = b["median_s"] / a["median_s"]
    detail = f"{a['provider']} {a['median_s']:.4g} s vs {spec['versus']} {b['median_s']:.4g} s"
    extra = _others(rows, spec["match"], spec.get("also", ()), b)
    if extra:
        detail += "; without the graph: " + ", ".join(extra)
    return _entry(spec, _fmt_x(v), v, "yes" if v >= spec["threshold"] else "no", detail)


def t_vs_peer(spec, rows):
    """The fastest of spec['providers'] (fastdiff backends) against a peer's loop (spec['versus']); the detail
    gives the same fastdiff row against the other loops of spec['beside'] and the CPU thread count."""
    cands = [r for r in (_find(rows, n, **spec["match"]) for n in spec["providers"]) if r is not None]
    b = _find(rows, spec["versus"], **spec["match"])
    if not cands or b is None:
        return _not_measured(spec, f"{'no fastdiff backend' if not cands else spec['versus']} measured on this case")
    a = min(cands, key=lambda r: r["median_s"])
    v = b["median_s"] / a["median_s"]
    detail = f"{a['provider']} {a['median_s']:.4g} s vs {spec['versus']} {b['median_s']:.4g} s"
    beside = [(n, _find(rows, n, **spec["match"])) for n in spec.get("beside", ())]
    beside = [f"{n} {r['median_s']:.4g} s ({r['median_s'] / a['median_s']:.3g}×)" for n, r in beside if r is not None]
    if beside:
        detail += "; beside: " + ", ".join(beside)
    bound = _find(rows, spec["bound"], **spec["match"]) if spec.get("bound") else None
    if bound is not None:       # the model alone: no sampler can beat the peer's loop by more than this
        detail += (f"; {spec['bound']} {bound['median_s']:.4g} s, {b['median_s'] / bound['median_s']:.3g}× "
                   f"{spec['versus']}: the most any sampler can gain with this model (timing noise aside)")
    if a.get("threads"):
        detail += f"; {a['threads']} CPU thread(s)"
    return _entry(spec, _fmt_x(v), v, "yes" if v >= spec["threshold"] else "no", detail)


def t_info(spec, rows):
    ref = _find(rows, spec["versus"], **spec["match"])
    got = _others(rows, spec["match"], spec["providers"], ref)
    if ref is None or not got:
        return _not_measured(spec)
    return _entry(spec, ", ".join(got), None, "info", f"speedups over {spec['versus']} "
                  f"({ref['median_s']:.4g} s) on the same case")


_SAMPLE_I3 = {"suite": "sample", "op": "pointcloud/ancestral SDE", "n_elems": 100_000, "steps": 1000, "N": 10_000}
_SAMPLE_I4 = {"suite": "sample", "op": "pointcloud/ancestral SDE", "n_elems": 10_000, "steps": 200, "N": 10_000}
_LOOP = {"suite": "sample", "op": "mlp loop", "n_elems": 1024, "steps": 1000}
# issue 14: 100 steps of dpmpp_2m on the suite's Karras grid (VE, σ 80 → 1e-3); the MLP case samples its own
# training density (the 500-point swiss roll), the point-cloud case the 10⁴-point one
_SAMPLE_I14_MLP = {"suite": "sample", "op": "mlp/dpmpp_2m", "n_elems": 1024, "steps": 100, "N": 500}
_SAMPLE_I14_PC = {"suite": "sample", "op": "pointcloud/dpmpp_2m", "n_elems": 10_000, "steps": 100, "N": 10_000}
_FD_CPU_SIDE = (_fd("cpu"), _fd("torch"))
_KD_2M = "k-diffusion sample_dpmpp_2m"
_TORCH_ALTS = ("fastdiff[torch]", "torch naive", "torch.compile(naive)", "torch chunked (cuBLAS fp32)")
_GRAPHS = tuple(f"{_fd(b)} cuda_graph" for b in ("triton", "cuda", "torch"))

# the CPU ladder's largest shape of each d (fastdiff/bench/posterior.py sizes: M·N·max(d, 8) ≤ 5.4e8, N = 4M)
_I15_SHAPES = ((2, 4096, 16384), (3, 4096, 16384), (16, 2048, 8192), (64, 1024, 4096), (784, 256, 1024),
               (3072, 128, 512))

TARGETS = [
    # ---- issue 3: the Triton kernels on an H100, float32
    dict(id="I3-posterior-d2-rate", issue="3", device="cuda", fn=t_rate,
         target="posterior d=2, M=N=65,536: fastdiff[triton] pair interactions/s",
         required="≥ 1.0e12 pairs/s", match=_posterior(2, 65536, 65536), provider=_fd("triton"), threshold=1.0e12),
    dict(id="I3-posterior-d2-vs-ref", issue="3", device="cuda", fn=t_speedup,
         target="posterior d=2, M=N=65,536: fastdiff[triton] vs the torch reference",
         required="≥ 20×", match=_posterior(2, 65536, 65536), provider=_fd("triton"), versus=_fd("torch"),
         threshold=20.0, also=(_fd("cuda"),)),
    dict(id="I3-posterior-d3072-vs-torch", issue="3", device="cuda", fn=t_vs_best_torch,
         target="posterior d=3072, N=50,000, M=1,024: fastdiff[triton] vs the best torch version "
                "(chunked cuBLAS fp32 products + softmax, naive, torch.compile, fastdiff[torch])",
         required="≥ 1.3×, at §7 accuracy", match=_posterior(3072, 1024, 50000), provider=_fd("triton"),
         versus=_TORCH_ALTS, threshold=1.3),
    dict(id="I3-posterior-d3072-vs-sdpa", issue="3", device="cuda", fn=t_faster,
         target="posterior d=3072, N=50,000, M=1,024: fastdiff[triton] vs SDPA (fp32 bias, memory-efficient)",
         required="> 1× (faster), at §7 accuracy", match=_posterior(3072, 1024, 50000), provider=_fd("triton"),
         versus="sdpa", accuracy=True),
    dict(id="I3-posterior-d3072-accuracy", issue="3", device="cuda", fn=t_accuracy,
         target="posterior d=3072, N=50,000, M=1,024: MATH.md §7 accuracy at σ = 1e-3 (alternatives beside)",
         required="fastdiff[triton] meets §7", match=_posterior(3072, 1024, 50000), provider=_fd("triton"),
         versus=(_fd("cuda"), "torch chunked (cuBLAS fp32)", "sdpa", "torch naive", "torch.compile(naive)",
                 _fd("torch"))),
    dict(id="I3-affine-step-bandwidth", issue="3", device="cuda", fn=t_fraction,
         target="affine_step, 2²⁶ float32 elements (M=2²⁰, d=64): fastdiff[triton] of the copy bandwidth "
                "measured in the same run",
         required="≥ 80%", match={"suite": "step", "M": 1 << 20, "d": 64}, provider=_fd("triton"), threshold=0.8,
         also=(_fd("cuda"),)),
    dict(id="I3-pointcloud-sample", issue="3", device="cuda", fn=t_speedup,
         target="pointcloud_sample, swiss roll N=10⁴, M=10⁵ samples, 1,000 steps: fastdiff[triton] vs the "
                "torch reference sampler",
         required="≥ 50×", match=_SAMPLE_I3, provider=_fd("triton"), versus=_fd("torch"), threshold=50.0,
         also=(_fd("cuda"),)),
    dict(id="I3-mlp-cuda-graph", issue="3", device="cuda", fn=t_best_of,
         target="user network (3-hidden-layer MLP), M=1,024, d=2, 1,000 steps: fd.sample(cuda_graph=True) vs a "
                "plain eager torch loop of the same model and update",
         required="≥ 3×", match=_LOOP, providers=_GRAPHS, versus="torch eager loop (randn)", threshold=3.0,
         also=(_fd("cuda"), _fd("triton"), _fd("torch"))),
    # ---- issue 4: the compiled extension
    dict(id="I4-gpu-posterior-d2-16384", issue="4", device="cuda", fn=t_info,
         target="posterior d=2, M=N=16,384 on the GPU: CUDA kernels vs Triton vs the torch reference",
         required="(comparison)", match=_posterior(2, 16384, 16384), providers=(_fd("cuda"), _fd("triton")),
         versus=_fd("torch")),
    dict(id="I4-gpu-sample-1e4", issue="4", device="cuda", fn=t_info,
         target="fd.sample swiss roll N=10⁴, M=10⁴, 200 steps on the GPU: CUDA kernels vs Triton vs the torch "
                "reference",
         required="(comparison)", match=_SAMPLE_I4, providers=(_fd("cuda"), _fd("triton")), versus=_fd("torch")),
    dict(id="I4-cpu-posterior-vs-ref", issue="4", device="cpu", fn=t_speedup,
         target="posterior d=2, M=N=16,384 on the CPU: fastdiff[cpu] vs the torch reference",
         required="≥ 4×", match=_posterior(2, 16384, 16384), provider=_fd("cpu"), versus=_fd("torch"),
         threshold=4.0, threads_note=True),
    dict(id="I4-cpu-posterior-vs-keops", issue="4", device="cpu", fn=t_faster,
         target="posterior d=2, M=N=16,384 on the CPU: fastdiff[cpu] vs KeOps (LazyTensor, CPU)",
         required="> 1× (faster)", match=_posterior(2, 16384, 16384), provider=_fd("cpu"), versus="keops"),
    dict(id="I4-cpu-sample-vs-ref", issue="4", device="cpu", fn=t_speedup,
         target="fd.sample swiss roll point cloud N=10⁴, M=10⁴, 200 steps on the CPU: fastdiff[cpu] vs the torch "
                "reference",
         required="≥ 4×", match=_SAMPLE_I4, provider=_fd("cpu"), versus=_fd("torch"), threshold=4.0,
         threads_note=True),
    # ---- issue 14: against the peers' loops (run with --threads 2)
    dict(id="I14-cpu-mlp-dpmpp_2m-vs-kdiffusion", issue="14", device="cpu", fn=t_vs_peer,
         target="MLP denoiser (3 hidden layers of 128), M=1,024, d=2, 100 steps of dpmpp_2m on the CPU, 2 threads: "
                "fd.sample (fastest fastdiff backend) vs k-diffusion's sample_dpmpp_2m loop with the same model",
         required="≥ 1.5×", match=_SAMPLE_I14_MLP, providers=_FD_CPU_SIDE, versus=_KD_2M, threshold=1.5,
         beside=("diffusers EDMDPMSolverMultistepScheduler",), bound="model evaluations alone (bound)"),
    dict(id="I14-cpu-pointcloud-dpmpp_2m-vs-kdiffusion", issue="14", device="cpu", fn=t_vs_peer,
         target="point cloud, swiss roll N=10⁴, M=10⁴, 100 steps of dpmpp_2m on the CPU, 2 threads: fd.sample "
                "(fastdiff[cpu], the fused trajectory) vs k-diffusion's sample_dpmpp_2m loop calling a naive torch "
                "point-cloud denoiser (cdist / logsumexp / matmul, float32: what a user writes without fastdiff)",
         required="≥ 10×", match=_SAMPLE_I14_PC, providers=(_fd("cpu"),), versus=f"{_KD_2M} + naive torch denoiser",
         threshold=10.0, beside=(f"{_KD_2M} + fastdiff PointCloud.denoise",
                                 "diffusers EDMDPMSolverMultistepScheduler + naive torch denoiser", _fd("torch"))),
    # ---- issue 15: the CPU posterior at the ladder's largest shape per d (σ = 0.5, the main timing point)
    *[dict(id=f"I15-cpu-posterior-d{d}-vs-{tag}", issue="15", device="cpu", fn=t_speedup,
           target=f"posterior d={d}, M={M:,}, N={N:,} on the CPU (σ = 0.5): fastdiff[cpu] vs {name}",
           required=f"≥ {thr:g}×", match=dict(_posterior(d, M, N), regime="main"), provider=_fd("cpu"),
           versus=name, threshold=thr, threads_note=True)
      for d, M, N in _I15_SHAPES for tag, name, thr in (("sdpa", "sdpa", 1.5),
                                                         ("compile", "torch.compile(naive)", 3.0))],
    *[dict(id=f"I15-cpu-posterior-d{d}-roofline", issue="15", device="cpu", fn=t_roofline,
           target=f"posterior d={d}, M={M:,}, N={N:,} on the CPU (σ = 0.5): fastdiff[cpu] of the FMA ceiling "
                  "measured in the same run",
           required="≥ 50%", match=dict(_posterior(d, M, N), regime="main"), provider=_fd("cpu"), threshold=0.5)
      for d, M, N in _I15_SHAPES if d >= 64],
]


def evaluate(rows, device: str, quick: bool = False, suites=None) -> list[dict]:
    """One entry per target of this device type (cpu or cuda); suites: those the run had (None: all)."""
    out = []
    for spec in TARGETS:
        if spec["device"] != device:
            continue
        if quick:
            out.append(_not_measured(spec, "--quick runs use small sizes: targets are measured by full runs"))
            continue
        suite = spec["match"].get("suite")
        if suites is not None and suite not in suites:
            out.append(_not_measured(spec, f"the {suite} suite is not part of this run"))
            continue
        try:
            out.append(spec["fn"](spec, rows))
        except Exception as exc:     # a malformed row must not lose the run's report
            out.append(_entry(spec, "–", None, "not measured", f"evaluation failed: {type(exc).__name__}: {exc}"))
    for e in out:
        if isinstance(e["value"], float) and not math.isfinite(e["value"]):
            e["value"] = None
    return out
