"""fastdiff.distributed on real torch.distributed (gloo, CPU): spawned ranks on 127.0.0.1 against one process.

Each spawn runs a whole scenario (several configurations) so the file pays the process start-up a few times
only. Every spawn has a hard deadline: a rank still alive after it is killed and the test fails.
"""
from __future__ import annotations

import datetime
import io
import math
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback

import pytest
import torch

import fastdiff as fd

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

SPAWN_DEADLINE_S = 60          # hard limit of one spawned scenario (start-up on 2 loaded cores included)
PEER_TIMEOUT_S = 3             # the collective timeout the die / hang scenarios use
LAYOUTS = {1: [37], 2: [20, 17], 3: [0, 23, 14]}     # odd sizes; rank 0 of three holds an empty shard
SIGMAS = (1e-3, 0.1, 0.9)          # VP: α from 1 down to 0.44 (both forms of x − αy)
D_DIM = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, scenario, results):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=datetime.timedelta(seconds=30))
        out = globals()[scenario](rank, world)
        results.put((rank, "ok", _to_bytes(out), time.monotonic() - start))
    except BaseException as exc:   # report everything to the parent, which asserts on it
        results.put((rank, "error", (type(exc).__name__, str(exc), traceback.format_exc()), time.monotonic() - start))
    finally:
        results.close()
        results.join_thread()     # flush the report before leaving
        os._exit(0)               # never wait in destroy_process_group for a peer that hangs


def _to_bytes(obj) -> bytes:
    # tensors through a multiprocessing queue would be shared memory owned by a process that exits
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _spawn(world, scenario):
    """{rank: (status, payload, seconds)} from `world` spawned ranks running scenario(rank, world)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + SPAWN_DEADLINE_S
    try:
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, status, payload, secs = results.get(timeout=0.5)
                payload = _from_bytes(payload) if status == "ok" else payload
                out[rank] = (status, payload, secs)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return out


def _ok(out, world):
    for r in range(world):
        assert r in out, f"rank {r} reported nothing (hung or crashed): {out}"
        assert out[r][0] == "ok", f"rank {r} failed: {out[r][1][2] if out[r][0] == 'error' else out[r]}"
    return [out[r][1] for r in range(world)]


# -- shared data: every rank builds the same global cloud and takes its shard -----------------------------------

def _global_data(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    N = sum(LAYOUTS[3])
    centers = torch.randn(4, D_DIM, generator=g, dtype=torch.float64) * 2
    y = centers[torch.arange(N) % 4] + 0.3 * torch.randn(N, D_DIM, generator=g, dtype=torch.float64)
    y[5] = y[6] + 1e-7                                   # a near-duplicate pair
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    w[30:] = 0.0                                         # zero weights: rank 2 of three has none left
    x = torch.randn(11, D_DIM, generator=g, dtype=torch.float64) * 2
    return y.to(dtype), w, x.to(dtype)


def _shard(t, world, rank):
    sizes = LAYOUTS[world] if sum(LAYOUTS[world]) == t.shape[0] else None
    sizes = sizes or [t.shape[0] // world + (r < t.shape[0] % world) for r in range(world)]
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _sizes(world):
    return LAYOUTS[world]


CONFIGS = [   # (name, dtype, weighted, bandwidth)
    ("f32", torch.float32, False, 0.0),
    ("f32-weights-bandwidth", torch.float32, True, 0.05),
    ("f64-weights", torch.float64, True, 0.0),
    ("f64-bandwidth", torch.float64, False, 0.2),
]


def _scenario_compare(rank, world):
    """Posterior D, L for every config and σ (twice: bit-identity across calls), and a float64 trajectory."""
    from fastdiff.distributed import ShardedPointCloud
    proc = fd.VP()
    out = {}
    for name, dtype, weighted, bw in CONFIGS:
        y, w, x = _global_data(dtype)
        pc = ShardedPointCloud(_shard(y, world, rank), proc, weights=_shard(w, world, rank) if weighted else None,
                               bandwidth=bw, timeout=20)
        for sigma in SIGMAS:
            t = _t_for_sigma(proc, sigma)
            D1, L1 = pc.posterior(x, t)
            D2, L2 = pc.posterior(x, t)
            out[(name, sigma)] = (D1, L1, D2, L2)
    y, w, x = _global_data(torch.float64)
    pc = ShardedPointCloud(_shard(y, world, rank), proc, weights=_shard(w, world, rank), bandwidth=0.01)
    out["trajectory"] = fd.sample(pc, n=6, steps=15, seed=11, return_trajectory=True, dtype=torch.float64)
    return out


def _t_for_sigma(proc, sigma):
    return float(proc.sigma_inverse(sigma))


def _single(dtype, weighted, bw):
    y, w, x = _global_data(dtype)
    return fd.PointCloud(y, fd.VP(), weights=w if weighted else None, bandwidth=bw), x


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_posterior_and_trajectory_match_one_process(world):
    outs = _ok(_spawn(world, "_scenario_compare"), world)
    proc = fd.VP()
    for name, dtype, weighted, bw in CONFIGS:
        single, x = _single(dtype, weighted, bw)
        ref64, x64 = _single(torch.float64, weighted, bw)
        for sigma in SIGMAS:
            t = _t_for_sigma(proc, sigma)
            D1, L1, D2, L2 = outs[0][(name, sigma)]
            for r in range(world):      # every rank holds the same bits, and a second call repeats them
                for a, b in zip(outs[r][(name, sigma)], (D1, L1, D1, L1)):
                    assert torch.equal(a, b), f"{name} σ={sigma}: rank {r} differs from rank 0 or from its first call"
            D64, L64 = ref64.posterior(x64, t)
            scale = float(_global_data(torch.float64)[0].abs().max())
            if dtype == torch.float32:   # MATH.md §7 against float64 on the concatenated data
                assert float((D1.double() - D64).abs().max()) <= 1e-4 * scale, (name, sigma)
                assert bool(((L1.double() - L64).abs() <= 1e-3 + 1e-6 * L64.abs()).all()), (name, sigma)
            else:                        # float64: the merge only reorders float64 sums
                Ds, Ls = single.posterior(x, t)
                assert float((D1 - Ds).abs().max()) <= 1e-12 * scale, (name, sigma)
                assert float((L1 - Ls).abs().max()) <= 1e-12 * (1 + float(Ls.abs().max())), (name, sigma)
    # whole trajectory against one process running the same per-step loop (a callback keeps fd.sample on it)
    single, _ = _single(torch.float64, True, 0.01)
    xs, traj = fd.sample(single, n=6, steps=15, seed=11, return_trajectory=True, dtype=torch.float64,
                         callback=lambda info: None)
    for r in range(world):
        xr, tr = outs[r]["trajectory"]
        assert torch.equal(xr, outs[0]["trajectory"][0]) and torch.equal(tr, outs[0]["trajectory"][1])
    assert float((outs[0]["trajectory"][1] - traj).abs().max()) <= 1e-9 * (1 + float(traj.abs().max()))
    assert float(xs.std()) > 0.1      # the run moved: not a comparison of constants
