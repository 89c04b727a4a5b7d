"""Host-side helpers shared by the Triton ops: the kernels' limits, per-row parameter tables, launch
configurations (a plain Python heuristic: autotuning with several configs needs a GPU driver) and the
accuracy constants of the large-d screening. Imports no Triton and never queries a GPU driver."""
from __future__ import annotations

import contextlib
import math
import os

import torch

LOG2E = 1.4426950408889634
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.401298464324817e-45     # smallest positive (subnormal) float32
# data, D and the history's D's: read in x's float32 on load, as every backend reads them in x's dtype (float64
# ones are rounded, as the cpu and torch backends round them for a float32 x)
DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# ---- the kernels' limits, written once (read by refuse_reasons through limit_reasons)
ROWS_MAX = 2**31 - 4097     # most query rows / data points: row indices (program_id·BM + lane) are int32
D_MAX = 2**31 - 4097        # most columns: column indices (k0 + lane) are int32; addresses are int64
X_DTYPES = (torch.float32,)  # the kernels compute in float32 (x, out, D and L)
SMALL_D_MAX = 64            # d ≤ 64: direct-difference kernel, whole rows on chip; above: large-d kernel
INV2C_MAX = 1e30            # 1/(2c) beyond this: float32 logits lose their meaning (fastdiff._precision's
#                             F32_SAFE_INV2C: such rows go to a float64 backend; refuse_reasons names it)
NPAR = 10                   # per-row (or per-step) parameter record, float32:
# 0 a = α   1 c1   2 c2   3 k2 = log2(e)/(2c)   4 cy = 1 − α²v/c   5 cx = αv/c   6 A   7 B   8 C
# 9 k2_lo = k2 − fl32(k2) (float64 k2 = k2 + k2_lo to ~2⁻⁴⁸: a far row's anchor logit, hence its L, is formed
#   in float64; with k2 alone its relative error 2⁻²⁴ moves an L of −1.6e5 by 0.01, more than the reference)
# x − αy is formed as (x − c1·y) + c2·y: (c1, c2) = (1, 1 − α) for α ≥ ½ (x − y is then exact near the
# data and (1 − α)·y tiny), (0, −α) for α < ½ (plain x − αy, the better form when α is small).


def interpreting() -> bool:
    """True when Triton kernels are (or will be) decorated for the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------- launch configurations
def small_config(d: int) -> dict:
    """d ≤ SMALL_D_MAX: rows [BM, DP] stay in registers; the [BM, BN, DP] difference tile is 4K–8K floats
    (4 warps; sizes chosen so ptxas reports no spills for sm_90, see aot.py)."""
    DP = max(4, next_pow2(d))
    BM, BN = {4: (32, 32), 8: (32, 16), 16: (32, 16), 32: (16, 16), 64: (16, 8)}[DP]
    return {"BM": BM, "BN": BN, "DP": DP, "num_warps": 4}


def large_config(d: int) -> dict:
    """d > SMALL_D_MAX: [BM, BN] logits from BK-wide tl.dot tiles; exact re-scoring in BKE-wide slices."""
    return {"BM": 32, "BN": 32, "BK": 32, "BKE": 4, "num_warps": 4}


SPLIT_SCRATCH_BYTES = 1 << 30   # the split posterior's partial accumulators [S, M, d] stay below this
MAX_SPLITS = 65535              # the launch grid's second dimension (GRID_YZ_MAX)


SPLITS_PER_SM = 1 / 8            # the default split count: one part per 8 SMs (16 on a 132-SM H100/H200)


def large_splits(N: int, d: int, device) -> int:
    """How many parts the large-d posterior splits the data into. With few rows (M = 1024 is 32 programs of
    BM = 32 on a 132-SM H100) one program per row block leaves most of the GPU idle, so the data is split
    (SMs/8 parts: M = 1024 then runs 512 programs, ~4 per SM), keeping ≥ 8 tiles of BN points per split.
    A function of N, d and the device only, never of M: the split changes the summation order, and row i's
    result must not depend on how many rows are computed with it (batch invariance; the launcher bounds the
    partials' scratch by launching rows in chunks instead). 1 off CUDA (the interpreter)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 1
    cfg = large_config(d)
    want = max(1, int(_sm_count(dev) * SPLITS_PER_SM))
    return max(1, min(want, N // (8 * cfg["BN"]), MAX_SPLITS))


def split_row_chunk(S: int, d: int, BM: int, scratch_bytes: int | None = None) -> int:
    """Rows per launch of the split posterior so its float64 partials [S, rows, d] stay under scratch_bytes
    (default SPLIT_SCRATCH_BYTES; a multiple of BM; at least BM)."""
    rows = (SPLIT_SCRATCH_BYTES if scratch_bytes is None else scratch_bytes) // max(1, 8 * S * d)
    return max(BM, rows // BM * BM)


_SMS: dict = {}


def device_guard(device):
    """Launch on the tensors' device, not the current one (tensors on cuda:1 while cuda:0 is current would
    otherwise run on the wrong GPU): every launcher enters this around its kernel launches."""
    dev = torch.device(device)
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _sm_count(dev: torch.device) -> int:
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def affine_config(d: int) -> dict:
    BK = min(128, max(4, next_pow2(d)))
    return {"BM": max(8, 1024 // BK), "BK": BK, "num_warps": 4}


SMALL_DPS = (4, 8, 16, 32, 64)
AFFINE_BKS = (4, 8, 16, 32, 64, 128)
GRID_YZ_MAX = 65535                       # CUDA's limit on a launch grid's second and third dimensions
AFFINE_D_MAX = GRID_YZ_MAX * AFFINE_BKS[-1]   # the affine step tiles d over the grid's second dimension


# ---------------------------------------------------------------- large-d screening constants
def screen_kappa(d: int, tf32: bool) -> float:
    """Relative bound κ with |d̃² − d²| ≤ κ(|x| + α|y|)² for the expanded squared distance
    |x|² − 2α x·y + α²|y|² evaluated from a float32 tl.dot (MATH.md §5).

    tf32: inputs truncated to 10 mantissa bits by the kernel itself (relative error < 2⁻¹⁰ each, so
    products are off by < 2⁻⁹ + 2⁻²⁰); any float32 accumulation order, even truncating (tensor-core)
    adds: d·2⁻²³ (1.01 for higher-order terms); the norms: d·2⁻²³; forming the sum and scaling: 16u.
    The whole bound is doubled to cover the rounding of the bound itself and of |x|, |y|.
    """
    acc = 1.01 * d * 2.0**-23
    cross = (2.0**-9 + 2.0**-20 + acc) if tf32 else acc
    return 2.0 * (max(cross, acc) + 16 * 2.0**-24)


def screen_delta2(N: int) -> float:
    """Pairs whose logit is below the row max by more than this (log2 units) are dropped:
    N·2^−Δ ≤ 2⁻⁴⁰ of the total weight."""
    return math.log2(max(N, 1)) + 40.0


SCREEN_TAU2 = 1e-6          # screened logits (log2 units) are used as they are when their bound is below this


# ---------------------------------------------------------------- kernel limits (read by refuse_reasons)
def limit_reasons(op, M=None, N=None, d=None) -> list[str]:
    """Why the kernels of `op` cannot take M query rows, N data points, d columns ([] = they can): the limits
    above, written once here, read by fastdiff.triton.refuse_reasons and by the ops (which raise with them)."""
    reasons = []
    if op == "affine_step" and d is not None and int(d) > AFFINE_D_MAX:
        reasons.append(f"d={int(d)} exceeds the Triton affine step's limit of {AFFINE_D_MAX} columns (its launch "
                       f"grid's second dimension, d/{AFFINE_BKS[-1]}, is at most {GRID_YZ_MAX})")
    for name, n in (("x", M), ("data", N)):
        if n is not None and int(n) > ROWS_MAX:
            reasons.append(f"{name} has {int(n)} rows; the Triton kernels index rows in int32 (at most {ROWS_MAX})")
    if d is not None and int(d) > D_MAX:
        reasons.append(f"d={int(d)} exceeds the Triton kernels' limit of {D_MAX} columns (int32 column indices)")
    return reasons


def check_limits(op, x, data=None):
    """Raise ValueError for shapes beyond the kernels' limits (limit_reasons); no scan of values."""
    reasons = limit_reasons(op, x.shape[0], None if data is None else data.shape[0], x.shape[1])
    if reasons:
        raise ValueError("; ".join(reasons))


def words(value: int):
    """(low, high) 32-bit words of a non-negative integer < 2⁶⁴."""
    v = int(value)
    return v & 0xFFFFFFFF, v >> 32


def rows64(value, device) -> torch.Tensor:
    """alpha or sigma as a float64 [1] or [M] tensor on device (fastdiff.ops has validated it; a Python
    number is accepted for direct calls in tests). No value is read on the host: no device synchronisation."""
    return torch.as_tensor(value, dtype=torch.float64).to(device).reshape(-1)


def log_weights2(log_weights, N, device, return_shift=False):
    """log π in log2 units as float32 [N] (zeros when None); −inf allowed (zero weight).

    The largest weight is shifted to 0 in float64 first, so a common offset (log-weights of 1e9, or of
    1e300) costs no float32 precision and cannot overflow; the shift (natural log units, a 0-d float64
    tensor on device, read by no host code: no synchronisation) is returned when asked, for L. D does not
    depend on it. fastdiff.ops has checked the values (no NaN or +inf, not all −inf)."""
    if log_weights is None:
        zeros = _zeros(N, device)
        return (zeros, None) if return_shift else zeros
    lw = log_weights.to(device=device, dtype=torch.float64)
    shift = lw.max()
    lw2 = ((lw - shift) * LOG2E).to(torch.float32).contiguous()   # ≤ 0; far below: −inf = zero weight
    return (lw2, shift) if return_shift else lw2


_ZEROS: dict = {}
_RETIRED_ZEROS: list = []       # outgrown buffers (doubling: all together at most the current one's size)


def _zeros(N: int, device) -> torch.Tensor:
    """A read-only float32 zero vector of length N (uniform log-weights): one buffer per device, grown as
    needed, so a call allocates and fills nothing (the kernels only read it)."""
    key = torch.device(device)
    buf = _ZEROS.get(key)
    if buf is None or buf.numel() < N:
        if buf is not None:          # kernels on another stream may still read it: never freed
            _RETIRED_ZEROS.append(buf)
        buf = _ZEROS[key] = torch.zeros(max(2 * N, 1024), dtype=torch.float32, device=key)
    return buf[:N]


def reduction_params(alpha, sigma, bandwidth, M, device) -> torch.Tensor:
    """float64 [R, NPAR] records (R = 1 or M) with a, c1, c2, k2, cy, cx filled (A, B, C zero) on `device`.

    Computed where alpha and sigma live (float64 tensors on x's device, as fastdiff.ops passes them; Python
    numbers from direct calls are built on the host), without reading any value back: no synchronisation.
    fastdiff.ops has checked sigma > 0 and bandwidth, and sends the rows whose 1/(2c) exceeds INV2C_MAX (or
    whose logits could overflow float32) to a float64 backend (fastdiff._precision)."""
    a, s = rows64(alpha, device), rows64(sigma, device)
    R = max(a.numel(), s.numel())
    a, s = a.expand(R), s.expand(R)
    v = float(bandwidth)
    c = a * a * v + s * s
    inv2c = 0.5 / c
    par = torch.zeros(R, NPAR, dtype=torch.float64, device=a.device)
    near_one = a >= 0.5
    par[:, 0] = a
    par[:, 1] = near_one.to(torch.float64)
    par[:, 2] = torch.where(near_one, 1.0 - a, -a)
    # the shared numeric rule, point 1: 1/(2c) within [smallest subnormal, largest finite] of float32 (the
    # ops layer keeps it ≤ INV2C_MAX here; the clamp keeps k2 finite and nonzero whatever that limit is)
    par[:, 3] = (inv2c.clamp(min=F32_TINY, max=F32_MAX) * LOG2E).clamp(max=F32_MAX)
    par[:, 9] = par[:, 3] - par[:, 3].to(torch.float32).to(torch.float64)
    par[:, 4] = 1.0 - a * a * v / c
    par[:, 5] = a * v / c
    return par


def as_f32_table(par64: torch.Tensor) -> torch.Tensor:
    return par64.to(torch.float32).contiguous()
