"""`fastdiff bench scaling --distributed`: the sharded point cloud on CPU ranks (gloo) and the streamed cloud.

    fastdiff bench scaling --distributed [--quick] [--out DIR] [--ranks 1,2] [--no-streaming]
    python -m fastdiff.bench.distributed [the same options]

Distributed (spawned ranks on 127.0.0.1, one torch thread each, so K ranks use K cores):
  strong scaling: a fixed global N split over K ranks;  weak scaling: a fixed N per rank.
  Per posterior call, after a barrier, each rank times its local fused reduction and then the merge (after a
  second barrier, so waiting for a slower rank is not counted as merge): all_reduce(MAX) of [M] float64 plus
  all_reduce(SUM) of [M, d+1] float64, i.e. 8·M·(d+2) bytes of tensors per step (a ring all_reduce sends
  about 2(K−1)/K of that per rank). The step time is the slowest rank's local + merge.
Streaming (each case in a fresh process: peak resident set from getrusage, and above the resident set after
  imports and setup): N = 1e7 in d = 2 and N = 1e6 in d = 3072 (fp16 storage, a .npy of 6.1 GB) from a .npy
  file, beside smaller N to show that peak memory does not grow with N. The file is read through the page
  cache (written just before, so warm when the machine has the memory).
Writes DIR/results.json and DIR/report.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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


# -- distributed: spawned gloo ranks ---------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, spec, results):
    """One rank: build its shard, time `reps` posterior calls split into local reduction and merge."""
    import torch.distributed as dist

    from fastdiff import VP
    from fastdiff.distributed import ShardedPointCloud
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        d, M, n_rank, reps = spec["d"], spec["M"], spec["rows"][rank], spec["reps"]
        g = torch.Generator().manual_seed(1000 + rank)
        shard = torch.randn(n_rank, d, generator=g)
        x = torch.randn(M, d, generator=torch.Generator().manual_seed(1))
        pc = ShardedPointCloud(shard, VP(), timeout=120)
        alpha, sig2 = torch.tensor([[0.8]], dtype=torch.float64), torch.tensor([[0.36]], dtype=torch.float64)
        local, merge, step = [], [], []
        for i in range(reps + 1):        # the first call warms up
            dist.barrier()
            t0 = time.perf_counter()
            part = pc.partial(x, alpha, sig2)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            pc.merge(part, M, x.device)
            t3 = time.perf_counter()
            if i:
                local.append(t1 - t0)
                merge.append(t3 - t2)
                step.append((t1 - t0) + (t3 - t2))
        results.put((rank, {"local_s": statistics.median(local), "merge_s": statistics.median(merge),
                            "step_s": statistics.median(step)}))
    except BaseException as exc:
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def _spawn_case(world, spec, timeout_s=900):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, spec, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                r, res = results.get(timeout=1.0)
                out[r] = res
            except Exception:
                if all(not p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}: {v['error']}" for r, v in sorted(out.items()) if "error" in v]
    if errors or len(out) < world:
        raise RuntimeError("; ".join(errors) or f"only ranks {sorted(out)} of {world} reported")
    return [out[r] for r in range(world)]


def _split(n, world):
    return [(r + 1) * n // world - r * n // world for r in range(world)]


def distributed_rows(shapes, ranks, reps, log):
    rows = []
    for label, d, M, n_strong, n_weak in shapes:
        for mode in ("strong", "weak"):
            base = None
            for k in ranks:
                N = n_strong if mode == "strong" else n_weak * k
                spec = {"d": d, "M": M, "rows": _split(N, k), "reps": reps}
                log(f"  {mode} {label} N={N} M={M} ranks={k}")
                per_rank = _spawn_case(k, spec)
                step = max(r["step_s"] for r in per_rank)
                local = max(r["local_s"] for r in per_rank)
                merge = max(r["merge_s"] for r in per_rank)
                base = step if base is None else base
                rows.append({
                    "scaling": mode, "shape": label, "d": d, "M": M, "N": N, "ranks": k, "threads_per_rank": 1,
                    "step_s": step, "local_s": local, "merge_s": merge, "merge_fraction": merge / step,
                    "allreduce_bytes_per_step": 8 * M + 8 * M * (d + 1),
                    "pairs_per_s": N * M / step,
                    ("speedup" if mode == "strong" else "efficiency"): base / step,
                })
    return rows


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
    """In this (fresh) process: time posterior calls of a StreamingPointCloud over spec['path']."""
    import resource

    from fastdiff import VP
    from fastdiff.streaming import StreamingPointCloud
    torch.set_num_threads(spec["threads"])
    x = torch.randn(spec["M"], spec["d"], generator=torch.Generator().manual_seed(1))
    in_memory = spec.get("chunk_rows") == "memory"
    if in_memory:     # the contrast: the whole cloud loaded, one fused call (memory grows with N)
        import numpy as np

        from fastdiff import ops
        rss_before_kb = _status_kb("VmRSS")
        data = torch.from_numpy(np.load(spec["path"]))
        alpha, sigma = float(VP().alpha(0.3)), float(VP().sigma(0.3))      # the streamed cases' t = 0.3
        call, chunk_rows = (lambda: ops.posterior(x, data, alpha, sigma)), data.shape[0]
    else:
        pc = StreamingPointCloud(spec["path"], VP(), chunk_rows=spec.get("chunk_rows"), check=False)
        rss_before_kb = _status_kb("VmRSS")
        call, chunk_rows = (lambda: pc.posterior(x, 0.3)), pc.chunk_rows
    times = []
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        D, L = call()
        times.append(time.perf_counter() - t0)
    assert bool(torch.isfinite(D).all()) and bool(torch.isfinite(L).all())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"s_per_call": statistics.median(times), "s_first_call": times[0], "chunk_rows": chunk_rows,
            "source": "whole file in memory, one ops.posterior" if in_memory else ".npy streamed",
            "peak_rss_mb": peak_kb / 1024, "rss_before_mb": rss_before_kb / 1024,
            "peak_above_setup_mb": (peak_kb - rss_before_kb) / 1024}


def streaming_rows(cases, tmpdir, threads, reps, log):
    rows = []
    files = {}
    for label, d, N, M, dtype, chunk_rows in cases:
        path = Path(tmpdir) / f"fastdiff-stream-{N}x{d}-{dtype}.npy"
        if (N, d, dtype) not in files:
            log(f"  writing {path} ({N * d * (2 if dtype == 'float16' else 4) / 1e9:.2f} GB)")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"from fastdiff.bench.distributed import _write_npy; "
                            f"_write_npy({str(path)!r}, {N}, {d}, {dtype!r})"], check=True)
            files[(N, d, dtype)] = (path, time.perf_counter() - t0)
        big = N * M * d > 1e10          # minutes per call on two cores: one timed call
        spec = {"path": str(path), "d": d, "M": M, "threads": threads, "reps": 1 if big else reps,
                "chunk_rows": chunk_rows}
        log(f"  streaming {label} M={M}")
        proc = subprocess.run([sys.executable, "-m", "fastdiff.bench.distributed", "--stream-case", json.dumps(spec)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"streaming case {label} failed: {proc.stderr[-2000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"case": label, "d": d, "N": N, "M": M, "storage": dtype, "threads": threads,
                     "file_gb": os.path.getsize(path) / 1e9, "write_s": files[(N, d, dtype)][1], "reps": spec["reps"],
                     "pairs_per_s": N * M / res["s_per_call"], **res})
    for path, _ in files.values():
        path.unlink(missing_ok=True)
    return rows


# -- the run and its report ---------------------------------------------------------------------------------------

def _git_state():
    here = Path(__file__).resolve().parents[2]

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}
    except Exception:
        return {"commit": None, "dirty_files": None}


def run(out, quick=False, ranks=(1, 2), streaming=True, distributed=True, progress=True, tmpdir="/tmp"):
    from .timing import environment
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"environment": environment(torch.device("cpu")), "git": _git_state(), "quick": quick,
           "commit_env": os.environ.get("FASTDIFF_BENCH_COMMIT"), "distributed": [], "streaming": []}
    t0 = time.perf_counter()
    if distributed:
        log("distributed (gloo, 1 thread per rank)")
        res["distributed"] = distributed_rows(SHAPES_QUICK if quick else SHAPES_FULL, ranks, 3, log)
        _write(out, res)
    if streaming:
        log("streaming (fresh process per case)")
        res["streaming"] = streaming_rows(STREAM_QUICK if quick else STREAM_FULL, tmpdir, torch.get_num_threads(),
                                          2 if quick else 3, log)
    res["seconds"] = time.perf_counter() - t0
    try:
        res["loadavg_end"] = list(os.getloadavg())
    except OSError:
        res["loadavg_end"] = None
    _write(out, res)
    return out


def _write(out, res):
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "report.md").write_text(report(res))


def _modified_note(dirty_files) -> str:
    return " (tracked files modified: " + ", ".join(f.split()[-1] for f in dirty_files) + ")"


def report(res) -> str:
    env, git = res["environment"], res["git"]
    commit = res.get("commit_env") or git.get("commit")
    lines = ["# fastdiff distributed and streaming benchmark", "",
             f"CPU: {env.get('cpu_model')} ({env.get('cpu_count')} cores), torch {env.get('torch_version')}, "
             f"commit {commit}" + (_modified_note(git["dirty_files"])
                                   if git.get("dirty_files") and not res.get("commit_env") else ""), ""]
    lines += distributed_table(res["distributed"]) + [""] + streaming_table(res["streaming"])
    return "\n".join(lines) + "\n"


def distributed_table(rows):
    if not rows:
        return []
    out = ["## Sharded point cloud (gloo, CPU ranks, 1 thread each)", "",
           "| scaling | shape | M | N | ranks | step ms | local ms | merge ms | merge % | all_reduce bytes/step "
           "| speedup / efficiency |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = r.get("speedup", r.get("efficiency"))
        out.append(f"| {r['scaling']} | {r['shape']} | {r['M']} | {r['N']:,} | {r['ranks']} | "
                   f"{1e3 * r['step_s']:.1f} | {1e3 * r['local_s']:.1f} | {1e3 * r['merge_s']:.2f} | "
                   f"{100 * r['merge_fraction']:.1f} | {r['allreduce_bytes_per_step']:,} | {gain:.2f} |")
    return out


def streaming_table(rows):
    if not rows:
        return []
    out = ["## Streamed point cloud (.npy file through the page cache, chunks prefetched by a thread)", "",
           "| case | storage | M | file GB | chunk rows | s / posterior | timed calls | pairs/s | peak RSS MB "
           "| above setup MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    # "above setup": peak resident set minus the resident set after imports and setup (before the data is read)
    for r in rows:
        out.append(f"| {r['case']} | {r['storage']} | {r['M']} | {r['file_gb']:.2f} | {r['chunk_rows']:,} | "
                   f"{r['s_per_call']:.2f} | {r.get('reps', '?')} | {r['pairs_per_s']:.3g} | {r['peak_rss_mb']:.0f} | "
                   f"{r['peak_above_setup_mb']:.0f} |")
    return out


def add_arguments(p):
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--no-streaming", action="store_true", help="skip the streaming cases")
    p.add_argument("--no-sharded", action="store_true", help="skip the sharded (gloo) cases")
    p.add_argument("--tmpdir", default="/tmp", help="where the streaming .npy files are written (and removed)")
    return p


def run_from_args(args) -> int:
    try:
        ranks = tuple(int(k) for k in str(getattr(args, "ranks", "1,2")).split(","))
    except ValueError:
        print(f"fastdiff bench: error: --ranks must be comma-separated integers, got {args.ranks!r}", file=sys.stderr)
        return 2
    out = args.out or Path("fastdiff-bench") / (time.strftime("%Y%m%d-%H%M%S") + "-cpu-distributed"
                                                + ("-quick" if args.quick else ""))
    path = run(out, quick=args.quick, ranks=ranks, streaming=not getattr(args, "no_streaming", False),
               distributed=not getattr(args, "no_sharded", False), progress=not getattr(args, "no_progress", False),
               tmpdir=getattr(args, "tmpdir", "/tmp"))
    print(path)
    return 0


README_START, README_END = "<!-- distributed:start -->", "<!-- distributed:end -->"


def _loadavg(v) -> str:
    return ", ".join(f"{x:.1f}" for x in (v or []))


def readme_section(run_dirs) -> str:
    """The README's tables from committed run folders: each table from the last folder that has it."""
    run_dirs = [Path(d) for d in ([run_dirs] if isinstance(run_dirs, (str, Path)) else run_dirs)]
    runs = [(d, json.loads((d / "results.json").read_text())) for d in run_dirs]
    lines = [README_START, f"Generated by `python -m fastdiff.bench.distributed --readme README.md --results "
                           f"{' '.join(d.as_posix() for d in run_dirs)}`; each folder's `report.md` has the full "
                           "tables.", ""]
    for key, table in (("distributed", distributed_table), ("streaming", streaming_table)):
        have = [(d, res) for d, res in runs if res.get(key)]
        if not have:
            continue
        d, res = have[-1]
        env = res["environment"]
        commit = (res.get("commit_env") or res["git"].get("commit") or "?")[:12]
        body = [line.replace("## ", "#### ") for line in table(res[key])]
        lines += body[:2] + [f"Run `{d.name}` at commit `{commit}` on {env.get('cpu_model')} ({env.get('cpu_count')} "
                             f"cores); load average {_loadavg(env.get('loadavg_start'))} at the start, "
                             f"{_loadavg(res.get('loadavg_end'))} at the end.", ""] + body[2:] + [""]
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
    p = argparse.ArgumentParser(prog="python -m fastdiff.bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    return run_from_args(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
