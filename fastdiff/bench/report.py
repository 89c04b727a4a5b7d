"""Writes a benchmark run: results.json (everything), results.csv (one row per measurement), report.md
(targets, tables per suite, ceilings, skipped providers, backend order, plots) and PNG plots (throughput
against size, one line per provider).

    python -m fastdiff.bench.report DIR     # rewrite DIR/report.md, the plots, the targets and the backend
                                            # order from DIR/results.json (e.g. after a run was cut short)
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from .common import COLUMNS, fmt_si
from .order import auto_order
from .timing import to_jsonable

SCHEMA = "fastdiff-bench/1"


def load_targets():
    """The project's benchmark targets (benchmarks/targets.py of a repository checkout, or the file named by
    FASTDIFF_BENCH_TARGETS) as a module with TARGETS and evaluate(rows, device, quick, suites); None when
    fastdiff runs from an installed package without the repository."""
    path = Path(os.environ.get("FASTDIFF_BENCH_TARGETS") or Path(__file__).resolve().parents[2] / "benchmarks"
                / "targets.py")
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fastdiff_benchmark_targets", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_targets(rows, device, quick=False, suites=None) -> list[dict]:
    targets = load_targets()
    return [] if targets is None else targets.evaluate(rows, device, quick, suites)


def document(ctx, suites, duration_s: float, load_end, complete: bool = True) -> dict:
    return {
        "schema": SCHEMA,
        "run_id": ctx.run_id,
        "suites": list(suites),
        "quick": ctx.quick,
        "device": ctx.device.type,
        "complete": complete,
        "environment": ctx.env,
        "ceilings": {k: to_jsonable(v) for k, v in ctx.ceilings.items()},
        "duration_s": duration_s,
        "loadavg_end": load_end,
        "targets": evaluate_targets(ctx.rows, ctx.device.type, ctx.quick, list(suites)),
        "auto_order": auto_order(ctx.rows),
        "rows": ctx.rows,
        "notes": ctx.notes,
        **{k: to_jsonable(v) for k, v in ctx.extra.items()},
    }


def _write_data(doc, out: Path, json_only: bool = False):
    text = json.dumps(doc, indent=1, default=_default, allow_nan=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out / "results.json")      # atomic: a run killed at any moment leaves a whole results.json
    if json_only:
        return
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in doc["rows"]:
            w.writerow({k: _csv(r.get(k)) for k in COLUMNS})


def write_partial(ctx, suites, duration_s: float) -> Path:
    """results.json and results.csv so far (after every case: a run cut short keeps what it measured)."""
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_data(document(ctx, suites, duration_s, None, complete=False), out, ctx.json_only)
    return out


def write_all(ctx, suites, duration_s: float, load_end, complete: bool = True) -> Path:
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = document(ctx, suites, duration_s, load_end, complete=complete)
    _write_data(doc, out, ctx.json_only)
    if not ctx.json_only:
        render(doc, out)
    return out


def render(doc: dict, out: Path) -> None:
    """report.md and the PNG plots of a results document."""
    pngs = plots(doc["rows"], doc.get("fits", []), out, title=doc["environment"].get("device_name", ""))
    (out / "report.md").write_text(markdown(doc, pngs))


def rerender(path) -> Path:
    """Re-evaluate targets and backend order and rewrite report.md, plots and CSV from DIR/results.json."""
    out = Path(path)
    doc = json.loads((out / "results.json").read_text())
    doc["targets"] = evaluate_targets(doc["rows"], doc["device"], doc.get("quick", False), doc.get("suites"))
    doc["auto_order"] = auto_order(doc["rows"])
    doc.setdefault("loadavg_end", None)
    _write_data(doc, out)
    render(doc, out)
    return out


def _default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def _csv(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return "" if v is None else v


# ----------------------------------------------------------------------------------------- markdown
def _f(v, fmt="{:.3g}"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–" if v is None else str(v)
    return fmt.format(v)


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict, pngs: dict) -> str:
    env, rows = doc["environment"], doc["rows"]
    s = [f"# fastdiff bench: {doc['run_id']}", ""]
    if not doc.get("complete", True):
        s += ["**Incomplete run**: the run stopped before its last case; what it measured is below.", ""]
    s.append(_table(["", ""], [
        ["device", f"{env.get('device')}: **{env.get('device_name')}**"],
        ["CPU", f"{env.get('cpu_model')} ({env.get('cpu_count')} logical CPUs, torch uses "
                f"{env.get('torch_threads')} threads)"],
        ["GPU", env.get("gpu_model") or "none"],
        ["versions", f"fastdiff {env.get('fastdiff_version')} (git {env.get('fastdiff_git')}), torch "
                     f"{env.get('torch_version')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton_version')}, "
                     f"python {env.get('python')}"],
        ["backends", ", ".join(f"{k} {'available' if not v else 'unavailable'}" for k, v in
                               (env.get("backends") or {}).items())],
        ["peers", ", ".join(f"{k} {v or 'not installed'}" for k, v in (env.get("peers") or {}).items())],
        ["command", f"`{env.get('command')}`"],
        ["started", env.get("started")],
        ["duration", f"{doc['duration_s']:.0f} s" + (" (quick)" if doc.get("quick") else "")],
        ["load average (1/5/15 min)", f"start {_load(env.get('loadavg_start'))}, end {_load(doc.get('loadavg_end'))}"],
    ]))
    s += ["", "Times are medians over repeated calls after warm-up (spread = interquartile range / median; reps = "
          "timed samples, 1 for runs lasting minutes). `vs ref` is the reference's median time divided by the "
          "provider's (above 1 = faster than fastdiff's plain-torch reference `fastdiff[torch]`; in the `mlp loop` "
          "case, than the hand-written eager loop). Roofline fractions use the ceilings below, measured in this run.",
          ""]
    targets = doc.get("targets") or []
    if targets:
        s += ["## Targets", "", _table(["issue", "target", "required", "measured", "met", "detail"], [
            [t["issue"], t["target"], t["required"], t["measured"],
             {"yes": "**yes**", "no": "**NO**"}.get(t["met"], t["met"]), t["detail"]] for t in targets]), ""]
    if doc.get("ceilings"):
        s += ["## Ceilings", "", _table(["ceiling", "value", "how"], [
            [k, f"{c['value']:.4g} {c['unit']}", c["method"]] for k, c in doc["ceilings"].items()]), ""]
    for suite in doc["suites"]:
        rs = [r for r in rows if r["suite"] == suite]
        s += [f"## {suite}", ""]
        if not rs:
            s += ["No measurements (see the notes).", ""]
        else:
            s += _suite_md(suite, rs, doc)
        if suite in pngs:
            s += [f"![{suite}]({pngs[suite]})", ""]
        notes = [n for n in doc["notes"] if n["suite"] == suite]
        if notes:
            s += ["Not measured / notes:", ""]
            s += [f"- **{n['provider']}** ({n['kind']}): {n['note']}" for n in notes]
            s.append("")
    s += _order_md(doc.get("auto_order") or {})
    return "\n".join(s) + "\n"


def _order_md(order: dict) -> list[str]:
    entries = order.get("entries") or []
    if not entries:
        return []
    out = ["## Backend order", "", "Per case, the fastdiff backends from fastest to slowest (median times); "
           "results.json `auto_order` has the same data for setting backend=\"auto\"'s order.", ""]
    summ = order.get("summary") or {}
    if summ:
        out += [_table(["kernel op", "cases", "fastest (cases)", "cuda vs triton (cases won)", "cuda vs triton by d"], [
            [k, v["cases"], ", ".join(f"{b} {c}" for b, c in sorted(v["fastest"].items(), key=lambda t: -t[1])),
             ", ".join(f"{b} {c}" for b, c in v["cuda_vs_triton"].items()) or "–",
             "; ".join(f"d={d}: " + ", ".join(f"{b} {c}" for b, c in w.items()) for d, w in v["by_d"].items()) or "–"]
            for k, v in summ.items()]), ""]
    if not any(e.get("cuda_vs_triton") for e in entries):
        return out + ["Per case: `auto_order.entries` in results.json.", ""]
    out += [_table(["kernel op", "case", "order (median time)", "cuda vs triton"], [
        [e["kernel_op"], f"{e['suite']}: {e['case']}",
         " < ".join(f"{b} {_f(e['times_s'][b], '{:.3g}')} s" for b in e["ranking"]),
         (f"{e['cuda_vs_triton']['faster']} by {e['cuda_vs_triton']['ratio']:.2f}×" if e.get("cuda_vs_triton")
          else "–")] for e in entries]), ""]
    return out


def _load(v):
    return "/".join(f"{x:.2f}" for x in v) if v else "–"


def _tgt(r):
    return f" ({r['target']})" if r.get("target") else ""


def _sigma_eff(r):
    """'0.5 (8)': the timing σ and the median 1/Σw² of a posterior row ('dense' marks the dense regime)."""
    if r.get("sigma") is None:
        return "–"
    eff = "" if r.get("eff_points") is None else f" ({r['eff_points']:.3g})"
    return f"{r['sigma']:.3g}{eff}" + (" dense" if r.get("regime") == "dense" else "")


def _suite_md(suite, rs, doc):
    if suite == "posterior":
        from .posterior import SIGMA_ACC, TOL_D, TOL_L_ABS, TOL_L_REL
        head = ["d", "M", "N", "σ (1/Σw²)", "provider", "pairs/s", "spread", "reps", "roofline", "vs ref",
                "err_D (§7)", "err_L", "err_D / σ", "§7 accurate"]
        body = [[r["d"], r["M"], f"{r['N']}{_tgt(r)}", _sigma_eff(r), r["provider"], fmt_si(r["throughput"]),
                 _pct(r["spread"]),
                 r["reps"], f"{_pct(r['roofline_fraction'])} ({r['ceiling']})", _f(r["speedup_vs_ref"], "{:.2f}×"),
                 _f(r["err_D"], "{:.1e}"), _f(r["err_L"], "{:.1e}"), _f(r.get("err_D_sigma"), "{:.1e}"),
                 "–" if r["accurate"] is None else ("yes" if r["accurate"] else "**NO**")] for r in rs]
        return ["Timed at σ (the column): the main timing point σ = 0.5 on the size ladder and the target shapes, "
                "and a dense-regime case per d (σ = √d, marked dense) where a good fraction of the points share the "
                "posterior weight; 1/Σw² is the median effective number of points sharing it (a kernel that skips "
                "points of negligible weight is fast when it is small).", "",
                f"Accuracy (MATH.md §7): float32 at σ = {SIGMA_ACC:g} against a float64 brute force on the same inputs "
                "(data in clusters of 8 points ~σ apart, so several points share the weight), on the smallest shape "
                "of each d and on the target shapes; err_D = max |D − D64| / max|y| (≤ "
                f"{TOL_D:g}), err_L = max |L − L64| in nats (≤ {TOL_L_ABS:g} + {TOL_L_REL:g}·|L64| per query), "
                "err_D / σ = the same D error on the scale D moves on. A fast wrong answer is marked **NO**.",
                "", _table(head, body), ""]
    if suite == "step":
        head = ["M", "d", "provider", "GB/s", "spread", "of copy bandwidth", "vs ref"]
        body = [[r["M"], f"{r['d']}{_tgt(r)}", r["provider"], _f(r["throughput"]), _pct(r["spread"]),
                 _pct(r["roofline_fraction"]), _f(r["speedup_vs_ref"], "{:.2f}×")] for r in rs]
        return [_table(head, body), ""]
    if suite == "sample":
        head = ["denoiser / method", "n", "N", "steps", "provider", "samples/s", "spread", "reps", "roofline", "vs ref",
                "KL", "W2", "max |Δ| vs first"]
        body = [[r["op"] + _tgt(r), r["n_elems"], r["N"], r.get("steps"),
                 r["provider"] + (" (extrapolated†)" if str(r.get("note") or "").startswith("extrapolated") else ""),
                 fmt_si(r["throughput"]),
                 _pct(r["spread"]), r["reps"] or "–",
                 "–" if r["roofline_fraction"] is None else f"{_pct(r['roofline_fraction'])} ({r['ceiling']})",
                 _f(r["speedup_vs_ref"], "{:.2f}×"), _f(r["kl"], "{:.4f}"), _f(r["w2"], "{:.4f}"),
                 _f(r["max_abs_diff"], "{:.1e}")] for r in rs]
        return ["Within a case every sampler runs the same Karras grid from the same initial noise; KL to the "
                "true density (50×50 histogram) and W2 to exact draws; `exact draws (floor)` is what exact samples "
                "of the same size score. max |Δ| (ODE only): largest difference from the first ODE provider's "
                "samples. `mlp loop`: fd.sample with and without cuda_graph against a hand-written eager loop "
                "(`vs ref` is against that loop). † timed over the first steps of the grid and scaled to the whole "
                "run (the row's note in results.json says how). `pointcloud d=784` / `d=3072`: standard normal data "
                "in d dimensions (image sizes), no KL/W2 (2-D metrics); max |Δ| says the samplers agree.", "",
                _table(head, body), ""]
    if suite == "scaling":
        fits = doc.get("fits", [])
        out = []
        if fits:
            out += ["Fitted log–log slopes (time and peak memory against M·N for the N and M sweeps, against d "
                    "for the d sweep):", "",
                    _table(["sweep", "provider", "points", "time slope", "memory slope",
                            "peak / (4·M·N) at the largest"],
                           [[f["sweep"], f["provider"], f["points"], _f(f["time_slope"], "{:.2f}"),
                             _f(f["mem_slope"], "{:.2f}"), _f(f["mem_vs_MxN_at_largest"], "{:.3g}")] for f in fits]),
                    ""]
        head = ["sweep", "M", "N", "d", "provider", "time", "pairs/s", "peak memory", "peak / (4·M·N)"]
        body = [[r["op"].split()[-1], r["M"], r["N"], r["d"], r["provider"], _f(r["median_s"], "{:.3g} s"),
                 fmt_si(r["throughput"]), _bytes(r["peak_mem_bytes"]), _f(r["mem_vs_MxN"], "{:.3g}")] for r in rs]
        return out + [_table(head, body), ""]
    return []


def _bytes(b):
    if b is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b} B"


# ----------------------------------------------------------------------------------------- plots
def plots(rows, fits, out: Path, title: str = "") -> dict:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return {}
    made = {}
    for suite, fn in (("posterior", _plot_posterior), ("step", _plot_step), ("sample", _plot_sample),
                      ("scaling", _plot_scaling)):
        rs = [r for r in rows if r["suite"] == suite and r.get("median_s")]
        if suite == "sample":     # the target cases and the image-sized clouds (one size each): tables only
            rs = [r for r in rs if not r.get("target") and r.get("d") in (None, 2)]
        if suite == "posterior":  # the size ladder at the main timing point; the dense-regime cases: tables only
            rs = [r for r in rs if r.get("regime") != "dense"]
        if not rs:
            continue
        _STYLES.clear()
        try:
            fig = fn(plt, rs, fits)
            fig.suptitle(f"fastdiff bench {suite}: {title}", fontsize=9)
            fig.tight_layout(rect=(0, 0.1 if suite != "scaling" else 0.03, 1, 1))
            name = f"{suite}.png"
            fig.savefig(out / name, dpi=72)
            made[suite] = name
        except Exception as exc:     # a plot must never cost the report
            print(f"fastdiff bench: the {suite} plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            plt.close("all")
    return made


def _grid(plt, n, w=3.4, h=2.6):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows + 0.9), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def _style(i):
    return dict(color=f"C{i % 10}", marker="osv^D<>p*hx"[i % 11], linestyle="-", markersize=4, linewidth=1.2)


_STYLES: dict = {}


def _lines(ax, rs, x, y, label_of=lambda p, rs: p):
    """One line per provider; a provider keeps its colour and marker across the panels of a figure."""
    provs = list(dict.fromkeys(r["provider"] for r in rs))
    for p in provs:
        i = _STYLES.setdefault(p, len(_STYLES))
        pr = sorted((r for r in rs if r["provider"] == p), key=lambda r: r[x])
        ax.plot([r[x] for r in pr], [r[y] for r in pr], label=label_of(p, pr), **_style(i))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    _ticks(ax, sorted({r[x] for r in rs}))


def _ticks(ax, xs):
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    if 0 < len(xs) <= 9:
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.set_xticklabels([str(int(v)) if float(v).is_integer() and v < 1e5 else fmt_si(v) for v in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        if len(xs) == 1:
            ax.set_xlim(xs[0] / 2, xs[0] * 2)
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(labelsize=7)


def _legend(fig, axes, ncol=3):
    """One legend for the figure (labels in first-seen order), below the panels."""
    seen = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncol, fontsize=7, frameon=False)


def _plot_posterior(plt, rs, fits):
    ds = sorted({r["d"] for r in rs})
    fig, axes = _grid(plt, len(ds))
    for ax, d in zip(axes, ds, strict=False):   # spare panels of the grid stay empty
        sub = [r for r in rs if r["d"] == d]
        _lines(ax, sub, "n_elems", "throughput",
               lambda p, pr: p + (" (inaccurate)" if any(r["accurate"] is False for r in pr) else ""))
        roof = sorted({(r["n_elems"], r["ceiling_throughput"]) for r in sub if r["ceiling_throughput"]})
        if roof:
            ax.plot([a for a, _ in roof], [b for _, b in roof], "k--", linewidth=0.8, label="roofline bound")
        ax.set_title(f"d = {d}", fontsize=9)
        ax.set_xlabel("M·N pairs", fontsize=8)
        ax.set_ylabel("pairs/s", fontsize=8)
    _legend(fig, axes)
    return fig


def _plot_step(plt, rs, fits):
    ds = sorted({r["d"] for r in rs})
    fig, axes = _grid(plt, len(ds))
    for ax, d in zip(axes, ds, strict=False):   # spare panels of the grid stay empty
        sub = [r for r in rs if r["d"] == d]
        _lines(ax, sub, "n_elems", "throughput")
        ceil = next((r["ceiling_throughput"] for r in sub if r["ceiling_throughput"]), None)
        if ceil:
            ax.axhline(ceil, color="k", linestyle="--", linewidth=0.8, label="copy bandwidth")
        ax.set_title(f"affine step, d = {d}", fontsize=9)
        ax.set_xlabel("elements per tensor (M·d)", fontsize=8)
        ax.set_ylabel("GB/s", fontsize=8)
    _legend(fig, axes)
    return fig


def _plot_sample(plt, rs, fits):
    ops = list(dict.fromkeys(r["op"] for r in rs))
    fig, axes = _grid(plt, len(ops))
    for ax, op in zip(axes, ops, strict=False):   # spare panels of the grid stay empty
        _lines(ax, [r for r in rs if r["op"] == op], "n_elems", "throughput")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("samples per run", fontsize=8)
        ax.set_ylabel("samples/s", fontsize=8)
    _legend(fig, axes, ncol=2)
    return fig


def _slope_label(fit, sweep, key):
    """Labels each provider's line with its fitted slope `key` on this sweep."""
    return lambda p, pr: f"{p} (slope {_f(fit.get((sweep, p), {}).get(key), '{:.2f}')})"


def _plot_scaling(plt, rs, fits):
    axes_names = [a for a in ("N", "M", "d") if any(r["op"] == f"sweep {a}" for r in rs)]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(3.4 * len(axes_names), 5.6), squeeze=False)
    fit = {(f["sweep"], f["provider"]): f for f in fits}
    for j, a in enumerate(axes_names):
        sub = [r for r in rs if r["op"] == f"sweep {a}"]
        fixed = {k: sub[0][k] for k in ("M", "N", "d") if k != a} if sub else {}
        for i, (y, ylabel) in enumerate((("median_s", "seconds"), ("peak_mem_bytes", "peak memory (bytes)"))):
            ax = axes[i][j]
            key = "time_slope" if y == "median_s" else "mem_slope"
            use = [r for r in sub if r.get(y)]
            _lines(ax, use, a, y, _slope_label(fit, a, key))
            if y == "peak_mem_bytes" and use and a != "d":
                xs = sorted({r[a] for r in use})
                ax.plot(xs, [4 * r_mn(a, x, fixed) for x in xs], "k:", linewidth=0.8, label="fp32 M×N matrix")
            ax.set_xlabel(a + " (" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.legend(fontsize=6)
    fig.text(0.5, 0.005, "slopes: least-squares fit of log time / log peak memory against log M·N (N, M sweeps) "
             "or log d", ha="center", fontsize=7)
    return fig


def r_mn(axis, x, fixed):
    M = x if axis == "M" else fixed["M"]
    N = x if axis == "N" else fixed["N"]
    return M * N


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m fastdiff.bench.report DIR [DIR ...]\n\nWrites report.md, results.csv and the plots "
              "of each run folder again from its results.json.", file=sys.stderr if len(sys.argv) < 2 else sys.stdout)
        sys.exit(2 if len(sys.argv) < 2 else 0)
    for d in sys.argv[1:]:
        print(rerender(d) / "report.md")
