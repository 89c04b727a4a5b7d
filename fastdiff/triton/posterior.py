"""Triton point-cloud posterior (MATH.md §5, §7): D [M, d] and L [M] in one pass over the data with an
online log-sum-exp; no M×N matrix ever exists (one [BM, BN] tile of logits at a time).

Logits are kept in log2 units (k2 = log2(e)/(2c), exp2/log2 on the hardware units); per-row
records (see _common.NPAR) carry a = α, b = 1 − α, k2, cy = 1 − α²v/c, cx = αv/c.

Differences are formed as (x − y) + b·y with b = 1 − α computed in float64 on the host: when α is near
1 (every process at small σ) x − y is exact and b·y is tiny, so the distance keeps float32 accuracy
even against a float64 reference that uses the unrounded α (x − fl(α)·y would be off by u·|y| per
component, hundreds of logit units... well, ~10⁻³ of one at σ = 1e−3, d = 3072).

Small d (≤ 64, exp-bound): every pair by direct differences, the [BM, DP] rows and the [BM, DP]
accumulator in registers.

Large d (matrix-product-bound), the accuracy method — screening plus exact re-scoring:
  1. Screen each [BM, BN] tile with the expanded form |x|² − 2α x·y + α²|y|² from tl.dot. By default
     the kernel truncates both operands to TF32 itself (bit mask), so the tensor-core product is exact
     on those operands and the interpreter sees exactly the same operands: the error of the screened
     logit is then bounded rigorously by κ(|x| + α|y|)²·k2 (_common.screen_kappa) whatever the
     accumulation order. TF32 is used only to decide what to skip, never for a value that is returned.
  2. Keep a running lower bound m_lb of each row's maximum logit (max of screened − bound). A tile
     whose every upper bound (screened + bound) is below m_lb − Δ (Δ = log2 N + 40) holds less than
     2⁻⁴⁰ of the weight: it is skipped (no exp, no accumulation).
  3. Any other tile goes through the online log-sum-exp; each of its pairs whose bound exceeds τ = 1e−6
     (all but huge σ) is re-scored exactly by direct differences ((x − y) + b·y, BKE columns at a time,
     Kahan-summed) and formed relative to the row's running maximum; its p·y product uses
     tl.dot(..., input_precision="ieee").
  4. Far rows (best logit below −FAR_LOG2) are reduced again relative to their best point r (large_reduce):
     their direct logits each carry a float32 rounding of ~1e-7·|l| (0.02 log2 units at 471σ), the anchored
     form α(y_r − y)·(2(x − αy_r) + α(y_r − y)) one relative to the points' spread times the distance.
  At small σ (the hard case: 1/(2c) ~ 10⁶ multiplies the cancellation error of the expanded form)
  only the few tiles that hold a near neighbour of some row in the block are re-scored, so the cost is
  about one TF32 screening product; at large σ nearly every tile is re-scored (direct differences,
  ~1.5× the FMAs of an fp32 expanded form) and the result is still float32-exact.
  Chosen over centring (which shrinks |x|² and |y|² only by a data-dependent factor, far from the
  10⁶ needed at σ = 1e−3 on images) and split products (which at best restore float32 products,
  whereas the cancellation needs ~10⁻¹² relative accuracy of the terms).
  The [BM, d] accumulator does not fit on chip for d in the thousands: it lives in a float64 scratch [M, d]
  (rule 4: each tile's float32 product merged into double, as the softmax sum s), owned by one program and
  resident in L2; each processed tile does one read-modify-write of it (rescaled by the online max), skipped
  tiles touch nothing.
  Few rows (M = 1024 is 32 programs for 132 SMs): the posterior op splits the data into parts reduced by
  separate programs into partial (m, s, acc) and merges them (combine_splits), as split-K does for a
  matrix product; _common.large_splits picks the count from N, d and the device's SM count, never from M.

Batch invariance: row i's D and L never depend on which other rows are computed with it. Every screening
decision (skip a pair, re-score it exactly) is made per pair from that row's own bounds; a block of rows
only decides whether a tile is touched at all, and a pair its row does not need contributes exactly
nothing. The split count does not depend on M, and the split merge uses elementwise operations only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

LN2 = 0.6931471805599453


# ================================================================ kernels
@triton.jit
def _load_params(par_ptr, rows, par_stride, rmask):
    p = par_ptr + rows.to(tl.int64) * par_stride
    a = tl.load(p + 0, mask=rmask, other=1.0)
    c1 = tl.load(p + 1, mask=rmask, other=1.0)
    c2 = tl.load(p + 2, mask=rmask, other=0.0)
    k2 = tl.load(p + 3, mask=rmask, other=1.0)
    cy = tl.load(p + 4, mask=rmask, other=1.0)
    cx = tl.load(p + 5, mask=rmask, other=0.0)
    return a, c1, c2, k2, cy, cx


@triton.jit
def _load_k2_lo(par_ptr, rows, par_stride, rmask):
    """The record's k2_lo (_common.NPAR): k2 + k2_lo is k2 to ~2⁻⁴⁸ (the large path's far rows)."""
    return tl.load(par_ptr + rows.to(tl.int64) * par_stride + 9, mask=rmask, other=0.0)


@triton.jit
def finite_logit(lg, lw):
    """The shared numeric rule, point 2: a pair with finite weight keeps a logit ≥ −max_float32 even when its
    distance term overflows float32 (|x − αy| ≳ 1e19): the row's softmax then still has a finite maximum
    (no 0/0 = NaN). A pair with weight −inf stays −inf (excluded)."""
    return tl.where(lw > float("-inf"), tl.maximum(lg, -3.4028234663852886e38), lg)


FAR_LOG2 = tl.constexpr(256.0)
# A row whose largest logit is below −FAR_LOG2 (log2 units) is recomputed relative to its best point: the float32
# rounding of logits that large (≈ 3·2⁻²⁴·|l| per logit, 5e-5 at 256) would otherwise set the error of its
# weights, where the logits' differences are what matters (issue 11 defect 8: a query 471σ from the data
# has logits ≈ −1.6e5, rounded by ±0.008).


@triton.jit
def _merge_tile(acc, s, m, lg, y, nm):
    """One online log-sum-exp step: logits lg [BM, BN] (log2 units) of the points y [BN, DP] (mask nm [BN])
    merged into acc [BM, DP] = Σ 2^{l − m} y and s [BM, DP] = Σ 2^{l − m} (float64, m float32 [BM]).

    Rule 4: the tile's sums are float32, merged into float64, so s and acc keep their precision for any N.
    s is summed from the same [BM, BN, DP] weights as acc, one copy per column: D = acc/s then never mixes two
    roundings of p (the compiler may rematerialise p in each layout it is used in, with another reduction
    order for the distances: on an H200 one-hot rows came out ~20 ulps off at d = 32)."""
    m_new = tl.maximum(m, tl.max(lg, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp2(m - m_safe).to(tl.float64)[:, None]
    p = tl.exp2(lg - m_safe[:, None])
    # Not sum(p[:, :, None] * y[None, :, :]): Triton's combine pass rewrites that form into tl.dot, which on a
    # GPU runs in TF32 (D off by ~5e-4 of max|y|, seen on an H200 at d = 32, 64); the select on the point mask
    # (p is already 0 there) keeps it a float32 multiply-add reduction on every target.
    w = tl.where(nm[None, :, None], p[:, :, None] + tl.zeros_like(y)[None, :, :], 0.0)
    acc = acc * scale + tl.sum(w * y[None, :, :], axis=1).to(tl.float64)
    s = s * scale + tl.sum(w, axis=1).to(tl.float64)
    return acc, s, m_new


@triton.jit
def _load_tile(data_ptr, stride_y, lw_ptr, n0, N, cols, cmask, BN: tl.constexpr):
    rn = n0 + tl.arange(0, BN)
    nm = rn < N
    y = tl.load(data_ptr + rn.to(tl.int64)[:, None] * stride_y + cols[None, :],
                mask=nm[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    lw = tl.load(lw_ptr + rn, mask=nm, other=float("-inf"))
    return rn, nm, y, lw


@triton.jit
def small_reduce(x, a, c1, c2, k2, data_ptr, stride_y, lw_ptr, N, d,
                 BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    """Online log-sum-exp of the rows x [BM, DP] (padding columns zero) against all N data points.
    Returns (acc [BM, DP] = Σ 2^{l − m} y, m [BM] (log2 units, float32), s [BM, DP] = Σ 2^{l − m}), acc and s
    float64 (every column of s holds the same sum, formed from that column's weights).

    Direct pass: l = lw − |x − αy|²·k2 with x − αy = (x − c1·y) + c2·y. Far rows (m < −FAR_LOG2) are then
    recomputed relative to their best point r: with e = x − αy_r and t = y_r − y,
        |x − αy|² − |x − αy_r|² = α t·(2e + αt),
    whose float32 error is relative to |t|·|e| (the points' spread times the distance), not to |x − αy|²: the
    large common part cancels exactly instead of being rounded into every logit. m is then r's direct logit plus
    the best logit relative to r."""
    cols = tl.arange(0, DP)
    cmask = cols < d
    m = tl.full([BM], float("-inf"), tl.float32)
    s = tl.zeros([BM, DP], tl.float64)
    acc = tl.zeros([BM, DP], tl.float64)
    best = tl.zeros([BM], tl.int32)
    for n0 in range(0, N, BN):
        rn, nm, y, lw = _load_tile(data_ptr, stride_y, lw_ptr, n0, N, cols, cmask, BN)
        diff = (x[:, None, :] - c1[:, None, None] * y[None, :, :]) + c2[:, None, None] * y[None, :, :]
        d2 = tl.sum(diff * diff, axis=2)
        lg = finite_logit(lw[None, :] - d2 * k2[:, None], lw[None, :])
        tile_max = tl.max(lg, axis=1)
        best = tl.where(tile_max > m, n0 + tl.argmax(lg, axis=1), best)
        acc, s, m = _merge_tile(acc, s, m, lg, y, nm)
    far = (m < -FAR_LOG2) & (m > float("-inf"))
    if tl.sum(far.to(tl.int32), axis=0) > 0:
        yr = tl.load(data_ptr + best.to(tl.int64)[:, None] * stride_y + cols[None, :], mask=cmask[None, :],
                     other=0.0).to(tl.float32)
        lwr = tl.load(lw_ptr + best)
        e2 = 2.0 * ((x - c1[:, None] * yr) + c2[:, None] * yr)
        m_r = tl.full([BM], float("-inf"), tl.float32)
        s_r = tl.zeros([BM, DP], tl.float64)
        acc_r = tl.zeros([BM, DP], tl.float64)
        for n0 in range(0, N, BN):
            rn, nm, y, lw = _load_tile(data_ptr, stride_y, lw_ptr, n0, N, cols, cmask, BN)
            t = yr[:, None, :] - y[None, :, :]
            dd = a[:, None] * tl.sum(t * (e2[:, None, :] + a[:, None, None] * t), axis=2)
            lg = finite_logit((lw[None, :] - lwr[:, None]) - dd * k2[:, None], lw[None, :])
            acc_r, s_r, m_r = _merge_tile(acc_r, s_r, m_r, lg, y, nm)
        # m_r: the best logit relative to r's. Not folded into s (2^{m_r} can overflow): the direct pass finds r
        # only to within its own rounding, which at σ = 1e-12 is millions of log2 units.
        acc = tl.where(far[:, None], acc_r, acc)
        s = tl.where(far[:, None], s_r, s)
        m = tl.where(far, m + m_r, m)
    return acc, m, s


@triton.jit
def _round_tf32(v):
    """Truncate float32 to TF32 (10 mantissa bits): exact operands for a TF32 tensor-core product."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _screen_tile(x_ptr, stride_x, rows64, rmask, a, k2, xn2, xn, data_ptr, stride_y, lw_ptr, n0, N, d, kappa,
                 SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Step 1 on the points [n0, n0 + BN): screened logits la [BM, BN] (log2 units) from the expanded distance
    |x|² − 2α x·y + α²|y|² by tl.dot, their rigorous error bound E = κ·k2·(|x| + α|y|)², the points'
    log-weights lw and the pair mask. Returns (rn64, nm, lw, la, E, valid)."""
    rn = n0 + tl.arange(0, BN)
    nm = rn < N
    rn64 = rn.to(tl.int64)
    dot = tl.zeros([BM, BN], tl.float32)
    yn2 = tl.zeros([BN], tl.float32)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < d
        xk = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
        yk = tl.load(data_ptr + rn64[:, None] * stride_y + kk[None, :],
                     mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
        yn2 += tl.sum(yk * yk, axis=1)
        if SCREEN_TF32:
            dot = tl.dot(_round_tf32(xk), tl.trans(_round_tf32(yk)), dot, input_precision="tf32")
        else:
            dot = tl.dot(xk, tl.trans(yk), dot, input_precision="ieee")
    lw = tl.load(lw_ptr + rn, mask=nm, other=float("-inf"))
    yn = tl.sqrt(yn2)
    half_d2 = 0.5 * xn2[:, None] - a[:, None] * dot + (0.5 * a * a)[:, None] * yn2[None, :]
    la = lw[None, :] - (2.0 * k2)[:, None] * half_d2
    t = xn[:, None] + a[:, None] * yn[None, :]
    E = (kappa * k2)[:, None] * (t * t)
    valid = nm[None, :] & rmask[:, None]
    return rn64, nm, lw, la, E, valid


@triton.jit
def _direct_d2(x_ptr, stride_x, rows64, rmask, c1, c2, data_ptr, stride_y, rn64, nm, d,
               BM: tl.constexpr, BN: tl.constexpr, BKE: tl.constexpr):
    """|x − αy|² of every pair by direct differences ((x − c1·y) + c2·y), BKE columns at a time, the slices
    Kahan-summed. Returns (d2, comp): the true sum is ≈ d2 − comp; an overflowed distance (inf − inf in Kahan)
    is +inf."""
    d2 = tl.zeros([BM, BN], tl.float32)
    comp = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, d, BKE):
        ke = k0 + tl.arange(0, BKE)
        kem = ke < d
        xe = tl.load(x_ptr + rows64[:, None] * stride_x + ke[None, :], mask=rmask[:, None] & kem[None, :], other=0.0)
        ye = tl.load(data_ptr + rn64[:, None] * stride_y + ke[None, :],
                     mask=nm[:, None] & kem[None, :], other=0.0).to(tl.float32)
        diff = (xe[:, None, :] - c1[:, None, None] * ye[None, :, :]) + c2[:, None, None] * ye[None, :, :]
        part = tl.sum(diff * diff, axis=2) - comp
        tot = d2 + part
        comp = (tot - d2) - part
        d2 = tot
    return tl.where(d2 == d2, d2, float("inf")), comp


@triton.jit
def _anchored_d2(x_ptr, stride_x, rows64, rmask, a, c1, c2, data_ptr, stride_y, best64, rn64, nm, d,
                 BM: tl.constexpr, BN: tl.constexpr, BKE: tl.constexpr):
    """|x − αy|² − |x − αy_r|² of every pair, r = best64 (each row's anchor point), as
        α t·(2e + αt),   t = y_r − y,  e = x − αy_r = (x − c1·y_r) + c2·y_r,
    BKE columns at a time, the slices Kahan-summed. Returns (dd, comp) with the true value ≈ dd − comp; NaN
    (inf − inf from overflowing terms) is +inf, and the anchor's own value is exactly 0 (t = 0)."""
    acc = tl.zeros([BM, BN], tl.float32)
    comp = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, d, BKE):
        ke = k0 + tl.arange(0, BKE)
        kem = ke < d
        xe = tl.load(x_ptr + rows64[:, None] * stride_x + ke[None, :], mask=rmask[:, None] & kem[None, :], other=0.0)
        ye = tl.load(data_ptr + rn64[:, None] * stride_y + ke[None, :],
                     mask=nm[:, None] & kem[None, :], other=0.0).to(tl.float32)
        yr = tl.load(data_ptr + best64[:, None] * stride_y + ke[None, :],
                     mask=rmask[:, None] & kem[None, :], other=0.0).to(tl.float32)
        e2 = 2.0 * ((xe - c1[:, None] * yr) + c2[:, None] * yr)
        t = yr[:, None, :] - ye[None, :, :]
        part = tl.sum(t * (e2[:, None, :] + a[:, None, None] * t), axis=2) - comp
        tot = acc + part
        comp = (tot - acc) - part
        acc = tot
    dd = a[:, None] * acc
    return tl.where(dd == dd, dd, float("inf")), a[:, None] * comp


@triton.jit
def _accumulate_rows(acc_ptr, stride_acc, rows64, wmask, fresh, scale, p, data_ptr, stride_y, rn64, nm, d,
                     BK: tl.constexpr):
    """acc[rows] ← acc·scale + p·Y for the tile's points Y, in the float64 accumulator in memory (rule 4: the
    tile's float32 product, BN points, merged into double). Rows outside wmask are neither read nor written;
    fresh rows (nothing accumulated yet: their memory is garbage, maybe NaN) start from 0."""
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < d
        yk = tl.load(data_ptr + rn64[:, None] * stride_y + kk[None, :],
                     mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
        aptr = acc_ptr + rows64[:, None] * stride_acc + kk[None, :]
        amask = wmask[:, None] & km[None, :]
        old = tl.load(aptr, mask=amask, other=0.0)
        new = tl.where(fresh[:, None], 0.0, old) * scale[:, None] + tl.dot(p, yk, input_precision="ieee").to(tl.float64)
        tl.debug_barrier()                 # loads of the tile before its stores
        tl.store(aptr, new, mask=amask)
    # The next read of this accumulator tile may come from other threads of the program (other layouts): order
    # it after these stores.
    tl.debug_barrier()


@triton.jit
def large_reduce(x_ptr, stride_x, rows, rmask, a, c1, c2, k2, k2_lo, data_ptr, stride_y, lw_ptr, acc_ptr, stride_acc,
                 N, d, kappa, delta2, tau2,
                 SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 BKE: tl.constexpr):
    """Screened online log-sum-exp for rows `rows` of x (in memory) against all N data points.
    Writes acc[rows, :d] = Σ 2^{l − m} y (unnormalised, float64) and returns (m [BM], s [BM]), both float64:
    m the row's largest logit (log2 units, ≥ −max_float32), s = Σ 2^{l − m}.

    Far rows (m < −max(FAR_LOG2, (d + 16)·log2 e), see the rule below) are reduced a second time relative to
    their anchor r (_anchored_d2), as small_reduce does: the direct logits of a query 471σ from the data are
    ≈ −1.6e5 log2 units and each carries its own float32 rounding, ≈ k2·(BKE + 3)·u·|x − αy|² (≥ u·|l|/2 =
    0.005 even rounded once, as the torch reference does; u = 2⁻²⁴), while the weights depend only on the
    logits' differences. The anchored form's error is
        |δ(l − l_r)| ≤ k2·γ·α|t|·(2|e| + α|t|) + u·|l − l_r|,   γ ≈ (BKE + 6)·u,
    (t = y_r − y rounded once, e = x − αy_r to 2u·|e|, then the products and the Kahan-summed slices), relative
    to the points' spread |t| times the distance |e| instead of the distance squared: at 471σ, d = 300 (|e| ≈
    1.7e5, |t| ≲ 80) ~2000× smaller. The second pass costs as much as the first and runs only for blocks with a
    far row; it skips, by the same screening bounds, every pair the first pass's final m_lb rules out. A far
    row's m is then r's logit computed in float64 (one pass over r's d values) plus the best logit relative to
    r: L keeps float32 accuracy too, and split partials (combine_splits) are weighted against each other without
    the ~1e-7·|l| error of each split's own float32 frame."""
    rows64 = rows.to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    xn2 = tl.zeros([BM], tl.float32)
    for k0 in range(0, d, BK):
        kk = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :],
                     mask=rmask[:, None] & (kk < d)[None, :], other=0.0)
        xn2 += tl.sum(xk * xk, axis=1)
    xn = tl.sqrt(xn2)
    # The running maximum is a pair (m, m_lo): m a float32 logit of the row, m_lo the row's true maximum
    # relative to it (0 unless the logits are so large that float32 cannot hold them to within 1).
    m = tl.full([BM], NEG_INF, tl.float32)
    m_lo = tl.zeros([BM], tl.float32)
    s = tl.zeros([BM], tl.float64)
    m_lb = tl.full([BM], NEG_INF, tl.float32)
    best = tl.zeros([BM], tl.int32)
    for n0 in range(0, N, BN):
        rn64, nm, lw, la, E, valid = _screen_tile(x_ptr, stride_x, rows64, rmask, a, k2, xn2, xn, data_ptr,
                                                  stride_y, lw_ptr, n0, N, d, kappa, SCREEN_TF32, BM, BN, BK)
        lower = tl.where(valid, la - E, NEG_INF)
        upper = tl.where(valid, la + E, NEG_INF)
        m_lb = tl.maximum(m_lb, tl.max(lower, axis=1))
        # a NaN bound (inf − inf from overflowing norms) is never a reason to skip
        need = valid & (((upper - m_lb[:, None]) >= -delta2) | (upper != upper))
        n_need = tl.sum(tl.sum(need.to(tl.int32), axis=1), axis=0)
        if n_need > 0:
            # -- 2. exact re-scoring of the pairs whose screened logit is not exact enough. Every decision is
            # per pair (its own bound against its own row's m_lb), never per block: a row's result must not
            # depend on which other rows share its block (batch invariance); the block only decides whether
            # any work is done.
            lg = la
            rescore = need & (E > tau2)
            n_rescore = tl.sum(tl.sum(rescore.to(tl.int32), axis=1), axis=0)
            d2 = tl.zeros([BM, BN], tl.float32)
            comp = tl.zeros([BM, BN], tl.float32)
            if n_rescore > 0:
                d2, comp = _direct_d2(x_ptr, stride_x, rows64, rmask, c1, c2, data_ptr, stride_y, rn64, nm, d,
                                      BM, BN, BKE)
                lg = tl.where(rescore, lw[None, :] - d2 * k2[:, None], la)
            # pairs this row does not need contribute exactly nothing (as if the tile were skipped for it)
            lg = tl.where(need, finite_logit(lg, lw[None, :]), NEG_INF)
            # -- 3. online log-sum-exp and the accumulator's read-modify-write
            m_new = tl.maximum(m, tl.max(lg, axis=1))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            rel = lg - m_safe[:, None]
            if n_rescore > 0:
                # Re-scored logits relative to m_new, rounded once: fma(−d2, k2, −m) rounds once after the exact
                # product, at the small magnitude of l − m for the pairs that matter, and the Kahan remainder
                # adds back what d2's own rounding lost (comp·k2). A relative error of k2 scales every logit of
                # the row alike (a common shift, cancelled by the softmax). Clamped or excluded pairs keep
                # lg − m. (d2's own rounding, relative to |x − αy|², remains: far rows are redone below.)
                fine = rescore & (lg > -3.4028234663852886e38)
                exact = (tl.fma(-d2, k2[:, None], -m_safe[:, None]) + lw[None, :]) + comp * k2[:, None]
                rel = tl.where(fine, exact, rel)
            # the frame of the new maximum: m_new + lo, lo = the largest relative logit, old frame included
            prev = (m - m_safe) + m_lo                 # −inf when nothing has been accumulated yet
            tile_best = tl.max(rel, axis=1)
            best = tl.where(tile_best > prev, n0 + tl.argmax(rel, axis=1), best)
            lo = tl.maximum(prev, tile_best)
            lo = tl.where(lo == NEG_INF, 0.0, lo)
            scale = tl.exp2(prev - lo)
            p = tl.exp2(rel - lo[:, None])
            s = s * scale.to(tl.float64) + tl.sum(p, axis=1).to(tl.float64)
            _accumulate_rows(acc_ptr, stride_acc, rows64, rmask, m == NEG_INF, scale.to(tl.float64), p,
                             data_ptr, stride_y, rn64, nm, d, BK)
            m = m_new
            m_lo = lo
    m = m + m_lo
    # At large d a row of the diffusion's own marginal already has a best logit near −d/2 nats (its distance to
    # the nearest point is ~χ²_d σ²): it is not far, and redoing it would double the cost of every step at large
    # σ. So the threshold grows with d, as the CPU and CUDA kernels' rule (lw_max − (d + 16) nats,
    # csrc/common/far.h) does; a genuinely far query (471σ: −1.6e5) is far by either.
    far = rmask & (m < -tl.maximum(FAR_LOG2, (d + 16) * 1.4426950408889634)) & (m > NEG_INF)
    m = m.to(tl.float64)
    if tl.sum(far.to(tl.int32), axis=0) > 0:
        best64 = best.to(tl.int64)
        lwr = tl.load(lw_ptr + best, mask=far, other=0.0)
        m_r = tl.full([BM], NEG_INF, tl.float32)
        s_r = tl.zeros([BM], tl.float64)
        for n0 in range(0, N, BN):
            rn64, nm, lw, la, E, valid = _screen_tile(x_ptr, stride_x, rows64, rmask, a, k2, xn2, xn, data_ptr,
                                                      stride_y, lw_ptr, n0, N, d, kappa, SCREEN_TF32, BM, BN, BK)
            upper = tl.where(valid, la + E, NEG_INF)
            need = valid & far[:, None] & (((upper - m_lb[:, None]) >= -delta2) | (upper != upper))
            n_need = tl.sum(tl.sum(need.to(tl.int32), axis=1), axis=0)
            if n_need > 0:
                dd, comp = _anchored_d2(x_ptr, stride_x, rows64, rmask, a, c1, c2, data_ptr, stride_y, best64,
                                        rn64, nm, d, BM, BN, BKE)
                lg = (lw[None, :] - lwr[:, None]) - (dd - comp) * k2[:, None]
                lg = tl.where(need, finite_logit(lg, lw[None, :]), NEG_INF)
                m_new = tl.maximum(m_r, tl.max(lg, axis=1))
                m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                scale = tl.exp2(m_r - m_safe)
                p = tl.exp2(lg - m_safe[:, None])
                s_r = s_r * scale.to(tl.float64) + tl.sum(p, axis=1).to(tl.float64)
                _accumulate_rows(acc_ptr, stride_acc, rows64, far, m_r == NEG_INF, scale.to(tl.float64), p,
                                 data_ptr, stride_y, rn64, nm, d, BK)
                m_r = m_new
        # m_r: the best logit relative to r's (0 unless the first pass's rounding picked the wrong anchor); the
        # row's maximum is r's logit (float64, the kernel's own float32 parameters) plus m_r, kept ≥ −max_float32.
        e2 = tl.zeros([BM], tl.float64)
        for k0 in range(0, d, BK):
            kk = k0 + tl.arange(0, BK)
            fm = far[:, None] & (kk < d)[None, :]
            xk = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=fm, other=0.0).to(tl.float64)
            yr = tl.load(data_ptr + best64[:, None] * stride_y + kk[None, :], mask=fm, other=0.0).to(tl.float64)
            e = (xk - c1.to(tl.float64)[:, None] * yr) + c2.to(tl.float64)[:, None] * yr
            e2 += tl.sum(e * e, axis=1)
        l_r = lwr.to(tl.float64) - e2 * (k2.to(tl.float64) + k2_lo.to(tl.float64))
        s = tl.where(far, s_r, s)
        m = tl.where(far, tl.maximum(l_r + m_r.to(tl.float64), -3.4028234663852886e38), m)
    return m, s


@triton.jit
def small_row_tile(x_ptr, M, d, stride_x, BM: tl.constexpr, DP: tl.constexpr):
    """This program's BM whole rows of x as a [BM, DP] tile (padding columns 0).
    Returns (rows, rows64, rmask, cols, mask, x)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    cols = tl.arange(0, DP)
    mask = rmask[:, None] & (cols < d)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    return rows, rows64, rmask, cols, mask, x


@triton.jit
def small_rows_posterior(x_ptr, data_ptr, lw_ptr, par_ptr, M, N, d, stride_x, stride_y, par_stride,
                         BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    """This program's BM rows of x and their posterior mean D (the small-d kernels' common part).
    Returns (rows, rows64, rmask, cols, mask, x, D, m, s); m as small_reduce, s [BM] float32 (for L)."""
    rows, rows64, rmask, cols, mask, x = small_row_tile(x_ptr, M, d, stride_x, BM, DP)
    a, c1, c2, k2, cy, cx = _load_params(par_ptr, rows, par_stride, rmask)
    acc, m, s = small_reduce(x, a, c1, c2, k2, data_ptr, stride_y, lw_ptr, N, d, BM, BN, DP)
    D = (acc / s).to(tl.float32) * cy[:, None] + cx[:, None] * x
    return rows, rows64, rmask, cols, mask, x, D, m, tl.max(s, axis=1).to(tl.float32)


@triton.jit
def _posterior_small_kernel(x_ptr, data_ptr, lw_ptr, par_ptr, D_ptr, L_ptr, M, N, d,
                            stride_x, stride_y, stride_D, par_stride,
                            BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    rows, rows64, rmask, cols, mask, x, D, m, s = small_rows_posterior(
        x_ptr, data_ptr, lw_ptr, par_ptr, M, N, d, stride_x, stride_y, par_stride, BM, BN, DP)
    tl.store(D_ptr + rows64[:, None] * stride_D + cols[None, :], D, mask=mask)
    tl.store(L_ptr + rows, (m + tl.log2(s)) * 0.6931471805599453, mask=rmask)


@triton.jit
def _posterior_large_kernel(x_ptr, data_ptr, lw_ptr, par_ptr, acc_ptr, D_ptr, L_ptr, M, N, d,
                            stride_x, stride_y, stride_acc, stride_D, par_stride, kappa, delta2, tau2,
                            SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, BKE: tl.constexpr):
    """acc_ptr: a float64 [M, d] scratch (the accumulator, rule 4); D, L float32."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    a, c1, c2, k2, cy, cx = _load_params(par_ptr, rows, par_stride, rmask)
    k2_lo = _load_k2_lo(par_ptr, rows, par_stride, rmask)
    m, s = large_reduce(x_ptr, stride_x, rows, rmask, a, c1, c2, k2, k2_lo, data_ptr, stride_y, lw_ptr, acc_ptr,
                        stride_acc, N, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK, BKE)
    for k0 in range(0, d, BK):      # D = (acc/s)·cy + cx·x, acc/s rounded once to float32 (as the reference)
        kk = k0 + tl.arange(0, BK)
        mask = rmask[:, None] & (kk < d)[None, :]
        xk = tl.load(x_ptr + rows64[:, None] * stride_x + kk[None, :], mask=mask, other=0.0)
        acc = tl.load(acc_ptr + rows64[:, None] * stride_acc + kk[None, :], mask=mask, other=0.0)
        Dk = (acc / s[:, None]).to(tl.float32) * cy[:, None] + cx[:, None] * xk
        tl.store(D_ptr + rows64[:, None] * stride_D + kk[None, :], Dk, mask=mask)
    tl.store(L_ptr + rows, ((m + tl.log2(s)) * 0.6931471805599453).to(tl.float32), mask=rmask)


@triton.jit
def _posterior_large_split_kernel(x_ptr, data_ptr, lw_ptr, par_ptr, acc_ptr, ms_ptr, M, N, d, n_chunk,
                                  stride_x, stride_y, par_stride, kappa, delta2, tau2,
                                  SCREEN_TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                  BK: tl.constexpr, BKE: tl.constexpr):
    """Split over the data: program (i, j) reduces row block i against points [j·n_chunk, (j+1)·n_chunk)
    into float64 partials acc[j] [M, d] (Σ 2^{l − m_j} y, unnormalised) and ms[j] = (m_j, s_j) [2, M] (float64),
    merged by combine_splits. Each split screens against its own running maximum (never skips more than the
    whole-data kernel would)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    j = tl.program_id(1).to(tl.int64)
    n0 = j * n_chunk
    n_here = tl.minimum(N - n0, n_chunk).to(tl.int32)
    a, c1, c2, k2, cy, cx = _load_params(par_ptr, rows, par_stride, rmask)
    k2_lo = _load_k2_lo(par_ptr, rows, par_stride, rmask)
    m, s = large_reduce(x_ptr, stride_x, rows, rmask, a, c1, c2, k2, k2_lo, data_ptr + n0 * stride_y, stride_y,
                        lw_ptr + n0, acc_ptr + j * M * d, d, n_here, d, kappa, delta2, tau2, SCREEN_TF32, BM, BN, BK,
                        BKE)
    tl.store(ms_ptr + (2 * j) * M + rows, m, mask=rmask)
    tl.store(ms_ptr + (2 * j + 1) * M + rows, s, mask=rmask)


# ================================================================ launcher
SCREEN_TF32 = True        # large-d screening operands truncated to TF32 (exactly bounded; see above)


def launch_posterior(x, data, lw2, par, D, L, screen_tf32=None, splits=None):
    """x [M, d] float32 contiguous, data [N, d] contiguous, lw2 [N] float32 (log2 units),
    par [R, NPAR] float32 (R = 1 or M), D [M, d] / L [M] float32 outputs.
    splits (large d): split the data into this many parts, reduced in parallel and merged; None = as
    _common.large_splits chooses for N, d and the device (never M: batch invariance)."""
    M, d = x.shape
    N = data.shape[0]
    par_stride = 0 if par.shape[0] == 1 else par.stride(0)
    with C.device_guard(x.device):
        if d <= C.SMALL_D_MAX:
            cfg = C.small_config(d)
            grid = (triton.cdiv(M, cfg["BM"]),)
            _posterior_small_kernel[grid](x, data, lw2, par, D, L, M, N, d, x.stride(0), data.stride(0), D.stride(0),
                                          par_stride, BM=cfg["BM"], BN=cfg["BN"], DP=cfg["DP"],
                                          num_warps=cfg["num_warps"])
            return D, L
        tf32 = SCREEN_TF32 if screen_tf32 is None else bool(screen_tf32)
        cfg = C.large_config(d)
        S = C.large_splits(N, d, x.device) if splits is None else max(1, min(int(splits), N, C.MAX_SPLITS))
        screen = (C.screen_kappa(d, tf32), C.screen_delta2(N), C.SCREEN_TAU2)
        meta = dict(SCREEN_TF32=tf32, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BKE=cfg["BKE"],
                    num_warps=cfg["num_warps"])
        if S == 1:
            grid = (triton.cdiv(M, cfg["BM"]),)
            acc = _scratch((M, d), x.device)
            _posterior_large_kernel[grid](x, data, lw2, par, acc, D, L, M, N, d, x.stride(0), data.stride(0),
                                          acc.stride(0), D.stride(0), par_stride, *screen, **meta)
            return D, L
        n_chunk = triton.cdiv(N, S)
        S = triton.cdiv(N, n_chunk)
        step = C.split_row_chunk(S, d, cfg["BM"])
        for r0 in range(0, M, step):           # rows in chunks: the partials' scratch stays bounded
            r1 = min(M, r0 + step)
            Mc = r1 - r0
            xc, parc = x[r0:r1], par if par.shape[0] == 1 else par[r0:r1]
            acc, ms = _scratch((S, Mc, d), x.device), _scratch((S, 2, Mc), x.device)
            _posterior_large_split_kernel[(triton.cdiv(Mc, cfg["BM"]), S)](
                xc, data, lw2, parc, acc, ms, Mc, N, d, n_chunk, xc.stride(0), data.stride(0), par_stride,
                *screen, **meta)
            combine_splits(acc, ms, xc, parc, D[r0:r1], L[r0:r1])
    return D, L


def _scratch(shape, device):
    """Uninitialised float64 scratch for the accumulators and split partials (rule 4: sums merged in double;
    a test fills it with NaN instead)."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def _tree_sum0(t):
    """Σ over dim 0 by halving (elementwise adds, an odd last slice added into the first): the order depends
    only on t.shape[0], never on the row count (torch's reductions choose theirs from the whole shape)."""
    n = t.shape[0]
    while n > 1:
        h = n // 2
        head = t[:h] + t[h:2 * h]
        if n % 2:
            head[0] += t[2 * h]
        t, n = head, h
    return t[0]


def combine_splits(acc, ms, x, par, D, L):
    """Merge split partials, in float64 (rule 4): m = max_j m_j, w_j = 2^{m_j − m}, s = Σ w_j s_j,
    acc = Σ w_j acc_j, then D = (acc/s)·cy + cx·x and L = (m + log2 s)·ln 2, as the whole-data kernel's epilogue
    (a far row's m_j is its anchor's float64 logit: the splits' frames agree to float64 accuracy). A split whose
    points all have zero weight has m_j = −inf and an unwritten acc_j: it gets weight 0 and is not read.
    Elementwise operations and halving sums only: row i's result depends on row i alone."""
    m_j, s_j = ms[:, 0], ms[:, 1]
    m = m_j.max(dim=0).values
    live = m_j > float("-inf")
    w = torch.where(live, torch.exp2(m_j - torch.where(m == float("-inf"), 0.0, m)), 0.0)
    s = _tree_sum0(w * s_j)
    total = _tree_sum0(acc.masked_fill_(~live[..., None], 0.0).mul_(w[..., None]))   # in place: acc is our scratch
    cy, cx = par[:, 4:5], par[:, 5:6]
    D.copy_((total / s[:, None]).float() * cy + cx * x)
    L.copy_(((m + torch.log2(s)) * LN2).clamp(min=-C.F32_MAX))


# ================================================================ public function
def posterior(x, data, alpha, sigma, log_weights=None, bandwidth=0.0):
    """The backend op (the contract of fastdiff.ops.posterior's backends): point-cloud posterior mean
    D [M, d] and log-sum-exp L [M], float32. x float32 [M, d] contiguous (M ≥ 1); data [N, d] float32/
    float16/bfloat16; alpha, sigma float64 [1] or [M]; log_weights [N] or None; bandwidth ≥ 0.
    Inputs are validated by fastdiff.ops, not here (only the kernels' shape limits are checked)."""
    return run_posterior(x, data, alpha, sigma, log_weights, bandwidth)


def run_posterior(x, data, alpha, sigma, log_weights=None, bandwidth=0.0, *, screen_tf32=None, splits=None):
    """posterior with the large-d kernel's knobs (tests, benchmarks): screen_tf32 None = module default
    SCREEN_TF32; splits: see launch_posterior."""
    C.check_limits("posterior", x, data)
    M, d = x.shape
    lw2, shift = C.log_weights2(log_weights, data.shape[0], x.device, return_shift=True)
    par = C.as_f32_table(C.reduction_params(alpha, sigma, bandwidth, M, x.device))
    D = torch.empty(M, d, dtype=torch.float32, device=x.device)
    L = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return D, L
    D, L = launch_posterior(x.contiguous(), data.contiguous(), lw2, par, D, L, screen_tf32, splits)
    if shift is not None:
        L.add_(shift)            # (float64 shift into float32 L: one rounding, as the kernel's own)
    return D, L
