"""Collectives with a timeout that fail loudly (PeerError), and process-group set-up from torchrun's environment."""
from __future__ import annotations

import atexit
import datetime
import math
import os

import torch
import torch.distributed as dist


class PeerError(RuntimeError):
    """A collective did not complete: another rank died, hung past the timeout, or left the computation."""


# Set once any PeerError is raised in this process: the exit hook then leaves the process group alone, since
# tearing gloo down waits for the failed collective's worker thread (up to the group's timeout).
_peer_failed = False


def _peer_error(message: str) -> PeerError:
    global _peer_failed
    _peer_failed = True
    return PeerError(message)


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
        raise _peer_error(f"fastdiff.distributed: rank {rank}: {what} did not complete within {limit}: another rank "
                        f"died, hung or stopped calling it ({type(exc).__name__}: {str(exc)[:300]})") from exc


def _all_reduce(t, op, group, timeout, what, rank):
    # NCCL: work.wait() only orders the current stream (no host sync); a timeout would block the host every
    # step, so NCCL relies on the process group's own timeout and watchdog instead.
    if timeout is not None and dist.get_backend(group) == "nccl":
        timeout = None
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
            raise _peer_error(f"fastdiff.distributed: rank {rank}: the input check could not gather every rank "
                            f"within {timeout.total_seconds():g} s ({type(exc).__name__}: {str(exc)[:300]})") from exc
    out = [None] * world
    try:
        dist.all_gather_object(out, obj, group=group)
    except Exception as exc:
        raise _peer_error(f"fastdiff.distributed: rank {rank}: the input check's exchange failed "
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
        atexit.register(_destroy_at_exit)
    return dev


def _destroy_at_exit():
    """Destroy the process group init() created, while the interpreter is still whole. Left to interpreter
    teardown, gloo's worker threads can still hold the last collective's work (and its tensors) and the process
    aborts with "terminate called without an active exception" (pytorch/pytorch#190489): a flaky non-zero exit
    after a run that succeeded. Skipped after a PeerError, and a no-op if the caller already destroyed it."""
    if _peer_failed or not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
