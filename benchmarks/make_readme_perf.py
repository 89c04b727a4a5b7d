#!/usr/bin/env python
"""Generate the README's performance section from the committed benchmark results, and nothing else.

    python benchmarks/make_readme_perf.py                      # markdown on stdout
    python benchmarks/make_readme_perf.py --out perf.md        # ... into a file
    python benchmarks/make_readme_perf.py --readme README.md   # replace the text between
                                                               # <!-- perf:start --> and <!-- perf:end -->

Reads benchmarks/results/<run>/results.json (written by `fastdiff bench`). Runs are grouped by device
(GPU runs may be split into one run per suite, e.g. by benchmarks/run_gpu.sh); for each device and suite
the latest full run that has the suite is used (quick runs are left out unless --include-quick). Per
device: the targets table (target, required, measured, met), then one table per suite, naming the device,
the run folders and the versions. Every number comes from those files. Standard library only.

CPU runs are grouped by thread count too (the device name says "(2 threads)"). When posterior runs of the same
CPU model exist on several thread counts (e.g. `fastdiff bench posterior --threads 1` and `--threads 2`, each
into its own folder), the group with the most threads gets a thread-scaling table after its posterior table:
fastdiff[cpu] on the fewest and the most threads, SDPA and torch.compile(naive) beside it. With one thread
count the section is as before.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
REF = "fastdiff[torch]"


def _subset(env: dict) -> str:
    """How a run picked a subset of its suites' cases ("" for a full run): --only TEXT, or --targets-only. Such a
    run adds its cases to the suite's full run (or stands in for one) instead of replacing it."""
    if env.get("only"):
        return f"the cases of --only {' '.join(env['only'])}"
    return "the target cases, --targets-only" if env.get("targets_only") else ""


def load_runs(results: Path, include_quick: bool = False) -> list[dict]:
    """One group per (device type, device name, quick): {"device", "quick", "env", "suites": {suite: run doc},
    "runs": [docs used]}, GPU groups first."""
    runs = []
    for f in sorted(results.glob("*/results.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or str(doc.get("schema", "")).split("/")[0] != "fastdiff-bench":
            continue
        if doc.get("quick") and not include_quick:
            continue
        doc["_dir"] = f.parent
        runs.append(doc)
    groups = {}
    for doc in sorted(runs, key=lambda d: d["environment"].get("started", "")):
        env = doc["environment"]
        key = (doc["device"], env.get("device_name"), bool(doc.get("quick")))
        g = groups.setdefault(key, {"device": doc["device"], "quick": bool(doc.get("quick")), "suites": {}})
        for suite in doc.get("suites", []):
            if any(r["suite"] == suite for r in doc.get("rows", [])):
                if _subset(env):                  # a run of a few cases (--only) adds them to the suite's run
                    g.setdefault("extra", {}).setdefault(suite, []).append(doc)
                else:
                    g["suites"][suite] = doc      # later runs replace earlier ones, suite by suite
    out = []
    for g in groups.values():
        extra = g.setdefault("extra", {})
        for suite, docs in extra.items():         # --only runs after the suite's run, or in place of one
            base = g["suites"].get(suite)
            started = base["environment"].get("started", "") if base else ""
            kept = [d for d in docs if d["environment"].get("started", "") >= started]
            extra[suite] = kept[1:] if base is None else kept
            if base is None and kept:
                g["suites"][suite] = kept[0]
        if not g["suites"]:
            continue
        g["runs"] = list({id(d): d for d in list(g["suites"].values()) + [d for ds in extra.values() for d in ds]}
                         .values())
        g["env"] = max(g["runs"], key=lambda d: d["environment"].get("started", ""))["environment"]
        out.append(g)
    return sorted(out, key=lambda g: (g["device"] != "cuda", g["quick"], g["env"].get("device_name") or ""))


def merged_targets(group) -> list[dict]:
    """Each target from the latest run of the group that measured it (else the latest that lists it)."""
    best = {}
    for doc in sorted(group["runs"], key=lambda d: d["environment"].get("started", "")):
        for t in doc.get("targets") or []:
            old = best.get(t["id"])
            if old is None or t.get("met") != "not measured" or old.get("met") == "not measured":
                best[t["id"]] = dict(t, run=doc["_dir"].name)
    return list(best.values())


# ----------------------------------------------------------------------------------------- formatting
def si(x, unit=""):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    for p, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= s:
            return f"{x / s:.3g} {p}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def num(x, fmt="{:.3g}"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def providers_in(rows, prefer=()):
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fd = [n for n in names if n.startswith("fastdiff")]
    others = [n for n in names if not n.startswith("fastdiff")]
    return fd + others


# ----------------------------------------------------------------------------------------- suites
def _dense(r) -> bool:
    return r.get("regime") == "dense"


def headline_cases(rows) -> list[tuple]:
    """The posterior cases the README shows, as (d, case, label): per d the largest ladder shape at the main timing
    point, then the dense-regime case of each d (runs from before the regimes have none), then every target shape."""
    rows = [r for r in rows if r.get("median_s")]
    main: dict[int, dict] = {}
    dense: dict[int, dict] = {}
    for r in rows:
        if r.get("target"):
            continue
        pick = dense if _dense(r) else main
        if r["d"] not in pick or r["n_elems"] > pick[r["d"]]["n_elems"]:
            pick[r["d"]] = r
    out = [(d, r["case"], f"{r['M']}×{r['N']}") for d, r in sorted(main.items())]
    out += [(d, r["case"], f"{r['M']}×{r['N']} (dense, σ = {r['sigma']:.3g})") for d, r in sorted(dense.items())]
    out += list(dict.fromkeys((r["d"], r["case"], f"{r['M']}×{r['N']} (target, {r['target']})")
                              for r in rows if r.get("target")))
    return out


def _shared(r) -> str:
    """How many data points share the posterior weight in this case (median 1/Σw²), out of N."""
    eff = r.get("eff_points")
    return "–" if eff is None else f"{eff:.3g} of {r['N']}"


def posterior_md(rows, doc):
    rows = [r for r in rows if r.get("median_s")]
    if not rows:
        return []
    provs = providers_in(rows)
    with_eff = any(r.get("eff_points") is not None for r in rows)    # runs from before the column: no column
    body = []
    for d, case, label in headline_cases(rows):
        big = {r["provider"]: r for r in rows if (r["d"], r["case"]) == (d, case)}
        cells = []
        for p in provs:
            r = big.get(p)
            if r is None:
                cells.append("–")
                continue
            c = si(r["throughput"])
            if r.get("speedup_vs_ref") and p != REF:
                c += f" ({r['speedup_vs_ref']:.2g}×)"
            if r.get("accurate") is False:
                c += " ✗"
            cells.append(c)
        fd = [r for p, r in big.items() if p.startswith("fastdiff") and r.get("roofline_fraction") is not None]
        best = max(fd, key=lambda r: r["throughput"], default=None)
        roof = f"{100 * best['roofline_fraction']:.0f}% of {best['ceiling']} ({best['provider']})" if best else "–"
        shared = [_shared(next(iter(big.values())))] if with_eff else []
        body.append([d, label] + shared + cells + [roof])
    regimes = (" Timed at σ = 0.5 (the main timing point: at large d one cluster of near-duplicate points holds the "
               "posterior weight) and, per d, in the dense regime (σ = √d: about half the points share the weight, "
               "none is negligible, so a kernel that skips negligible points gains nothing there); `1/Σw²` is the "
               "median effective number of points sharing the weight.") if with_eff else ""
    return ["**posterior** — the point-cloud reduction, pairs/s (M·N / time) at the largest measured size per d "
            f"and at the target shapes; (×) = speedup over `{REF}`; ✗ = fails MATH.md §7's float32 accuracy "
            "contract at σ = 1e-3 against a float64 brute force (a fast wrong answer)." + regimes, "",
            table(["d", "M×N"] + (["1/Σw²"] if with_eff else []) + [f"`{p}`" for p in provs]
                  + ["fastdiff roofline"], body), ""]


FD_CPU, SDPA, COMPILED = "fastdiff[cpu]", "sdpa", "torch.compile(naive)"


def _threads(doc) -> int | None:
    t = doc["environment"].get("torch_threads")
    if t is None:
        t = next((r.get("threads") for r in doc.get("rows", []) if r.get("threads")), None)
    return None if t is None else int(t)


def thread_partners(groups) -> dict:
    """{id(group): posterior run with fewer threads} for each CPU group whose posterior run has the most threads
    among the groups of the same CPU model, ISA (cpu_isa: AMX, AVX-512, AVX2; runs before it was recorded have
    none) and quick flag that have one; nothing when there is one thread count."""
    by_model: dict[tuple, list[tuple[int, dict, dict]]] = {}
    for g in groups:
        doc = g["suites"].get("posterior")
        threads = None if g["device"] != "cpu" or doc is None else _threads(doc)
        if threads is not None:
            env = doc["environment"]
            by_model.setdefault((env.get("cpu_model"), env.get("cpu_isa"), g["quick"]), []).append((threads, g, doc))
    out = {}
    for runs in by_model.values():
        hi_threads, hi_group, _ = max(runs, key=lambda t: t[0])
        lo_threads, _, lo_doc = min(runs, key=lambda t: t[0])
        if lo_threads < hi_threads:
            out[id(hi_group)] = lo_doc
    return out


def _ms(r) -> str:
    return "–" if r is None else f"{r['median_s'] * 1e3:.3g} ms"


def _x(slow, fast) -> str:
    return "–" if slow is None or fast is None else f"{slow['median_s'] / fast['median_s']:.2g}×"


def thread_scaling_md(lo_doc, hi_doc) -> list[str]:
    """`fastdiff[cpu]` posterior times on few and many threads side by side at the README's cases, with SDPA and
    torch.compile(naive) on the many threads and fastdiff's ratio over each; [] when nothing matches."""
    t_lo, t_hi = _threads(lo_doc), _threads(hi_doc)

    def index(doc):
        return {(r["d"], r["case"], r["provider"]): r for r in doc["rows"]
                if r["suite"] == "posterior" and r.get("median_s")}
    lo, hi = index(lo_doc), index(hi_doc)
    hi_rows = [r for r in hi_doc["rows"] if r["suite"] == "posterior"]
    body = []
    for d, case, label in headline_cases(hi_rows):
        f_lo, f_hi = lo.get((d, case, FD_CPU)), hi.get((d, case, FD_CPU))
        if f_lo is None or f_hi is None:
            continue
        sdpa, comp = hi.get((d, case, SDPA)), hi.get((d, case, COMPILED))
        body.append([d, label, _ms(f_lo), _ms(f_hi), _x(f_lo, f_hi), _ms(sdpa), _ms(comp), _x(sdpa, f_hi),
                     _x(comp, f_hi)])
    if not body:
        return []
    return [f"**posterior thread scaling** — `{FD_CPU}` median times on {t_lo} and {t_hi} thread(s) (runs "
            f"`{lo_doc['_dir'].name}` and `{hi_doc['_dir'].name}`), scaling = {t_lo}-thread time / {t_hi}-thread "
            f"time; `{SDPA}` and `{COMPILED}` on {t_hi} thread(s) in the same run, and `{FD_CPU}`'s speedup over "
            "each.", "",
            table(["d", "M×N", f"`{FD_CPU}` {t_lo}t", f"{t_hi}t", "scaling", f"`{SDPA}` {t_hi}t",
                   f"`{COMPILED}` {t_hi}t", f"vs `{SDPA}`", f"vs `{COMPILED}`"], body), ""]


def step_md(rows, doc):
    rows = [r for r in rows if r.get("median_s")]
    if not rows:
        return []
    provs = providers_in(rows)
    body = []
    for d in sorted({r["d"] for r in rows}):
        sub = [r for r in rows if r["d"] == d]
        top = max(r["n_elems"] for r in sub)
        big = {r["provider"]: r for r in sub if r["n_elems"] == top}
        cells = []
        for p in provs:
            r = big.get(p)
            percent = "–" if r is None else num(100 * (r["roofline_fraction"] or 0), "{:.0f}")
            cells.append("–" if r is None else f"{num(r['throughput'])} ({percent}%)")
        body.append([d, next(iter(big.values()))["M"]] + cells)
    return ["**step** — the affine update x ← A x + B D + C z with noise, GB/s of compulsory traffic (read x, D; "
            "write x) at the largest size per d, (% of the measured copy bandwidth).", "",
            table(["d", "M"] + [f"`{p}`" for p in provs], body), ""]


def _extrapolated(r) -> bool:
    return str(r.get("note") or "").startswith("extrapolated")


def sample_md(rows, doc):
    if not rows:
        return []
    body = []
    for op, N, steps in dict.fromkeys((r["op"], r["N"], r.get("steps")) for r in rows):
        sub = [r for r in rows if (r["op"], r["N"], r.get("steps")) == (op, N, steps)]
        top = max(r["n_elems"] for r in sub)
        target = next((r["target"] for r in sub if r.get("target")), None)
        big = sorted((r for r in sub if r["n_elems"] == top),
                     key=lambda r: (r["median_s"] is None, -(r["throughput"] or 0)))
        for r in big:
            rate = "–" if r["median_s"] is None else f"{si(r['throughput'])}/s"
            vs = "–" if r.get("speedup_vs_ref") is None else f"{r['speedup_vs_ref']:.2f}×"
            body.append([op + (f" (target, {target})" if target else ""), top, N, steps if steps is not None else "–",
                         f"`{r['provider']}`" + (" (extrapolated†)" if _extrapolated(r) else ""), rate, vs,
                         num(r["kl"], "{:.3f}"), num(r["w2"], "{:.3f}")])
    return ["**sample** — end to end, the same denoiser, grid, step count and initial noise for every sampler, "
            f"at the largest n of each setting: samples/s, speedup over `{REF}` (in the `mlp loop` case over the "
            "hand-written eager loop), KL to the true density and W2 to exact draws (`exact draws (floor)`: what "
            "exact samples of the same size score). † timed over the first steps of the grid and scaled to the "
            "whole run.", "",
            table(["denoiser / method", "n", "N data", "steps", "sampler", "samples/s", "vs ref", "KL", "W2"], body),
            ""]


def scaling_md(rows, doc):
    fits = doc.get("fits") or []
    if not fits:
        return []
    body = [[f["sweep"], f"`{f['provider']}`", num(f["time_slope"], "{:.2f}"), num(f["mem_slope"], "{:.2f}"),
             num(f["mem_vs_MxN_at_largest"], "{:.3g}")] for f in fits]
    return ["**scaling** — fitted log–log slopes of time and peak memory against M·N (N and M sweeps) or d; "
            "peak / (4·M·N) is peak memory over the size of one fp32 M×N matrix at the largest point.", "",
            table(["sweep", "provider", "time slope", "memory slope", "peak / (4·M·N)"], body), ""]


SUITE_MD = {"posterior": posterior_md, "step": step_md, "sample": sample_md, "scaling": scaling_md}


def targets_md(group) -> list[str]:
    ts = merged_targets(group)
    if not ts:
        return []
    body = [[f"#{t['issue']}", t["target"], t["required"], t["measured"],
             {"yes": "**yes**", "no": "**no**"}.get(t["met"], t["met"]), t.get("detail", "")] for t in ts]
    return ["**targets** — each benchmark target of the issues, measured in the runs below (`detail` names what "
            "was compared).", "", table(["issue", "target", "required", "measured", "met", "detail"], body), ""]


def group_md(group, root: Path, fewer_threads: dict | None = None) -> str:
    """fewer_threads: the posterior run of the same CPU with fewer threads (thread_partners), or None."""
    env = group["env"]
    lines = [f"### {'GPU' if group['device'] == 'cuda' else 'CPU'}: {env.get('device_name')}"
             + (" (quick run)" if group["quick"] else ""), ""]
    for doc in group["runs"]:
        e = doc["environment"]
        rel = doc["_dir"].resolve()
        try:
            rel = rel.relative_to(root.resolve())
        except ValueError:
            pass
        c = doc.get("ceilings") or {}
        ceil = ", ".join(f"{k} {v['value']:.3g} {v['unit']}" for k, v in c.items())
        load = e.get("loadavg_start")
        suites = [s for s, d in group["suites"].items() if d is doc]
        suites += [f"{s} ({_subset(doc['environment'])})" for s, ds in group["extra"].items()
                   if any(d is doc for d in ds)]
        lines.append(f"- {', '.join(suites)}: run [`{rel}`]({rel}/report.md), {e.get('started', '')[:10]}: fastdiff "
                     f"{e.get('fastdiff_version')} (git {e.get('fastdiff_git')}), torch {e.get('torch_version')}, "
                     f"triton {e.get('triton_version')}; `{e.get('command')}`. Ceilings measured in the run: {ceil}."
                     + (f" Load average at the start: {load[0]:.2f}." if load else "")
                     + ("" if doc.get("complete", True) else " (incomplete run)"))
    lines.append("")
    body = targets_md(group)
    for suite in ("posterior", "step", "sample", "scaling"):
        doc = group["suites"].get(suite)
        fn = SUITE_MD.get(suite)
        if doc is not None and fn:
            rows = [r for r in doc["rows"] if r["suite"] == suite]
            for more in group["extra"].get(suite, []):   # cases an --only run measured (newer: it replaces)
                added = [r for r in more["rows"] if r["suite"] == suite]
                cases = {r["case"] for r in added}
                rows = [r for r in rows if r["case"] not in cases] + added
            body += fn(rows, doc)
        if suite == "posterior" and doc is not None and fewer_threads is not None:
            body += thread_scaling_md(fewer_threads, doc)
    return "\n".join(lines + body)


def generate(results: Path = RESULTS, include_quick: bool = False, root: Path | None = None) -> str:
    root = root or results.parent.parent
    groups = load_runs(results, include_quick)
    if not groups:
        return ("No benchmark results are committed yet (`benchmarks/results/` is empty): no performance numbers "
                "are reported.\n")
    intro = ("Generated by `benchmarks/make_readme_perf.py` from the runs committed under `benchmarks/results/` "
             "(per device and suite, the latest); each run folder has the full tables (`report.md`), plots, "
             "`results.csv` and `results.json`. Reproduce with `fastdiff bench --out DIR` (add `--device cuda` "
             "on a GPU; `bash benchmarks/run_cpu.sh` and `bash benchmarks/run_gpu.sh` make the committed runs).\n")
    if not any(g["device"] == "cuda" for g in groups):
        intro += ("\n**No GPU run is committed yet**: no GPU machine has been available, so no GPU numbers are "
                  "reported (the GPU targets of the Triton and CUDA kernels are not yet measured). Only the CPU "
                  "results below were measured.\n")
    partners = thread_partners(groups)
    return intro + "\n" + "\n".join(group_md(g, root, partners.get(id(g))) for g in groups)


def replace_between_markers(text: str, section: str) -> str:
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"the README has no {START} ... {END} block to replace")
    a = text.index(START) + len(START)
    b = text.index(END)
    return text[:a] + "\n" + section.rstrip("\n") + "\n" + text[b:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of run folders (default benchmarks/results)")
    p.add_argument("--out", default=None, help="write the markdown here instead of stdout")
    p.add_argument("--readme", default=None, help=f"rewrite the text between {START} and {END} in this file")
    p.add_argument("--include-quick", action="store_true", help="also report --quick runs")
    args = p.parse_args(argv)
    results = Path(args.results)
    root = Path(args.readme).resolve().parent if args.readme else results.resolve().parent.parent
    section = generate(results, args.include_quick, root)
    if args.readme:
        path = Path(args.readme)
        try:
            path.write_text(replace_between_markers(path.read_text(), section))
        except ValueError as exc:
            print(f"make_readme_perf: error: {exc}", file=sys.stderr)
            return 2
        print(f"rewrote the performance section of {path}", file=sys.stderr)
    elif args.out:
        Path(args.out).write_text(section)
    else:
        sys.stdout.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
