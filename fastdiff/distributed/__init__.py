"""fastdiff on torch.distributed: a point cloud sharded over ranks, and samples split over ranks.

ShardedPointCloud   each rank holds one shard of the data; every posterior is one local fused call plus a
                    merge through all_reduce (MAX of the per-row log-sum-exp L, then SUM of the rescaled
                    [Σe^a·y, Σe^a] in float64), so D and L equal the single-device PointCloud on the
                    concatenated data to MATH.md §7 accuracy, bit-identical for a fixed rank count and layout
                    (float32 rows whose split mass float32's L cannot resolve are merged again from float64
                    parts: merge.F32_MERGE_TOL). No backward: under autograd it raises.
sample_parallel     each rank of a group draws its contiguous slice of the n samples (sample_offset, the noise
                    contract) and the slices are gathered: the result equals one process's bit for bit.
grid_groups         a 2-D layout: data shards × sample slices, as two families of process groups.

Every collective is issued with async_op=True; on gloo it is waited on with the timeout given (else the process
group's own), so a peer that died, hung or raised turns into PeerError on the ranks still running, never a
hang. On NCCL the wait stays on the stream (no host sync per step) and the process group's timeout applies.
Inputs are checked once, collectively, when a ShardedPointCloud is built: every rank exchanges a summary of
its shard first, so bad input on one rank makes every rank raise the same error naming that rank.
"""
from __future__ import annotations

from ._comm import PeerError, init
from .merge import local_posterior, merge_partials
from .samples import grid_groups, sample_parallel, sample_slice
from .sharded import ShardedPointCloud

__all__ = [
           "PeerError",
           "ShardedPointCloud",
           "grid_groups",
           "init",
           "local_posterior",
           "merge_partials",
           "sample_parallel",
           "sample_slice",
]
