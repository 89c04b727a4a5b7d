"""Counter-based Gaussian noise: the same numbers on every backend, batch size and device (DESIGN.md).

z for sample i (its global index in the run), sampler step k and component j is a pure function of
(seed, i, k, j):
  Philox4x32-10, key (seed mod 2³², seed >> 32), counter (⌊j/4⌋, k, i mod 2³², i >> 32) → r₀..r₃
  u_m = ((r_m >> 9) + 0.5)·2⁻²³                   (exact in float32, strictly inside (0, 1))
  (n₀, n₁) = √(−2 ln u₀)·(cos 2πu₁, sin 2πu₁),  (n₂, n₃) likewise from (u₂, u₃);  z = n_{j mod 4}.
Step k of the sampler uses step index k; the prior draw uses PRIOR_STEP = 2³² − 1.

How backends evaluate it: the C++ (cpu) and CUDA kernels compute Box–Muller exactly as `normal` below, in
float64 from the float32 uniforms with the angle fl64(2π·u₁) (never sinpi(2u₁), which near the zeros of cos
and sin differs from fl64(2π·u₁) by up to ~700 float64 ulps), then round to the dtype: float32 noise equals
this reference bit for bit (up to the libm's last float64 ulp, which practically never moves a float32
rounding), float64 noise is within a few ulps. The Triton kernels compute in float32 (within 4 float32 ulps).

Deviation from DESIGN.md, on purpose: DESIGN.md writes u = ((r >> 8) + 0.5)·2⁻²⁴ and calls it exact
in float32, but (2k + 1)·2⁻²⁵ needs 25 significant bits, so for u ≥ ½ it rounds (and the top value
rounds to exactly 1.0). Keeping 23 bits, (2k + 1)·2⁻²⁴ with k < 2²³, is exact, so every backend gets the
same bits with no rounding rule to agree on, and u lies in [2⁻²⁴, 1 − 2⁻²⁴].

This is the plain-torch reference: uint32 arithmetic is emulated in int64 (products split into
16-bit halves so nothing overflows), so it runs on any device and is exact everywhere.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ._checks import check_int

PRIOR_STEP = 2**32 - 1
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of the 64-bit product a·b, for a constant a and int64 tensor b < 2³²."""
    a_lo, a_hi = a & _MASK16, a >> 16
    b_lo, b_hi = b & _MASK16, b >> 16
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> 16) + (lh & _MASK16) + (hl & _MASK16)
    lo = (ll & _MASK16) | ((mid & _MASK16) << 16)
    hi = (hh + (lh >> 16) + (hl >> 16) + (mid >> 16)) & _MASK32
    return hi, lo


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123). counter: 4 int64 tensors (or ints) of uint32 words; key: 2 words.

    Returns the four output words as int64 tensors holding uint32 values.
    """
    # Plain-int words go to the device of the tensor words: a CPU scalar expanded beside CUDA tensors is no
    # longer a 0-d tensor, and the XOR below would mix devices.
    device = next((c.device for c in counter if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64, device=device) for c in counter))
    k0, k1 = (int(k) & _MASK32 for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _check_seed(seed) -> int:
    return check_int(seed, "seed", 0, 2**64)             # never a truncated float (seed=1.7 is not seed 1)


def _sample_index(sample_index, device) -> torch.Tensor:
    if isinstance(sample_index, (int, np.integer)) and not isinstance(sample_index, (bool, np.bool_)):
        sample_index = [check_int(sample_index, "sample_index", 0, 2**63)]
    elif isinstance(sample_index, range):
        sample_index = torch.arange(sample_index.start, sample_index.stop, sample_index.step, dtype=torch.int64)
    elif isinstance(sample_index, (list, tuple)) and len(sample_index) == 0:
        sample_index = torch.empty(0, dtype=torch.int64)
    try:
        idx = torch.as_tensor(sample_index, device=device)
    except (OverflowError, RuntimeError, TypeError, ValueError):
        raise ValueError("sample_index must be an int, a range or a 1-D integer tensor of indices in [0, 2**63), "
                         f"got {sample_index!r}") from None
    if idx.dtype not in (torch.int32, torch.int64) or idx.ndim != 1:
        raise ValueError("sample_index must be an int, a range or a 1-D integer tensor, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    idx = idx.to(torch.int64)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError("sample_index must be non-negative")
    return idx


def uniform(seed, sample_index, step, dim: int, *, device=None) -> torch.Tensor:
    """The float32 uniforms u for components 0..dim−1 of each sample: shape [len(sample_index), 4⌈dim/4⌉].

    Column 4q + m holds u_m of counter (q, step, i). These must agree bit for bit across backends.
    """
    seed = _check_seed(seed)
    step = check_int(step, "step", 0, 2**32)
    dim = check_int(dim, "dim", 1, 2**63)
    idx = _sample_index(sample_index, device)
    quads = torch.arange((dim + 3) // 4, dtype=torch.int64, device=idx.device)
    c0 = quads.view(1, -1)
    c2 = (idx & _MASK32).view(-1, 1)
    c3 = (idx >> 32).view(-1, 1)
    r = philox4x32_10((c0, int(step), c2, c3), (seed & _MASK32, seed >> 32))
    words = torch.stack(r, dim=-1).reshape(idx.numel(), 4 * quads.numel())      # [M, 4·quads]
    return ((words >> 9).to(torch.float32) + 0.5) * 2.0**-23           # exact: 2k + 1 < 2²⁴


def normal(seed, sample_index, step, dim: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise z[i, j] for the samples in `sample_index` at sampler step `step`: [M, dim].

    Box–Muller is evaluated in float64 from the exact float32 uniforms, then rounded to `dtype`.
    """
    u = uniform(seed, sample_index, step, dim, device=device).to(torch.float64)
    u = u.view(u.shape[0], u.shape[1] // 4, 2, 2)                     # [M, quads, pair, (radius, angle)]
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    angle = (2 * math.pi) * u[..., 1]
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return z.reshape(u.shape[0], 4 * u.shape[1])[:, : int(dim)].to(dtype)
