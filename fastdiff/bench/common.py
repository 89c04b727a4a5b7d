"""Shared pieces of the benchmark suites: the run context, result rows, backend discovery and peers."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .timing import Ceiling, Timing, TimingPolicy

# One row per measurement; the CSV has exactly these columns (JSON rows have the same keys).
COLUMNS = [
    "run_id", "suite", "op", "provider", "backend", "case", "shape", "M", "N", "d", "n_elems", "steps", "dtype",
    "device", "device_name", "cpu_model", "gpu_model", "threads",
    "median_s", "q25_s", "q75_s", "min_s", "spread", "reps", "inner", "first_s",
    "throughput", "unit", "ceiling", "ceiling_throughput", "roofline_fraction",
    "ref_provider", "speedup_vs_ref",
    "err_D", "err_L", "err_D_sigma", "accurate", "acc_shape", "sigma", "regime", "eff_points", "kl", "w2",
    "max_abs_diff", "peak_mem_bytes", "mem_vs_MxN", "target", "note",
    "torch_version", "triton_version", "fastdiff_version", "command",
]


@dataclass
class Case:
    """One planned unit of work: `fn(ctx)` appends rows (and notes) to ctx."""
    suite: str
    label: str
    fn: object


@dataclass
class Context:
    device: torch.device
    quick: bool
    out: Path
    policy: TimingPolicy
    env: dict
    ceilings: dict[str, Ceiling] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    notes: list[dict] = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)     # suite-level results (e.g. scaling fits) for the JSON
    progress: object = None
    run_id: str = ""
    deadline: float | None = None      # time.perf_counter() after which remaining cases are skipped
    json_only: bool = False            # write results.json alone (no CSV, report or plots)

    def out_of_time(self) -> bool:
        import time
        return self.deadline is not None and time.perf_counter() > self.deadline

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def note(self, suite: str, provider: str, text: str, kind: str = "skipped"):
        """A provider skipped or failed (kept once per suite/provider/text)."""
        item = {"suite": suite, "provider": provider, "kind": kind, "note": text}
        if item not in self.notes:
            self.notes.append(item)
            if self.progress is not None:
                self.progress.message(f"  {kind}: {suite}/{provider}: {text}")

    def add_row(self, **kw) -> dict:
        row = {c: None for c in COLUMNS}
        row.update(run_id=self.run_id, device=self.device.type, device_name=self.env.get("device_name"),
                   cpu_model=self.env.get("cpu_model"), gpu_model=self.env.get("gpu_model"),
                   threads=None if self.cuda else torch.get_num_threads(),
                   torch_version=self.env.get("torch_version"), triton_version=self.env.get("triton_version"),
                   fastdiff_version=self.env.get("fastdiff_version"), command=self.env.get("command"))
        for k, v in kw.items():
            if k not in row:
                raise KeyError(f"unknown result column {k!r}")
            row[k] = v
        self.rows.append(row)
        return row

    def timing_row(self, timing: Timing, **kw) -> dict:
        return self.add_row(median_s=timing.median_s, q25_s=timing.q25_s, q75_s=timing.q75_s, min_s=timing.min_s,
                            spread=timing.spread, reps=timing.reps, inner=timing.inner, first_s=timing.first_s, **kw)


def fill_speedups(rows: list[dict], ref_provider: str, key=("suite", "op", "case", "dtype")):
    """speedup_vs_ref = median time of ref_provider / this row's median time, for rows of the same case."""
    ref = {tuple(r[k] for k in key): r["median_s"] for r in rows if r["provider"] == ref_provider and r["median_s"]}
    for r in rows:
        t_ref = ref.get(tuple(r[k] for k in key))
        if t_ref and r["median_s"]:
            r["ref_provider"] = ref_provider
            r["speedup_vs_ref"] = t_ref / r["median_s"]


# ----------------------------------------------------------------------------------------- backends
def fastdiff_backends() -> list[str]:
    """Every registered fastdiff backend (fastdiff._backend.BACKENDS, in its order; PREFERENCE first if the
    registry has one), so backends added later are benchmarked without changes here."""
    from fastdiff import _backend
    pref = [n for n in getattr(_backend, "PREFERENCE", ()) if n in _backend.BACKENDS]
    return pref + [n for n in _backend.BACKENDS if n not in pref]


def backend_refusal(name: str, op: str, x=None, **inputs) -> list[str]:
    """Why fastdiff backend `name` will not run `op` on inputs like x ([] = it will). Passes the registry's
    own description of the inputs (`_backend.facts(x)`: device, dtype, d) and the tensors themselves
    (x=, data=, D=): a backend that decides on tensors (Triton: CPU tensors need TRITON_INTERPRET=1) then
    refuses here instead of failing inside the timed call."""
    import os

    from fastdiff import _backend
    if (name == "triton" and isinstance(x, torch.Tensor) and x.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        return ["TRITON_INTERPRET=1 runs the Triton kernels in the interpreter on CPU tensors (a test tool): "
                "not benchmarked"]
    try:
        backend = _backend.BACKENDS[name]
        facts = getattr(_backend, "facts", None)
        kw = dict(facts(x)) if (facts is not None and x is not None) else {}
        if x is not None:
            kw["x"] = x
        kw.update(inputs)
        try:
            return list(backend.refuse_reasons(op, **kw))
        except TypeError:        # a refuse_reasons that takes only the facts
            return list(backend.refuse_reasons(op, **(facts(x) if (facts is not None and x is not None) else {})))
    except Exception as exc:     # a backend under construction must not break the harness
        return [f"refuse_reasons raised {type(exc).__name__}: {exc}"]


def cleanup(device) -> None:
    """Free what a case left behind (between cases, and after a failure such as running out of memory)."""
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass


def describe_error(exc: BaseException, limit: int = 240) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {(text[0] if text else '')[:limit]}"


def mem_cap(ctx) -> float:
    """Bytes a provider that materialises M×N matrices may use before it is skipped (with a note)."""
    if ctx.cuda:
        try:
            free, total = torch.cuda.mem_get_info(ctx.device)
            return 0.45 * min(total, free + torch.cuda.memory_reserved(ctx.device))
        except Exception:
            return 0.4 * torch.cuda.get_device_properties(ctx.device).total_memory
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except Exception:
        avail = 8 << 30
    return min(6 << 30, 0.3 * avail)


def fastdiff_provider(name: str) -> str:
    return f"fastdiff[{name}]"


# ----------------------------------------------------------------------------------------- peers
_KDIFFUSION: list = []


def kdiffusion_sampling():
    """(k_diffusion.sampling, None), or (None, reason). k_diffusion/__init__ imports its whole training
    stack (wandb, CLIP, skimage, ...); the samplers need only k_diffusion.sampling and k_diffusion.utils,
    so when the package import fails they are loaded without the package __init__. Looked up once."""
    if not _KDIFFUSION:
        _KDIFFUSION.append(_load_kdiffusion())
    return _KDIFFUSION[0]


def _load_kdiffusion():
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ValueError, ImportError) as exc:
        return None, f"k_diffusion cannot be looked up: {type(exc).__name__}: {exc}"
    if spec is None:
        return None, "k-diffusion is not installed (pip install k-diffusion)"
    try:
        return importlib.import_module("k_diffusion.sampling"), None
    except Exception:
        for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
            del sys.modules[name]
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        # a real spec, so importlib.util.find_spec("k_diffusion") keeps working for everyone else
        pkg.__spec__, pkg.__file__, pkg.__package__ = spec, spec.origin, "k_diffusion"
        sys.modules["k_diffusion"] = pkg
        try:
            return importlib.import_module("k_diffusion.sampling"), None
        except Exception as exc:
            for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
                del sys.modules[name]
            return None, f"k_diffusion.sampling cannot be imported: {type(exc).__name__}: {exc}"


def optional_import(module: str, install_hint: str):
    """(module, None) or (None, reason) — an absent peer is a note, never an error."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None, f"{module.split('.')[0]} is not installed ({install_hint})"
    try:
        return importlib.import_module(module), None
    except Exception as exc:
        return None, f"{module} cannot be imported: {type(exc).__name__}: {exc}"


def ladder(d: int, cap: float, count: int, k_min: int = 5, k_max: int = 17, ratio: int = 4):
    """Sizes (M, N) = (2^k, ratio·2^k), the `count` largest with M·N·max(d, 8) <= cap (pairs·dims budget)."""
    fits = [(2**k, ratio * 2**k) for k in range(k_min, k_max + 1) if (2**k) * (ratio * 2**k) * max(d, 8) <= cap]
    return fits[-count:] if fits else [(2**k_min, ratio * 2**k_min)]


def fmt_si(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
