"""`fastdiff bench scaling --distributed`: the sharded point cloud on spawned ranks and the streamed cloud.

    fastdiff bench scaling --distributed [--device cpu|cuda] [--quick] [--out DIR] [--ranks 1,2] [--no-streaming]
    python -m fastdiff.bench.distributed [the same options] [--smoke] [--time-limit S] [--json-only]
    python -m fastdiff.bench.distributed --report DIR          (report.md again from DIR/results.json)

Distributed (spawned ranks on 127.0.0.1; every case of one rank count runs in the same spawned processes):
  on the CPU (gloo): one torch thread per rank, so K ranks use K cores; on CUDA (NCCL): rank r on cuda:r, so a
  rank count above the machine's GPU count is not run (a note says so; it is never simulated on fewer GPUs).
  strong scaling: a fixed global N split over K ranks;  weak scaling: a fixed N per rank.
  Per posterior call, after a barrier, each rank times its local fused reduction and then the merge (after a
  second barrier, so waiting for a slower rank is not counted as merge): all_reduce(MAX) of [M] float64 plus
  all_reduce(SUM) of [M, 2d+1] float64 (ȳ, the shares, and the second moments a float32 query's merge carries),
  i.e. 8·M·(2d+2) bytes of tensors per step (a ring all_reduce sends about 2(K−1)/K of that per rank), then the
  float32 redo test (one host read; no row of these queries needs a redo). The step time is the slowest rank's
  local + merge. On CUDA every clock read follows torch.cuda.synchronize(), so a
  time is the GPU's work and not the launch.
Streaming (each case in a fresh process: peak resident set from getrusage, and above the resident set after
  imports and setup): N = 1e7 in d = 2 and N = 1e6 in d = 3072 (fp16 storage, a .npy of 6.1 GB) from a .npy
  file, beside smaller N to show that peak memory does not grow with N. The file is read through the page
  cache (written just before, so warm when the machine has the memory). On CUDA the chunks go through pinned
  host buffers and a side stream (fastdiff.streaming) and the peak GPU memory (max_memory_allocated) is reported
  beside the host's. A case's first call is timed on its own (s_first_call); s_per_call is the median of the
  reps calls after it (a CPU case beyond 1e10 pair-dimensions makes one cold call only: its reps column reads 1).
--quick: smaller sizes; --smoke: tiny sizes in seconds (the GPU check's dry run); --time-limit S: start no case
after S seconds (what ran is kept); --json-only: results.json alone. Every row records its device.
Writes DIR/results.json (after every rank count and every streamed case, so an interrupted run keeps what
finished) and DIR/report.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES_FULL = [  # (label, d, M, N_strong, N_weak_per_rank): about a second per call on one core
    ("d=2", 2, 512, 1 << 19, 1 << 18),
    ("d=64", 64, 128, 1 << 15, 1 << 14),
    ("d=3072", 3072, 16, 1 << 13, 1 << 12),
]
SHAPES_QUICK = [("d=2", 2, 128, 1 << 15, 1 << 14), ("d=64", 64, 32, 1 << 12, 1 << 11)]
STREAM_FULL = [  # (label, d, N, M, storage dtype, chunk rows or "memory": the whole file loaded, one ops.posterior)
    ("d=2 N=1e6", 2, 10**6, 256, "float32", None),
    ("d=2 N=1e7", 2, 10**7, 256, "float32", None),
    ("d=2 N=1e7 in memory", 2, 10**7, 256, "float32", "memory"),
    ("d=2 N=1e7 fp16", 2, 10**7, 256, "float16", None),
    ("d=3072 N=1e5 fp16", 3072, 10**5, 8, "float16", None),
    ("d=3072 N=1e6 fp16", 3072, 10**6, 8, "float16", None),
]
STREAM_QUICK = [("d=2 N=1e5", 2, 10**5, 64, "float32", None), ("d=2 N=1e6", 2, 10**6, 64, "float32", None),
                ("d=2 N=1e6 in memory", 2, 10**6, 64, "float32", "memory"),
                ("d=256 N=2e4 fp16", 256, 20000, 8, "float16", None)]
# --smoke: seconds in all, process start-up included (the GPU check's dry run on a CI machine)
SHAPES_SMOKE = [("d=2", 2, 16, 1 << 10, 1 << 9)]
STREAM_SMOKE = [("d=2 N=1e4", 2, 10**4, 16, "float32", 2500), ("d=64 N=2e3 fp16", 64, 2000, 4, "float16", 500)]
# CUDA (one GPU per rank). A posterior call on an H200 runs ~1e11 pairs/s at d = 2 (the GPU check of 3448f58):
# full: ~0.1-1 s per call; quick: the GPU check's `distributed` phase, ~30 s in all on an H200, most of it process
# start-up (a spawned rank, one fresh process per streamed case) and writing the .npy files.
SHAPES_CUDA_FULL = [("d=2", 2, 4096, 1 << 24, 1 << 23), ("d=64", 64, 1024, 1 << 20, 1 << 19),
                    ("d=3072", 3072, 256, 1 << 17, 1 << 16)]
SHAPES_CUDA_QUICK = [("d=2", 2, 4096, 1 << 22, 1 << 21), ("d=3072", 3072, 64, 1 << 15, 1 << 14)]
STREAM_CUDA_FULL = [("d=2 N=1e8", 2, 10**8, 4096, "float32", None),
                    ("d=3072 N=1e6 fp16", 3072, 10**6, 256, "float16", None)]
STREAM_CUDA_QUICK = [("d=2 N=1e7", 2, 10**7, 1024, "float32", None),
                     ("d=3072 N=3e4 fp16", 3072, 30000, 64, "float16", None)]


def plan(device: str, quick: bool = False, smoke: bool = False):
    """(sharded shapes, streamed cases) of a run."""
    if smoke:
        return SHAPES_SMOKE, STREAM_SMOKE
    if device == "cuda":
        return (SHAPES_CUDA_QUICK, STREAM_CUDA_QUICK) if quick else (SHAPES_CUDA_FULL, STREAM_CUDA_FULL)
    return (SHAPES_QUICK, STREAM_QUICK) if quick else (SHAPES_FULL, STREAM_FULL)


def _sync_for(device):
    """What makes a clock read mean 'the work is done': torch.cuda.synchronize on CUDA, nothing on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


# -- distributed: spawned ranks (gloo on the CPU, NCCL on CUDA) -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_sharded(spec, rank, dev):
    """One case on this rank: build its shard, time `reps` posterior calls split into local reduction and merge."""
    import torch.distributed as dist

    from fastdiff import VP
    from fastdiff.distributed import ShardedPointCloud
    from fastdiff.distributed.merge import float64_redo
    sync = _sync_for(dev)
    d, M, n_rank, reps = spec["d"], spec["M"], spec["rows"][rank], spec["reps"]
    g = torch.Generator().manual_seed(1000 + rank)
    shard = torch.randn(n_rank, d, generator=g).to(dev)
    x = torch.randn(M, d, generator=torch.Generator().manual_seed(1)).to(dev)
    pc = ShardedPointCloud(shard, VP(), timeout=120)
    alpha = torch.tensor([[0.8]], dtype=torch.float64, device=dev)
    sig2 = torch.tensor([[0.36]], dtype=torch.float64, device=dev)
    local, merge, step = [], [], []
    for i in range(reps + 1):        # the first call warms up
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        part = pc.partial(x, alpha, sig2)
        sync()
        t1 = time.perf_counter()
        dist.barrier()
        sync()
        t2 = time.perf_counter()
        # the merge as a float32 step runs it: the all_reduces with the moments, then the redo test (a host read;
        # these random queries near the data need no redo, so no second round is timed)
        ybar, m, s, q = pc._reduce(part, M, x.device, moments=x.dtype == torch.float32)
        float64_redo(x, ybar, m, s, q, pc._absmax)
        sync()
        t3 = time.perf_counter()
        if i:
            local.append(t1 - t0)
            merge.append(t3 - t2)
            step.append((t1 - t0) + (t3 - t2))
    return {"local_s": statistics.median(local), "merge_s": statistics.median(merge),
            "step_s": statistics.median(step)}


def _rank_main(rank, world, port, specs, results, device="cpu"):
    """One rank: every case of `specs` in turn, each result put as (rank, case index, result); an error ends
    the rank (put with case index None)."""
    import torch.distributed as dist
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")       # one node: NCCL's bootstrap over the loopback
    torch.set_num_threads(1)
    try:
        if device == "cuda":
            dev = torch.device("cuda", rank)
            torch.cuda.set_device(dev)
            backend = {"backend": "nccl", "device_id": dev}
        else:
            dev, backend = torch.device("cpu"), {"backend": "gloo"}
        dist.init_process_group(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120), **backend)
        for i, spec in enumerate(specs):
            results.put((rank, i, _time_sharded(spec, rank, dev)))
    except BaseException as exc:
        results.put((rank, None, {"error": f"{type(exc).__name__}: {exc}"}))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def _spawn_cases(world, specs, device="cpu", timeout_s=900):
    """Run `specs` on `world` spawned ranks: per case, the list of per-rank results. Raises RuntimeError naming
    the rank at the first error (the other ranks are then stopped instead of waited for)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, specs, results, device), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world * len(specs) and not errors and time.monotonic() < deadline:
            try:
                r, i, res = results.get(timeout=1.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                continue
            if i is None:
                errors.append(f"rank {r}: {res['error']}")
            else:
                out[(r, i)] = res
    finally:
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.kill()
    if errors or len(out) < world * len(specs):
        raise RuntimeError("; ".join(errors) or f"only {len(out)} of {world * len(specs)} (rank, case) results "
                           f"arrived from {world} rank(s)")
    return [[out[(r, i)] for r in range(world)] for i in range(len(specs))]


def _split(n, world):
    return [(r + 1) * n // world - r * n // world for r in range(world)]


def _sharded_rows(shapes, ranks, measured, device):
    """The table's rows, in (shape, scaling, ranks) order, from measured[(label, mode, k)] = per-rank results;
    speedup / efficiency against the smallest rank count measured."""
    rows = []
    for label, d, M, n_strong, n_weak in shapes:
        for mode in ("strong", "weak"):
            base = None
            for k in ranks:
                per_rank = measured.get((label, mode, k))
                if per_rank is None:
                    continue
                N = n_strong if mode == "strong" else n_weak * k
                step = max(r["step_s"] for r in per_rank)
                local = max(r["local_s"] for r in per_rank)
                merge = max(r["merge_s"] for r in per_rank)
                base = step if base is None else base
                rows.append({
                    "scaling": mode, "shape": label, "d": d, "M": M, "N": N, "ranks": k, "threads_per_rank": 1,
                    "step_s": step, "local_s": local, "merge_s": merge, "merge_fraction": merge / step,
                    "allreduce_bytes_per_step": 8 * M + 8 * M * (2 * d + 1),
                    "pairs_per_s": N * M / step,
                    ("speedup" if mode == "strong" else "efficiency"): base / step,
                    "device": device,
                })
    return rows


def distributed_rows(shapes, ranks, reps, log, device="cpu", deadline=None, notes=None, errors=None, done=None):
    """Every (shape, scaling) case for each rank count, one spawn per rank count. On CUDA a rank count above
    torch.cuda.device_count() is skipped with a note. With `errors` (a list), a failed rank count is recorded
    there and the others still run (else it raises); `done(rows)` is called after each rank count; no rank count
    starts after `deadline` (time.monotonic())."""
    measured = {}
    gpus = torch.cuda.device_count() if device == "cuda" else None
    for k in ranks:
        if gpus is not None and k > gpus:
            _note(notes, log, f"ranks={k} not run: NCCL needs one GPU per rank and this machine has {gpus}")
            continue
        if deadline is not None and time.monotonic() > deadline:
            _note(notes, log, f"ranks={k} not run: the time limit was reached")
            continue
        keys, specs = [], []
        for label, d, M, n_strong, n_weak in shapes:
            for mode in ("strong", "weak"):
                N = n_strong if mode == "strong" else n_weak * k
                keys.append((label, mode, k))
                specs.append({"d": d, "M": M, "rows": _split(N, k), "reps": reps})
                log(f"  {mode} {label} N={N} M={M} ranks={k}")
        try:
            for key, per_rank in zip(keys, _spawn_cases(k, specs, device), strict=True):
                measured[key] = per_rank
        except RuntimeError as exc:
            if errors is None:
                raise
            errors.append(f"sharded, ranks={k}: {exc}")
            log(f"  ranks={k} FAILED: {exc}")
        if done is not None:
            done(_sharded_rows(shapes, ranks, measured, device))
    return _sharded_rows(shapes, ranks, measured, device)


def _note(notes, log, text):
    log(f"  {text}")
    if notes is not None:
        notes.append(text)


# -- streaming: one fresh process per case ----------------------------------------------------------------------

def _write_npy(path, N, d, dtype, seed=0):
    """A random [N, d] .npy written in slabs (run in a subprocess: its pages are not the measured process's)."""
    import numpy as np
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(N, d))
    rng = np.random.default_rng(seed)
    slab = max(1, (64 << 20) // (4 * d))
    for s in range(0, N, slab):
        e = min(N, s + slab)
        arr[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
    arr.flush()
    del arr


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _stream_case(spec):
    """In this (fresh) process: time posterior calls of a StreamingPointCloud over spec['path'] on spec['device']
    (default cpu; on CUDA also the peak GPU memory, from torch.cuda.max_memory_allocated after setup)."""
    import resource

    from fastdiff import VP
    from fastdiff.streaming import StreamingPointCloud
    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec.get("device", "cpu"))
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:      # StreamingPointCloud compares x.device (always indexed) with its own
        dev = torch.device("cuda", torch.cuda.current_device())
    sync = _sync_for(dev)
    x = torch.randn(spec["M"], spec["d"], generator=torch.Generator().manual_seed(1)).to(dev)
    in_memory = spec.get("chunk_rows") == "memory"
    if in_memory:     # the contrast: the whole cloud loaded, one fused call (memory grows with N)
        import numpy as np

        from fastdiff import ops
        rss_before_kb = _status_kb("VmRSS")
        data = torch.from_numpy(np.load(spec["path"])).to(dev)
        alpha, sigma = float(VP().alpha(0.3)), float(VP().sigma(0.3))      # the streamed cases' t = 0.3
        call, chunk_rows = (lambda: ops.posterior(x, data, alpha, sigma)), data.shape[0]
    else:
        pc = StreamingPointCloud(spec["path"], VP(), chunk_rows=spec.get("chunk_rows"), check=False, device=dev)
        rss_before_kb = _status_kb("VmRSS")
        call, chunk_rows = (lambda: pc.posterior(x, 0.3)), pc.chunk_rows
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats(dev)
        gpu_before = torch.cuda.memory_allocated(dev)
    times = []
    # the first call is timed on its own (s_first_call: cold caches, first launches); s_per_call is the median of
    # the calls after it, or that first call when only one is made (the big cases: "cold, single call")
    for _ in range(spec["reps"] + (1 if spec["reps"] > 1 else 0)):
        sync()
        t0 = time.perf_counter()
        D, L = call()
        sync()
        times.append(time.perf_counter() - t0)
    assert bool(torch.isfinite(D).all()) and bool(torch.isfinite(L).all())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"s_per_call": statistics.median(times[1:] or times), "s_first_call": times[0], "chunk_rows": chunk_rows,
           "source": "whole file in memory, one ops.posterior" if in_memory else ".npy streamed",
           "peak_rss_mb": peak_kb / 1024, "rss_before_mb": rss_before_kb / 1024,
           "peak_above_setup_mb": (peak_kb - rss_before_kb) / 1024}
    if cuda:
        res.update(peak_gpu_mb=torch.cuda.max_memory_allocated(dev) / 2**20, gpu_before_mb=gpu_before / 2**20,
                   gpu_model=torch.cuda.get_device_name(dev))
    return res


def streaming_rows(cases, tmpdir, threads, reps, log, device="cpu", deadline=None, notes=None, errors=None,
                   done=None):
    """Each case in a fresh process. With `errors` (a list), a failed case is recorded there and the others still
    run (else it raises); `done(rows)` after each case; no case starts after `deadline` (time.monotonic())."""
    rows = []
    files = {}
    try:
        for label, d, N, M, dtype, chunk_rows in cases:
            if deadline is not None and time.monotonic() > deadline:
                _note(notes, log, f"streaming {label} not run: the time limit was reached")
                continue
            path = Path(tmpdir) / f"fastdiff-stream-{N}x{d}-{dtype}.npy"
            if (N, d, dtype) not in files:
                log(f"  writing {path} ({N * d * (2 if dtype == 'float16' else 4) / 1e9:.2f} GB)")
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", f"from fastdiff.bench.distributed import _write_npy; "
                                f"_write_npy({str(path)!r}, {N}, {d}, {dtype!r})"], check=True)
                files[(N, d, dtype)] = (path, time.perf_counter() - t0)
            big = N * M * d > 1e10 and device != "cuda"         # minutes per call on two cores: one timed call
            spec = {"path": str(path), "d": d, "M": M, "threads": threads, "reps": 1 if big else reps,
                    "chunk_rows": chunk_rows, "device": device}
            log(f"  streaming {label} M={M}")
            proc = subprocess.run([sys.executable, "-m", "fastdiff.bench.distributed", "--stream-case",
                                   json.dumps(spec)], capture_output=True, text=True, check=False)
            if proc.returncode:
                message = f"streaming case {label} failed: {proc.stderr[-2000:]}"
                if errors is None:
                    raise RuntimeError(message)
                errors.append(message)
                log(f"  {message}")
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"case": label, "d": d, "N": N, "M": M, "storage": dtype, "threads": threads,
                         "file_gb": os.path.getsize(path) / 1e9, "write_s": files[(N, d, dtype)][1],
                         "reps": spec["reps"], "pairs_per_s": N * M / res["s_per_call"], **res, "device": device})
            if done is not None:
                done(rows)
    finally:
        for path, _ in files.values():
            path.unlink(missing_ok=True)
    return rows


# -- the run and its report ---------------------------------------------------------------------------------------

def _git_state():
    here = Path(__file__).resolve().parents[2]

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
    try:
        tracked = git("status", "--porcelain", "--untracked-files=no").splitlines()
        new = [f for f in git("status", "--porcelain", "--untracked-files=all", "--", "fastdiff", "csrc").splitlines()
               if f.startswith("??")]          # a new module in the package changes what runs too
        return {"commit": git("rev-parse", "HEAD") or None, "dirty_files": tracked + new}
    except Exception:
        return {"commit": None, "dirty_files": None}


def run(out, quick=False, ranks=(1, 2), streaming=True, distributed=True, progress=True, tmpdir="/tmp",
        device="cpu", smoke=False, time_limit=None, json_only=False):
    """The whole benchmark into `out`; returns (out, the results). A failed rank count or streamed case is
    recorded in results["errors"] and the rest still runs; KeyboardInterrupt writes what finished, then
    propagates."""
    from .timing import environment
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch here")
    res = {"environment": environment(torch.device(device)), "git": _git_state(), "quick": quick,
           "commit_env": os.environ.get("FASTDIFF_BENCH_COMMIT"), "distributed": [], "streaming": []}
    res.update(device=device, smoke=smoke, time_limit_s=time_limit, notes=[], errors=[], complete=False)
    shapes, cases = plan(device, quick, smoke)
    t0 = time.perf_counter()
    deadline = None if time_limit is None else time.monotonic() + time_limit
    extra = {"deadline": deadline, "notes": res["notes"], "errors": res["errors"]}

    def keep(key):
        def done(rows):
            res[key] = rows
            _write(out, res, json_only)
        return done
    try:
        if distributed:
            log(f"distributed ({'NCCL, one GPU' if device == 'cuda' else 'gloo, 1 thread'} per rank)")
            res["distributed"] = distributed_rows(shapes, ranks, 3, log, device, done=keep("distributed"), **extra)
            _write(out, res, json_only)
        if streaming:
            log("streaming (fresh process per case)")
            res["streaming"] = streaming_rows(cases, tmpdir, torch.get_num_threads(), 2 if quick or smoke else 3, log,
                                              device, done=keep("streaming"), **extra)
    except KeyboardInterrupt:
        res["interrupted"] = True
        _finish(out, res, t0, json_only)
        raise
    res["complete"] = not res["errors"] and not any("time limit" in n for n in res["notes"])
    _finish(out, res, t0, json_only)
    return out, res


def _finish(out, res, t0, json_only):
    res["seconds"] = time.perf_counter() - t0
    try:
        res["loadavg_end"] = list(os.getloadavg())
    except OSError:
        res["loadavg_end"] = None
    _write(out, res, json_only)


def _write(out, res, json_only=False):
    """results.json (and report.md) replaced whole: a kill never leaves half a file."""
    files = {"results.json": json.dumps(res, indent=1, default=str)}
    if not json_only:
        files["report.md"] = report(res)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _modified_note(dirty_files) -> str:
    return " (tracked files modified: " + ", ".join(f.split()[-1] for f in dirty_files) + ")"


def _device_of(res) -> str:
    return res.get("device", "cpu")


def report(res) -> str:
    env, git = res["environment"], res["git"]
    commit = res.get("commit_env") or git.get("commit")
    lines = ["# fastdiff distributed and streaming benchmark", ""]
    if _device_of(res) == "cuda":
        lines += [f"GPU: {env.get('gpu_model')} ({env.get('gpu_memory_gib')} GiB), CUDA {env.get('torch_cuda')}", ""]
    lines += [f"CPU: {env.get('cpu_model')} ({env.get('cpu_count')} cores), torch {env.get('torch_version')}, "
              f"commit {commit}" + (_modified_note(git["dirty_files"])
                                    if git.get("dirty_files") and not res.get("commit_env") else ""), ""]
    lines += distributed_table(res["distributed"]) + [""] + streaming_table(res["streaming"])
    extra = [f"- note: {n}" for n in res.get("notes", [])] + [f"- ERROR: {e}" for e in res.get("errors", [])]
    if res.get("interrupted"):
        extra.append("- interrupted: the run stopped early (SIGINT); the tables hold what finished")
    if extra:
        lines += ["", "## Notes", ""] + extra
    return "\n".join(lines) + "\n"


def _fixed(value, decimals) -> str:
    """`decimals` decimals, or 3 significant digits for a value too small to show that way (GPU times)."""
    return f"{value:.{decimals}f}" if abs(value) >= 10.0 ** (1 - decimals) else f"{value:.3g}"


_SHARDED_TITLE = {"cpu": "gloo, CPU ranks, 1 thread each", "cuda": "NCCL, one GPU per rank"}
_STREAM_TITLE = {"cpu": ".npy file through the page cache, chunks prefetched by a thread",
                 "cuda": ".npy file through the page cache into pinned buffers, copied to the GPU on a side stream"}


def _devices(rows) -> list[str]:
    return list(dict.fromkeys(r.get("device", "cpu") for r in rows))


def _title(titles, devices) -> str:
    if len(devices) == 1:
        return titles[devices[0]]
    return "; ".join(f"{dev}: {titles[dev]}" for dev in devices)


def distributed_table(rows):
    """The sharded table; a leading device column when the rows come from more than one device."""
    if not rows:
        return []
    devices = _devices(rows)
    mixed = len(devices) > 1
    out = [f"## Sharded point cloud ({_title(_SHARDED_TITLE, devices)})", "",
           ("| device " if mixed else "") + "| scaling | shape | M | N | ranks | step ms | local ms | merge ms "
           "| merge % | all_reduce bytes/step | speedup / efficiency |",
           "|---" * (12 if mixed else 11) + "|"]
    for r in rows:
        gain = r.get("speedup", r.get("efficiency"))
        out.append((f"| {r.get('device', 'cpu')} " if mixed else "")
                   + f"| {r['scaling']} | {r['shape']} | {r['M']} | {r['N']:,} | {r['ranks']} | "
                   f"{_fixed(1e3 * r['step_s'], 1)} | {_fixed(1e3 * r['local_s'], 1)} | "
                   f"{_fixed(1e3 * r['merge_s'], 2)} | {100 * r['merge_fraction']:.1f} | "
                   f"{r['allreduce_bytes_per_step']:,} | {gain:.2f} |")
    return out


def streaming_table(rows):
    """The streamed table; a device column when mixed, and the peak GPU memory when a row ran on a GPU."""
    if not rows:
        return []
    devices = _devices(rows)
    mixed, gpu = len(devices) > 1, "cuda" in devices
    out = [f"## Streamed point cloud ({_title(_STREAM_TITLE, devices)})", "",
           ("| device " if mixed else "") + "| case | storage | M | file GB | chunk rows | s / posterior | timed calls "
           "| pairs/s | peak RSS MB | above setup MB |" + (" peak GPU MB |" if gpu else ""),
           "|---" * (10 + mixed + gpu) + "|"]
    # "above setup": peak resident set minus the resident set after imports and setup (before the data is read)
    for r in rows:
        peak_gpu = r.get("peak_gpu_mb")
        out.append((f"| {r.get('device', 'cpu')} " if mixed else "")
                   + f"| {r['case']} | {r['storage']} | {r['M']} | {r['file_gb']:.2f} | {r['chunk_rows']:,} | "
                   f"{_fixed(r['s_per_call'], 2)} | {r.get('reps', '?')} | {r['pairs_per_s']:.3g} | "
                   f"{r['peak_rss_mb']:.0f} | {r['peak_above_setup_mb']:.0f} |"
                   + ((f" {peak_gpu:.0f} |" if peak_gpu is not None else " – |") if gpu else ""))
    return out


def add_arguments(p):
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2; on CUDA the counts "
                                                  "above the GPU count are skipped with a note)")
    p.add_argument("--no-streaming", action="store_true", help="skip the streaming cases")
    p.add_argument("--no-sharded", action="store_true", help="skip the sharded cases")
    p.add_argument("--tmpdir", default="/tmp", help="where the streaming .npy files are written (and removed)")
    return p


def run_from_args(args) -> int:
    """0, 1 when a case failed (recorded in results.json), 2 for a usage error, 130 when interrupted."""
    try:
        ranks = tuple(int(k) for k in str(getattr(args, "ranks", "1,2")).split(","))
    except ValueError:
        print(f"fastdiff bench: error: --ranks must be comma-separated integers, got {args.ranks!r}", file=sys.stderr)
        return 2
    device = str(getattr(args, "device", None) or "cpu")
    if device not in ("cpu", "cuda"):
        print(f"fastdiff bench: error: --device must be cpu or cuda, got {device!r}", file=sys.stderr)
        return 2
    smoke = getattr(args, "smoke", False)
    size = "-smoke" if smoke else "-quick" if args.quick else ""
    out = args.out or Path("fastdiff-bench") / (time.strftime("%Y%m%d-%H%M%S") + f"-{device}-distributed{size}")
    try:
        path, res = run(out, quick=args.quick, ranks=ranks, streaming=not getattr(args, "no_streaming", False),
                        distributed=not getattr(args, "no_sharded", False),
                        progress=not getattr(args, "no_progress", False), tmpdir=getattr(args, "tmpdir", "/tmp"),
                        device=device, smoke=smoke, time_limit=getattr(args, "time_limit", None),
                        json_only=getattr(args, "json_only", False))
    except ValueError as exc:
        print(f"fastdiff bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdiff bench: interrupted; what finished is in {out}", file=sys.stderr)
        return 130
    print(path)
    for e in res.get("errors", []):
        print(f"fastdiff bench: error: {e}", file=sys.stderr)
    return 1 if res.get("errors") else 0


README_START, README_END = "<!-- distributed:start -->", "<!-- distributed:end -->"


def _loadavg(v) -> str:
    return ", ".join(f"{x:.1f}" for x in (v or []))


def _caption(d, res) -> str:
    env = res["environment"]
    commit = (res.get("commit_env") or res["git"].get("commit") or "?")[:12]
    where = f"{env.get('cpu_model')} ({env.get('cpu_count')} cores)"
    if _device_of(res) == "cuda":
        where = f"{env.get('gpu_model')} (host: {where})"
    return (f"Run `{d.name}` at commit `{commit}` on {where}; load average {_loadavg(env.get('loadavg_start'))} at "
            f"the start, {_loadavg(res.get('loadavg_end'))} at the end.")


def readme_section(run_dirs) -> str:
    """The README's tables from committed run folders: each table from the last folder of each device that has
    it (the CPU's, then a GPU's beside it, with a device column)."""
    run_dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    runs = [(d, json.loads((d / "results.json").read_text())) for d in run_dirs]
    lines = [README_START, f"Generated by `python -m fastdiff.bench.distributed --readme README.md --results "
                           f"{' '.join(d.as_posix() for d in run_dirs)}`; each folder's `report.md` has the full "
                           "tables.", ""]
    for key, table in (("distributed", distributed_table), ("streaming", streaming_table)):
        last = {}                                        # device -> its last folder with this table
        for d, res in runs:
            if res.get(key):
                last[_device_of(res)] = (d, res)
        picks = [last[dev] for dev in sorted(last, key=lambda dev: dev != "cpu")]
        if not picks:
            continue
        body = [line.replace("## ", "#### ") for line in table([row for _, res in picks for row in res[key]])]
        captions = [line for d, res in picks for line in (_caption(d, res), "")]
        notes = [f"- {_device_of(res)}: {n}" for _, res in picks for n in res.get("notes", [])
                 if (key == "distributed") == n.startswith("ranks=")]
        lines += body[:2] + captions + body[2:] + [""] + (notes + [""] if notes else [])
    return "\n".join(lines + [README_END])


def write_readme(readme, run_dirs):
    text = Path(readme).read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{readme} must hold one {README_START} ... {README_END} block")
    before, rest = text.split(README_START)
    _, after = rest.split(README_END)
    Path(readme).write_text(before + readme_section(run_dirs) + after)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--stream-case"]:
        print(json.dumps(_stream_case(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--readme"]:
        if len(argv) < 4 or argv[2] != "--results":
            print("usage: python -m fastdiff.bench.distributed --readme README.md --results RUN_DIR [RUN_DIR ...]",
                  file=sys.stderr)
            return 2
        write_readme(argv[1], argv[3:])
        return 0
    if argv[:1] == ["--report"]:
        if len(argv) != 2:
            print("usage: python -m fastdiff.bench.distributed --report RUN_DIR", file=sys.stderr)
            return 2
        (Path(argv[1]) / "report.md").write_text(report(json.loads((Path(argv[1]) / "results.json").read_text())))
        return 0
    p = argparse.ArgumentParser(
        prog="python -m fastdiff.bench.distributed", description=__doc__.split("\n\n")[0],
        epilog="Also: --report RUN_DIR (report.md again from RUN_DIR/results.json) and --readme README.md --results "
               "RUN_DIR [RUN_DIR ...] (the README's generated section from those runs), each on its own.")
    p.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds in all (the GPU check's dry run)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no rank count or streamed case after this many seconds (what ran is kept)")
    p.add_argument("--json-only", action="store_true",
                   help="write results.json only (--report DIR writes report.md from it later)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    return run_from_args(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
