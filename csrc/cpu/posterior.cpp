// CPU point-cloud kernels: the posterior (MATH.md §5), the fused step and whole trajectories.
// d <= 4: one query at a time per thread (OpenMP over queries); the data stream through in tiles with an
// online log-sum-exp; inner loops run over contiguous points of yT [d, N] and vectorise (omp simd).
// d >= 5: the register-blocked kernel (blocks of kRows queries, groups of rows per thread, the cloud packed
// once per call); see "d >= 5" below for the reasoning and the error bound.
#include <algorithm>
#include <bit>
#include <cstring>
#include <cmath>
#include <limits>
#include <memory>
#include <omp.h>
#include <vector>

#include "../common/philox.h"
#include "kernels.h"
#include "simd_vec.h"
#include "update_row.h"

namespace fastdiff::cpu {
namespace {

constexpr int64_t kTile = 256;

// e^x for x <= 0 in float: Cody–Waite reduction and a degree-7 polynomial, written without calls or
// branches (rounding by the 1.5·2²³ shift, the exponent by bit_cast, a select at the end) so the loops
// around it vectorise; relative error about 1e-7; exactly 0 below −87 (and for −inf).
inline float exp_nonpositive(float x) {
  constexpr float kShift = 12582912.0f;                     // 1.5·2²³: adding it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + kShift) - kShift;
  const float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float e = p * scale;
  return x < -87.0f ? 0.0f : e;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// The shared numeric rule (every backend alike), so D and L are finite for every finite input:
// 1. 1/(2c) is clamped to [smallest subnormal, largest finite] of T: a query on a data point (distance 0)
//    never forms 0·inf, an overflowed distance never meets inv2c = 0 (inf·0); the lower clamp moves a
//    logit by at most max·subnormal (5e-7 in float, 1e-15 in double).
// 2. A point with finite log-weight keeps a logit ≥ −max_finite(T) even when its distance overflows; a
//    point with log-weight −inf stays excluded.
template <typename T>
inline double clamped_inv2c(double c) {
  const double lo = static_cast<double>(std::numeric_limits<T>::denorm_min());
  const double hi = static_cast<double>(std::numeric_limits<T>::max());
  const double v = 0.5 / c;                       // c > 0 (checked); inf when c underflows
  return v < lo ? lo : (v > hi ? hi : v);
}
template <typename L, typename T>
inline L finite_logit(L l, L lw) {
  const L lo = -static_cast<L>(std::numeric_limits<T>::max());
  return lw == -std::numeric_limits<L>::infinity() ? lw : (l < lo ? lo : l);
}

// Small d (DD = 1..4, the exp-bound regime): the logits of a tile in one pass, and e^{l − m}, its sum
// and the DD dot products in a second, instead of d + 1 and d + 1 passes through the tile.
template <typename T, int DD, bool Weighted>
inline T tile_logits_small(const T* __restrict yT, int64_t N, int64_t j0, int64_t n, const T* __restrict x, T c1,
                           T c2, T inv2c, const T* __restrict lw, T* __restrict buf) {
  T xs[DD];
  const T* __restrict ys[DD];
  for (int k = 0; k < DD; ++k) { xs[k] = x[k]; ys[k] = yT + k * N + j0; }
  T tmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : tmax)
  for (int64_t j = 0; j < n; ++j) {
    T d2 = T(0);
    for (int k = 0; k < DD; ++k) {
      const T diff = (xs[k] - c1 * ys[k][j]) + c2 * ys[k][j];
      d2 += diff * diff;
    }
    T l = -d2 * inv2c;
    if constexpr (Weighted) {
      l = finite_logit<T, T>(lw[j] + l, lw[j]);
    } else {
      l = finite_logit<T, T>(l, T(0));
    }
    buf[j] = l;
    tmax = std::max(tmax, l);
  }
  return tmax;
}

template <typename T, int DD>
inline T tile_exp_dot_small(const T* __restrict yT, int64_t N, int64_t j0, int64_t n, T mt, const T* __restrict buf,
                            T* dots) {
  const T* __restrict y0 = yT + j0;
  const T* __restrict y1 = yT + (DD > 1 ? 1 : 0) * N + j0;
  const T* __restrict y2 = yT + (DD > 2 ? 2 : 0) * N + j0;
  const T* __restrict y3 = yT + (DD > 3 ? 3 : 0) * N + j0;
  T tsum = T(0), s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
#pragma omp simd reduction(+ : tsum, s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_nonpositive(buf[j] - mt);
    tsum += e;
    s0 += e * y0[j];
    if constexpr (DD > 1) s1 += e * y1[j];
    if constexpr (DD > 2) s2 += e * y2[j];
    if constexpr (DD > 3) s3 += e * y3[j];
  }
  dots[0] = s0;
  if constexpr (DD > 1) dots[1] = s1;
  if constexpr (DD > 2) dots[2] = s2;
  if constexpr (DD > 3) dots[3] = s3;
  return tsum;
}

// Large d: the squared distances of a tile, and then its logits, in double (dist [n]).
// Why: for a far query (d = 300, σ = 300, x = 1e4·1, data ~ 3·N(0, I)) |x − y|² ≈ 3e10 while the logit
// differences that set the weights are O(1) in units of 2c = 1.8e5: the distances must keep ~1e-7 relative
// accuracy *between points*. A sequential float sum over d errs by up to d·u·|x − y|² (≈ 0.2 of a logit
// here: D erred by 2e-2·max|y|), and a float logit of −1.7e5 rounds by 0.008 on its own. Here each block of
// kDimBlock = 8 dimensions is summed in T (error ≤ 8u of the block's sum) and the blocks are added in double
// (no further error worth counting), so the sum errs by ≤ 8u·|x − y|² instead of d·u·|x − y|² (the torch
// reference's halving tree: log2(d)·u); the logit is formed in double and rounded once, relative to the
// running maximum, when it becomes a weight (|l − m| ≤ 87 in float: absolute error ≤ 2⁻¹⁸). What remains is
// the rounding of x − αy itself (≤ u·|x − y| per component, as in the reference). At small σ (MATH.md §7:
// σ = 1e-3, d = 3072) the same bounds hold with smaller distances. Cost: one conversion and one double
// add per 8 dimensions; the inner loop stays in T at full SIMD width.
constexpr int kDimBlock = 8;

template <typename T, int KB>
inline void add_block_distances(const T* __restrict yk, int64_t N, int64_t n, const T* __restrict xk, int kb,
                                T c1, T c2, double* __restrict dist) {
  const int kn = KB > 0 ? KB : kb;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T part = T(0);
    for (int kk = 0; kk < kn; ++kk) {
      const T y = yk[kk * N + j];
      const T diff = (xk[kk] - c1 * y) + c2 * y;
      part += diff * diff;
    }
    dist[j] += static_cast<double>(part);
  }
}

template <typename T>
inline double tile_logits_large(const Cloud<T>& c, int64_t j0, int64_t n, const T* __restrict x, T c1, T c2,
                                double inv2c, double* __restrict dist) {
  const int64_t N = c.N, d = c.d;
  for (int64_t j = 0; j < n; ++j) dist[j] = 0.0;
  int64_t k0 = 0;
  for (; k0 + kDimBlock <= d; k0 += kDimBlock)    // |x − α y_j|² by direct differences, x − αy = (x − c1·y) + c2·y
    add_block_distances<T, kDimBlock>(c.yT + k0 * N + j0, N, n, x + k0, kDimBlock, c1, c2, dist);
  if (k0 < d)
    add_block_distances<T, 0>(c.yT + k0 * N + j0, N, n, x + k0, static_cast<int>(d - k0), c1, c2, dist);
  double tmax = -std::numeric_limits<double>::infinity();
  if (c.log_w) {
    const T* __restrict lw = c.log_w + j0;
#pragma omp simd reduction(max : tmax)
    for (int64_t j = 0; j < n; ++j) {
      const double w = static_cast<double>(lw[j]);
      dist[j] = finite_logit<double, T>(w - dist[j] * inv2c, w);
      tmax = std::max(tmax, dist[j]);
    }
  } else {
#pragma omp simd reduction(max : tmax)
    for (int64_t j = 0; j < n; ++j) {
      dist[j] = finite_logit<double, T>(-dist[j] * inv2c, 0.0);
      tmax = std::max(tmax, dist[j]);
    }
  }
  return tmax;
}

// D (d values) and L of one query x against the whole cloud. `buf` holds kTile scratch values of T,
// `dist` kTile doubles (large d only). DD = d for the fused small-d loops (1..4), 0 for any d.
// Row-invariant: everything here depends on this query alone (one query per thread), so a row's result
// never depends on which other rows are computed in the same call.
template <typename T, int DD>
void posterior_row_d(const Cloud<T>& c, const T* __restrict x, double alpha, double sigma, T* __restrict buf,
                     double* __restrict dist, double* __restrict acc, T* __restrict D, T* L) {
  const int64_t N = c.N, d = c.d;
  const double cdbl = alpha * alpha * c.bandwidth + sigma * sigma;
  const double inv2c_d = clamped_inv2c<T>(cdbl);
  const T inv2c = static_cast<T>(inv2c_d);
  // x − αy as (x − c1·y) + c2·y: for α ≥ ½ (every process at small σ) c1 = 1 and c2 = 1 − α from double,
  // so x − y is exact and the tiny (1 − α)y term carries α's rounding; x − fl(α)·y would move a logit
  // at σ = 1e-3, d = 784 by ~2e-3 (MATH.md §7 allows 1e-3).
  const T c1 = alpha >= 0.5 ? T(1) : T(0);
  const T c2 = static_cast<T>(alpha >= 0.5 ? 1.0 - alpha : -alpha);
  double m = -std::numeric_limits<double>::infinity(), s = 0.0;
  std::fill(acc, acc + d, 0.0);
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const int64_t n = std::min(kTile, N - j0);
    double tmax;
    if constexpr (DD > 0) {
      tmax = c.log_w ? tile_logits_small<T, DD, true>(c.yT, N, j0, n, x, c1, c2, inv2c, c.log_w + j0, buf)
                     : tile_logits_small<T, DD, false>(c.yT, N, j0, n, x, c1, c2, inv2c, nullptr, buf);
    } else {
      tmax = tile_logits_large<T>(c, j0, n, x, c1, c2, inv2c_d, dist);
    }
    if (!(tmax > -std::numeric_limits<double>::infinity())) continue;   // a tile of zero-weight points
    const double m_new = std::max(m, tmax);
    const double rescale = std::exp(m - m_new);                      // 0 on the first tile
    if constexpr (DD > 0) {
      T dots[DD];
      const T tsum = tile_exp_dot_small<T, DD>(c.yT, N, j0, n, static_cast<T>(m_new), buf, dots);
      s = s * rescale + static_cast<double>(tsum);
      for (int k = 0; k < DD; ++k) acc[k] = acc[k] * rescale + static_cast<double>(dots[k]);
    } else {
      T tsum = T(0);
#pragma omp simd reduction(+ : tsum)
      for (int64_t j = 0; j < n; ++j) {
        buf[j] = exp_nonpositive(static_cast<T>(dist[j] - m_new));   // l − m in double, rounded once
        tsum += buf[j];
      }
      s = s * rescale + static_cast<double>(tsum);
      for (int64_t k = 0; k < d; ++k) {
        const T* __restrict y = c.yT + k * N + j0;
        T dot = T(0);
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < n; ++j) dot += buf[j] * y[j];
        acc[k] = acc[k] * rescale + static_cast<double>(dot);
      }
    }
    m = m_new;
  }
  const double shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cdbl : 1.0;
  const double pull = c.bandwidth > 0 ? alpha * c.bandwidth / cdbl : 0.0;
  for (int64_t k = 0; k < d; ++k) D[k] = static_cast<T>(acc[k] / s * shrink + pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(m + std::log(s));
}

template <typename T>
void posterior_row(const Cloud<T>& c, const T* __restrict x, double alpha, double sigma, T* __restrict buf,
                   double* __restrict dist, double* __restrict acc, T* __restrict D, T* L) {
  switch (c.d) {
    case 1: return posterior_row_d<T, 1>(c, x, alpha, sigma, buf, dist, acc, D, L);
    case 2: return posterior_row_d<T, 2>(c, x, alpha, sigma, buf, dist, acc, D, L);
    case 3: return posterior_row_d<T, 3>(c, x, alpha, sigma, buf, dist, acc, D, L);
    case 4: return posterior_row_d<T, 4>(c, x, alpha, sigma, buf, dist, acc, D, L);
    default: return posterior_row_d<T, 0>(c, x, alpha, sigma, buf, dist, acc, D, L);
  }
}


// ============================================================== d >= 5: register-blocked over queries
// Why: one query at a time (posterior_row_d) loads every y value once per query and keeps its sums in memory
// (the distance of a tile in a double array, updated every 8 dimensions); at d >= 16 the kernel ran at
// 15–18% of the FMA ceiling. Here kRows queries go through the data together:
// - distances: for W points (one SIMD vector, packed [d][W] per tile so the stream is contiguous) and all d
//   dimensions, the kRows rows' partial sums live in registers; each y vector loaded is used kRows times.
//   3 vector ops per (query, point, dim): x − c1·y, + c2·y, the square added (see posterior_row_d for why
//   x − αy is formed that way);
// - weighted sums Σ e_j y_j: vectorised over dimensions on a row-major copy of the tile, so no horizontal
//   sums: kRows × kVecs accumulators, each loaded y vector and each broadcast weight reused;
// - the tile of points is sized to stay in L2 (both copies) and is reused by every block of the group.
// Arithmetic and error bound (T = float, u = 2⁻²⁴), per row exactly as in posterior_row_d:
// - |x − αy|²: blocks of kDimBlock = 8 dimensions summed in T in dimension order (≤ 8u of the block's sum),
//   blocks added in double: ≤ 8u·|x − αy|², plus the rounding of x − αy itself (≤ u·|x − αy| a component);
// - logit in double, rounded once as l − m (|l − m| ≤ 87 where it matters: ≤ 2⁻¹⁸ absolute);
// - Σ_j e_j and Σ_j e_j y_j: e_j = e^{l_j − m} ∈ [0, 1] (exp_nonpositive, relative error ~1e-7); the weight
//   sum in W lanes over a tile (≤ nt/W ≤ 64 terms a lane) then the fixed halving tree, ≤ (nt/W + log₂W)u
//   relative; the weighted sums in T over runs of ≤ kChunk = 128 points, then in double: ≤ 128u relative
//   to Σ e_j |y_j| ≤ s·max|y|, so D errs by ≤ 128u·max|y| ≈ 8e-6·max|y| (MATH.md §7 allows 1e-4), L by
//   ≤ (nt/W + 4)u ≈ 4e-6 from the sum; double merges across tiles with the running-max rescale.
// Row invariance: a row's lanes are never mixed with another row's, the order of every sum depends on
// (d, N) only (tile and chunk sizes are functions of d), and a group whose row count is not a multiple of
// kRows is padded with copies of its last row (results discarded), so every row runs the same
// instantiation whatever rows share its block.
constexpr int kRows = 4;
constexpr int kVecs = 4;                 // dimension vectors per weighted-sum block (kRows × kVecs accumulators)
constexpr int64_t kChunk = 128;         // points summed in T before a weighted sum goes to double
constexpr int64_t kGroupRows = 128;     // rows that go through each tile together (reuse in L2)
constexpr int64_t kTileBytes = 196608;  // one copy of a tile (x2 with the row-major copy) kept in L2
static_assert(kGroupRows % kRows == 0, "a group is padded to whole blocks within kGroupRows rows");

template <typename T>
constexpr int kW = simd::Vec<T>::W;

template <typename T>
int64_t tile_points(int64_t d) {       // a function of d only (row invariance)
  const int64_t n = kTileBytes / static_cast<int64_t>(sizeof(T)) / d / kW<T> * kW<T>;
  return std::clamp<int64_t>(n, 4 * kW<T>, 1024);
}

template <typename T>
struct RowParams {
  T c1, c2;                          // x − αy = (x − c1·y) + c2·y
  double inv2c, shrink, pull;
};

template <typename T>
RowParams<T> row_params(const Cloud<T>& c, double alpha, double sigma) {
  const double cdbl = alpha * alpha * c.bandwidth + sigma * sigma;
  RowParams<T> p;
  p.c1 = alpha >= 0.5 ? T(1) : T(0);
  p.c2 = static_cast<T>(alpha >= 0.5 ? 1.0 - alpha : -alpha);
  p.inv2c = clamped_inv2c<T>(cdbl);
  p.shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cdbl : 1.0;
  p.pull = c.bandwidth > 0 ? alpha * c.bandwidth / cdbl : 0.0;
  return p;
}

// Per-thread scratch of the blocked kernel for groups of up to `rows` rows (a multiple of kRows).
template <typename T>
struct BlockedWork {
  int64_t d, dp, nt, np;             // dims, dims padded to W, points per tile, nt padded to W
  const T* Pt = nullptr;             // the current tile packed [np/W][d][W] (own P or the shared packing)
  const T* Yt = nullptr;             // the current tile row-major [nt][dp]
  std::vector<T> P, Yr, E;           // own packing (only when the cloud is not packed once), weights [kRows][np]
  std::vector<double> lwt, Lg;       // log-weights of the tile [np] (−inf on padding), logits [kRows][np]
  std::vector<double> acc, m, s;     // per-row state: weighted sums [rows][dp], running max, weight sum
  std::vector<RowParams<T>> prm;
  BlockedWork(int64_t d_, int64_t rows, bool own_tiles)
      : d(d_), dp((d_ + kW<T> - 1) / kW<T> * kW<T>), nt(tile_points<T>(d_)), np(nt),
        P(own_tiles ? np * d : 0), Yr(own_tiles ? nt * dp : 0, T(0)), E(kRows * np), lwt(np), Lg(kRows * np),
        acc(rows * dp), m(rows), s(rows), prm(rows) {}
};

// Rows k ∈ [k0, k1) of the tile [j0, j0 + n) of yT into the packed columns P [nv][d][W] (zero lanes past n).
template <typename T>
void pack_columns(const Cloud<T>& c, int64_t j0, int64_t n, int64_t k0, int64_t k1, T* __restrict P) {
  using V = typename simd::Vec<T>::V;
  constexpr int W = kW<T>;
  const int64_t d = c.d, N = c.N, nv = (n + W - 1) / W;
  for (int64_t k = k0; k < k1; ++k) {
    const T* __restrict src = c.yT + k * N + j0;
    T* __restrict dst = P + k * W;
    int64_t v = 0;
    for (; (v + 1) * W <= n; ++v) simd::store(dst + v * d * W, simd::load<V>(src + v * W));
    if (v < nv)
      for (int64_t l = 0; l < W; ++l) dst[v * d * W + l] = v * W + l < n ? src[v * W + l] : T(0);
  }
}

// Packed column v of a tile ([d][W]) into its W rows of the row-major copy (stride dp, zero past d). Through
// a W × W block in L1: W scalar store streams dp apart alias in L1 (dp·4 bytes a multiple of 4 KiB at
// d = 3072) and missed on every store. Rows past the end of the cloud are not written (never read).
template <typename T>
void columns_to_rows(const T* __restrict col, int64_t d, int64_t dp, int64_t lanes, T* __restrict rows) {
  using V = typename simd::Vec<T>::V;
  constexpr int W = kW<T>;
  alignas(64) T block[W][W];
  for (int64_t k0 = 0; k0 < dp; k0 += W) {
    for (int kk = 0; kk < W; ++kk) {
      const V y = k0 + kk < d ? simd::load<V>(col + (k0 + kk) * W) : V{};
      for (int l = 0; l < W; ++l) block[l][kk] = y[l];
    }
    for (int64_t l = 0; l < lanes; ++l) simd::store(rows + l * dp + k0, simd::load<V>(block[l]));
  }
}

// The tile [j0, j0 + n) into the thread's own buffers (clouds too large to pack once).
template <typename T>
void pack_tile(const Cloud<T>& c, int64_t j0, int64_t n, BlockedWork<T>& w) {
  constexpr int W = kW<T>;
  pack_columns(c, j0, n, 0, c.d, w.P.data());
  for (int64_t v = 0; v * W < n; ++v)
    columns_to_rows(w.P.data() + v * c.d * W, c.d, w.dp, std::min<int64_t>(W, n - v * W), w.Yr.data() + v * W * w.dp);
  w.Pt = w.P.data();
  w.Yt = w.Yr.data();
}

// The whole cloud packed once per call (both layouts, tile by tile, the same bits as pack_tile), shared by
// all threads and groups: each tile packed per group read yT down d rows 4 KiB apart (a TLB miss a row at
// N = 1024) and cost as much as the arithmetic at d = 3072. Used when both copies fit in kPackBytes.
constexpr int64_t kPackBytes = int64_t(512) << 20;

template <typename T>
struct PackedCloud {
  int64_t d, dp, nt, ntiles;
  std::unique_ptr<T[]> P, Yr;        // tile t at P + t·nt·d, rows of tile t at Yr + t·nt·dp
  explicit PackedCloud(const Cloud<T>& c)
      : d(c.d), dp((c.d + kW<T> - 1) / kW<T> * kW<T>), nt(tile_points<T>(c.d)), ntiles((c.N + nt - 1) / nt) {
    if (static_cast<double>(ntiles) * nt * (d + dp) * sizeof(T) <= static_cast<double>(kPackBytes)) {
      P.reset(new T[ntiles * nt * d]);
      Yr.reset(new T[ntiles * nt * dp]);
    }
  }
  bool packed() const { return P != nullptr; }
  // Called by every thread of a parallel region (work-shared loops, a barrier at the end of each).
  void pack(const Cloud<T>& c) {
    if (!packed()) return;                   // the same answer in every thread
    constexpr int W = kW<T>;
    constexpr int64_t kRowsAtOnce = 16;     // rows of yT read together: 16 sequential streams
#pragma omp for schedule(static)
    for (int64_t k0 = 0; k0 < d; k0 += kRowsAtOnce)
      for (int64_t t = 0; t < ntiles; ++t)
        pack_columns(c, t * nt, std::min(nt, c.N - t * nt), k0, std::min(d, k0 + kRowsAtOnce), P.get() + t * nt * d);
    const int64_t nvt = (c.N + W - 1) / W;
#pragma omp for schedule(static)
    for (int64_t v = 0; v < nvt; ++v) {       // global column v = tile v / (nt / W), column v % (nt / W)
      const int64_t t = v / (nt / W), vl = v % (nt / W);
      columns_to_rows(P.get() + t * nt * d + vl * d * W, d, dp, std::min<int64_t>(W, c.N - v * W),
                      Yr.get() + v * W * dp);
    }
  }
  void select(int64_t t, BlockedWork<T>& w) const {
    w.Pt = P.get() + t * nt * d;
    w.Yt = Yr.get() + t * nt * dp;
  }
};

// Squared distances of kRows queries to the W points of one packed vector column P [d][W] (see above).
template <typename T, int R>
inline void block_distances(const T* __restrict P, int64_t d, const T* const* xs, const RowParams<T>* prm,
                            double* __restrict out) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  using D = typename S::D;
  constexpr int W = S::W;
  D acc[R][S::H] = {};
  V c1[R], c2[R];
  for (int r = 0; r < R; ++r) { c1[r] = simd::splat<T>(prm[r].c1); c2[r] = simd::splat<T>(prm[r].c2); }
  auto block = [&](int64_t k0, int kn) {
    V part[R] = {};
    for (int kk = 0; kk < kn; ++kk) {
      const V y = simd::load<V>(P + (k0 + kk) * W);
      for (int r = 0; r < R; ++r) {
        const V diff = (simd::splat<T>(xs[r][k0 + kk]) - c1[r] * y) + c2[r] * y;
        part[r] += diff * diff;
      }
    }
    for (int r = 0; r < R; ++r) simd::add_wide<T>(acc[r], part[r]);
  };
  int64_t k0 = 0;
  for (; k0 + kDimBlock <= d; k0 += kDimBlock) block(k0, kDimBlock);
  if (k0 < d) block(k0, static_cast<int>(d - k0));
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < S::H; ++h) simd::store(out + r * W + h * (W / S::H), acc[r][h]);
}

// acc[r][k .. k + KV·W) += Σ_{j ∈ [js, je)} E[r][j] · Yr[j][k ..], summed in T, added in double.
template <typename T, int R, int KV>
inline void block_weighted(const BlockedWork<T>& w, int64_t js, int64_t je, int64_t k, double* const* acc) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  using D = typename S::D;
  constexpr int W = S::W;
  V a[R][KV] = {};
  const T* __restrict E = w.E.data();
  for (int64_t j = js; j < je; ++j) {
    V y[KV];
    for (int v = 0; v < KV; ++v) y[v] = simd::load<V>(w.Yt + j * w.dp + k + v * W);
    for (int r = 0; r < R; ++r) {
      const V e = simd::splat<T>(E[r * w.np + j]);
      for (int v = 0; v < KV; ++v) a[r][v] += e * y[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < KV; ++v) {
      double* p = acc[r] + k + v * W;
      D cur[S::H];
      for (int h = 0; h < S::H; ++h) cur[h] = simd::load<D>(p + h * (W / S::H));
      simd::add_wide<T>(cur, a[r][v]);
      for (int h = 0; h < S::H; ++h) simd::store(p + h * (W / S::H), cur[h]);
    }
}

// One block of kRows rows (first row b of the group) against the packed tile of n points.
template <typename T>
void block_tile(BlockedWork<T>& w, int64_t b, int64_t n, const T* const* xs) {
  constexpr int W = kW<T>, R = kRows;
  const int64_t np = (n + W - 1) / W * W;
  double tmax[R];
  std::fill(tmax, tmax + R, -std::numeric_limits<double>::infinity());
  const RowParams<T>* prm = w.prm.data() + b;
  double dist[R * W];
  for (int64_t v = 0; v < np / W; ++v) {
    block_distances<T, R>(w.Pt + v * w.d * W, w.d, xs + b, prm, dist);
    for (int r = 0; r < R; ++r) {
      double* __restrict lg = w.Lg.data() + r * w.np + v * W;
      const double* __restrict lw = w.lwt.data() + v * W;
      const double inv2c = prm[r].inv2c;
      double t = tmax[r];
#pragma omp simd reduction(max : t)
      for (int l = 0; l < W; ++l) {
        lg[l] = finite_logit<double, T>(lw[l] - dist[r * W + l] * inv2c, lw[l]);
        t = std::max(t, lg[l]);
      }
      tmax[r] = t;
    }
  }
  double* acc[R];
  for (int r = 0; r < R; ++r) {
    const int64_t i = b + r;
    acc[r] = w.acc.data() + i * w.dp;
    T* __restrict e = w.E.data() + r * w.np;
    if (!(tmax[r] > -std::numeric_limits<double>::infinity())) {   // a tile of zero-weight points
      std::fill(e, e + np, T(0));
      continue;
    }
    const double m_new = std::max(w.m[i], tmax[r]);
    const double rescale = std::exp(w.m[i] - m_new);                 // 0 on the first tile
    const double* __restrict lg = w.Lg.data() + r * w.np;
#pragma omp simd
    for (int64_t j = 0; j < np; ++j) e[j] = exp_nonpositive(static_cast<T>(lg[j] - m_new));   // rounded once
    typename simd::Vec<T>::V t = {};
    for (int64_t v = 0; v < np / W; ++v) t += simd::load<typename simd::Vec<T>::V>(e + v * W);
    w.s[i] = w.s[i] * rescale + static_cast<double>(simd::lane_sum<T>(t));
    if (rescale != 1.0)
      for (int64_t k = 0; k < w.dp; ++k) acc[r][k] *= rescale;
    w.m[i] = m_new;
  }
  for (int64_t js = 0; js < n; js += kChunk) {
    const int64_t je = std::min(n, js + kChunk);
    int64_t k = 0;
    for (; k + kVecs * W <= w.dp; k += kVecs * W) block_weighted<T, R, kVecs>(w, js, je, k, acc);
    for (; k < w.dp; k += W) block_weighted<T, R, 1>(w, js, je, k, acc);
  }
}

// D and L of g rows (g a multiple of kRows; pad with copies of a row). L[r] may be nullptr.
template <typename T>
void posterior_group(const Cloud<T>& c, int64_t g, const T* const* xs, const double* alpha, const double* sigma,
                     T* const* D, T* const* L, const PackedCloud<T>& pc, BlockedWork<T>& w) {
  for (int64_t i = 0; i < g; ++i) {
    w.prm[i] = row_params(c, alpha[i], sigma[i]);
    w.m[i] = -std::numeric_limits<double>::infinity();
    w.s[i] = 0.0;
  }
  std::fill(w.acc.begin(), w.acc.begin() + g * w.dp, 0.0);
  for (int64_t j0 = 0; j0 < c.N; j0 += w.nt) {
    const int64_t n = std::min(w.nt, c.N - j0);
    if (pc.packed())
      pc.select(j0 / w.nt, w);
    else
      pack_tile(c, j0, n, w);
    for (int64_t j = 0; j < w.np; ++j)
      w.lwt[j] = j >= n ? -std::numeric_limits<double>::infinity() : (c.log_w ? static_cast<double>(c.log_w[j0 + j]) : 0.0);
    for (int64_t b = 0; b < g; b += kRows) block_tile(w, b, n, xs);
  }
  for (int64_t i = 0; i < g; ++i) {
    const double* acc = w.acc.data() + i * w.dp;
    const RowParams<T>& p = w.prm[i];
    for (int64_t k = 0; k < w.d; ++k)
      D[i][k] = static_cast<T>(acc[k] / w.s[i] * p.shrink + p.pull * static_cast<double>(xs[i][k]));
    if (L[i]) *L[i] = static_cast<T>(w.m[i] + std::log(w.s[i]));
  }
}

// Rows [i0, i0 + g) of a call as one padded group: x/D/L pointers, per-row α and σ (rows past the end repeat
// the last row and write to scratch).
template <typename T>
struct GroupRows {
  std::vector<const T*> x;
  std::vector<T*> D, L;
  std::vector<double> alpha, sigma;
  std::vector<T> scratch;
  explicit GroupRows(int64_t rows, int64_t d) : x(rows), D(rows), L(rows), alpha(rows), sigma(rows), scratch(d + 1) {}
  // Fill rows 0..g-1 by f(r) -> (x, D, L, alpha, sigma); returns g rounded up to kRows.
  template <typename F>
  int64_t fill(int64_t g, F&& f) {
    for (int64_t r = 0; r < g; ++r) f(r, x[r], D[r], L[r], alpha[r], sigma[r]);
    const int64_t gp = (g + kRows - 1) / kRows * kRows;
    for (int64_t r = g; r < gp; ++r) {
      x[r] = x[g - 1]; alpha[r] = alpha[g - 1]; sigma[r] = sigma[g - 1];
      D[r] = scratch.data(); L[r] = nullptr;
    }
    return gp;
  }
};

// Rows per group: the thread's share of the rows, at most kGroupRows, a multiple of kRows.
inline int64_t group_rows(int64_t M) {
  const int64_t threads = omp_get_max_threads();
  const int64_t share = (M + threads - 1) / threads;
  return std::min<int64_t>(kGroupRows, (share + kRows - 1) / kRows * kRows);
}
inline bool use_blocked(int64_t d) { return d > 4; }

}  // namespace

template <typename T>
void posterior(const Cloud<T>& c, const T* x, int64_t M, const double* alpha, const double* sigma, bool per_row,
               T* D, T* L) {
  if (use_blocked(c.d)) {
    const int64_t G = group_rows(M), d = c.d;
    PackedCloud<T> pc(c);
#pragma omp parallel
    {
      pc.pack(c);
      BlockedWork<T> w(d, G, !pc.packed());
      GroupRows<T> rows(G, d);
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t gp = rows.fill(std::min(G, M - i0), [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
          const int64_t i = i0 + r;
          xr = x + i * d; Dr = D + i * d; Lr = L + i;
          a = alpha[per_row ? i : 0]; s = sigma[per_row ? i : 0];
        });
        posterior_group(c, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), pc, w);
      }
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<T> buf(kTile);
    std::vector<double> dist(kTile), acc(c.d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const int64_t r = per_row ? i : 0;
      posterior_row(c, x + i * c.d, alpha[r], sigma[r], buf.data(), dist.data(), acc.data(), D + i * c.d, L + i);
    }
  }
}

template <typename T>
void pointcloud_step(const Cloud<T>& c, const T* x, T* out, int64_t M, double alpha, double sigma, double A,
                     double B, double C, uint64_t seed, uint32_t step, uint64_t sample_offset) {
  if (use_blocked(c.d)) {
    const int64_t G = group_rows(M), d = c.d;
    PackedCloud<T> pc(c);
#pragma omp parallel
    {
      pc.pack(c);
      BlockedWork<T> w(d, G, !pc.packed());
      GroupRows<T> rows(G, d);
      std::vector<T> Dg(G * d);
      std::vector<double> z(d + 4);
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t g = std::min(G, M - i0);
        const int64_t gp = rows.fill(g, [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
          xr = x + (i0 + r) * d; Dr = Dg.data() + r * d; Lr = nullptr; a = alpha; s = sigma;
        });
        posterior_group(c, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), pc, w);
        for (int64_t r = 0; r < g; ++r)   // after the whole group: out may alias x
          update_row(x + (i0 + r) * d, Dg.data() + r * d, out + (i0 + r) * d, d, A, B, C, seed, step, sample_offset + i0 + r, z.data());
      }
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<T> buf(kTile), Drow(c.d);
    std::vector<double> dist(kTile), acc(c.d), z(c.d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      posterior_row(c, x + i * c.d, alpha, sigma, buf.data(), dist.data(), acc.data(), Drow.data(), static_cast<T*>(nullptr));
      update_row(x + i * c.d, Drow.data(), out + i * c.d, c.d, A, B, C, seed, step, sample_offset + i, z.data());
    }
  }
}

template <typename T>
void pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* alpha, const double* sigma,
                       const double* A, const double* B, const double* C, uint64_t seed, uint64_t sample_offset,
                       T* traj) {
  const int64_t d = c.d;
  if (use_blocked(d)) {
    const int64_t G = group_rows(M);
    PackedCloud<T> pc(c);
#pragma omp parallel
    {
      pc.pack(c);
      BlockedWork<T> w(d, G, !pc.packed());
      GroupRows<T> rows(G, d);
      std::vector<T> Dg(G * d);
      std::vector<double> z(d + 4);
#pragma omp for schedule(static)
      for (int64_t i0 = 0; i0 < M; i0 += G) {
        const int64_t g = std::min(G, M - i0);
        if (traj)
          for (int64_t r = 0; r < g; ++r) std::copy(x + (i0 + r) * d, x + (i0 + r + 1) * d, traj + (i0 + r) * d);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t gp = rows.fill(g, [&](int64_t r, const T*& xr, T*& Dr, T*& Lr, double& a, double& s) {
            xr = x + (i0 + r) * d; Dr = Dg.data() + r * d; Lr = nullptr; a = alpha[k]; s = sigma[k];
          });
          posterior_group(c, gp, rows.x.data(), rows.alpha.data(), rows.sigma.data(), rows.D.data(), rows.L.data(), pc, w);
          for (int64_t r = 0; r < g; ++r) {
            T* xi = x + (i0 + r) * d;
            update_row(xi, Dg.data() + r * d, xi, d, A[k], B[k], C[k], seed, static_cast<uint32_t>(k), sample_offset + i0 + r, z.data());
            if (traj) std::copy(xi, xi + d, traj + ((k + 1) * M + i0 + r) * d);
          }
        }
      }
    }
    return;
  }
#pragma omp parallel
  {
    std::vector<T> buf(kTile), Drow(d);
    std::vector<double> dist(kTile), acc(d), z(d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      T* xi = x + i * d;
      if (traj) std::copy(xi, xi + d, traj + i * d);
      for (int64_t k = 0; k < K; ++k) {
        posterior_row(c, xi, alpha[k], sigma[k], buf.data(), dist.data(), acc.data(), Drow.data(), static_cast<T*>(nullptr));
        update_row(xi, Drow.data(), xi, d, A[k], B[k], C[k], seed, static_cast<uint32_t>(k), sample_offset + i, z.data());
        if (traj) std::copy(xi, xi + d, traj + ((k + 1) * M + i) * d);
      }
    }
  }
}

#define FD_INSTANTIATE(T)                                                                                          \
  template void posterior<T>(const Cloud<T>&, const T*, int64_t, const double*, const double*, bool, T*, T*);      \
  template void pointcloud_step<T>(const Cloud<T>&, const T*, T*, int64_t, double, double, double, double, double, \
                                   uint64_t, uint32_t, uint64_t);                                                  \
  template void pointcloud_sample<T>(const Cloud<T>&, T*, int64_t, int64_t, const double*, const double*,          \
                                     const double*, const double*, const double*, uint64_t, uint64_t, T*);
FD_INSTANTIATE(float)
FD_INSTANTIATE(double)
#undef FD_INSTANTIATE

}  // namespace fastdiff::cpu
