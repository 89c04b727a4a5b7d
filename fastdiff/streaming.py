"""Point clouds larger than memory: the data streamed in chunks through the fused posterior.

StreamingPointCloud(data, process, ...) is the exact denoiser of a point cloud read chunk by chunk from
  - a CPU tensor in host memory (any float dtype, fp16/bf16 included; pinned memory is used as is on CUDA),
  - a NumPy array or np.memmap,
  - the path of a .npy file (read with positioned reads into two reused buffers, so neither the file's pages
    nor the data count towards the resident set: peak memory depends on the chunk size, not on N).
Each chunk is one fused ops.posterior call (the storage dtype is upcast per chunk inside the call); the
partial (L_c, ȳ_c) are merged online in float64 with the same algebra as fastdiff.distributed:
  m' = max(m, L_c),  s' = s·e^{m−m'} + e^{L_c−m'},  acc' = acc·e^{m−m'} + e^{L_c−m'}·ȳ_c,
  L = m + log s,  ȳ = acc / s,  D = (1 − α²v/c)·ȳ + (αv/c)·x.
Float32 rows whose mass is split between chunks while |L| is large (far queries at small σ) get a second pass
in float64 (fastdiff.distributed.merge.F32_MERGE_TOL): a chunk's float32 L cannot resolve such a split.
Copy overlaps compute: on the CPU a background thread reads chunk i+1 while chunk i is reduced (file reads and
torch kernels release the GIL). On CUDA, host chunks go through two pinned buffers and a side stream; that path
is written for CUDA but has not been run on a GPU yet.
Weights, when given, are held in memory as float64 log-weights (8 bytes per point).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ._checks import as_real, check_int
from .denoisers import _Cloud, _coeffs
from .distributed.merge import _affine_D, float64_redo, local_posterior, take_rows
from .processes import Process

__all__ = ["ArraySource", "NpySource", "StreamingPointCloud", "TensorSource", "as_source"]

DEFAULT_CHUNK_BYTES = 32 << 20     # storage bytes per chunk: big enough to keep every core busy per call


class TensorSource:
    """Rows of a host tensor, as views (no copy)."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.rows, self.dim = self.tensor.shape
        self.dtype = self.tensor.dtype

    def read(self, start, stop, out=None):
        view = self.tensor[start:stop]
        if out is None:
            return view
        out[:stop - start].copy_(view)
        return out[:stop - start]


class ArraySource:
    """Rows of a NumPy array or np.memmap, copied chunk by chunk into a buffer (a memmap may be read-only, which
    a torch view cannot be; the copy also lets the prefetch thread page the next chunk in)."""

    def __init__(self, array):
        self.array = array
        self.rows, self.dim = array.shape
        self.dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype

    def read(self, start, stop, out=None):
        if out is None:
            out = torch.empty(stop - start, self.dim, dtype=self.dtype)
        view = out[:stop - start]
        view.numpy()[...] = self.array[start:stop]
        return view


class NpySource:
    """A C-ordered 2-D .npy file read by row ranges with os.preadv (no mapping: the page cache holds the file,
    the process holds only the buffers it reads into)."""

    def __init__(self, path):
        self.path = Path(path)
        try:    # the header through NumPy's own reader; the mapping is dropped unread (its offset is kept)
            mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"data: {self.path} is not a readable .npy file ({exc})") from None
        shape, fortran, dtype = mapped.shape, not mapped.flags.c_contiguous, mapped.dtype
        self.offset = int(mapped.offset)
        del mapped
        if len(shape) != 2 or fortran:
            raise ValueError(f"data: {self.path} must hold a C-ordered [N, d] array, got shape {shape}"
                             + (" in Fortran order" if fortran else ""))
        if dtype.kind != "f" or not dtype.isnative:
            raise ValueError(f"data: {self.path} must hold native floats (float16/32/64), got {dtype}")
        self.rows, self.dim = shape
        self.np_dtype = dtype
        self.dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        self.row_bytes = self.dim * dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY)

    def read(self, start, stop, out=None):
        n = stop - start
        if out is None:
            out = torch.empty(n, self.dim, dtype=self.dtype)
        view = out[:n]
        buf = memoryview(view.numpy()).cast("B")
        done = 0
        while done < len(buf):       # preadv may return short counts
            got = os.preadv(self.fd, [buf[done:]], self.offset + start * self.row_bytes + done)
            if got <= 0:
                raise ValueError(f"data: {self.path} ended early (row {start + done // self.row_bytes} of {self.rows})")
            done += got
        return view

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


def as_source(data):
    """A chunk source for a CPU tensor, a NumPy array / memmap, or the path of a .npy file."""
    if isinstance(data, (str, os.PathLike)):
        src = NpySource(data)
    elif isinstance(data, np.ndarray):
        if data.ndim != 2 or data.dtype.kind != "f":
            raise ValueError(f"data must be a float array [N, d], got {data.dtype} of shape {data.shape}")
        if data.dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(f"data must hold float16/32/64, got {data.dtype}")
        src = ArraySource(data)
    elif isinstance(data, torch.Tensor):
        if data.ndim != 2 or not data.is_floating_point():
            raise ValueError(f"data must be a floating tensor [N, d], got {data.dtype} of shape {tuple(data.shape)}")
        if data.device.type != "cpu":
            raise ValueError("data must be in host memory (a CPU tensor) to be streamed, got a tensor on "
                             f"{data.device}; a cloud that fits on the device is a fd.PointCloud")
        src = TensorSource(data.contiguous())
    elif isinstance(data, (TensorSource, ArraySource, NpySource)):
        src = data
    else:
        raise TypeError("data must be a CPU tensor, a NumPy array or the path of a .npy file, got "
                        f"{type(data).__name__}")
    if src.rows == 0 or src.dim == 0:
        raise ValueError(f"data must be non-empty, got shape [{src.rows}, {src.dim}]")
    return src


class StreamingPointCloud(_Cloud):
    """The exact denoiser of a point cloud streamed from host memory or a .npy file, chunk by chunk.

    data: see as_source; weights: [N] non-negative (normalised here); bandwidth: v >= 0;
    chunk_rows: rows per chunk (default: DEFAULT_CHUNK_BYTES of storage); device: where the reduction runs
    (queries x must live there); check: scan the data once for NaN/inf now (one extra pass);
    prefetch: read the next chunk in a background thread while the current one is reduced.
    """

    prediction = "x0"

    def __init__(self, data, process: Process, weights=None, bandwidth: float = 0.0, *, chunk_rows: int | None = None,
                 device="cpu", backend: str = "auto", check: bool = True, prefetch: bool = True):
        super().__init__(process)
        self.source = as_source(data)
        self.dim, self.rows = self.source.dim, self.source.rows
        self.bandwidth = as_real(bandwidth, "bandwidth")
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= 0):
            raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}")
        itemsize = torch.empty(0, dtype=self.source.dtype).element_size()
        default_rows = max(1, DEFAULT_CHUNK_BYTES // (self.dim * itemsize))
        rows = default_rows if chunk_rows is None else check_int(chunk_rows, "chunk_rows", 1, 2**63)
        self.chunk_rows = min(self.rows, rows)
        self.device = torch.device(device)
        self.backend, self.prefetch = backend, bool(prefetch)
        self.log_weights = None if weights is None else self._log_weights(weights)
        # chunks holding a point of positive weight: the others are never read (and the kernels refuse a chunk
        # whose weights are all zero); decided once here, so a posterior adds no host sync per chunk
        bounds = [(s, min(s + self.chunk_rows, self.rows)) for s in range(0, self.rows, self.chunk_rows)]
        if self.log_weights is not None:
            live = torch.isfinite(self.log_weights).cpu()
            bounds = [(s, e) for s, e in bounds if bool(live[s:e].any())]
        self._weighted_bounds = bounds
        self._absmax = None            # max|y|, for the float32 merge's redo test (merge.float64_redo)
        if check:
            absmax = 0.0
            for start, chunk in self._chunks():
                if not bool(torch.isfinite(chunk).all()):
                    bad = start + int((~torch.isfinite(chunk)).any(1).nonzero()[0])
                    raise ValueError(f"data contains NaN or inf (row {bad})")
                absmax = max(absmax, float(chunk.abs().max()))
            self._absmax = absmax

    def _log_weights(self, weights):
        w = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights,
                            dtype=torch.float64).cpu()
        if w.shape != (self.rows,):
            raise ValueError(f"weights must have shape [N]=[{self.rows}], got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        w = w / w.max()                                # (scaled first: a sum of 1e308's overflows)
        return (w / w.sum()).log().to(self.device)     # zero weights: −inf, excluded by the kernels

    # -- chunks -------------------------------------------------------------------------------------------
    def _chunks(self, bounds=None):
        """(start row, chunk on self.device) for the chunks (start, stop) in bounds (default: all), in order; the
        next is read while one is used."""
        if bounds is None:
            bounds = [(s, min(s + self.chunk_rows, self.rows)) for s in range(0, self.rows, self.chunk_rows)]
        if self.device.type == "cuda":
            yield from self._cuda_chunks(bounds)
            return
        if isinstance(self.source, TensorSource) or not self.prefetch:
            for s, e in bounds:
                yield s, self.source.read(s, e)
            return
        buffers = [torch.empty(self.chunk_rows, self.dim, dtype=self.source.dtype) for _ in range(2)]
        with ThreadPoolExecutor(1, thread_name_prefix="fastdiff-prefetch") as pool:
            pending = pool.submit(self.source.read, *bounds[0], buffers[0])
            for i, (s, _) in enumerate(bounds):
                chunk = pending.result()
                if i + 1 < len(bounds):      # buffer (i+1)%2 held chunk i-1, whose reduction has finished
                    pending = pool.submit(self.source.read, *bounds[i + 1], buffers[(i + 1) % 2])
                yield s, chunk

    def _cuda_chunks(self, bounds):
        """Pinned host buffers -> device buffers on a side stream, two of each (written for CUDA, not yet run
        on a GPU). The compute stream waits for a chunk's copy; a copy waits for the reduction that last used its
        device buffer; a pinned buffer is refilled only after its previous copy has finished."""
        compute, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        pinned = [torch.empty(self.chunk_rows, self.dim, dtype=self.source.dtype, pin_memory=True) for _ in range(2)]
        dev = [torch.empty(self.chunk_rows, self.dim, dtype=self.source.dtype, device=self.device) for _ in range(2)]
        copied = [torch.cuda.Event() for _ in range(2)]
        used = [torch.cuda.Event() for _ in range(2)]
        for i, (s, e) in enumerate(bounds):
            k, n = i % 2, e - s
            if i >= 2:
                copied[k].synchronize()                  # pinned[k] is free again
            host = self.source.read(s, e, pinned[k])
            with torch.cuda.stream(side):
                if i >= 2:
                    side.wait_event(used[k])
                dev[k][:n].copy_(host, non_blocking=True)
                copied[k].record(side)
            compute.wait_event(copied[k])
            yield s, dev[k][:n]
            used[k].record(compute)

    # -- the posterior ------------------------------------------------------------------------------------
    def _check(self, x):
        if isinstance(x, torch.Tensor) and x.device != self.device:
            raise ValueError(f"x is on {x.device} but this StreamingPointCloud reduces on {self.device}")
        return super()._check(x)

    def posterior(self, x: torch.Tensor, t):
        """(D [M, d], L [M]) over every chunk (MATH.md §5), merged online in float64."""
        self._check(x)
        alpha, sig2 = _coeffs(self.process, t, x)
        c = alpha * alpha * self.bandwidth + sig2
        ybar, L = self._merged(x, alpha, c)
        return _affine_D(ybar, x, alpha, c, self.bandwidth).to(x.dtype), L.to(x.dtype)

    def _ybar(self, x, alpha, c):
        return self._merged(x, alpha, c)[0]

    def _merged(self, x, alpha, c):
        """(ȳ [M, d], L [M]) in float64: one pass over the chunks, then a second, in float64, for the float32 rows
        whose merge float32's L cannot resolve (fastdiff.distributed.merge.F32_MERGE_TOL)."""
        ybar, m, s, q = self._online(x, alpha, c)
        redo = float64_redo(x, ybar, m, s, q, self._absmax)
        if redo is not None:
            y2, m2, s2, _ = self._online(x[redo].to(torch.float64), take_rows(alpha, redo), take_rows(c, redo))
            ybar, m, s = ybar.index_copy(0, redo, y2), m.index_copy(0, redo, m2), s.index_copy(0, redo, s2)
        return ybar, m + s.log()

    def _online(self, x, alpha, c):
        """ȳ, m = max_c L_c, s = Σ_c e^{L_c − m} and q = Σ_c e^{L_c − m}·ȳ_c² (per coordinate), float64, merged
        chunk by chunk."""
        M = x.shape[0]
        m = torch.full((M,), -math.inf, dtype=torch.float64, device=x.device)
        s = torch.zeros(M, dtype=torch.float64, device=x.device)
        # the second moments feed only the float32 redo test (merge.float64_redo): float64 queries skip them
        q = torch.zeros(M, self.dim, dtype=torch.float64, device=x.device) if x.dtype == torch.float32 else None
        acc = torch.zeros(M, self.dim, dtype=torch.float64, device=x.device)
        # max|y| for the redo test, taken on the first pass when the build-time scan was skipped (check=False)
        absmax = torch.zeros((), dtype=torch.float64, device=x.device) if self._absmax is None else None
        for start, chunk in self._chunks(self._weighted_bounds):
            if absmax is not None:
                absmax = torch.maximum(absmax, chunk.abs().max().to(torch.float64))
            lw = None if self.log_weights is None else self.log_weights[start:start + chunk.shape[0]]
            L_c, ybar_c = local_posterior(x, chunk, alpha, c, lw, self.backend)
            new_m = torch.maximum(m, L_c)
            keep, add = torch.exp(m - new_m), torch.exp(L_c - new_m)
            s = s * keep + add
            if q is not None:
                q.mul_(keep.unsqueeze(1)).add_(ybar_c * ybar_c * add.unsqueeze(1))
            acc.mul_(keep.unsqueeze(1)).add_(ybar_c * add.unsqueeze(1))
            m = new_m
        if absmax is not None:
            self._absmax = float(absmax)
        return acc / s.unsqueeze(1), m, s, q
