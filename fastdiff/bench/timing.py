"""Timing, hardware ceilings, peak memory, environment and progress for `fastdiff bench`.

Timing (DESIGN.md "Benchmarks"): warm-up calls first (the first call's time is kept: it includes any
compilation), then repeated samples until both a minimum number of samples and a minimum total time are
reached. Each sample times `inner` back-to-back calls (chosen so one sample lasts at least ~2 ms, which
keeps timer and scheduler noise small) and is divided by `inner`. On CUDA each sample is bracketed by
CUDA events recorded on the current stream and read after one synchronisation at the end; on the CPU by
`time.perf_counter`. Results are medians with the interquartile range as the spread: robust to the
occasional sample slowed down by another process on a shared machine. A call lasting at least
`long_call` seconds (whole sampling runs of the torch reference take minutes) is not warmed up again and
is timed only while the total stays under `max_time` (reps = 1 for a run of minutes; see measure()).
Calls of tens of ms whose ratios are close (the sample suite's MLP loops) are timed together instead, one call
of each per round, the order rotated each round (measure_interleaved), so a drift of the machine's speed over
seconds falls on all of them alike.

Ceilings, measured in the same run on the same device:
  copy   bytes moved per second by `dst.copy_(src)` (read + write, a buffer much larger than the caches;
         device-to-device on CUDA, memcpy on the CPU)
  fma    fp32 FLOP/s of a large square matmul (TF32 disabled on CUDA): the achievable fp32 FMA rate
  exp    exponentials per second: on CUDA a Triton kernel that applies exp 64 times to each loaded value
         (compute-bound); without Triton, and on the CPU, `torch.exp` on a cache-resident buffer
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch


# ----------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    reps: int          # number of timed samples
    inner: int         # calls per sample
    first_s: float     # the very first call (includes compilation / lazy initialisation)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s > 0 else float("nan")


@dataclass
class TimingPolicy:
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    min_time: float = 0.5       # seconds of timed samples at least (unless max_time is hit)
    max_time: float = 8.0       # stop sampling after this much (but never before 3 samples)
    sample_time: float = 2e-3   # a sample lasts at least this long (inner calls are batched)
    long_call: float = 5.0      # a call this slow is not warmed up again: see measure()


QUICK_POLICY = TimingPolicy(warmup=1, min_reps=3, max_reps=15, min_time=0.05, max_time=1.0, sample_time=1e-3,
                            long_call=1.0)
FULL_POLICY = TimingPolicy(max_time=6.0, long_call=2.0)
# CUDA events are precise and the GPU is not shared: shorter sampling keeps a full GPU run within its budget.
CUDA_POLICY = TimingPolicy(warmup=2, min_reps=5, max_reps=30, min_time=0.15, max_time=3.0, sample_time=5e-3,
                           long_call=3.0)
CUDA_QUICK_POLICY = TimingPolicy(warmup=1, min_reps=3, max_reps=10, min_time=0.03, max_time=0.5, sample_time=2e-3,
                                 long_call=1.0)


def policy_for(device, quick: bool) -> TimingPolicy:
    if torch.device(device).type == "cuda":
        return CUDA_QUICK_POLICY if quick else CUDA_POLICY
    return QUICK_POLICY if quick else FULL_POLICY


def _quantile(sorted_vals, q):
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def measure(fn, device: torch.device | str, policy: TimingPolicy = FULL_POLICY, *, min_reps: int | None = None,
            max_time: float | None = None, warm_first: bool = False) -> Timing:
    """Median time of one call of `fn()` on `device` (see the module docstring for the method).

    Long calls (whole sampling runs of the torch reference take minutes): when the first call lasts at
    least policy.long_call seconds, it is not repeated for warm-up. With warm_first=True (the caller knows
    the first call compiles nothing: eager torch, the C++ kernels) that first call is itself the first
    sample; otherwise one more call is made and, if it is fast (the first one was compilation), timing
    continues as usual; if it is slow too, it is the first sample. Long calls are sampled only while the
    total stays under max_time, so a 2-minute call is timed once (reps = 1, spread 0)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    min_reps = policy.min_reps if min_reps is None else min_reps
    max_time = policy.max_time if max_time is None else max_time

    t_begin = time.perf_counter()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    last = first
    if first >= policy.long_call:
        samples = [first] if warm_first else []
        while True:
            if samples and (time.perf_counter() - t_begin + samples[-1] > max_time or len(samples) >= min_reps):
                s = sorted(samples)
                return Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], len(s), 1, first)
            t0 = time.perf_counter()
            fn()
            sync()
            last = time.perf_counter() - t0
            if not samples and last < policy.long_call / 2:
                break           # the first call was compilation: time it the usual way, already warm
            samples.append(last)
    else:
        for _ in range(max(0, policy.warmup - 1)):
            t0 = time.perf_counter()
            fn()
            sync()
            last = time.perf_counter() - t0
    inner = max(1, min(1000, int(math.ceil(policy.sample_time / max(last, 1e-7)))))

    samples: list[float] = []
    started = time.perf_counter()
    if cuda:
        events = []
        while True:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            events.append((start, end))
            # the wall clock only decides when to stop; the samples are the event times
            if len(events) % 5 == 0 or len(events) >= min_reps:
                sync()
            spent = time.perf_counter() - started
            n = len(events)
            if n >= policy.max_reps or (n >= min_reps and spent >= policy.min_time) or (n >= 3 and spent >= max_time):
                break
        sync()
        samples = [s.elapsed_time(e) / 1e3 / inner for s, e in events]
    else:
        while True:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
            spent = time.perf_counter() - started
            n = len(samples)
            if n >= policy.max_reps or (n >= min_reps and spent >= policy.min_time) or (n >= 3 and spent >= max_time):
                break
    s = sorted(samples)
    return Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), s[0], len(s), inner, first)


def measure_interleaved(fns: list, device: torch.device | str, policy: TimingPolicy = FULL_POLICY) -> list[Timing]:
    """Median time of one call of each of `fns`, timed in rounds (one call of each per round, the order rotated
    each round) instead of one after the other: on a shared machine whose speed drifts by several percent over
    seconds, the ratios between the fns then compare calls made at the same time. For calls short enough to
    repeat (tens of ms); the first call of each is its warm-up (first_s). Rounds: at least policy.min_reps, and
    on until policy.min_time of samples per fn or policy.max_reps rounds."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    firsts = [timed(fn) for fn in fns]
    for _ in range(max(0, policy.warmup - 1)):
        for fn in fns:
            timed(fn)
    samples: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    while True:
        r = len(samples[0])
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            samples[i].append(timed(fns[i]))
        spent = (time.perf_counter() - started) / len(fns)
        if r + 1 >= policy.max_reps or (r + 1 >= policy.min_reps and spent >= policy.min_time):
            break
    out = []
    for first, vals in zip(firsts, samples, strict=True):
        v = sorted(vals)
        out.append(Timing(statistics.median(v), _quantile(v, 0.25), _quantile(v, 0.75), v[0], len(v), 1, first))
    return out


# ----------------------------------------------------------------------------------------- ceilings
@dataclass
class Ceiling:
    name: str
    value: float        # in `unit`
    unit: str
    method: str
    timing: dict = field(default_factory=dict)


def measure_ceilings(device, quick: bool, policy: TimingPolicy) -> dict[str, Ceiling]:
    device = torch.device(device)
    out = {}
    out["copy"] = _copy_ceiling(device, quick, policy)
    out["fma"] = _fma_ceiling(device, quick, policy)
    out["exp"] = _exp_ceiling(device, quick, policy)
    return out


def _copy_ceiling(device, quick, policy):
    if device.type == "cuda":
        n = (1 << 26) if quick else (1 << 28)     # 256 MiB / 1 GiB fp32: far beyond L2
        method = "device-to-device dst.copy_(src)"
    else:
        n = (1 << 24) if quick else (1 << 26)     # 64 MiB / 256 MiB fp32: far beyond the LLC
        method = "memcpy: dst.copy_(src) on the CPU"
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = measure(partial(dst.copy_, src), device, policy)
    nbytes = 2 * n * 4
    del src, dst
    return Ceiling("copy", nbytes / t.median_s / 1e9, "GB/s", f"{method}, {n * 4 >> 20} MiB, read + write counted",
                   asdict(t))


def _fma_ceiling(device, quick, policy):
    if device.type == "cuda":
        n = 4096 if quick else 8192
    else:
        n = 1024 if quick else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    flags = None
    if device.type == "cuda":
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        t = measure(lambda: torch.mm(a, b, out=c), device, policy)
    finally:
        if flags is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    what = "TF32 off" if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    return Ceiling("fma", 2 * n**3 / t.median_s / 1e9, "GFLOP/s", f"fp32 matmul {n}x{n} ({what}), 2n^3 flops",
                   asdict(t))


_EXP_ITERS = 64


def _triton_exp_kernel():
    """A compute-bound exp kernel: each loaded value goes through 64 dependent exps (x <- -exp(x) stays in
    [-1, 0)), enough independent elements in flight to fill the machine. Returns a launcher or None."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def _exp_loop(x_ptr, out_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=-0.5)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(ITERS):
            x = -tl.exp(x)
            acc += x
        tl.store(out_ptr + offs, acc, mask=mask)

    def launch(x, out):
        n = x.numel()
        block = 1024
        _exp_loop[(triton.cdiv(n, block),)](x, out, n, ITERS=_EXP_ITERS, BLOCK=block)

    return launch


def _exp_ceiling(device, quick, policy):
    if device.type == "cuda":
        launch = _triton_exp_kernel()
        if launch is not None:
            n = 1 << 22
            x = -torch.rand(n, device=device)
            out = torch.empty_like(x)
            try:
                launch(x, out)
                torch.cuda.synchronize(device)
                ref = x.double()
                acc = torch.zeros_like(ref)
                for _ in range(_EXP_ITERS):
                    ref = -ref.exp()
                    acc += ref
                if not torch.allclose(out.double(), acc, rtol=1e-3, atol=1e-3):
                    raise RuntimeError("the Triton exp kernel disagrees with torch")
                t = measure(lambda: launch(x, out), device, policy)
                return Ceiling("exp", n * _EXP_ITERS / t.median_s / 1e9, "Gexp/s",
                               f"Triton kernel: {_EXP_ITERS} dependent tl.exp per element, {n} elements", asdict(t))
            except Exception as exc:   # fall back to torch.exp below, and say so
                fallback = f"Triton exp kernel failed ({type(exc).__name__}: {exc}); "
        else:
            fallback = "Triton not available; "
        n = 1 << 20      # 4 MiB: resident in L2
        method = fallback + f"torch.exp on an L2-resident {n * 4 >> 20} MiB buffer (a lower bound)"
    else:
        n = 1 << 17      # 512 KiB: resident in the per-core caches
        fallback = ""
        # torch.exp's throughput, not a hardware bound: fastdiff's CPU kernels evaluate e^x inline (a polynomial
        # in registers), so their fraction of it can exceed 100 %
        method = (f"torch.exp(out=) on a cache-resident {n * 4 >> 10} KiB buffer, {torch.get_num_threads()} "
                  "thread(s): a reference rate, not a bound (fastdiff's inline exp may exceed it)")
    x = torch.rand(n, device=device) - 1
    out = torch.empty_like(x)
    t = measure(lambda: torch.exp(x, out=out), device, policy)
    return Ceiling("exp", n / t.median_s / 1e9, "Gexp/s", method, asdict(t))


# ----------------------------------------------------------------------------------------- memory
def cuda_peak(fn, device) -> int:
    """Peak bytes allocated by the CUDA caching allocator during one call, above what was live before."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") > 0
    except OSError:
        return False


def cpu_peak(fn) -> int:
    """Peak resident memory during one call above the resident size before it (Linux: VmHWM reset via
    /proc/self/clear_refs). Meaningful only in a process whose allocator returns freed blocks to the OS
    (the scaling suite runs it in a worker with MALLOC_MMAP_THRESHOLD_ set); -1 where unsupported."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    base = _status_kb("VmRSS")
    fn()
    return max(0, (_status_kb("VmHWM") - base)) * 1024


# ----------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return None


def _describe_backends(_backend) -> dict:
    try:
        return {name: list(reasons) for name, reasons in _backend.describe().items()}
    except Exception as exc:
        return {"?": [f"describe() raised {type(exc).__name__}: {exc}"]}


def _build_config(_backend):
    try:
        cfg = _backend.build_config()
        return None if cfg is None else {k: (v if isinstance(v, (bool, int, float, str)) else str(v))
                                         for k, v in dict(cfg).items()}
    except Exception as exc:
        return f"build_config() raised {type(exc).__name__}: {exc}"


def environment(device, argv=None) -> dict:
    import fastdiff
    from fastdiff import _backend

    device = torch.device(device)
    cmd = list(sys.argv) if argv is None else list(argv)
    if cmd:
        cmd[0] = os.path.basename(cmd[0])
        if cmd[0] == "__main__.py":           # python -m fastdiff.bench / python -m fastdiff
            cmd[0] = "python -m fastdiff.bench" if "bench" not in cmd[1:2] else "python -m fastdiff"
            cmd = cmd[0].split() + cmd[1:]
    env = {
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_model": None,
        "device_name": None,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": _version("triton"),
        "fastdiff_version": getattr(fastdiff, "__version__", "?"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "command": shlex.join(cmd) if cmd else "",
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "backends": _describe_backends(_backend),
        "fastdiff_build": _build_config(_backend),
        "peers": {name: _version(dist) for name, dist in
                  (("k_diffusion", "k-diffusion"), ("diffusers", "diffusers"), ("pykeops", "pykeops"))},
    }
    try:
        env["loadavg_start"] = list(os.getloadavg())
    except OSError:
        env["loadavg_start"] = None
    try:
        here = os.path.dirname(os.path.abspath(fastdiff.__file__))

        def git(*a):
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()
        head = git("rev-parse", "--short", "HEAD") or None
        # uncommitted changes to tracked files, or new files in the package or the kernels' sources, make the
        # commit alone not what ran
        changed = git("status", "--porcelain", "--untracked-files=no") or git(
            "status", "--porcelain", "--untracked-files=all", "--", "fastdiff", "csrc")
        env["fastdiff_git"] = head and head + ("+dirty" if changed else "")
    except Exception:
        env["fastdiff_git"] = None
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env["gpu_model"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
        env["device_name"] = props.name
    else:
        n = torch.get_num_threads()
        try:
            from .. import _backend
            env["cpu_isa"] = _backend.cpu_isa()     # AMX / AVX-512 / AVX2: the same model name covers all three
        except Exception:  # the environment record must not fail the run
            env["cpu_isa"] = None
        isa = f", {env['cpu_isa']}" if env["cpu_isa"] else ""
        env["device_name"] = f"{env['cpu_model']}{isa} ({n} thread{'s' if n != 1 else ''})"
    return env


# ----------------------------------------------------------------------------------------- progress
class Progress:
    """What is running: a tqdm bar (cases done / planned, current case as its description) when tqdm is
    installed and stderr is a terminal, else one line per case and provider on stderr (readable in a log)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        self.t0 = time.perf_counter()
        if enabled and getattr(sys.stderr, "isatty", lambda: False)():
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, file=sys.stderr,
                                bar_format="{l_bar}{bar:20}{r_bar}")
            except ImportError:
                self.bar = None

    def start(self, label: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(label[:70])
        else:
            print(f"[{self.done + 1}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}", file=sys.stderr,
                  flush=True)

    def message(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def finish_case(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def to_jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
