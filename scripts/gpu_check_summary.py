"""summary.txt of scripts/gpu_check.sh: one screen from what the run has written into OUT so far.

    python scripts/gpu_check_summary.py OUT      (called by gpu_check.sh whenever a phase starts or ends)

Environment (set by gpu_check.sh): GC_TABLE, one line per phase "name|status|seconds|detail"; GC_ELAPSED and
GC_TOTAL (seconds); GC_DRY ("1" for --dry-run); GC_INTERRUPTED (INT or TERM, or empty); GC_ROOT (the checkout,
for the commit). Reads env.txt, triton.xml / cuda.xml (junit), phases.log (the pytest -v lines: counts for a
phase killed before it wrote its junit file, and how many tests were selected), bench/results.json and
distributed/results.json.
Standard library only, so it runs in a fraction of a second, also where torch is broken. Writes
OUT/summary.txt atomically (a kill never leaves half a summary).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

WIDTH = 160                 # one line of a terminal, at most
MAX_FAILED = 8              # failed test ids listed (the rest are counted)
FILES = ("env.txt", "build.log", "phases.log", "triton.xml", "cuda.xml", "bench/results.json",
         "distributed/results.json")
LOG = "phases.log"          # the output of the phases after the build, each after '=== gpu_check phase NAME: ...'


def _git(root: str, *args) -> str:
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _env_line(out: str, key: str):
    try:
        with open(os.path.join(out, "env.txt"), errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line[len(key):].strip()
    except OSError:
        pass
    return None


def junit(path: str):
    """(passed, failed, errors, skipped, [failed or erroring test ids]) of a junit file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    passed = failed = errors = skipped = 0
    bad = []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        if "error" in tags or "failure" in tags:
            errors += "error" in tags
            failed += "error" not in tags
            bad.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    return passed, failed, errors, skipped, bad


_COLLECTED = (re.compile(r"collected (\d+) items?(?: / (\d+) deselected)?"),   # collected 58 items / 51 deselected
              re.compile(r"\d+ workers \[(\d+) items?\]()"))                    # pytest-xdist: 8 workers [55 items]
_RESULT = (re.compile(r"(?P<test>\S+::\S+) (?P<word>PASSED|FAILED|ERROR|SKIPPED)\b"),           # tests/x.py::t PASSED
           re.compile(r"\[gw\d+\] \[ *\d+%\] (?P<word>PASSED|FAILED|ERROR|SKIPPED) (?P<test>\S+::\S+)"))  # xdist


def log_counts(path: str, phase: str):
    """From phases.log, the part of one phase (after its '=== gpu_check phase NAME' line): ({PASSED, FAILED, ERROR,
    SKIPPED: count}, [failed or erroring test ids], tests selected or None), or None without the file."""
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}
    bad, inside, selected = [], False, None
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("=== gpu_check phase "):
                    inside = line.split()[3].rstrip(":") == phase        # === gpu_check phase NAME: pytest ...
                    continue
                if not inside:
                    continue
                for pattern in _COLLECTED:
                    m = pattern.search(line)
                    if m:
                        selected = int(m.group(1)) - int(m.group(2) or 0)
                        break
                for pattern in _RESULT:
                    m = pattern.match(line)
                    if m:
                        counts[m["word"]] += 1
                        if m["word"] in ("FAILED", "ERROR"):
                            bad.append(m["test"])
                        break
    except OSError:
        return None
    return counts, bad, selected


def _test_phase_result(out: str, name: str, detail: str):
    """The result column of a pytest phase, and its failed test ids."""
    logged = log_counts(os.path.join(out, LOG), name)
    of = f" of {logged[2]}" if logged is not None and logged[2] is not None else ""
    tail = f"; {detail}" if detail else ""
    j = junit(os.path.join(out, f"{name}.xml"))
    if j is not None:
        p, f, e, s, bad = j
        return f"{p} passed, {f} failed, {e} errors, {s} skipped{of} ({name}.xml){tail}", bad
    if logged is not None and sum(logged[0].values()):
        c, bad, _ = logged
        return (f"so far: {c['PASSED']} passed, {c['FAILED']} failed, {c['ERROR']} errors, {c['SKIPPED']} skipped"
                f"{of} ({LOG}){tail}"), bad
    return detail, []


def measured_order(doc: dict):
    """(per-op lines of cases won, the AUTO_ORDER line) from a results document's auto_order summary: the
    device's compiled backends by the number of measured cases each was fastest in, torch last (it accepts
    every input, so it must stay the fallback at the end of the order)."""
    summary = (doc.get("auto_order") or {}).get("summary") or {}
    lines, wins = [], {}
    for op, s in summary.items():
        fastest = sorted(s.get("fastest", {}).items(), key=lambda kv: -kv[1])
        lines.append(f"  fastest first, {op}: " + ", ".join(f"{b} {n}" for b, n in fastest) + " (cases won)")
        for b, n in fastest:
            wins[b] = wins.get(b, 0) + n
    if not wins:
        return lines, None
    device = doc.get("device", "cuda")
    known = ("cuda", "triton") if device == "cuda" else ("cpu",)
    order = [b for b in sorted(wins, key=lambda b: -wins[b]) if b in known]
    order += [b for b in known if b not in order] + ["torch"]
    return lines, f"  measured order: AUTO_ORDER[\"{device}\"] = {tuple(order)!r} (fastdiff/_backend.py)"


def _bench_lines(out: str) -> list[str]:
    try:
        with open(os.path.join(out, "bench", "results.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    reps = "reduced repetitions" if doc.get("environment", {}).get("brief") else "full repetitions"
    lines = ["", f"targets ({doc.get('device')}, {reps}, {len(doc.get('rows', []))} measurements"
                 f"{', complete' if doc.get('complete') else ', cut short'}; bench/results.json):"]
    targets = doc.get("targets", [])
    for t in targets:                      # the measured ones a line each; the rest folded (one screen)
        if t["met"] != "not measured":
            lines.append(f"  {t['met']:<12} {t['id']:<28} {str(t['measured'])[:24]:<24} required {t['required']}")
    missing = [t["id"] for t in targets if t["met"] == "not measured"]
    if missing:
        lines.append(f"  not measured: {len(missing)} target(s): {', '.join(missing[:3])}"
                     + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    per_op, order = measured_order(doc)
    lines += per_op + ([order] if order else [])
    errors = [n for n in doc.get("notes", []) if n.get("kind") == "error"]
    if errors:
        lines.append(f"  bench errors ({len(errors)}): "
                     + "; ".join(f"{n['provider']}: {n['note']}" for n in errors[:2]))
    return lines


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f} ms" if ms >= 1 else f"{ms:.3g} ms"


def _distributed_lines(out: str) -> list[str]:
    """A few lines from distributed/results.json: the device, each rank count's steps, each streamed case, notes
    and errors (the tables: `python -m fastdiff.bench.distributed --report DIR`)."""
    try:
        with open(os.path.join(out, "distributed", "results.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return []
    env = doc.get("environment", {})
    device = doc.get("device", "cpu")
    where = env.get("gpu_model") if device == "cuda" else f"{env.get('cpu_model')}"
    state = "interrupted" if doc.get("interrupted") else "complete" if doc.get("complete") else "cut short"
    lines = ["", f"distributed ({device}: {where}; {state}; distributed/results.json):"]
    by_ranks: dict = {}
    for r in doc.get("distributed", []):
        if r.get("scaling") == "strong":
            by_ranks.setdefault(r["ranks"], []).append(
                f"{r['shape']} N={r['N']:,} step {_ms(r['step_s'])} (merge {100 * r['merge_fraction']:.0f} %)")
    for k, cells in by_ranks.items():
        lines.append(f"  sharded, {k} rank{'s' if k != 1 else ''}: " + "; ".join(cells))
    cells = []
    for r in doc.get("streaming", []):
        gpu = f", GPU {r['peak_gpu_mb']:.0f} MB" if r.get("peak_gpu_mb") is not None else ""
        cells.append(f"{r['case']} {r['s_per_call']:.3g} s (RSS {r['peak_rss_mb']:.0f} MB{gpu})")
    if cells:
        lines.append("  streamed: " + "; ".join(cells))
    for n in doc.get("notes", [])[:2]:
        lines.append(f"  note: {n}")
    errors = doc.get("errors", [])
    if errors:
        lines.append(f"  distributed errors ({len(errors)}): " + "; ".join(e[:100] for e in errors[:2]))
    return lines


def summarize(out: str, table: list[tuple[str, str, str, str]], elapsed: int, total: int, dry: bool,
              interrupted: str = "", root: str = ".") -> list[str]:
    """The summary's lines; table: (phase, status, seconds, detail) per phase, in order."""
    mode = "DRY RUN (no CUDA: skips, tiny sizes)" if dry else "GPU run"
    commit = _git(root, "rev-parse", "--short", "HEAD") or "?"
    dirty = "+dirty" if _git(root, "status", "--porcelain", "--untracked-files=no") else ""
    lines = [f"fastdiff GPU check, {mode}: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, git {commit}{dirty}"]
    for key in ("device:", "versions:"):
        value = _env_line(out, key)
        if value:
            lines.append(f"  {key} {value}")
    if interrupted:
        state = f"INTERRUPTED by SIG{interrupted}"
    elif any(status in ("running", "pending") for _, status, _, _ in table):
        state = "running (this file is rewritten as the phases end)"
    else:
        state = "finished"
    lines += [f"  {state}; {elapsed} s of the {total} s budget", "",
              f"{'phase':<11} {'status':<11} {'time':>6}  result"]
    failed = []
    for name, status, secs, detail in table:
        result = detail
        if name in ("triton", "cuda") and status != "pending":
            result, bad = _test_phase_result(out, name, detail)
            failed += bad
        lines.append(f"{name:<11} {status:<11} {secs + ' s' if secs else '':>6}  {result}")
    if failed:
        lines += ["", f"failed tests ({len(failed)}; tracebacks in {LOG}):"]
        lines += [f"  {t}" for t in failed[:MAX_FAILED]]
        if len(failed) > MAX_FAILED:
            lines.append(f"  ... and {len(failed) - MAX_FAILED} more")
    lines += _bench_lines(out)
    lines += _distributed_lines(out)
    lines += ["", "files: summary.txt " + " ".join(n for n in FILES if os.path.exists(os.path.join(out, n)))]
    return [line[:WIDTH] for line in lines]


def write(out: str, lines: list[str]) -> None:
    tmp = os.path.join(out, "summary.txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "summary.txt"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python scripts/gpu_check_summary.py OUT (with GC_TABLE etc. set, see the docstring)",
              file=sys.stderr)
        return 2
    env = os.environ
    table = [tuple((row.split("|", 3) + ["", "", ""])[:4]) for row in env.get("GC_TABLE", "").strip().splitlines()]
    write(argv[0], summarize(argv[0], table, int(env.get("GC_ELAPSED", 0)), int(env.get("GC_TOTAL", 0)),
                             env.get("GC_DRY") == "1", env.get("GC_INTERRUPTED", ""), env.get("GC_ROOT", ".")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
