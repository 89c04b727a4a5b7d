"""fastdiff.distributed on real torch.distributed (gloo, CPU): spawned ranks on 127.0.0.1 against one process.

Each spawn runs a whole scenario (several configurations) so the file pays the process start-up a few times
only. Every spawn has a hard deadline: a rank still alive after it is killed and the test fails.
"""
from __future__ import annotations

import datetime
import functools
import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
import warnings

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


def _spawn(world, scenario, wait_for=None):
    """{rank: (status, payload, seconds)} from `world` spawned ranks running scenario(rank, world); returns once
    the ranks in wait_for (default: all) have reported, killing the rest."""
    wait_for = set(range(world) if wait_for is None else wait_for)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not wait_for <= set(out) and time.monotonic() < deadline:
            try:
                rank, status, payload, secs = results.get(timeout=0.5)
                payload = _from_bytes(payload) if status == "ok" else payload
                out[rank] = (status, payload, secs)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=2 if wait_for == set(range(world)) else 0)
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


CONFIGS = [   # (name, dtype, weighted, bandwidth)
    ("f32", torch.float32, False, 0.0),
    ("f32-weights-bandwidth", torch.float32, True, 0.05),
    ("f64-weights", torch.float64, True, 0.0),
    ("f64-bandwidth", torch.float64, False, 0.2),
]


def _scenario_main(rank, world):
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
    y, x = _far_query_case()               # float32, one point per rank of two (world 1: both on rank 0)
    pc = ShardedPointCloud(y if world == 1 else y[rank:rank + 1] if rank < 2 else y[:0], fd.PureVE(), timeout=20)
    out["far"] = {sigma: pc.posterior(x, sigma) for sigma in FAR_SIGMAS}
    xg = x.clone().requires_grad_()
    try:
        pc.posterior(xg, 1e-2)
        out["grad_error"] = None
    except ValueError as exc:
        out["grad_error"] = str(exc)
    y, w, x = _global_data(torch.float64)
    pc = ShardedPointCloud(_shard(y, world, rank), proc, weights=_shard(w, world, rank), bandwidth=0.01)
    out["trajectory"] = fd.sample(pc, n=6, steps=15, schedule="logsnr", seed=11, return_trajectory=True,
                                  dtype=torch.float64)
    if world > 1:
        out["sample_parallel"] = _sample_parallel_part(rank, world)
    if world == 3:
        out["bad_inputs"] = _bad_inputs_part(rank, world)
    return out


FAR_SIGMAS = (1e-2, 3e-3, 1e-3)


def _far_query_case():
    """Two points in d = 16 and queries on their bisector, 1 to 3 away from both: at small σ each query's L is
    -3e4 .. -1e7 (float32 rounds it by up to 0.6) while the two points share its mass (0.5/0.5 on the bisector,
    uneven just off it)."""
    g = torch.Generator().manual_seed(1)
    y0, y1 = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(2))
    u = (y1 - y0) / (y1 - y0).norm()
    n = torch.randn(16, generator=g, dtype=torch.float64)
    n = n - (n @ u) * u
    n = n / n.norm()
    x = torch.stack([0.5 * (y0 + y1) + R * n + e * u for R in (1.0, 2.0, 3.0) for e in (0.0, 1e-7)])
    return torch.stack([y0, y1]).float(), x.float()


def _far_query_reference(sigma):
    """Float64 brute force over the float32 points and queries: D [M, d]."""
    y, x = _far_query_case()
    y, x = y.double(), x.double()
    w = torch.softmax(-((x[:, None, :] - y[None]) ** 2).sum(-1) / (2 * sigma * sigma), dim=1)
    return w @ y


@functools.cache
def _main_spawn(world):
    """One spawn per world size serves the posterior, trajectory, sample-parallel and bad-input tests."""
    return _ok(_spawn(world, "_scenario_main"), world)


def _t_for_sigma(proc, sigma):
    return float(proc.sigma_inverse(sigma))


def _single(dtype, weighted, bw):
    y, w, x = _global_data(dtype)
    return fd.PointCloud(y, fd.VP(), weights=w if weighted else None, bandwidth=bw), x


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_posterior_and_trajectory_match_one_process(world):
    outs = _main_spawn(world)
    proc = fd.VP()
    for name, dtype, weighted, bw in CONFIGS:
        single, x = _single(dtype, weighted, bw)
        ref64, x64 = _single(torch.float64, weighted, bw)
        for sigma in SIGMAS:
            t = _t_for_sigma(proc, sigma)
            D1, L1, _, _ = outs[0][(name, sigma)]
            for r in range(world):      # every rank holds the same bits, and a second call repeats them
                for a, b in zip(outs[r][(name, sigma)], (D1, L1, D1, L1), strict=True):
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
    xs, traj = fd.sample(single, n=6, steps=15, schedule="logsnr", seed=11, return_trajectory=True, dtype=torch.float64,
                         callback=lambda info: None)
    for r in range(world):
        xr, tr = outs[r]["trajectory"]
        assert torch.equal(xr, outs[0]["trajectory"][0]) and torch.equal(tr, outs[0]["trajectory"][1])
    assert float((outs[0]["trajectory"][1] - traj).abs().max()) <= 1e-9 * (1 + float(traj.abs().max()))
    assert float(xs.std()) > 0.1      # the run moved: not a comparison of constants


@pytest.mark.parametrize("world", [1, 3])
def test_sharded_float32_far_query_with_split_mass_meets_math7(world):
    """A far query whose mass is split between ranks: the float32 L of each rank cannot resolve the split (the
    merge used to be 0.04 of max|y| off at σ = 1e-3), so those rows are merged again from float64 parts."""
    outs = _main_spawn(world)
    y, x = _far_query_case()
    single = fd.PointCloud(y, fd.PureVE())
    scale = float(y.abs().max())
    for sigma in FAR_SIGMAS:
        D, L = outs[0]["far"][sigma]
        ref = _far_query_reference(sigma)
        assert D.dtype == torch.float32
        assert float((D.double() - ref).abs().max()) <= 1e-6 * scale, sigma         # PointCloud's own 2e-8
        assert float((single.posterior(x, sigma)[0].double() - ref).abs().max()) <= 1e-6 * scale
        for r in range(world):
            assert torch.equal(outs[r]["far"][sigma][0], D) and torch.equal(outs[r]["far"][sigma][1], L)
        assert float(L.max()) < -1e4            # the regime that needs it: |L| beyond float32's resolution


def test_sharded_refuses_autograd_by_name():
    outs = _main_spawn(1)
    assert "ShardedPointCloud has no backward" in outs[0]["grad_error"]


def test_streaming_float32_far_query_with_split_mass_meets_math7():
    from fastdiff.streaming import StreamingPointCloud
    y, x = _far_query_case()
    stream = StreamingPointCloud(y, fd.PureVE(), chunk_rows=1)          # one point per chunk
    scale = float(y.abs().max())
    for sigma in FAR_SIGMAS:
        D, L = stream.posterior(x, sigma)
        assert float((D.double() - _far_query_reference(sigma)).abs().max()) <= 1e-6 * scale, sigma
        # L as precise as the single cloud's (float32 rounding of a float64 sum)
        L1 = fd.PointCloud(y, fd.PureVE()).posterior(x, sigma)[1]
        assert bool(((L.double() - L1.double()).abs() <= 1e-6 * L1.double().abs()).all()), sigma


def test_float32_merge_redoes_only_rows_that_need_it(monkeypatch):
    """Near-data queries (one chunk holds the mass) keep the float32 pass: float64_redo picks no row there, and
    picks the far bisector rows."""
    from fastdiff.distributed import merge
    from fastdiff.streaming import StreamingPointCloud
    picked = []
    real = merge.float64_redo

    def spy(x, *merged):
        idx = real(x, *merged)
        picked.append(None if idx is None else idx.tolist())
        return idx
    monkeypatch.setattr("fastdiff.streaming.float64_redo", spy)
    y, x = _far_query_case()
    stream = StreamingPointCloud(y, fd.PureVE(), chunk_rows=1)
    near = y + 1e-3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    stream.posterior(near, 1e-3)
    stream.posterior(x, 1e-3)
    assert picked == [None, list(range(x.shape[0]))]


# -- bad input: every rank raises the same clear error naming the rank and the argument ----------------------

BAD_CASES = {   # name: (rank that is wrong, how its shard / weights are spoiled, words the error must contain)
    "d": (2, "d", ("rank 2", "shard", "dimension")),
    "dtype": (1, "dtype", ("rank 1", "shard", "dtype")),
    "device": (0, "device", ("rank 0", "shard", "meta")),
    "nan": (1, "nan", ("rank 1", "shard", "NaN")),
    "weights": (2, "weights", ("rank 2", "weights")),
}


def _bad_inputs_part(rank, world):
    from fastdiff.distributed import ShardedPointCloud
    y, w, _ = _global_data()
    out = {}
    for name, (bad_rank, how, _) in BAD_CASES.items():
        shard, wr = _shard(y, world, rank).clone() + 1.0, _shard(w, world, rank).clone()
        if rank == bad_rank:
            if how == "d":
                shard = torch.randn(shard.shape[0], D_DIM + 1)
            elif how == "dtype":
                shard = shard.double()
            elif how == "device":
                shard = torch.empty(shard.shape, device="meta")
            elif how == "nan":
                shard[-1, 0] = float("nan")
            else:
                wr[0] = -1.0
        before = shard.clone() if shard.device.type != "meta" else None
        try:
            ShardedPointCloud(shard, fd.VP(), weights=wr if how == "weights" else None, timeout=20)
            out[name] = ("built", "")
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc))
        if before is not None:
            out[name + ":untouched"] = torch.equal(before, shard) or bool(torch.isnan(before).any())
    return out


def test_bad_input_raises_on_every_rank_naming_rank_and_argument():
    outs = [o["bad_inputs"] for o in _main_spawn(3)]
    for name, (_, _, words) in BAD_CASES.items():
        for r in range(3):
            kind, msg = outs[r][name]
            assert kind in ("ValueError", "TypeError"), f"{name}: rank {r} got {kind}: {msg}"
            for word in words:
                assert word in msg, f"{name}: rank {r}'s error lacks {word!r}: {msg}"
            assert outs[r].get(name + ":untouched", True)
    assert outs[0]["dtype"][0] == "TypeError"


# -- a rank that dies or hangs: the others raise PeerError within the timeout ----------------------------------

def _scenario_peer_dies(rank, world):
    return _peer_failure(rank, lambda: os._exit(3))


def _scenario_peer_hangs(rank, world):
    return _peer_failure(rank, lambda: time.sleep(10 * PEER_TIMEOUT_S))


def _peer_failure(rank, fail):
    from fastdiff.distributed import PeerError, ShardedPointCloud
    y, _, x = _global_data()
    pc = ShardedPointCloud(_shard(y, 2, rank), fd.VP(), timeout=PEER_TIMEOUT_S)
    pc.posterior(x, 0.3)                   # a healthy step first
    if rank == 1:
        fail()
    start = time.monotonic()
    try:
        pc.posterior(x, 0.3)
    except PeerError as exc:
        return ("PeerError", str(exc), time.monotonic() - start)
    return ("returned", "", time.monotonic() - start)


def _scenario_peer_hangs_at_build(rank, world):
    """Rank 1 never arrives at the collective input check: rank 0's constructor must give up, not wait."""
    from fastdiff.distributed import PeerError, ShardedPointCloud
    y, _, _ = _global_data()
    if rank == 1:
        time.sleep(10 * PEER_TIMEOUT_S)
    start = time.monotonic()
    try:
        ShardedPointCloud(_shard(y, 2, rank), fd.VP(), timeout=PEER_TIMEOUT_S)
    except PeerError as exc:
        return ("PeerError", str(exc), time.monotonic() - start)
    return ("returned", "", time.monotonic() - start)


@pytest.mark.parametrize("scenario", ["_scenario_peer_dies", "_scenario_peer_hangs", "_scenario_peer_hangs_at_build"])
def test_dead_or_hung_rank_makes_the_others_fail_within_the_timeout(scenario):
    out = _spawn(2, scenario, wait_for=[0])
    assert 0 in out and out[0][0] == "ok", f"rank 0 reported nothing or crashed: {out}"
    kind, msg, seconds = out[0][1]
    assert kind == "PeerError", f"rank 0 returned instead of raising: {out[0]}"
    assert "rank 0" in msg and ("input check" if scenario.endswith("at_build") else "all_reduce") in msg, msg
    assert seconds <= PEER_TIMEOUT_S + 5, f"rank 0 needed {seconds:.1f} s to notice (timeout {PEER_TIMEOUT_S} s)"


# -- samples split over ranks; data × samples on a 2 × 2 grid ---------------------------------------------------

def _sample_parallel_part(rank, world):
    from fastdiff.distributed import sample_parallel
    y, w, _ = _global_data()
    pc = fd.PointCloud(y, fd.VP(), weights=w)
    return {"x": sample_parallel(pc, 7, seed=5, sample_offset=3, steps=12),
            "traj": sample_parallel(pc, 7, seed=5, steps=12, schedule="logsnr", return_trajectory=True, ode=True)}


@pytest.mark.parametrize("world", [2, 3])
def test_sample_parallel_equals_one_process_bit_for_bit(world):
    outs = [o["sample_parallel"] for o in _main_spawn(world)]
    y, w, _ = _global_data()
    pc = fd.PointCloud(y, fd.VP(), weights=w)
    single = fd.sample(pc, n=7, seed=5, sample_offset=3, steps=12)
    single_x, single_traj = fd.sample(pc, n=7, seed=5, steps=12, schedule="logsnr", return_trajectory=True, ode=True)
    assert float(single.std()) > 0.1
    for r in range(world):
        assert torch.equal(outs[r]["x"], single), f"rank {r}"
        assert torch.equal(outs[r]["traj"][0], single_x) and torch.equal(outs[r]["traj"][1], single_traj), f"rank {r}"


# -- streaming: chunks from host memory or a .npy file, merged with the same algebra ---------------------------

def _stream_data(dtype=torch.float32):
    y, w, x = _global_data(torch.float64)
    return y.to(dtype), w, x


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_streaming_matches_the_point_cloud(chunk_rows):
    from fastdiff.streaming import StreamingPointCloud
    proc = fd.VP()
    for weighted, bw in ((False, 0.0), (True, 0.05)):
        for dtype in (torch.float32, torch.float64):
            y, w, x64 = _stream_data()
            x = x64.to(dtype)
            stream = StreamingPointCloud(y.to(dtype), proc, weights=w if weighted else None, bandwidth=bw,
                                         chunk_rows=chunk_rows)
            ref = fd.PointCloud(y.double(), proc, weights=w if weighted else None, bandwidth=bw)
            scale = float(y.abs().max())
            for sigma in SIGMAS:
                t = _t_for_sigma(proc, sigma)
                D, L = stream.posterior(x, t)
                D64, L64 = ref.posterior(x64, t)
                if dtype == torch.float32:      # MATH.md §7
                    assert float((D.double() - D64).abs().max()) <= 1e-4 * scale, (weighted, sigma)
                    assert bool(((L.double() - L64).abs() <= 1e-3 + 1e-6 * L64.abs()).all()), (weighted, sigma)
                else:
                    assert float((D - D64).abs().max()) <= 1e-12 * scale, (weighted, sigma)
                    assert float((L - L64).abs().max()) <= 1e-12 * (1 + float(L64.abs().max())), (weighted, sigma)


def test_streaming_from_an_fp16_npy_file_with_prefetch(tmp_path):
    import numpy as np

    from fastdiff.streaming import StreamingPointCloud
    y, w, x = _stream_data()
    path = tmp_path / "cloud.npy"
    np.save(path, y.numpy().astype(np.float16))
    y16 = torch.from_numpy(np.load(path)).double()          # what the file holds, exactly
    proc = fd.VP()
    ref = fd.PointCloud(y16, proc, weights=w)
    runs = []
    for prefetch in (True, False):
        stream = StreamingPointCloud(str(path), proc, weights=w, chunk_rows=6, prefetch=prefetch)
        assert stream.source.dtype == torch.float16
        runs.append(stream.posterior(x.double(), 0.05))
    with warnings.catch_warnings():      # a read-only memmap streams without torch's non-writable warning
        warnings.simplefilter("error")
        mapped = StreamingPointCloud(np.load(path, mmap_mode="r"), proc, weights=w, chunk_rows=6)
        runs.append(mapped.posterior(x.double(), 0.05))
    D64, L64 = ref.posterior(x.double(), 0.05)
    for D, L in runs[1:]:
        assert torch.equal(runs[0][0], D) and torch.equal(runs[0][1], L)
    assert float((runs[0][0] - D64).abs().max()) <= 1e-12 * float(y16.abs().max())
    assert float((runs[0][1] - L64).abs().max()) <= 1e-12 * (1 + float(L64.abs().max()))
    # a whole trajectory through fd.sample, against one point cloud on the same per-step loop
    xs = fd.sample(StreamingPointCloud(str(path), proc, weights=w, chunk_rows=5), n=4, steps=12, schedule="logsnr",
                   seed=2, dtype=torch.float64)
    single = fd.sample(ref, n=4, steps=12, schedule="logsnr", seed=2, dtype=torch.float64, callback=lambda i: None)
    assert float((xs - single).abs().max()) <= 1e-9 * (1 + float(single.abs().max()))


def test_streaming_bad_input_is_named(tmp_path):
    import numpy as np

    from fastdiff.streaming import StreamingPointCloud
    y, _, _ = _stream_data()
    bad = y.clone()
    bad[29, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(row 29\)"):
        StreamingPointCloud(bad, fd.VP(), chunk_rows=4)
    np.save(tmp_path / "f.npy", np.asfortranarray(y.numpy()))
    with pytest.raises(ValueError, match="data: .*Fortran"):
        StreamingPointCloud(str(tmp_path / "f.npy"), fd.VP())
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="data: .*not a readable .npy"):
        StreamingPointCloud(str(tmp_path / "junk.npy"), fd.VP())
    with pytest.raises(ValueError, match=r"weights must have shape \[N\]"):
        StreamingPointCloud(y, fd.VP(), weights=torch.ones(3))
    with pytest.raises(ValueError, match="chunk_rows"):
        StreamingPointCloud(y, fd.VP(), chunk_rows=0)
    with pytest.raises(ValueError, match="x is on"):
        StreamingPointCloud(y, fd.VP()).posterior(torch.zeros(2, D_DIM, device="meta"), 0.5)


def test_bench_scaling_distributed_option_is_wired():
    import argparse

    from fastdiff import bench
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(["posterior", "--distributed"])
    assert args.distributed and args.ranks == "1,2"
    assert bench.run_from_args(args) == 2           # --distributed belongs to the scaling suite only
    args = bench.add_arguments(argparse.ArgumentParser()).parse_args(["scaling", "--distributed", "--ranks", "x"])
    assert bench.run_from_args(args) == 2


TORCHRUN_SCRIPT = """
import atexit, os, sys, torch, fastdiff as fd
from fastdiff import distributed as fdd
def at_exit():      # atexit runs last-registered first: this runs after the hook fdd.init registers
    with open(sys.argv[1] + f"/rank{os.environ['RANK']}.exit", "w") as f:
        f.write(f"group alive at exit: {torch.distributed.is_initialized()}")
atexit.register(at_exit)
fdd.init("cpu", timeout=60)
torch.set_num_threads(1)
rank = torch.distributed.get_rank()
data_group, sample_group, data_index, _ = fdd.grid_groups(2, timeout=60)     # 2 data shards x 2 sample slices
y = torch.randn(29, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
start, count = fdd.sample_slice(29, data_index, 2)                          # this rank's rows of the data
cloud = fdd.ShardedPointCloud(y[start:start + count], fd.VP(), group=data_group, timeout=60)
x = fdd.sample_parallel(cloud, 5, group=sample_group, steps=10, schedule="logsnr", seed=4, dtype=torch.float64,
                        timeout=60)
torch.save(x, sys.argv[1] + f"/rank{rank}.pt")
"""


def test_torchrun_two_by_two_grid_of_data_shards_and_sample_slices(tmp_path):
    """torchrun with the Python API: 4 ranks = 2 data shards x 2 sample slices, against one process."""
    import shutil
    import subprocess
    import sys
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nnodes=1", "--nproc-per-node=4", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=SPAWN_DEADLINE_S, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # fdd.init destroyed its group before the interpreter's teardown (left to teardown, gloo's threads can abort
    # the process after a run that succeeded: "terminate called without an active exception")
    for r in range(4):
        assert (tmp_path / f"rank{r}.exit").read_text() == "group alive at exit: False", f"rank {r}"
    y = torch.randn(29, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    single = fd.sample(fd.PointCloud(y, fd.VP()), n=5, steps=10, schedule="logsnr", seed=4, dtype=torch.float64,
                       callback=lambda i: None)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for r in range(4):
        assert torch.equal(outs[r], outs[0]), f"rank {r} differs from rank 0"
    assert float((outs[0] - single).abs().max()) <= 1e-9 * (1 + float(single.abs().max()))
    assert float(single.std()) > 0.1


def test_exit_hook_destroys_the_group_unless_a_peer_failed(monkeypatch):
    """The hook fdd.init registers destroys the group at exit, but not after a PeerError: tearing gloo down
    then waits for the failed collective's thread, up to the group's timeout, instead of exiting."""
    from fastdiff.distributed import _comm
    destroyed = []
    monkeypatch.setattr(_comm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(_comm.dist, "destroy_process_group", lambda: destroyed.append(True))
    monkeypatch.setattr(_comm, "_peer_failed", False)
    _comm._destroy_at_exit()
    assert destroyed == [True]
    err = _comm._peer_error("rank 1: gone")
    assert isinstance(err, _comm.PeerError) and str(err) == "rank 1: gone" and _comm._peer_failed
    _comm._destroy_at_exit()
    assert destroyed == [True]


def test_unchecked_stream_learns_its_scale_on_the_first_call():
    """check=False skips the build-time scan: the first posterior takes max|y| for the redo test on its way, and
    the far split-mass rows are still redone."""
    from fastdiff.streaming import StreamingPointCloud
    y, x = _far_query_case()
    stream = StreamingPointCloud(y, fd.PureVE(), chunk_rows=1, check=False)
    assert stream._absmax is None
    D, _ = stream.posterior(x, 1e-3)
    assert stream._absmax == float(y.abs().max())
    assert float((D.double() - _far_query_reference(1e-3)).abs().max()) <= 1e-6 * float(y.abs().max())
