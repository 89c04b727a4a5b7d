"""`fastdiff bench`: every fastdiff backend against what users would otherwise run, with rooflines.

    fastdiff bench [suite ...] [--device cpu|cuda] [--quick] [--out DIR] [--threads N] [--time-limit S]
                   [--targets-only] [--only TEXT] [--brief] [--json-only] [--list] [--no-progress]
    python -m fastdiff.bench ...            (the same, without the CLI wiring)

Suites: posterior (the point-cloud reduction), step (the fused affine update with noise), sample (end to
end against k-diffusion / diffusers loops and an eager loop), scaling (time and peak memory as N, M, d
grow); default: all. Writes DIR/results.json (also after every case), results.csv (one row per
measurement), report.md and PNG plots. Ceilings (copy bandwidth, fp32 FMA rate, exp rate) are measured
first, in the same run. fastdiff backends are discovered from fastdiff._backend.BACKENDS: every backend
whose refuse_reasons(op, ...) is empty is measured, so new backends appear without changes here. Peers
that are not installed are skipped with a note. The issues' benchmark targets (benchmarks/targets.py, read
from a repository checkout) are measured by every full run on their device type and reported with
target / measured / met; the measured order of the fastdiff backends per (op, shape) is results.json["auto_order"].

For a machine lent for minutes (scripts/gpu_check.sh): --targets-only runs only the cases that carry the
targets (issue by issue, the lowest issue number first; a --quick run has none, so the first case of each
suite stands in, at its small size), --brief times each provider with fewer repetitions (one warm-up, 3 to 5
samples, at most ~1 s each; the sizes are unchanged), and --json-only writes results.json alone (a lent
machine returns few files; `python -m fastdiff.bench.report DIR` writes the CSV, report and plots later).

CLI wiring: `add_arguments(parser)` adds the arguments to a (sub-)parser, `run_from_args(args)` runs it
and returns the exit status.

Speed is measured here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

SUITES = ("posterior", "step", "sample", "scaling")

__all__ = ["SUITES", "main", "run", "plan", "add_arguments", "run_from_args"]


def _suite_module(name):
    from . import posterior, sample, scaling, step
    return {"posterior": posterior, "step": step, "sample": sample, "scaling": scaling}[name]


def _slug(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")[:40]


def default_run_name(device: torch.device, quick: bool) -> str:
    from .timing import _cpu_model
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{_cpu_model()}-{torch.get_num_threads()}t"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(name)}{'-quick' if quick else ''}"


def run(suites=SUITES, device: str = "cpu", quick: bool = False, out=None, *, progress: bool = True,
        argv=None, threads: int | None = None, time_limit: float | None = None, targets_only: bool = False,
        brief: bool = False, json_only: bool = False, only: list[str] | None = None) -> Path:
    """Run the suites and write results into `out` (default ./fastdiff-bench/<run name>); returns that folder.

    argv: the command line to record (defaults to sys.argv). threads: torch.set_num_threads for the run
    (default: torch's choice); on a shared machine fewer threads than busy cores avoids OpenMP threads
    waiting for a descheduled sibling, which otherwise makes every parallel region cost a scheduler tick.
    time_limit: seconds; cases not started by then are skipped with a note and the run is written as usual
    (a machine lent for a limited time still gets a complete report).
    targets_only, brief, json_only: see the module docstring (the GPU check's reduced run).
    only: keep the cases whose label contains one of these strings (and the suites' closing cases)."""
    suites = _check_suites(suites)
    threads_before = torch.get_num_threads()
    if threads is None and quick and str(device).startswith("cpu"):
        # a smoke run: on a busy machine more OpenMP threads than idle cores turn every parallel region into
        # a wait for a descheduled thread; one thread keeps it short and its numbers stable
        threads = 1
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    if time_limit is not None and not (math.isfinite(float(time_limit)) and float(time_limit) > 0):
        # nan passed `<= 0` and was then ignored; inf is no limit (leave it out)
        raise ValueError(f"time_limit must be a positive number of seconds, got {float(time_limit):g}")
    precision = torch.get_float32_matmul_precision()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # fp32 products everywhere (the torch alternatives are "cuBLAS fp32"; TF32 would change their accuracy)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    previous_term = _sigterm_as_exit()
    try:
        return _run(suites, device, quick, out, progress, argv, time_limit,
                    dict(targets_only=bool(targets_only), brief=bool(brief), json_only=bool(json_only),
                         only=list(only) if only else None))
    finally:
        torch.set_num_threads(threads_before)
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        _restore_sigterm(previous_term)


def _check_suites(suites) -> list[str]:
    if isinstance(suites, str):
        suites = [suites]
    suites = list(dict.fromkeys(SUITES if not suites or "all" in suites else suites))
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise ValueError(f"unknown suite(s) {', '.join(bad)}; choose from {', '.join(SUITES)} or all")
    return suites


class _Terminated(SystemExit):
    pass


def _sigterm_as_exit():
    """SIGTERM (a job's time limit) raises in the main thread, so the run still writes what it measured."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated(128 + signum)
    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _restore_sigterm(previous):
    import signal
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass


def _parse_device(device: str) -> torch.device:
    """cpu or cuda[:i] as a torch.device, without needing the device (a plan can list a GPU run anywhere)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu or cuda, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


def _device(device: str) -> torch.device:
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch here")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def select_cases(planned, only):
    """The planned cases whose label contains one of the strings in `only` (all when empty), with the suites'
    closing cases (speedups, fits) kept so the selected rows are post-processed as in a full run."""
    if not only:
        return planned
    picked = [c for c in planned if any(o in c.label for o in only) and not c.label.endswith(_FINISHING)]
    if not picked:       # else an empty report and exit 0: a typo would look like a run
        raise ValueError(f"--only {', '.join(map(repr, only))} matches none of the {len(planned)} cases planned "
                         "(see --list)")
    return [c for c in planned if c.label.endswith(_FINISHING) or any(o in c.label for o in only)]


def plan(suites=SUITES, device: str = "cpu", quick: bool = False, targets_only: bool = False,
         only: list[str] | None = None) -> list[tuple[str, str]]:
    """[(suite, case label)] that a run would execute, in order (nothing is measured)."""
    from .common import Context
    from .timing import policy_for
    suites = _check_suites(suites)
    dev = _parse_device(device)
    ctx = Context(device=dev, quick=quick, out=Path("."), policy=policy_for(dev, quick), env={}, run_id="plan")
    planned = [c for s in suites for c in _suite_module(s).cases(ctx)]
    planned = select_cases(target_cases(planned) if targets_only else planned, only)
    return [(c.suite, c.label) for c in planned]


_FINISHING = (": speedups", ": fits")      # cases that post-process the rows measured before them


def _target_issue(label: str):
    """The issue number of a case that carries a target ('... (target, issue 3)'), else None."""
    mark = "(target, issue "
    i = label.find(mark)
    if i < 0:
        return None
    digits = label[i + len(mark):].split(")")[0]
    return int(digits) if digits.isdigit() else None


def target_cases(planned: list) -> list:
    """The cases that carry targets, the lowest issue number first (a time limit cuts the later issues), then
    each suite's finishing cases. A --quick plan has no target cases: the first case of each suite stands in,
    so a reduced run still exercises every suite at small sizes."""
    targets = [c for c in planned if _target_issue(c.label) is not None]
    if targets:
        targets.sort(key=lambda c: _target_issue(c.label))          # stable: the suites' own order within an issue
    else:
        firsts = {}
        for c in planned:
            if not c.label.endswith(_FINISHING):
                firsts.setdefault(c.suite, c)
        targets = list(firsts.values())
    return targets + [c for c in planned if c.label.endswith(_FINISHING)]


def brief_policy(policy):
    """The same timing method with fewer repetitions: one warm-up, 3 to 5 samples, ~1 s at most per provider."""
    from dataclasses import replace
    return replace(policy, warmup=1, min_reps=3, max_reps=5, min_time=min(policy.min_time, 0.05),
                   max_time=min(policy.max_time, 1.0), long_call=min(policy.long_call, 1.0))


def _run(suites, device, quick, out, progress, argv, time_limit, reduced) -> Path:
    import gc

    from . import report
    from .common import Context, cleanup
    from .timing import Progress, environment, measure_ceilings, policy_for

    dev = _device(device)
    run_id = default_run_name(dev, quick)
    out = Path(out) if out is not None else Path("fastdiff-bench") / run_id
    t_start = time.perf_counter()
    env = environment(dev, argv)
    env["suites"] = suites
    env["time_limit_s"] = time_limit
    env.update(reduced)     # targets_only, brief, json_only: a reduced run says so in its results
    policy = policy_for(dev, quick)
    ctx = Context(device=dev, quick=quick, out=out, policy=brief_policy(policy) if reduced["brief"] else policy,
                  env=env, run_id=run_id, deadline=None if time_limit is None else t_start + float(time_limit),
                  json_only=reduced["json_only"])

    planned = []
    for s in suites:
        planned += _suite_module(s).cases(ctx)
    if reduced["targets_only"]:
        planned = target_cases(planned)
    planned = select_cases(planned, reduced["only"])
    bar = Progress(total=len(planned) + 1, enabled=progress)
    ctx.progress = bar
    ctx.extra["case_seconds"] = case_seconds = {}
    completed = False
    try:
        bar.start("ceilings: copy bandwidth, fp32 FMA rate, exp rate")
        t_case = time.perf_counter()
        try:
            ctx.ceilings = measure_ceilings(dev, quick, ctx.policy)
        except Exception as exc:      # without ceilings the rows have no roofline, but are still measured
            ctx.note("ceilings", "ceilings", f"failed: {type(exc).__name__}: {str(exc)[:300]}", kind="error")
        ctx.extra["ceiling_seconds"] = round(time.perf_counter() - t_case, 3)
        bar.finish_case()
        for case in planned:
            bar.start(case.label)
            if ctx.out_of_time() and not case.label.endswith(_FINISHING):
                ctx.note(case.suite, case.label, f"not run: the time limit of {time_limit:g} s was reached",
                         kind="skipped")
                bar.finish_case()
                continue
            t_case = time.perf_counter()
            try:
                case.fn(ctx)
            except Exception as exc:    # one broken case must not lose the others
                ctx.note(case.suite, case.label, f"case failed: {type(exc).__name__}: {str(exc)[:300]}", kind="error")
            cleanup(dev)
            # what survives a case's cleanup (torch.compile's graphs and caches, the cases' data) is set aside from
            # the cyclic collector: each later gc.collect walks only the objects made since, not 0.3 s of them
            # (18 s of a 43 s --quick run); refcounting still frees them, and the run unfreezes them at the end
            gc.freeze()
            case_seconds[case.label] = round(time.perf_counter() - t_case, 3)
            bar.finish_case()
            try:
                report.write_partial(ctx, suites, time.perf_counter() - t_start)
            except Exception as exc:
                bar.message(f"  could not write partial results: {type(exc).__name__}: {exc}")
        completed = True
    finally:
        gc.unfreeze()
        bar.close()
        try:
            load_end = list(os.getloadavg())
        except OSError:
            load_end = None
        path = report.write_all(ctx, suites, time.perf_counter() - t_start, load_end, complete=completed)
    if progress:
        print(f"fastdiff bench: {len(ctx.rows)} measurements, {len(ctx.notes)} notes, "
              f"{time.perf_counter() - t_start:.0f} s -> {path}/{'results.json' if ctx.json_only else 'report.md'}",
              file=sys.stderr)
    return path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `fastdiff bench`'s arguments to a parser (e.g. a `bench` sub-parser of the fastdiff CLI)."""
    p.add_argument("suites", nargs="*", metavar="suite", help=f"{', '.join(SUITES)} or all (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes and short timings (a CPU run in < 2 minutes)")
    p.add_argument("--out", default=None, help="output folder (default ./fastdiff-bench/<date>-<device>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the run (default: torch's choice; 1 for --quick on the CPU)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="skip the cases not started after this many seconds (the report is still written)")
    p.add_argument("--targets-only", action="store_true",
                   help="only the cases that carry the issues' targets (with --quick: the first case of each suite)")
    p.add_argument("--brief", action="store_true",
                   help="fewer repetitions per measurement (1 warm-up, 3-5 samples, ~1 s at most); same sizes")
    p.add_argument("--json-only", action="store_true",
                   help="write results.json only (python -m fastdiff.bench.report DIR writes the rest later)")
    p.add_argument("--only", action="append", default=None, metavar="TEXT",
                   help="only the cases whose label contains TEXT (repeatable; e.g. --only 'd=784')")
    p.add_argument("--list", action="store_true", help="print the cases the run would measure, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--distributed", action="store_true",
                   help="with `scaling`: the sharded point cloud on 1-2 CPU ranks (gloo) and the streamed point cloud "
                        "(fastdiff/bench/distributed.py) instead of the single-process sweep")
    from .distributed import add_arguments as _add_distributed_arguments
    _add_distributed_arguments(p)
    return p


def run_from_args(args, argv=None) -> int:
    """Run `fastdiff bench` from parsed arguments (see add_arguments); argv: the command line to record
    (default sys.argv). Returns the exit status: 0, or 2 for a usage error."""
    for s in args.suites:
        if s not in SUITES and s != "all":
            print(f"fastdiff bench: error: unknown suite {s!r}; choose from {', '.join(SUITES)} or all",
                  file=sys.stderr)
            return 2
    if getattr(args, "distributed", False):
        if args.suites not in ([], ["scaling"]):
            print("fastdiff bench: error: --distributed goes with the scaling suite only", file=sys.stderr)
            return 2
        from .distributed import run_from_args as _run_distributed
        return _run_distributed(args)
    if getattr(args, "list", False):
        try:
            for suite, label in plan(args.suites, args.device, args.quick, getattr(args, "targets_only", False),
                                     getattr(args, "only", None)):
                print(f"{suite}\t{label}")
        except ValueError as exc:
            print(f"fastdiff bench: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        path = run(args.suites, args.device, args.quick, args.out, progress=not args.no_progress, argv=argv,
                   threads=args.threads, time_limit=getattr(args, "time_limit", None),
                   targets_only=getattr(args, "targets_only", False), brief=getattr(args, "brief", False),
                   json_only=getattr(args, "json_only", False), only=getattr(args, "only", None))
    except ValueError as exc:
        print(f"fastdiff bench: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv=None) -> int:
    """Entry point for `fastdiff bench ...`: argv are the arguments after `bench`."""
    parser = add_arguments(argparse.ArgumentParser(prog="fastdiff bench", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    return run_from_args(args)
