"""ShardedPointCloud: a point cloud whose data is split over the ranks of a process group."""
from __future__ import annotations

import math
from collections import Counter

import torch
import torch.distributed as dist

from .._checks import as_real
from ..denoisers import _Cloud, _coeffs
from ..processes import Process
from ._comm import _all_gather_object, _all_reduce, _as_timeout, _group_info
from .merge import _affine_D, float64_redo, local_posterior, take_rows


def _expected_device(group):
    """Where a shard must live for this group's backend: NCCL's current CUDA device, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard_summary(shard, weights, bandwidth, process, expected):
    """What every rank tells the others about its input (computed without raising)."""
    s = {"problems": [], "d": None, "dtype": None, "device": None, "rows": 0, "weight_sum": 0.0, "absmax": 0.0,
         "weighted": weights is not None, "bandwidth": bandwidth, "process": repr(process)}
    if not isinstance(shard, torch.Tensor) or shard.ndim != 2 or not shard.is_floating_point():
        s["problems"].append("shard must be a floating tensor [N_r, d], got "
                             f"{getattr(shard, 'shape', type(shard).__name__)}"
                             + (f" of dtype {shard.dtype}" if isinstance(shard, torch.Tensor) else ""))
        return s
    s.update(d=shard.shape[1], dtype=str(shard.dtype), device=str(shard.device), rows=shard.shape[0])
    if shard.device != expected:
        s["problems"].append(f"shard is on {shard.device}, but this process group computes on {expected}")
        return s
    if shard.shape[0] and not bool(torch.isfinite(shard).all()):
        s["problems"].append("shard contains NaN or inf")
    elif shard.shape[0]:
        s["absmax"] = float(shard.abs().max())
    if weights is not None:
        w = (torch.as_tensor(weights, dtype=torch.float64, device=shard.device)
             if not isinstance(weights, torch.Tensor) else weights.to(dtype=torch.float64))
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


class ShardedPointCloud(_Cloud):
    """The exact denoiser of a point cloud whose data is split over the ranks of a process group.

    Every rank of `group` builds it with its own shard [N_r, d] (N_r may be 0) and the same process,
    bandwidth and the presence of weights; weights [N_r] are this shard's (normalised over all ranks).
    Every rank must then query the same points x (fd.sample does this when every rank runs the same call):
    each call is one local fused posterior and two all_reduces (MAX of [M], SUM of [M, d+1] in float64; of
    [M, 2d+1] for float32 queries).
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
        bandwidth = as_real(bandwidth, "bandwidth")
        summary = _shard_summary(shard, weights, bandwidth, process, _expected_device(group))
        summaries = _all_gather_object(summary, group, self.timeout, self.rank)
        problems = _collective_check(summaries)
        if problems:
            text = "; ".join(p if r is None else f"rank {r}: {p}" for r, p in problems)
            only_dtype = all("dtype" in p for _, p in problems)
            raise (TypeError if only_dtype else ValueError)(f"ShardedPointCloud (seen from rank {self.rank}): {text}")
        self.bandwidth, self.dim = bandwidth, summaries[0]["d"]
        self.rows = sum(s["rows"] for s in summaries)
        self._absmax = max(s["absmax"] for s in summaries)     # max|y| over every shard (merge.float64_redo)
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

    def merge(self, part, M: int, device, moments: bool = False):
        """(ȳ [M, d], L [M]) float64 over every rank: all_reduce MAX of L_r, then SUM of e^{L_r − m}·[ȳ_r, 1]
        (and of e^{L_r − m}·ȳ_r² with moments, as a float32 query's merge carries them)."""
        ybar, m, s, _ = self._reduce(part, M, device, moments)
        return ybar, m + s.log()

    def _reduce(self, part, M: int, device, moments: bool):
        """ȳ, m = max_r L_r, s = Σ_r e^{L_r − m} and, with moments, q = Σ_r e^{L_r − m}·ȳ_r² [M, d] (else None)
        (float64, identical on every rank): the two all_reduces. Only a float32 query's redo test needs q."""
        d = self.dim
        m = torch.full((M,), -math.inf, dtype=torch.float64, device=device) if part is None else part[0].clone()
        _all_reduce(m, dist.ReduceOp.MAX, self.group, self.timeout, "the posterior's all_reduce(MAX)", self.rank)
        buf = torch.zeros(M, 2 * d + 1 if moments else d + 1, dtype=torch.float64, device=device)
        if part is not None:
            scale = torch.exp(part[0] - m)
            torch.mul(part[1], scale.unsqueeze(1), out=buf[:, :d])
            buf[:, d] = scale
            if moments:
                torch.mul(part[1] * part[1], scale.unsqueeze(1), out=buf[:, d + 1:])
        _all_reduce(buf, dist.ReduceOp.SUM, self.group, self.timeout, "the posterior's all_reduce(SUM)", self.rank)
        s = buf[:, d]
        return buf[:, :d] / s.unsqueeze(1), m, s, (buf[:, d + 1:] if moments else None)

    def _merged(self, x, alpha, c):
        """(ȳ, L) float64 over every rank; float32 rows whose merge float32's L cannot resolve are merged again
        from float64 parts (fastdiff.distributed.merge.F32_MERGE_TOL). m and s are identical on every rank, so
        every rank picks the same rows and issues the same collectives."""
        if torch.is_grad_enabled() and (x.requires_grad or self.data.requires_grad):
            raise ValueError("ShardedPointCloud has no backward (its all_reduces are outside autograd): call it "
                             "under torch.no_grad(), or use PointCloud / StreamingPointCloud for gradients")
        ybar, m, s, q = self._reduce(self.partial(x, alpha, c), x.shape[0], x.device, x.dtype == torch.float32)
        redo = float64_redo(x, ybar, m, s, q, self._absmax)
        if redo is not None:
            xr = x[redo].to(torch.float64)
            y2, m2, s2, _ = self._reduce(self.partial(xr, take_rows(alpha, redo), take_rows(c, redo)), xr.shape[0],
                                         x.device, moments=False)
            ybar, m, s = ybar.index_copy(0, redo, y2), m.index_copy(0, redo, m2), s.index_copy(0, redo, s2)
        return ybar, m + s.log()

    def _ybar(self, x, alpha, c):
        return self._merged(x, alpha, c)[0]

    def posterior(self, x: torch.Tensor, t):
        """(D [M, d], L [M]) over the whole sharded cloud, identical on every rank (MATH.md §5)."""
        self._check(x)
        return self._posterior(x, t)

    def _posterior(self, x, t):
        alpha, sig2 = _coeffs(self.process, t, x)
        c = alpha * alpha * self.bandwidth + sig2
        ybar, L = self._merged(x, alpha, c)
        return _affine_D(ybar, x, alpha, c, self.bandwidth).to(x.dtype), L.to(x.dtype)

    def predict(self, x, t):
        # the sampler's per-step call: no second scan of x here (ops.posterior checks it), so the step adds no
        # host sync of its own to the fused call and the all_reduces (float32: one, to find rows to redo)
        return self._posterior(x, t)[0]
