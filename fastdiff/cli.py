"""The `fastdiff` command line: sample, info, demo."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .methods import ALL_METHODS, SOLVER_TYPES
from .schedules import as_integer

PROCESS_CHOICES = ("pure-ve", "drifted-ve", "drifted-ve-aggressive", "ve", "vp", "ou")
SCHEDULE_CHOICES = ("uniform", "quadratic", "exponential", "karras", "logsnr")   # fd.SCHEDULES (tested equal)
DEFAULT_SCHEDULE, DEFAULT_T_END = "logsnr", 1e-3                                 # fd.time_grid's (tested equal)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (whose help says what happens instead)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _count(text: str) -> int:
    """An integer argument: "2000", "1e6" or "1_000_000"; never a silently truncated 2.7."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


DEFAULT_T = {"pure-ve": 100.0, "drifted-ve": 100.0, "drifted-ve-aggressive": 100.0, "ou": 10.0, "ve": 1.0, "vp": 1.0}


def make_process(name: str, T: float | None):
    """A process by CLI name; T=None keeps the process's own default (DEFAULT_T; VE and VP always have T = 1).
    An explicit T is used as given (T = 0 is an error, never the default)."""
    import fastdiff as fd

    T_ = DEFAULT_T[name] if T is None else T
    if name == "pure-ve":
        return fd.PureVE(T=T_)
    if name == "drifted-ve":
        return fd.DriftedVE(T=T_, beta="t")
    if name == "drifted-ve-aggressive":
        return fd.DriftedVE(T=T_, beta="t^2")
    if name == "ou":
        return fd.OU(theta=0.5, g=1.0, T=T_)
    if T_ != 1.0:
        raise ValueError(f"--T does not apply to {name} (its T is 1), got {T}")
    return fd.VE() if name == "ve" else fd.VP()


DEFAULT_N_DATA = {"circle": 8}     # points of a named data set when --n-data is not given; others: 2000
# Host bytes per point of a named data set: its float64 draw with temporaries, the float32 copy and the point
# cloud, measured at 1e7 points: 89 B (blob9, gaussian_2d), 22-57 B (the others); rounded up.
DATA_BYTES_PER_POINT = 128
# Host bytes per sample of `fastdiff demo` before fd.sample checks its own: the exact draws and their centres
# (float64 [n, 2], with temporaries) and the samples' float64 copy for the histograms.
DEMO_BYTES_PER_SAMPLE = 128


def _check_memory(need: float, what: str):
    """Refuse before allocating what cannot fit in the host memory available: a failed allocation is a
    traceback (or the OOM killer), not one line."""
    from .sampling import _available_host_bytes

    available = _available_host_bytes()
    if available is not None and need > available:
        raise ValueError(f"{what} would need about {need / 2**30:.3g} GiB but only {available / 2**30:.3g} GiB of "
                         "host memory is available")


def _load_data(spec: str, n_data: int | None, seed: int):
    """The data [N, d]: a named data set (n_data points, seeded) or a file (n_data does not apply)."""
    import fastdiff as fd

    if spec in fd.datasets.DATASETS:
        n = DEFAULT_N_DATA.get(spec, 2000) if n_data is None else n_data
        if n_data is not None:
            _check_memory(float(n) * DATA_BYTES_PER_POINT, f"--n-data {n}")
        return fd.datasets.get(spec, n, seed=seed)
    if n_data is not None:
        raise ValueError(f"--n-data applies to the named data sets, not to the file {spec!r} (all its points are used)")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--data {spec!r} is neither a data set ({', '.join(fd.datasets.DATASETS)}) nor a file")
    return fd.datasets.load(path)


def _scatter(panels, path: Path, title: str):
    """PNG with one panel per (name, samples [n, d]); 1-D data as histograms."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastdiff: matplotlib is not installed (pip install 'fastdiff[plot]'); no figure written",
              file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels, strict=True):
        x = x.detach().cpu().double().numpy()
        if x.shape[1] == 1:
            ax.hist(x[:, 0], bins=100, density=True, color="tab:blue")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4, color="tab:blue", rasterized=True)
            ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_writable(path: Path, option: str):
    """A file `option` names can be written (creates its parent folder)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if not os.access(path, os.W_OK):
                raise PermissionError(13, "permission denied")
        else:
            tempfile.TemporaryFile(dir=path.parent).close()    # can a file be created there?
    except OSError as exc:
        raise ValueError(f"{option} {str(path)!r} is not writable ({exc.strerror or exc})") from None


def _check_out(out: Path):
    """--out must be .npz or .npy and writable; checked before any sampling (a failed write after the work
    would lose it). Creates the parent folder."""
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give a file name ending in .npz or .npy")
    if out.suffix not in (".npz", ".npy"):
        raise ValueError(f"--out {str(out)!r} must end in .npz (samples, data, settings) or .npy (samples only)")
    _check_writable(out, "--out")


def _check_plot(plot: Path):
    """--plot, like --out, before any sampling: a typo must not surface only after hours of work. Without
    matplotlib no figure is written (said after the run), so only the path is checked."""
    if plot.is_dir():
        raise ValueError(f"--plot {str(plot)!r} is a folder; give a file name such as samples.png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        pass
    else:
        formats = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix[1:].lower() not in formats:
            raise ValueError(f"--plot {str(plot)!r} must end in a format matplotlib writes (.png, .pdf, .svg, ...: "
                             f"{', '.join(sorted(formats))})")
    _check_writable(plot, "--plot")


def _check_out_dir(out: Path, option: str = "--out"):
    """An output folder, made before the work (fastdiff._checks.make_folder)."""
    from ._checks import make_folder
    make_folder(out, option)


AUTO_PROGRESS_SECONDS = 5.0   # estimated run time above which the bar is shown by default


SECONDS_PER_STEP = 5e-5   # fixed cost per step, measured at -n 2: 4.7e-5 s (1e5 to 1e6 steps, two loaded cores);
#                           8e-5 s in the CLI review's run (the 2e-5 used before hid 8-24 s runs' bar)


TORCH_PAIRS_PER_SECOND, TORCH_SECONDS_PER_STEP = 2e7, 2e-2   # --backend torch, d = 2, two cores: 1e7-3e7 pairs a
#                           second and ~20 ms a step (n = 1000-4000, 300-2000 points, 50 steps)


def _estimated_seconds(n: int, steps: int, n_points: int, d: int, backend: str = "auto") -> float:
    """A rough run time on two CPU cores: ~1e9 point-cloud pair evaluations a second, plus SECONDS_PER_STEP of
    fixed cost per step (so --steps 1e5 on a few samples, ~5 s, counts as long too); the plain-torch reference
    (--backend torch) ~50x slower a pair, with a fixed cost per step of its own."""
    pairs = float(n) * steps * n_points * max(d, 1) / 2
    if backend == "torch":
        return pairs / TORCH_PAIRS_PER_SECOND + TORCH_SECONDS_PER_STEP * steps
    return 2 * pairs / 1e9 + SECONDS_PER_STEP * steps


def _check_coverage(data, process):
    """The prior N(0, σ(T)²) must reach the data: data far beyond it are never visited by the sampler."""
    spread = float(data.double().abs().max())
    if spread > 10 * process.prior_std:
        print(f"fastdiff sample: warning: the data reach {spread:.3g} but the prior's std is {process.prior_std:.3g} "
              f"({process!r}); samples will miss most of the data: rescale the data or raise --T", file=sys.stderr)


def _launch() -> tuple[int, int]:
    """(rank, world size) from the environment torchrun sets; (0, 1) for a plain process (WORLD_SIZE unset or 1).
    Checked before any work, so a broken launch is one clear line, not a hang in the rendezvous."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={text!r} is not an integer (torchrun sets it; unset it for one "
                         "process)") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1 (torchrun sets it; unset it for one process)")
    if world == 1:
        return 0, 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun "
                         "(torchrun --nproc-per-node=K -m fastdiff sample ...)")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise ValueError(f"RANK={os.environ['RANK']!r} is not an integer (torchrun sets it)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    return rank, world


def _check_timeout(seconds: float):
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--timeout must be a positive number of seconds, got {seconds:g}")


def _check_rank_device(device: torch.device):
    """Under torchrun, `--device cuda` puts each rank on cuda:LOCAL_RANK; one explicit index for several ranks
    of a node would put them all on one GPU (NCCL refuses that, with an obscure error)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is not None and local_world > 1:
        raise ValueError(f"--device {str(device)!r} would put all {local_world} ranks of this node on one GPU; "
                         "give --device cuda (each rank then uses cuda:LOCAL_RANK)")


def _sample_on_ranks(args, data, process, device, dtype, kw):
    """fd.sample over the torchrun group: every rank gets the same x [n, d] (see --distributed)."""
    import fastdiff as fd
    from fastdiff import distributed as fdd

    ours = not torch.distributed.is_initialized()              # main() called inside a caller's group: keep it
    device = fdd.init(device, timeout=args.timeout)            # gloo on the CPU, NCCL on cuda:LOCAL_RANK
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if args.distributed == "data":
        start, count = fdd.sample_slice(data.shape[0], rank, world)
        cloud = fdd.ShardedPointCloud(data[start:start + count].to(device=device, dtype=dtype), process,
                                      bandwidth=args.bandwidth, timeout=args.timeout, backend=args.backend)
        x = fd.sample(cloud, **kw)
    else:
        cloud = fd.PointCloud(data.to(device=device, dtype=dtype), process, bandwidth=args.bandwidth)
        x = fdd.sample_parallel(cloud, timeout=args.timeout, **kw)
    if ours:    # every collective has completed on every rank (x is the same everywhere): leaving is safe
        torch.distributed.destroy_process_group()
    return x


# fd.sample's method options, by their keyword (the CLI spells s_churn --s-churn); passed only when given
METHOD_OPTIONS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "solver_type", "order", "r")


def _settings(args, process, data, progress: bool, world: int) -> dict:
    """The .npz's settings: the options as given plus what they resolved to (T, the number of data points,
    the progress bar, the ranks). Not `func`: its memory address made two identical runs' files differ."""
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(T=process.T, n_data=int(data.shape[0]), progress=bool(progress), world_size=world)
    return settings


def cmd_sample(args):
    import numpy as np

    import fastdiff as fd
    from fastdiff.sampling import check_device

    as_integer(args.seed, "seed", 0, 2**64 - 1)       # before the data set's generator overflows on it
    _check_timeout(args.timeout)
    rank, world = _launch()
    device = check_device(args.device, "--device")
    if world > 1:
        _check_rank_device(device)
    out = Path(args.out)
    if rank == 0:                                      # rank 0 alone writes --out (and --plot)
        _check_out(out)
        if args.plot:
            _check_plot(Path(args.plot))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    process = make_process(args.process, args.T)
    data = _load_data(args.data, args.n_data, args.seed)    # every rank: the same data (named sets from --seed)
    if rank == 0:
        _check_coverage(data, process)
    progress = args.progress
    if progress is None:     # auto: a bar when the run takes more than a few seconds
        n_per_rank, points_per_rank = args.n, data.shape[0]
        if world > 1 and args.distributed == "samples":
            n_per_rank = -(-args.n // world)
        elif world > 1:
            points_per_rank = -(-data.shape[0] // world)
        progress = _estimated_seconds(n_per_rank, args.steps, points_per_rank, data.shape[1],
                                      args.backend) > AUTO_PROGRESS_SECONDS
    kw = dict(n=args.n, steps=args.steps, schedule=args.schedule, method=args.method, ode=args.ode,
              t_end=args.t_end, final_denoise=args.final_denoise, seed=args.seed, progress=progress and rank == 0,
              backend=args.backend, dtype=dtype)
    # the method options only when given: fd.sample refuses one the method does not take (naming its options)
    kw.update({k: getattr(args, k) for k in METHOD_OPTIONS if getattr(args, k) is not None})
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fd.GridWarning)
        if world > 1:
            x = _sample_on_ranks(args, data, process, device, dtype, kw)
        else:
            cloud = fd.PointCloud(data.to(device=device, dtype=dtype), process, bandwidth=args.bandwidth)
            x = fd.sample(cloud, **kw)
    seconds = time.perf_counter() - t0
    if rank != 0:                                      # the same x as rank 0's, which reports and writes it
        return 0
    for w in caught:
        if issubclass(w.category, fd.GridWarning):
            print(f"fastdiff sample: warning: {str(w.message).removeprefix('fastdiff.sample: ')}", file=sys.stderr)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the sampler produced NaN or inf ({int((~torch.isfinite(x)).any(1).sum())} of {args.n} "
                         f"samples); nothing was written. Try --dtype float64, more --steps, or rescaled data")
    arr = x.cpu().numpy()
    with open(out, "wb") as f:    # a file object: numpy writes exactly this path (never out.npz.npz)
        if out.suffix == ".npy":
            np.save(f, arr)
        else:
            settings = _settings(args, process, data, progress, world)
            np.savez(f, samples=arr, data=data.cpu().numpy(), settings=json.dumps(settings, default=str))
    what = "samples" if out.suffix == ".npy" else "samples, data and settings"
    ranks = "" if world == 1 else (f"; {world} ranks, " + ("samples split" if args.distributed == "samples"
                                                            else "data sharded"))
    print(f"wrote {arr.shape[0]} samples of dimension {arr.shape[1]} to {out} ({what}; {process!r}, "
          f"{args.method}, {'ODE' if args.ode else 'SDE'}, {args.steps} {args.schedule} steps{ranks}, {seconds:.1f} s)")
    if args.plot:
        png = _scatter([("data", data), (f"{args.process} {args.method}, {args.steps} {args.schedule} steps", x)],
                       Path(args.plot), repr(process))
        if png:
            print(f"wrote {png}")
    return 0


def cmd_info(args):
    import numpy

    import fastdiff as fd
    from fastdiff import _backend

    lines = [f"fastdiff {fd.__version__}", f"python {platform.python_version()} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})", f"numpy {numpy.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError as exc:
        lines.append(f"triton: not installed ({exc})")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none available'}")
    cfg = _backend.build_config()
    if cfg is None:
        lines.append("fastdiff._C: not loaded")
    else:
        lines.append("fastdiff._C: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        amx = _backend.extension().cpu_amx()
        simd = cfg.get("cpu_simd", "?")
        vector = simd + (" VNNI (8-bit dot products from d = 16)" if amx.get("int8_screen") else "")
        lines.append("cpu posterior screen: " + (
            ("AMX-BF16 tiles" if amx["enabled"] else f"{vector}; AMX turned off: FASTDIFF_CPU_AMX=0")
            if amx["available"] else f"{vector}; no AMX: {amx['reason']}"))
    auto_order = "; ".join(f"{dev}: {' > '.join(o)}" for dev, o in _backend.AUTO_ORDER.items())
    lines.append("backends (auto order: " + auto_order + "):")
    for name, reasons in _backend.describe().items():
        lines.append(f"  {name:7s} {_backend_status(name, reasons, cuda)}")
    import importlib.util
    for opt, how in (("tqdm", "fastdiff[progress]"), ("matplotlib", "fastdiff[plot]"), ("scipy", "fastdiff[metrics]"),
                     ("ot", "fastdiff[metrics]"), ("k_diffusion", "fastdiff[peers]"),
                     ("diffusers", "fastdiff[diffusers]"),
                     ("pykeops", "pip install pykeops: the bench's KeOps rows; in no extra, it needs a compiler")):
        found = importlib.util.find_spec(opt) is not None
        lines.append(f"optional {opt}: {'installed' if found else f'not installed ({how})'}")
    print("\n".join(lines))
    return 0


DEMO_BANDWIDTH = 0.05**2   # a variance, like PointCloud(bandwidth=...) and `fastdiff sample --bandwidth`


def _backend_status(name: str, reasons: list, cuda: bool) -> str:
    """One line for `fastdiff info`: a backend that needs a GPU is not "available" on a machine without one."""
    if reasons:
        return "unavailable: " + "; ".join(reasons)
    if name == "triton" and not cuda:
        return "interpreter only (CPU tensors with TRITON_INTERPRET=1); no CUDA device"
    return "available"


def run_demo(out_dir: Path, n_data: int = 500, n: int = 10_000, steps: int = 100, seed: int = 0,
             bandwidth: float = DEMO_BANDWIDTH, T: float = 100.0, progress: bool = False):
    """The main job: the swiss roll as a kernel density (so its true density is known), sampled with pure
    and drifted VE (reverse SDE, exponential integrator), KL(samples ‖ truth) on a fixed 2-D grid."""
    import fastdiff as fd

    data = fd.datasets.swiss_roll(n_data, seed=seed, dtype=torch.float64)
    data32 = data.float()
    grid = ((-1.6, 1.6), (-1.6, 1.6))
    g = torch.Generator().manual_seed(seed)
    centres = data[torch.randint(n_data, (n,), generator=g)]     # drawn before the noise: g's order is the seed's
    exact = centres + bandwidth**0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    truth = fd.PointCloud(data, fd.PureVE(T=T), bandwidth=bandwidth)       # p_0 does not depend on the process

    def density(z):
        return truth.data_log_prob(z).exp()

    # KL of exact draws from the truth: the floor set by the histogram estimator at this n and grid.
    floor = fd.metrics.kl_histogram(exact, density=density, bins=50, range=grid)
    results = [{"process": "exact samples (floor)", "repr": "kernel density", "kl": floor, "seconds": 0.0}]
    panels = [(f"exact draws: KL = {floor:.3f}", exact)]
    for label, process in (("pure VE", fd.PureVE(T=T)), ("drifted VE (beta=t)", fd.DriftedVE(T=T, beta="t"))):
        cloud = fd.PointCloud(data32, process, bandwidth=bandwidth)
        t0 = time.perf_counter()
        x = fd.sample(cloud, n=n, steps=steps, schedule="exponential", method="ei", t_end=1e-3, seed=seed,
                      progress=progress)
        seconds = time.perf_counter() - t0
        kl = fd.metrics.kl_histogram(x.double(), density=density, bins=50, range=grid)
        results.append({"process": label, "repr": repr(process), "kl": kl, "seconds": seconds})
        panels.append((f"{label}: KL = {kl:.3f}", x))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _scatter(panels, out_dir / "demo_swiss_roll.png",
                   f"swiss roll, {n} samples, {steps} exponential steps, reverse SDE (ei), T = {T}")
    (out_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results, png


def cmd_demo(args):
    t0 = time.perf_counter()
    n, steps = (2000, 50) if args.quick else (10_000, 100)
    n = as_integer(n if args.n is None else args.n, "--n", 1)            # an explicit --n/--steps wins over --quick
    steps = as_integer(steps if args.steps is None else args.steps, "--steps", 1)
    seed = as_integer(args.seed, "--seed", 0, 2**64 - 1)
    _check_memory(float(n) * DEMO_BYTES_PER_SAMPLE, f"--n {n}")
    _check_out_dir(Path(args.out))
    results, png = run_demo(Path(args.out), n=n, steps=steps, seed=seed, progress=args.progress)
    print(f"swiss roll (kernel density, bandwidth v = {DEMO_BANDWIDTH:g}: a kernel variance, "
          f"std {DEMO_BANDWIDTH ** 0.5:g}), "
          f"{n} samples, {steps} steps, reverse SDE, method ei")
    print("KL(samples || true density), 50x50 histogram on [-1.6, 1.6]^2, empty-bin floor 1e-12:")
    for r in results:
        print(f"  {r['process']:22s} KL = {r['kl']:.4f}   ({r['seconds']:.1f} s)")
    if png:
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="fastdiff",
                                description="Correct and fast samplers for score-based diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample a point cloud (a data set or a file) with its exact score",
                       formatter_class=_DefaultsHelp,
                       description="Sample a point cloud with its exact score. The defaults (drifted VE, T = 100, "
                                   "reverse SDE, exponential integrator, 200 log-SNR steps) draw the data.")
    s.add_argument("--data", default="swiss_roll", help="data set name or a .npy/.pt/.csv file of points [N, d]")
    s.add_argument("--n-data", type=_count, default=None,
                   help="points drawn from a named data set (default 2000; circle: 8); not for files")
    s.add_argument("--process", choices=PROCESS_CHOICES, default="drifted-ve", help="forward process")
    s.add_argument("--T", type=float, default=None,
                   help="end time; default: 100 for pure-ve and the drifted VEs, 10 for ou; ve and vp have T = 1")
    s.add_argument("--method", choices=ALL_METHODS, default="ei",
                   help="ei: exponential integrator (score frozen); ei-x0: D frozen (DDIM/DPM-Solver++(1)); euler; "
                        "and k-diffusion's samplers on any process (edm_euler is its sample_euler; see "
                        "help(fastdiff.sample)), whose options are below")
    s.add_argument("--ode", action="store_true", help="probability-flow ODE instead of the reverse SDE")
    s.add_argument("--steps", type=_count, default=200, help="number of steps (1e4 style accepted)")
    s.add_argument("--schedule", choices=SCHEDULE_CHOICES, default=DEFAULT_SCHEDULE,
                   help="time grid; logsnr is good on every process from about 10 steps")
    s.add_argument("--t-end", type=float, default=DEFAULT_T_END, help="last time of the grid")
    s.add_argument("--bandwidth", type=float, default=0.0,
                   help="variance v of the Gaussian kernel around each point (kernel std = sqrt(v)); 0: the points")
    s.add_argument("--final-denoise", action="store_true", help="return D(x, t_end) instead of x_{t_end}")
    # -n: torchrun's own parser stops at `--n` (an ambiguous abbreviation of its --nnodes, --nproc-per-node...)
    s.add_argument("-n", "--n", type=_count, default=10_000,
                   help="number of samples (under torchrun write -n: torchrun takes --n for one of its own options)")
    s.add_argument("--seed", type=_count, default=0,
                   help="integer in [0, 2**64): the sampler's noise; it also draws a named --data set (another "
                        "seed, another point cloud; a file's points do not change)")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:index] (under torchrun: cuda means cuda:LOCAL_RANK)")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="working precision")
    s.add_argument("--backend", choices=("auto", "cpu", "cuda", "triton", "torch"), default="auto",
                   help="kernels to run (auto: the fastest that accepts the inputs; see `fastdiff info`)")
    s.add_argument("--distributed", choices=("samples", "data"), default="samples",
                   help="under torchrun (WORLD_SIZE > 1) only; a plain process ignores it. samples: every rank "
                        "holds the whole cloud and draws its slice of the n samples (the result is one "
                        "process's, bit for bit); data: every rank holds 1/K of the points and the posteriors "
                        "are merged each step (for clouds too large for one device; equal to one process's up "
                        "to rounding). Every rank reads the whole --data; rank 0 writes --out")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="under torchrun only: seconds a rank waits for the others before failing with an error")
    s.add_argument("--out", default="samples.npz", help=".npz (samples, data, settings) or .npy (samples); "
                   "exactly this path is written")
    s.add_argument("--plot", default=None, help="also write a scatter (2-D) or histogram (1-D) PNG here")
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: shown when the run is estimated to take more than a few "
                        "seconds)")
    m = s.add_argument_group(
        "method options", "passed to fd.sample only when given; each defaults to the method's own value "
        "(k-diffusion's). A method that does not take one is an error naming those it takes")
    m.add_argument("--eta", type=float, default=None,
                   help="share of fresh noise: euler/ei/ei-x0 in [0, 1] (0 the ODE, 1 the SDE: default from --ode); "
                        "the ancestral and SDE methods (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, "
                        "dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) >= 0, default 1")
    m.add_argument("--s-churn", type=float, default=None,
                   help="churn of edm_euler, heun, dpm_2 (>= 0, default 0)")
    m.add_argument("--s-tmin", type=float, default=None, help="the lowest sigma/alpha churned (default 0)")
    m.add_argument("--s-tmax", type=float, default=None, help="the highest sigma/alpha churned (default inf)")
    m.add_argument("--s-noise", type=float, default=None,
                   help="scale of the fresh noise of the churn and ancestral methods (default 1)")
    m.add_argument("--solver-type", choices=SOLVER_TYPES, default=None,
                   help="dpmpp_2m_sde's second-order correction (default midpoint)")
    m.add_argument("--order", type=_count, default=None, help="lms's order (an integer >= 1, default 4)")
    # -r: like -n, torchrun's parser stops at `--r` (an ambiguous abbreviation of its --rdzv-*, --role, ...)
    m.add_argument("-r", "--r", type=float, default=None,
                   help="dpmpp_sde's stage position in log sigma/alpha, in (0, 1] (default 0.5; under torchrun write "
                        "-r: torchrun takes --r for one of its own options)")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="swiss roll with pure and drifted VE: KL of each and a side-by-side PNG")
    d.add_argument("--out", default="fastdiff-demo", help="output folder (default fastdiff-demo)")
    d.add_argument("--n", type=_count, default=None, help="number of samples (default 10000; 2000 with --quick)")
    d.add_argument("--steps", type=_count, default=None, help="number of steps (default 100; 50 with --quick)")
    d.add_argument("--seed", type=_count, default=0, help="integer in [0, 2**64) (default 0)")
    d.add_argument("--quick", action="store_true",
                   help="2000 samples, 50 steps (a few seconds); an explicit --n or --steps wins")
    d.add_argument("--progress", action="store_true", help="progress bars on stderr while sampling")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="benchmark every backend against the alternatives (JSON, CSV, report, plots)")
    b.set_defaults(func=cmd_bench, bench_parser=b)
    _add_bench_arguments(b)

    r = sub.add_parser("reproduce", help="reproduce a paper's experiment: results.md, results.json and PNGs")
    r.add_argument("experiment", help=f"one of: {', '.join(REPRODUCTIONS)}, or all")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced sizes (under three minutes on two CPU cores)")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes that only exercise the code (seconds; for CI)")
    r.add_argument("--out", default=None,
                   help="output folder (default reproductions/<experiment>; with --smoke reproductions/<experiment>"
                        "-smoke, so smoke numbers never replace the committed results)")
    r.add_argument("--seed", type=_count, default=0,
                   help="integer in [0, 2**63) (default 0): seeds every random draw")
    r.add_argument("--no-progress", action="store_true", help="do not log each stage to stderr")
    r.set_defaults(func=cmd_reproduce)
    return p


# `bench` and `reproduce` import their packages only when run: `fastdiff sample` stays light.
REPRODUCTIONS = ("drift-ve-gaussian", "drift-ve-table", "cem-schedules", "cem-training", "ode-sde-gap")


def _add_bench_arguments(parser):
    from .bench import add_arguments
    add_arguments(parser)


def cmd_bench(args):
    from .bench import run_from_args
    return run_from_args(args, argv=sys.argv)


def cmd_reproduce(args):
    from . import reproduce
    names = list(reproduce.EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    if args.experiment != "all" and args.experiment not in reproduce.EXPERIMENTS:
        raise ValueError(f"unknown experiment {args.experiment!r}; "
                         f"choose one of {', '.join(reproduce.EXPERIMENTS)} or all")
    if args.out is not None and len(names) > 1:
        raise ValueError("--out names one experiment's folder; with 'all' the default folders are used")
    seed = as_integer(args.seed, "--seed", 0, reproduce.MAX_SEED)     # before any folder is made
    if args.out is not None:
        _check_out_dir(Path(args.out))
    for name in names:
        path = reproduce.run(name, quick=args.quick, smoke=args.smoke, out=args.out, seed=seed,
                             progress=not args.no_progress)
        print(path)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:   # bad input: one clear line, not a traceback
        print(f"{_who(args.command)}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:                   # a file that cannot be read or written mid-run
        print(f"{_who(args.command)}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not _is_peer_error(exc):
            raise
        print(f"{_who(args.command)}: error: {exc}", file=sys.stderr)    # another torchrun rank failed
        return 1


def _who(command: str) -> str:
    """The error prefix; under torchrun it names the rank (every rank prints its own errors)."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
    return f"fastdiff {command}" if rank is None or world == "1" else f"fastdiff {command} (rank {rank} of {world})"


def _is_peer_error(exc: Exception) -> bool:
    """fastdiff.distributed.PeerError, without importing torch.distributed for commands that never use it."""
    fdd = sys.modules.get("fastdiff.distributed")
    return fdd is not None and isinstance(exc, fdd.PeerError)


if __name__ == "__main__":
    sys.exit(main())
