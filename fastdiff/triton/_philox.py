"""The noise contract (fastdiff.noise) inside Triton kernels.

Philox4x32-10 is written out here (uint32 words, tl.umulhi for the high half of each product) rather
than taken from triton.language.random, so the counter/key layout is ours and cannot change with a
Triton release. For sample i, step k and component j:
  key (seed mod 2³², seed >> 32), counter (⌊j/4⌋, k, i mod 2³², i >> 32) → r₀..r₃
  u_m = ((r_m >> 9) + 0.5)·2⁻²³                       bit for bit the same as fd.noise.uniform
  (n₀, n₁) = √(−2 ln u₀)·(cos 2πu₁, sin 2πu₁), (n₂, n₃) likewise, z_j = n_{j mod 4}
Box–Muller runs in float32. cos/sin of 2πu use an exact quarter-turn reduction (4u − q is exact for
these u), so sin and cos are only needed on [−π/4, π/4] (Cephes minimax polynomials, no libdevice) with an
argument accurate to ~2 ulp in relative terms; with the accurate log (libdevice logf on the GPU, numpy's under the
interpreter) and a correctly rounded square root, z is within a few float32 ulps of the float64 Box–Muller of
fd.noise.normal, including near its zeros.

Every 32-bit word enters a kernel as an int64 argument and is truncated to uint32 in the kernel: the
interpreter types Python ints by value (a word ≥ 2³¹ would otherwise become int64 there).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors of one shape; returns the four output words."""
    M0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    M1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    W0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    W1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, M0) ^ c3 ^ k1
        c1 = a2 * M1
        c3 = a0 * M0
        k0 = k0 + W0
        k1 = k1 + W1
    return c0, c1, c2, c3


@triton.jit
def uniform_from_word(r):
    """u = ((r >> 9) + 0.5)·2⁻²³: exact in float32 (2k + 1 < 2²⁴)."""
    return ((r >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _sin_cos_small(x):
    """(sin x, cos x) for |x| ≤ π/4 by the Cephes sinf/cosf minimax polynomials (≤ ~1 ulp there).
    Written out rather than tl.sin/tl.cos: on the GPU those are libdevice calls whose large-argument
    reduction bloats every noise kernel, and the interpreter then runs the same arithmetic as the GPU."""
    z = x * x
    s = x + x * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    return s, c


@triton.jit
def cos_sin_2pi(u):
    """(cos 2πu, sin 2πu) for u in (0, 1), by an exact quarter-turn reduction."""
    t = u * 4.0                                   # exact (power of two)
    qi = (t + 0.5).to(tl.int32)                   # nearest quarter (a rounding here only moves f past ±½)
    f = t - qi.to(tl.float32)                     # exact: both on the 2⁻²² grid, |f| ≤ ½ + 2⁻²²
    th = f * 1.5707963267948966                   # |th| ≤ π/4 (+ a hair)
    s, c = _sin_cos_small(th)
    q = qi & 3
    cos_v = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    sin_v = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    return cos_v, sin_v


@triton.jit
def sample_index_words(off_lo, off_hi, rows):
    """(lo, hi) uint32 words of the global sample index sample_offset + row (64-bit, with carry)."""
    lo0 = off_lo.to(tl.uint32)
    lo = lo0 + rows.to(tl.uint32)
    carry = (lo < lo0).to(tl.uint32)
    hi = off_hi.to(tl.uint32) + carry
    return lo, hi


@triton.jit
def philox_tile(seed_lo, seed_hi, step, i_lo, i_hi, q):
    """The four Philox words of counter (q, step, i_lo, i_hi) under key (seed_lo, seed_hi) for every row
    (i_lo, i_hi: [BM] uint32) and quad (q: [BQ] uint32): four [BM, BQ] uint32 tiles."""
    zero = (i_lo[:, None] * 0) + (q[None, :] * 0)                     # [BM, BQ] uint32 zeros
    return philox4x32_10(zero + q[None, :], zero + step.to(tl.uint32), zero + i_lo[:, None], zero + i_hi[:, None],
                         zero + seed_lo.to(tl.uint32), zero + seed_hi.to(tl.uint32))


@triton.jit
def normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, q0, BQ: tl.constexpr):
    """Standard normals for the rows with sample-index words i_lo, i_hi ([BM] uint32) and the
    components 4·q0 .. 4·(q0 + BQ) − 1: a [BM, 4·BQ] float32 tile in component order."""
    q = (q0 + tl.arange(0, BQ)).to(tl.uint32)
    r0, r1, r2, r3 = philox_tile(seed_lo, seed_hi, step, i_lo, i_hi, q)
    rad0 = tl.sqrt_rn(-2.0 * tl.log(uniform_from_word(r0)))
    rad2 = tl.sqrt_rn(-2.0 * tl.log(uniform_from_word(r2)))
    cos1, sin1 = cos_sin_2pi(uniform_from_word(r1))
    cos3, sin3 = cos_sin_2pi(uniform_from_word(r3))
    n0 = rad0 * cos1
    n1 = rad0 * sin1
    n2 = rad2 * cos3
    n3 = rad2 * sin3
    z = tl.join(tl.join(n0, n2), tl.join(n1, n3))                     # [BM, BQ, 2, 2]: (n0 n1; n2 n3)
    return tl.reshape(z, [i_lo.shape[0], 4 * BQ])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _uniform_kernel(out_ptr, M, Q, seed_lo, seed_hi, step, off_lo, off_hi,
                    BM: tl.constexpr, BQ: tl.constexpr):
    """Test/diagnostic kernel: the uniforms u (as fd.noise.uniform lays them out) for M rows, Q quads."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    q = tl.program_id(1) * BQ + tl.arange(0, BQ)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    r0, r1, r2, r3 = philox_tile(seed_lo, seed_hi, step, i_lo, i_hi, q.to(tl.uint32))
    u = tl.join(tl.join(uniform_from_word(r0), uniform_from_word(r2)),
                tl.join(uniform_from_word(r1), uniform_from_word(r3)))
    u = tl.reshape(u, [BM, 4 * BQ])
    cols = tl.program_id(1) * (4 * BQ) + tl.arange(0, 4 * BQ)
    mask = (rows < M)[:, None] & (cols < 4 * Q)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * (4 * Q) + cols[None, :], u, mask=mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step", "off_lo", "off_hi"])   # per-call values: never recompile
def _normal_kernel(out_ptr, M, d, seed_lo, seed_hi, step, off_lo, off_hi,
                   BM: tl.constexpr, BK: tl.constexpr):
    """Test/diagnostic kernel: z [M, d] exactly as the step kernels draw it."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    i_lo, i_hi = sample_index_words(off_lo, off_hi, rows)
    z = normal_tile(seed_lo, seed_hi, step, i_lo, i_hi, tl.program_id(1) * (BK // 4), BK // 4)
    mask = (rows < M)[:, None] & (cols < d)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], z, mask=mask)
