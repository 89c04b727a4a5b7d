"""Samples split over ranks (the noise contract makes the gathered result one process's), and 2-D layouts."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._comm import _all_gather_object, _as_timeout, _group_info, _wait
from .sharded import _expected_device


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
    from ..sampling import sample
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
