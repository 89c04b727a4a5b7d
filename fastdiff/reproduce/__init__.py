"""Reproductions of the three papers' experiments (``fastdiff reproduce <experiment>``).

    import fastdiff.reproduce as rp
    path = rp.run("drift-ve-gaussian", quick=True)      # -> reproductions/drift-ve-gaussian/results.md

Each experiment writes ``results.md`` (settings, tables, the paper's claim, whether we agree and by how
much), ``results.json`` (the numbers) and PNG figures into its output folder. Modes: the default full mode
uses the papers' sizes where known; ``quick`` runs in under three minutes on two CPU cores; ``smoke``
(seconds, for CI) only exercises the code path and its numbers mean nothing.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from .._checks import make_folder
from ..schedules import as_integer
from . import cem_schedules, cem_training, drift_ve_gaussian, drift_ve_table, ode_sde_gap
from ._common import Context, write_json

_MODULES = {
    "drift-ve-gaussian": drift_ve_gaussian,
    "drift-ve-table": drift_ve_table,
    "cem-schedules": cem_schedules,
    "cem-training": cem_training,
    "ode-sde-gap": ode_sde_gap,
}
#: name -> the experiment function ``fn(ctx: Context) -> str`` (the markdown body of results.md)
EXPERIMENTS = {name: mod.experiment for name, mod in _MODULES.items()}
#: name -> one-line description
DESCRIPTIONS = {name: mod.DESCRIPTION for name, mod in _MODULES.items()}

#: the largest seed: the experiments derive seeds up to seed + 201 (ode-sde-gap), and every one must stay
#: within torch's generators and fd.sample's [0, 2**64); [0, 2**63) leaves a wide margin and is easy to state
MAX_SEED = 2**63 - 1

__all__ = ["DESCRIPTIONS", "EXPERIMENTS", "MAX_SEED", "Context", "run", "default_out"]


def default_out(name: str, smoke: bool = False) -> Path:
    """reproductions/<name>, or reproductions/<name>-smoke for a smoke run: its meaningless numbers never
    replace the committed --quick results."""
    return Path("reproductions") / (f"{name}-smoke" if smoke else name)


def run(name: str, quick: bool = False, smoke: bool = False, out=None, seed: int = 0,
        progress: bool = False, threads: int | None = 1) -> Path:
    """Run experiment `name` and return the path of its results.md.

    quick   the reduced mode (< 3 minutes on two CPU cores);  smoke: seconds, for CI (meaningless numbers)
    out     output folder (default ``reproductions/<name>``, ``reproductions/<name>-smoke`` for smoke), created
            if needed; files already in it are replaced
    seed    an integer in [0, 2**63) (MAX_SEED at most); seeds every random draw (data sets, sampler noise,
            network initialisation, training)
    progress  log each stage to stderr
    threads   torch intra-op threads during the run (restored afterwards); None leaves it alone. The
              default is 1: the work here is many small tensor ops, and on a machine shared with other
              jobs two threads were measured up to 4x slower than one (cem-schedules --quick: 82 s vs 19 s)
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    if quick and smoke:                  # was: smoke, silently
        raise ValueError("quick and smoke exclude each other: choose one mode")
    seed = as_integer(seed, "seed", 0, MAX_SEED)      # before any work or folder (seed + 201 must still fit)
    mode = "smoke" if smoke else ("quick" if quick else "full")
    out = Path(out) if out is not None else default_out(name, smoke)
    make_folder(out, "out")
    ctx = Context(name=name, mode=mode, out=out, seed=seed, progress=bool(progress))
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(max(1, min(int(threads), prev_threads)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            body = EXPERIMENTS[name](ctx)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    from .. import __version__

    flag = {"smoke": " --smoke", "quick": " --quick", "full": ""}[mode]
    header = (f"# `{name}`: {DESCRIPTIONS[name]}\n\n"
              f"Command: `fastdiff reproduce {name}{flag} --seed {seed}` · mode **{mode}** · "
              f"runtime {seconds:.0f} s on "
              f"{torch.get_num_threads() if not threads else min(int(threads), prev_threads)} "
              f"CPU thread(s) · fastdiff {__version__}, torch {torch.__version__}, python "
              f"{platform.python_version()}\n")
    if mode == "smoke":
        header += "\n> **Smoke mode**: tiny sizes that only exercise the code; the numbers below mean nothing.\n"
    path = out / "results.md"
    path.write_text(header + "\n" + body.strip() + "\n")
    write_json(out / "results.json", {"experiment": name, "mode": mode, "seed": seed,
                                       "seconds": seconds, "figures": ctx.figures, "results": ctx.results})
    return path
