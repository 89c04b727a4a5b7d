"""fastdiff on torch.distributed: a point cloud sharded over ranks, and samples split over ranks.

ShardedPointCloud   each rank holds one shard of the data; every posterior is one local fused call plus a
                    merge through all_reduce (MAX of the per-row log-sum-exp L, then SUM of the rescaled
                    [Σe^a·y, Σe^a] in float64), so D and L equal the single-device PointCloud on the
                    concatenated data to MATH.md §7 accuracy, bit-identical for a fixed rank count and layout.
sample_parallel     each rank of a group draws its contiguous slice of the n samples (sample_offset, the noise
                    contract) and the slices are gathered: the result equals one process's bit for bit.
grid_groups         a 2-D layout: data shards × sample slices, as two families of process groups.

Every collective is issued with async_op=True and waited on with the timeout given (else the process
group's own); a peer that died, hung or raised turns into PeerError on the ranks still running, never a hang.
Inputs are checked once, collectively, when a ShardedPointCloud is built: every rank exchanges a summary of
its shard first, so bad input on one rank makes every rank raise the same error naming that rank.
"""
from __future__ import annotations

import datetime
import math
import os
from collections import Counter

import torch
import torch.distributed as dist

from . import ops
from .denoisers import Denoiser, _coeffs
from .processes import Process

__all__ = ["init", "ShardedPointCloud", "PeerError", "merge_partials", "sample_parallel", "sample_slice",
           "grid_groups"]


class PeerError(RuntimeError):
    """A collective did not complete: another rank died, hung past the timeout, or left the computation."""


def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                           "(torchrun sets its environment) before building a ShardedPointCloud")
    return dist.get_rank(group), dist.get_world_size(group)


def _as_timeout(timeout):
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    seconds = float(timeout)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    return datetime.timedelta(seconds=seconds)


def _wait(work, timeout, what: str, rank: int):
    """Wait for an async collective; any failure (peer gone, timeout) becomes PeerError naming this rank."""
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except Exception as exc:
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        raise PeerError(f"fastdiff.distributed: rank {rank}: {what} did not complete within {limit}: another rank "
                        f"died, hung or stopped calling it ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _all_reduce(t, op, group, timeout, what, rank):
    _wait(dist.all_reduce(t, op=op, group=group, async_op=True), timeout, what, rank)
    return t


def _all_gather_object(obj, group, timeout, rank):
    """all_gather_object with the timeout applied (through a monitored barrier on gloo first, so a rank that
    never arrives is reported instead of waited for)."""
    world = dist.get_world_size(group)
    if timeout is not None and dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=True)
        except Exception as exc:
            raise PeerError(f"fastdiff.distributed: rank {rank}: the input check could not gather every rank "
                            f"within {timeout.total_seconds():g} s ({type(exc).__name__}: {str(exc)[:300]})") from exc
    out = [None] * world
    try:
        dist.all_gather_object(out, obj, group=group)
    except Exception as exc:
        raise PeerError(f"fastdiff.distributed: rank {rank}: the input check's exchange failed "
                        f"({type(exc).__name__}: {str(exc)[:300]})") from exc
    return out


def init(device="cpu", timeout=600.0) -> torch.device:
    """Initialise torch.distributed from the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...):
    gloo for the CPU, NCCL for CUDA with this process on cuda:LOCAL_RANK. Returns the device to compute on.
    Does nothing but return the device when a process group already exists."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"fastdiff.distributed.init: {', '.join(missing)} not set: launch with torchrun "
                               "(or call torch.distributed.init_process_group yourself)")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=_as_timeout(timeout),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return dev


# -- the merge ------------------------------------------------------------------------------------------------

def merge_partials(parts):
    """Merge per-part posteriors [(L_r [M], ȳ_r [M, d]) or None for an empty part] in float64, in list order:
    L = logsumexp_r L_r, ȳ = Σ_r e^{L_r − L} ȳ_r. The same algebra the all_reduce merge and the streaming
    merge use; exposed for checking."""
    live = [(L.to(torch.float64), y.to(torch.float64)) for L, y in (p for p in parts if p is not None)]
    if not live:
        raise ValueError("parts: every part is empty (nothing to merge)")
    m = torch.stack([L for L, _ in live]).amax(0)
    s = sum(torch.exp(L - m) for L, _ in live)
    acc = sum(torch.exp(L - m).unsqueeze(1) * y for L, y in live)
    return acc / s.unsqueeze(1), m + s.log()


def _affine_D(ybar64, x, alpha, c, bandwidth):
    """D = (1 − α²v/c)·ȳ + (αv/c)·x (MATH.md §5), applied once after the merge; ȳ when v = 0."""
    if not bandwidth:
        return ybar64
    return ybar64 * (1 - alpha * alpha * bandwidth / c) + (alpha * bandwidth / c) * x.to(torch.float64)


def local_posterior(x, data, alpha, c, log_weights, backend):
    """One fused call with bandwidth folded into σ_eff = √c (the logits see c = α²v + σ² only):
    (L [M] float64, ȳ [M, d] float64), or None when data is empty."""
    if data is None or data.shape[0] == 0:
        return None
    ybar, L = ops.posterior(x, data, alpha.view(-1), c.sqrt().view(-1), log_weights, 0.0, backend=backend)
    return L.to(torch.float64), ybar.to(torch.float64)


# -- the sharded point cloud --------------------------------------------------------------------------------

def _expected_device(group):
    """Where a shard must live for this group's backend: NCCL's current CUDA device, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard_summary(shard, weights, bandwidth, process, expected):
    """What every rank tells the others about its input (computed without raising)."""
    s = {"problems": [], "d": None, "dtype": None, "device": None, "rows": 0, "weight_sum": 0.0,
         "weighted": weights is not None, "bandwidth": bandwidth, "process": repr(process)}
    if not isinstance(shard, torch.Tensor) or shard.ndim != 2 or not shard.is_floating_point():
        s["problems"].append(f"shard must be a floating tensor [N_r, d], got {getattr(shard, 'shape', type(shard).__name__)}"
                             + (f" of dtype {shard.dtype}" if isinstance(shard, torch.Tensor) else ""))
        return s
    s.update(d=shard.shape[1], dtype=str(shard.dtype), device=str(shard.device), rows=shard.shape[0])
    if shard.device != expected:
        s["problems"].append(f"shard is on {shard.device}, but this process group computes on {expected}")
        return s
    if shard.shape[0] and not bool(torch.isfinite(shard).all()):
        s["problems"].append("shard contains NaN or inf")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64, device=shard.device) if not isinstance(weights, torch.Tensor) \
            else weights.to(dtype=torch.float64)
        if w.shape != (shard.shape[0],):
            s["problems"].append(f"weights must have shape [N_r]=[{shard.shape[0]}], got {tuple(w.shape)}")
        elif w.device != shard.device:
            s["problems"].append(f"weights are on {w.device} but the shard is on {shard.device}")
        elif not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            s["problems"].append("weights must be finite and non-negative")
        else:
            s["weight_sum"] = float(w.sum())
    if not (math.isfinite(bandwidth) and bandwidth >= 0):
        s["problems"].append(f"bandwidth must be a finite number >= 0, got {bandwidth}")
    return s


def _disagreement(summaries, key, what):
    """Problems for ranks whose `key` differs from the most common value (ties: the lowest rank's)."""
    values = [s[key] for s in summaries if s[key] is not None]
    if len(set(values)) <= 1:
        return []
    counts = Counter(values)
    top = max(counts.values())
    usual = next(v for v in values if counts[v] == top)
    listing = ", ".join(f"rank {r}: {s[key]}" for r, s in enumerate(summaries))
    return [(r, f"{what} {s[key]} differs from the other ranks' {usual} ({listing})")
            for r, s in enumerate(summaries) if s[key] is not None and s[key] != usual]


def _collective_check(summaries):
    """Every problem on any rank, as (rank, message); identical on every rank."""
    problems = [(r, p) for r, s in enumerate(summaries) for p in s["problems"]]
    problems += _disagreement(summaries, "d", "shard: dimension d =")
    problems += _disagreement(summaries, "dtype", "shard: dtype")
    problems += _disagreement(summaries, "weighted", "weights given:")
    problems += _disagreement(summaries, "bandwidth", "bandwidth")
    problems += _disagreement(summaries, "process", "process")
    if not problems:
        if summaries[0]["weighted"] and not sum(s["weight_sum"] for s in summaries) > 0:
            problems.append((None, "weights: every rank's weights are zero (no data point can be chosen)"))
        elif not summaries[0]["weighted"] and not any(s["rows"] for s in summaries):
            problems.append((None, "shard: every rank's shard is empty (the point cloud has no data)"))
    return problems


class ShardedPointCloud(Denoiser):
    """The exact denoiser of a point cloud whose data is split over the ranks of a process group.

    Every rank of `group` builds it with its own shard [N_r, d] (N_r may be 0) and the same process,
    bandwidth and the presence of weights; weights [N_r] are this shard's (normalised over all ranks).
    Every rank must then query the same points x (fd.sample does this when every rank runs the same call):
    each call is one local fused posterior and two all_reduces (MAX of [M], SUM of [M, d+1] in float64).
    timeout: seconds (or timedelta) for each collective; None uses the process group's timeout.
    backend: the fastdiff backend of the local fused call ("auto", "cpu", "cuda", "triton", "torch").
    `data` is this rank's shard; `rows` the global number of points.
    """

    prediction = "x0"

    def __init__(self, shard: torch.Tensor, process: Process, weights=None, bandwidth: float = 0.0, group=None,
                 *, timeout=None, backend: str = "auto"):
        super().__init__(process)
        self.group = group
        self.rank, self.world = _group_info(group)
        self.timeout = _as_timeout(timeout)
        self.backend = backend
        try:
            bandwidth = float(bandwidth)
        except (TypeError, ValueError):
            raise TypeError(f"bandwidth must be a number, got {type(bandwidth).__name__}") from None
        summary = _shard_summary(shard, weights, bandwidth, process, _expected_device(group))
        summaries = _all_gather_object(summary, group, self.timeout, self.rank)
        problems = _collective_check(summaries)
        if problems:
            text = "; ".join(p if r is None else f"rank {r}: {p}" for r, p in problems)
            only_dtype = all("dtype" in p for _, p in problems)
            raise (TypeError if only_dtype else ValueError)(f"ShardedPointCloud (seen from rank {self.rank}): {text}")
        self.bandwidth, self.dim = bandwidth, summaries[0]["d"]
        self.rows = sum(s["rows"] for s in summaries)
        self.log_weights = None
        if weights is not None:
            total = sum(s["weight_sum"] for s in summaries)     # rank order: the same sum on every rank
            w = torch.as_tensor(weights, dtype=torch.float64, device=shard.device)
            keep = w > 0                                         # zero-weight points can never be chosen
            shard, w = shard[keep], w[keep]
            self.log_weights = (w / total).log()
        self.data = shard

    def _check(self, x):
        if isinstance(x, torch.Tensor) and x.device != self.data.device:
            raise ValueError(f"x is on {x.device} but rank {self.rank}'s shard is on {self.data.device}")
        return super()._check(x)

    def partial(self, x, alpha, c):
        """This rank's (L_r, ȳ_r) in float64 at (α, c = α²v + σ²), or None for an empty shard."""
        return local_posterior(x, self.data, alpha, c, self.log_weights, self.backend)

    def merge(self, part, M: int, device):
        """(ȳ [M, d], L [M]) float64 over every rank: all_reduce MAX of L_r, then SUM of e^{L_r − m}·[ȳ_r, 1]."""
        d = self.dim
        m = torch.full((M,), -math.inf, dtype=torch.float64, device=device) if part is None else part[0].clone()
        _all_reduce(m, dist.ReduceOp.MAX, self.group, self.timeout, "the posterior's all_reduce(MAX)", self.rank)
        buf = torch.zeros(M, d + 1, dtype=torch.float64, device=device)
        if part is not None:
            scale = torch.exp(part[0] - m)
            torch.mul(part[1], scale.unsqueeze(1), out=buf[:, :d])
            buf[:, d] = scale
        _all_reduce(buf, dist.ReduceOp.SUM, self.group, self.timeout, "the posterior's all_reduce(SUM)", self.rank)
        s = buf[:, d]
        return buf[:, :d] / s.unsqueeze(1), m + s.log()

    def posterior(self, x: torch.Tensor, t):
        """(D [M, d], L [M]) over the whole sharded cloud, identical on every rank (MATH.md §5)."""
        self._check(x)
        alpha, sig2 = _coeffs(self.process, t, x)
        c = alpha * alpha * self.bandwidth + sig2
        ybar, L = self.merge(self.partial(x, alpha, c), x.shape[0], x.device)
        return _affine_D(ybar, x, alpha, c, self.bandwidth).to(x.dtype), L.to(x.dtype)

    def predict(self, x, t):
        return self.posterior(x, t)[0]

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x) = L − (d/2) log(2π c_t), c_t = α²v + σ²."""
        _, L = self.posterior(x, t)
        alpha, sig2 = _coeffs(self.process, t, x)
        c = (alpha * alpha * self.bandwidth + sig2).view(-1)
        return (L.to(torch.float64) - 0.5 * self.dim * torch.log(2 * math.pi * c)).to(x.dtype)


# -- samples split over ranks ---------------------------------------------------------------------------------

def sample_slice(n: int, rank: int, world: int):
    """(start, count): rank's contiguous slice of n samples, sizes differing by at most one."""
    if isinstance(n, bool) or int(n) < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    start, stop = rank * int(n) // world, (rank + 1) * int(n) // world
    return start, stop - start


def sample_parallel(denoiser, n: int | None = None, *, group=None, sample_offset: int = 0, timeout=None,
                    return_trajectory: bool = False, x: torch.Tensor | None = None, **sample_kwargs):
    """fd.sample split over the ranks of `group`: rank r draws global samples sample_offset + [start_r, stop_r)
    (its slice of n, or of the rows of x), then every rank receives all n, equal bit for bit to one process's
    fd.sample(denoiser, n=n, sample_offset=sample_offset, ...) (the noise contract). Other keyword arguments
    go to fd.sample unchanged. With a ShardedPointCloud, `group` must be the sample group of grid_groups."""
    from .sampling import sample
    rank, world = _group_info(group)
    timeout = _as_timeout(timeout)
    if x is not None:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"x must be a tensor [M, ...] of initial noise, got {getattr(x, 'shape', type(x))}")
        if n is not None and int(n) != x.shape[0]:
            raise ValueError(f"n={n} disagrees with x, which has {x.shape[0]} rows")
        n = x.shape[0]
    start, count = sample_slice(n, rank, world)
    per_rank = -(-int(n) // world)
    local = None
    if count:
        kw = dict(sample_kwargs, return_trajectory=return_trajectory)
        if x is not None:
            kw["x"] = x[start:start + count]
        else:
            kw["n"] = count
        local = sample(denoiser, sample_offset=int(sample_offset) + start, **kw)
    # One all_gather of [per_rank, ...] slices (padded: all_gather needs equal shapes); trajectories likewise.
    shapes = _all_gather_object(None if local is None else _shapes(local), group, timeout, rank)
    ref = next(s for s in shapes if s is not None)
    outs = _gather_padded(local if not return_trajectory or local is None else local[0], ref[0], 0, per_rank,
                          group, timeout, rank, n, world)
    if not return_trajectory:
        return outs
    traj = _gather_padded(None if local is None else local[1], ref[1], 1, per_rank, group, timeout, rank, n, world)
    return outs, traj


def _shapes(local):
    items = local if isinstance(local, tuple) else (local,)
    return tuple((tuple(t.shape), str(t.dtype), str(t.device)) for t in items)


def _gather_padded(t, ref, dim, per_rank, group, timeout, rank, n, world):
    shape, dtype, _ = ref
    dtype = getattr(torch, dtype.replace("torch.", ""))
    full = list(shape)
    full[dim] = per_rank
    device = t.device if t is not None else _expected_device(group)
    pad = torch.zeros(full, dtype=dtype, device=device)
    if t is not None:
        pad.narrow(dim, 0, t.shape[dim]).copy_(t)
    slots = [torch.empty_like(pad) for _ in range(world)]
    _wait(dist.all_gather(slots, pad, group=group, async_op=True), timeout, "sample_parallel's all_gather", rank)
    pieces = [s.narrow(dim, 0, sample_slice(n, r, world)[1]) for r, s in enumerate(slots)]
    return torch.cat(pieces, dim=dim)


def grid_groups(data_shards: int, *, timeout=None):
    """A 2-D layout of the world: rank = sample_index · data_shards + data_index. Returns
    (data_group, sample_group, data_index, sample_index): ranks of one data group hold the data_shards shards and
    draw the same samples (pass it to ShardedPointCloud); ranks of one sample group hold the same shard index
    and split the samples (pass it to sample_parallel). Every rank must call this, in the same order."""
    rank, world = _group_info(None)
    if isinstance(data_shards, bool) or int(data_shards) < 1 or world % int(data_shards):
        raise ValueError(f"data_shards must be a positive divisor of the world size {world}, got {data_shards!r}")
    k = int(data_shards)
    kw = {} if timeout is None else {"timeout": _as_timeout(timeout)}
    data_groups = [dist.new_group(list(range(i * k, (i + 1) * k)), **kw) for i in range(world // k)]
    sample_groups = [dist.new_group(list(range(j, world, k)), **kw) for j in range(k)]
    return data_groups[rank // k], sample_groups[rank % k], rank % k, rank // k
