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
                g["suites"][suite] = doc          # later runs replace earlier ones, suite by suite
    out = []
    for g in groups.values():
        if not g["suites"]:
            continue
        g["runs"] = list({id(d): d for d in g["suites"].values()}.values())
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
def posterior_md(rows, doc):
    rows = [r for r in rows if r.get("median_s")]
    if not rows:
        return []
    provs = providers_in(rows)
    shapes = []       # per d the largest ladder shape, then every target shape
    for d in sorted({r["d"] for r in rows}):
        ladder = [r for r in rows if r["d"] == d and not r.get("target")]
        if ladder:
            top = max(ladder, key=lambda r: r["n_elems"])
            shapes.append((d, top["M"], top["N"], None))
    shapes += list(dict.fromkeys((r["d"], r["M"], r["N"], r["target"]) for r in rows if r.get("target")))
    body = []
    for d, M, N, target in shapes:
        big = {r["provider"]: r for r in rows if (r["d"], r["M"], r["N"]) == (d, M, N)}
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
        body.append([d, f"{M}×{N}" + (f" (target, {target})" if target else "")] + cells + [roof])
    return ["**posterior** — the point-cloud reduction, pairs/s (M·N / time) at the largest measured size per d "
            f"and at the target shapes; (×) = speedup over `{REF}`; ✗ = fails MATH.md §7's float32 accuracy "
            "contract at σ = 1e-3 against a float64 brute force (a fast wrong answer).", "",
            table(["d", "M×N"] + [f"`{p}`" for p in provs] + ["fastdiff roofline"], body), ""]


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


def group_md(group, root: Path) -> str:
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
            body += fn([r for r in doc["rows"] if r["suite"] == suite], doc)
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
    return intro + "\n" + "\n".join(group_md(g, root) for g in groups)


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
