"""Shared helpers for the reproductions: the run context (mode, output folder, seed, logging, figures)
and small markdown formatting functions."""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("smoke", "quick", "full")


@dataclass
class Context:
    """What an experiment gets: its mode ("smoke" | "quick" | "full"), output folder, seed and a place
    to put numbers (``results``, written to results.json) and figures."""

    name: str
    mode: str
    out: Path
    seed: int = 0
    progress: bool = False
    results: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def pick(self, smoke, quick, full):
        """The setting for this mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    def log(self, msg: str):
        if self.progress:
            print(f"[{self.name} {time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def savefig(self, fig, filename: str, dpi: int = 90) -> Path:
        """Save a matplotlib figure as a PNG in the output folder (and close it)."""
        import matplotlib.pyplot as plt

        path = self.out / filename
        fig.savefig(path, dpi=dpi if self.mode != "smoke" else 40)
        plt.close(fig)
        self.figures.append(filename)
        return path


def plt():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    return pyplot


def fmt(v, digits: int = 3) -> str:
    """A number for a markdown table: 3 significant digits, scientific when small or large."""
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "−inf"
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.{digits}g}"
    return f"{v:.{max(digits - 1, 1)}e}"


def table(headers, rows) -> str:
    """A markdown table; cells are formatted with ``fmt``."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(lines)


def settings_list(items: dict) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in items.items())


def to_jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return obj


def write_json(path: Path, obj):
    path.write_text(json.dumps(to_jsonable(obj), indent=1))


def empirical_gaussian(x: torch.Tensor):
    """(mean, covariance) of samples [n, d] in float64."""
    x = x.double()
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (x.shape[0] - 1)
    return m, 0.5 * (c + c.T)


@contextmanager
def torch_threads(n: int):
    """Run the block with at most n torch intra-op threads (restored afterwards). Training the small
    MLPs here (batches of a few hundred, width 64) is faster and far less sensitive to other load on
    the machine with one thread than with two: the matrices are too small to split."""
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, min(int(n), prev)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def mean_sd(values):
    """(mean, sample standard deviation) of a list of floats (sd 0 for one value)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd
