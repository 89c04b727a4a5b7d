// The register-blocked point-cloud posterior for d >= 5: blocks of kRows queries, groups of rows per thread,
// the cloud packed once per call. Shared by the posterior, pointcloud_step and pointcloud_sample kernels.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <omp.h>
#include <vector>

#include "buffer_pool.h"
#include "kernels.h"
#include "once.h"
#include "posterior_row.h"
#include "simd_vec.h"

namespace fastdiff::cpu {

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
inline constexpr int kRows = 4;
inline constexpr int kVecs = 4;                 // dimension vectors per weighted-sum block (kRows × kVecs accumulators)
inline constexpr int64_t kChunk = 128;         // points summed in T before a weighted sum goes to double
inline constexpr int64_t kGroupRows = 128;     // rows that go through each tile together (reuse in L2)
inline constexpr int64_t kTileBytes = 196608;  // one copy of a tile (x2 with the row-major copy) kept in L2
static_assert(kGroupRows % kRows == 0, "a group is padded to whole blocks within kGroupRows rows");

template <typename T>
inline constexpr int kW = simd::Vec<T>::W;

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
  // nt_: points per tile, 0 for tile_points(d); block_rows: rows a block (the dot form's tiles and blocks are
  // larger: posterior_dense.h)
  BlockedWork(int64_t d_, int64_t rows, bool own_tiles, int64_t nt_ = 0, int block_rows = kRows)
      : d(d_), dp((d_ + kW<T> - 1) / kW<T> * kW<T>), nt(nt_ ? nt_ : tile_points<T>(d_)), np(nt),
        P(own_tiles ? np * d : 0), Yr(own_tiles ? nt * dp : 0, T(0)), E(block_rows * np), lwt(np),
        Lg(block_rows * np),
        acc(rows * dp), m(rows), s(rows), prm(rows) {}
};

// The tile [j0, j0 + n) of the row-major cloud into packed columns P [nv][d][W] (zero lanes past n), W points
// at a time through a W × W block in L1 (rows of y read contiguously, columns written whole). With a centre, the
// points less it (y − c rounded once: the dot form's copy, posterior_dense.h); without, y itself.
template <typename T>
void pack_columns(const Cloud<T>& c, int64_t j0, int64_t n, T* __restrict P, const T* centre = nullptr) {
  using V = typename simd::Vec<T>::V;
  constexpr int W = kW<T>;
  const int64_t d = c.d;
  alignas(64) T block[W][W];
  for (int64_t v = 0; v * W < n; ++v) {
    const int64_t lanes = std::min<int64_t>(W, n - v * W);
    T* __restrict dst = P + v * d * W;
    for (int64_t k0 = 0; k0 < d; k0 += W) {
      const int64_t kn = std::min<int64_t>(W, d - k0);
      for (int l = 0; l < W; ++l)
        for (int kk = 0; kk < W; ++kk)
          block[kk][l] = l < lanes && kk < kn ? (centre ? c.y[(j0 + v * W + l) * d + k0 + kk] - centre[k0 + kk]
                                                        : c.y[(j0 + v * W + l) * d + k0 + kk])
                                              : T(0);
      for (int64_t kk = 0; kk < kn; ++kk) simd::store(dst + (k0 + kk) * W, simd::load<V>(block[kk]));
    }
  }
}

// The tile [j0, j0 + n) row-major with rows padded to dp (zero past d; rows past n are not written, never read).
template <typename T>
void copy_rows(const Cloud<T>& c, int64_t j0, int64_t n, int64_t dp, T* __restrict rows) {
  for (int64_t j = 0; j < n; ++j) {
    std::copy(c.y + (j0 + j) * c.d, c.y + (j0 + j + 1) * c.d, rows + j * dp);
    std::fill(rows + j * dp + c.d, rows + (j + 1) * dp, T(0));
  }
}

// The tile [j0, j0 + n) into the thread's own buffers (clouds too large to pack once).
template <typename T>
void pack_tile(const Cloud<T>& c, int64_t j0, int64_t n, BlockedWork<T>& w) {
  pack_columns(c, j0, n, w.P.data());
  copy_rows(c, j0, n, w.dp, w.Yr.data());
  w.Pt = w.P.data();
  w.Yt = w.Yr.data();
}

// The whole cloud packed once per call (both layouts, tile by tile, the same bits as pack_tile), shared by all
// threads and groups, each tile packed by the first thread that needs it (a thread that finds it being packed
// packs the next ones meanwhile: once_helping): most calls at large d never reach this kernel (the screened path finishes their rows,
// posterior_screened.h), so nothing is packed up front. Used when both copies fit in kPackBytes.
inline constexpr int64_t kPackBytes = int64_t(512) << 20;

template <typename T>
struct PackedCloud {
  int64_t d, dp, nt, ntiles;
  PooledArray<T> P, Yr;              // tile t at P + t·nt·d, rows of tile t at Yr + t·nt·dp (buffer_pool.h: no
                                     // page faults on every call)
  // per tile and layout (columns, rows): 0 not packed, 1 being packed, 2 ready (once.h)
  std::unique_ptr<std::atomic<uint8_t>[]> cols_state, rows_state;
  explicit PackedCloud(const Cloud<T>& c)
      : d(c.d), dp((c.d + kW<T> - 1) / kW<T> * kW<T>), nt(tile_points<T>(c.d)), ntiles((c.N + nt - 1) / nt) {
    if (static_cast<double>(ntiles) * nt * (d + dp) * sizeof(T) <= static_cast<double>(kPackBytes)) {
      P.reset(ntiles * nt * d);
      Yr.reset(ntiles * nt * dp);
      cols_state.reset(new std::atomic<uint8_t>[ntiles]());
      rows_state.reset(new std::atomic<uint8_t>[ntiles]());
    }
  }
  bool packed() const { return P.get() != nullptr; }
  // tile t in both layouts (the direct kernel)
  void select(const Cloud<T>& c, int64_t t, BlockedWork<T>& w) const {
    select_rows(c, t, w);
    w.Pt = P.get() + t * nt * d;
    once_helping(cols_state.get(), t, ntiles,
                 [&](int64_t h) { pack_columns(c, h * nt, std::min(nt, c.N - h * nt), P.get() + h * nt * d); });
  }
  void select_rows(const Cloud<T>& c, int64_t t, BlockedWork<T>& w) const {
    ensure_rows(c, t);
    w.Yt = rows(t);
  }
  // tile t's rows packed (the dot form's weighted sums read the rows of consecutive tiles as one: its columns are
  // its own, centred, posterior_dense.h)
  void ensure_rows(const Cloud<T>& c, int64_t t) const {
    once_helping(rows_state.get(), t, ntiles,
                 [&](int64_t h) { copy_rows(c, h * nt, std::min(nt, c.N - h * nt), dp, Yr.get() + h * nt * dp); });
  }
  const T* rows(int64_t t) const { return Yr.get() + t * nt * dp; }
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

// The rest of a block's tile once the logits are in w.Lg (tmax: each row's largest over the tile): the weights
// e^{l − m} against each row's running maximum m, their sum, and the weighted sums of the tile's rows.
// R rows at a time: kRows, or 8 for the dot form (posterior_dense.h: half the loads a multiply-add); a row's sums are
// the same whatever R (each acc[k] sums the same terms in the same order).
template <typename T, int R = kRows>
void tile_sums(BlockedWork<T>& w, int64_t b, int64_t n, const double* tmax) {
  constexpr int W = kW<T>, KV = R > kRows ? 2 : kVecs;   // 8 rows × 2 vectors: 16 accumulators, as 4 × 4
  const int64_t np = (n + W - 1) / W * W;
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
    for (; k + KV * W <= w.dp; k += KV * W) block_weighted<T, R, KV>(w, js, je, k, acc);
    // the rest two vectors at a time where it can: one vector takes a broadcast weight per FMA (at d = 16 on
    // AVX2, two vectors a row, that was the whole weighted sum); each acc[k] sums the same terms in the same order
    for (; k + 2 * W <= w.dp; k += 2 * W) block_weighted<T, R, 2>(w, js, je, k, acc);
    for (; k < w.dp; k += W) block_weighted<T, R, 1>(w, js, je, k, acc);
  }
}

// One block of kRows rows (first row b of the group) against the packed tile of n points: the logits from direct
// differences, then tile_sums.
template <typename T>
void block_tile(BlockedWork<T>& w, int64_t b, int64_t n, const T* const* xs) {
  constexpr int W = kW<T>, R = kRows;
  const int64_t np = (n + W - 1) / W * W;
  // each row's tile maximum lane by lane, reduced across lanes once per tile (a max is exact in any order; a
  // horizontal reduction per row and vector cost ~7 instructions every W pairs)
  alignas(64) double lane_max[R][W];
  for (int r = 0; r < R; ++r) std::fill(lane_max[r], lane_max[r] + W, -std::numeric_limits<double>::infinity());
  const RowParams<T>* prm = w.prm.data() + b;
  double dist[R * W];
  for (int64_t v = 0; v < np / W; ++v) {
    block_distances<T, R>(w.Pt + v * w.d * W, w.d, xs + b, prm, dist);
    for (int r = 0; r < R; ++r) {
      double* __restrict lg = w.Lg.data() + r * w.np + v * W;
      const double* __restrict lw = w.lwt.data() + v * W;
      double* __restrict tm = lane_max[r];
      const double inv2c = prm[r].inv2c;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        lg[l] = finite_logit<double, T>(lw[l] - dist[r * W + l] * inv2c, lw[l]);
        tm[l] = std::max(tm[l], lg[l]);
      }
    }
  }
  double tmax[R];
  for (int r = 0; r < R; ++r) tmax[r] = *std::max_element(lane_max[r], lane_max[r] + W);
  tile_sums(w, b, n, tmax);
}

// The per-row state of g rows before their first tile (the direct and the dot form alike).
template <typename T>
void start_rows(const Cloud<T>& c, int64_t g, const double* alpha, const double* sigma, BlockedWork<T>& w) {
  for (int64_t i = 0; i < g; ++i) {
    w.prm[i] = row_params(c, alpha[i], sigma[i]);
    w.m[i] = -std::numeric_limits<double>::infinity();
    w.s[i] = 0.0;
  }
  std::fill(w.acc.begin(), w.acc.begin() + g * w.dp, 0.0);
}

// The log-weights of the tile [j0, j0 + n) into w.lwt (−inf on padding), and lw_max raised to the tile's largest.
template <typename T>
void tile_log_weights(const Cloud<T>& c, int64_t j0, int64_t n, BlockedWork<T>& w, double& lw_max) {
  for (int64_t j = 0; j < w.np; ++j)
    w.lwt[j] = j >= n ? -std::numeric_limits<double>::infinity() : (c.log_w ? static_cast<double>(c.log_w[j0 + j]) : 0.0);
  if (c.log_w) lw_max = std::max(lw_max, max_log_weight(c.log_w + j0, n));
}

// D and L of row i from its sums over every tile (a row whose every point is far: the double-double kernel).
template <typename T>
void finish_row(const Cloud<T>& c, int64_t i, const T* x, double alpha, double sigma, T* D, T* L, double lw_max,
                const BlockedWork<T>& w) {
  if (far::is_far(w.m[i], lw_max, w.d)) return posterior_row_far(c, x, alpha, sigma, D, L);   // far.h
  const double* acc = w.acc.data() + i * w.dp;
  const RowParams<T>& p = w.prm[i];
  for (int64_t k = 0; k < w.d; ++k)
    D[k] = static_cast<T>(acc[k] / w.s[i] * p.shrink + p.pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(w.m[i] + std::log(w.s[i]));
}

// D and L of g rows (g a multiple of kRows; pad with copies of a row). L[r] may be nullptr.
template <typename T>
void posterior_group(const Cloud<T>& c, int64_t g, const T* const* xs, const double* alpha, const double* sigma,
                     T* const* D, T* const* L, const PackedCloud<T>& pc, BlockedWork<T>& w) {
  start_rows(c, g, alpha, sigma, w);
  double lw_max = c.log_w ? -std::numeric_limits<double>::infinity() : 0.0;   // for the far-row test
  for (int64_t j0 = 0; j0 < c.N; j0 += w.nt) {
    const int64_t n = std::min(w.nt, c.N - j0);
    if (pc.packed())
      pc.select(c, j0 / w.nt, w);
    else
      pack_tile(c, j0, n, w);
    tile_log_weights(c, j0, n, w, lw_max);
    for (int64_t b = 0; b < g; b += kRows) block_tile(w, b, n, xs);
  }
  for (int64_t i = 0; i < g; ++i) finish_row(c, i, xs[i], alpha[i], sigma[i], D[i], L[i], lw_max, w);
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

// Rows per group: a quarter of the thread's share of the rows, at most kGroupRows, a multiple of kRows. A quarter:
// groups differ in cost (screened, rescored or dense rows), and four a thread let the dynamic schedule even out
// what one a thread left to the slowest (d = 3072, 128 rows on 2 threads: two 64-row groups, one a thread).
inline int64_t group_rows(int64_t M) {
  const int64_t threads = omp_get_max_threads();
  const int64_t share = (M + 4 * threads - 1) / (4 * threads);
  return std::min<int64_t>(kGroupRows, (share + kRows - 1) / kRows * kRows);
}
inline bool use_blocked(int64_t d) { return d > 4; }

}  // namespace fastdiff::cpu
