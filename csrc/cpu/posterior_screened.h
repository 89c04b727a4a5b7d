// The point-cloud posterior at large d by screening and exact rescoring (issue 15). Shared by the posterior,
// pointcloud_step and pointcloud_sample kernels through posterior_rows (posterior_large.h). On a CPU with AMX,
// float clouds without log-weights screen with posterior_amx.h instead, which reuses this file's anchor, pruning
// rule and exact stage.
//
// Why: a posterior weight w_j ∝ e^{l_j}, l_j = lw_j − |x − αy_j|²·inv2c, is negligible unless l_j is within a
// few tens of nats of the row's largest logit m. At large d that is a handful of points per query whenever the
// posterior is concentrated (every σ at which a point cloud is worth sampling at image sizes, apart from the
// first steps from pure noise), yet the exact kernels (posterior_blocked.h) spend 4 vector operations per
// (query, point, dimension) on every point. Here:
// 1. Screening. Lower bounds on |x − αy_j|² come from float dot products in the expanded form
//      |x|² − 2α x·y_j + α²|y_j|²   (one FMA per (query, point, dimension); the norms in double),
//    dimension chunk by dimension chunk (kScreenDims). A partial sum over the first K dimensions is a lower
//    bound on the whole distance (every term is ≥ 0), so a pair is dropped as soon as that bound, less its
//    rounding slack, puts its logit more than T below a logit the row is known to reach.
// 2. The anchor. After the first chunk, each row's most promising point gets its exact logit l_a (as in 3), so
//    the true maximum m ≥ l_a. A pair is pruned when  lw_j − lb_j·inv2c < l_a − T,  T = ln N + kPruneNats<T>.
// 3. Exact rescoring. The survivors get their logits exactly as the blocked kernel computes them (direct
//    differences x − αy = (x − c1·y) + c2·y in T, blocks of kDimBlock terms per lane summed in T then in double:
//    ≤ 8u·|x − αy|² as posterior_row.h explains), then e^{l − m}, Σe and Σ e·y in double.
// Error bound (u = unit roundoff of T):
// - Rounding slack of the bound after K dimensions: each chunk's dot is a chain of ≤ kScreenDims FMAs in T
//   (γ = 2·kScreenDims·u covers a build without FMA contraction too), so |S − P| ≤ 2|α|γ·|x_K||y_K| (Cauchy–
//   Schwarz over the chunks; the double parts add ≤ 1e-12 relative), P the true partial distance. The exact stage
//   forms (x − c1·y) + fl(c2)·y: its distances are ≥ (√P − 4u|c2||y_K|)² (the roundings of x − y, of c2 and of
//   c2·y, with room), and it rounds by ≤ 8u·dist more
//   (the (1 − 32u) factor). So a pruned pair's rescored logit would have been < l_a − T ≤ m − T.
// - Pruned mass: at most N·e^{−T} = e^{−kPruneNats} (1.1e-7 in float, 4e-18 in double) of the kept mass, and as
//   much again for the survivors the exact stage leaves out below m − T (finish_row), so D moves by ≤ 4·that·max|y|
//   and L by ≤ 2·that beyond the exact kernel's own error (MATH.md §7: 1e-4·max|y| and 1e-3).
// - The kept pairs carry the exact kernel's bound: D ≤ ~1e-6·max|y| from the sums in double, the logits as in 3.
// Cost: the screening FMAs for the chunks a pair survives (at d = 784, σ = 0.5, clustered data: 3 chunks of 13;
// a row down to kSettled survivors stops there)
// plus d·(3 + 2) operations per survivor. A row with more than N/8 survivors after half of its dimensions (or at
// the end) is dense: it goes to the blocked kernel, which costs less per point, and the screening it did is lost
// (at most half a dot product per pair: the worst case costs ≈ 1.15x the blocked kernel alone).
// Row invariance: a pair's bound after chunk c is computed the same way whichever rows share its block (a block
// runs chunk c while any of its pairs is alive; a dead pair stays dead), the anchor and T depend on the row alone,
// and the survivors are rescored in index order: a row's result never depends on the other rows of the call.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "../common/far.h"
#include "kernels.h"
#include "buffer_pool.h"
#include "once.h"
#include "posterior_blocked.h"
#include "posterior_row.h"
#include "simd_vec.h"

namespace fastdiff::cpu {

inline constexpr int64_t kScreenDims = 64;     // dimensions per screening chunk
inline constexpr int kScreenRows = 8;          // rows screened together (each loaded point vector serves 8 rows)
inline constexpr int kScreenVecs = 2;          // point vectors per screening block (kScreenRows × kScreenVecs
                                               // accumulators: 16 of the 32 vector registers)
// T = ln N + kPruneNats<T>: the pruned mass is < e^{−kPruneNats} of the kept mass. Float: e^-16 = 1.1e-7, the
// relative error every float weight carries anyway (e^x rounded to float, exp_nonpositive's ~1e-7), so D moves by
// ≤ 4.5e-7·max|y| against the exact kernel's own ≤ 8e-6·max|y| (posterior_blocked.h). Why not more: each nat costs
// survivors where the posterior is spread (d = 16, σ = 0.5, bench data: 12.8% of the points lie within ln N + 20
// nats of the best, 8.0% within ln N + 16). Double: e^-40 = 4e-18.
template <typename T>
inline constexpr double kPruneNats = sizeof(T) == 4 ? 16.0 : 40.0;
inline constexpr int64_t kScreenMinD = 32;     // below, the blocked kernel alone (the bound costs as much as a point)
inline constexpr int64_t kDenseShare = 8;      // a row with more than N / kDenseShare survivors is dense
inline constexpr int64_t kSettled = 32;        // a row with at most this many survivors stops screening: they
                                               // cost less rescored exactly than screened to the end

// Above this many points the blocked kernel alone: the bounds take kScreenRows doubles a point per thread and the
// screening copy of the cloud one chunk a point at least (64 MB and 256 MB at the limit, float, d ≥ 64).
inline constexpr int64_t kScreenMaxPoints = int64_t(1) << 20;

inline bool use_screening(int64_t d, int64_t N) { return d >= kScreenMinD && N <= kScreenMaxPoints; }

// The cloud re-laid for screening, packed lazily: block (v, c) holds the W points of vector column v over the
// dimensions of chunk c, [kScreenDims][W] (zero lanes past N, columns up to whole screening blocks), and their
// partial |y|² in double. Only the chunks
// some pair survives to are ever packed (at d = 3072 the first two of 24).
template <typename T>
struct ScreenCloud {
  int64_t d, N, nv, nc;
  PooledArray<T> vals;                             // [nv][nc][kScreenDims][W], uninitialised until packed
  PooledArray<double> norms;                       // [nv][nc][W]
  std::unique_ptr<std::atomic<uint8_t>[]> state;   // [nv][nc] (once.h)
  explicit ScreenCloud(const Cloud<T>& c)
      : d(c.d), N(c.N), nv((c.N + kScreenVecs * kW<T> - 1) / (kScreenVecs * kW<T>) * kScreenVecs), nc((c.d + kScreenDims - 1) / kScreenDims),
        vals(nv * nc * kScreenDims * kW<T>), norms(nv * nc * kW<T>),
        state(new std::atomic<uint8_t>[nv * nc]()) {}
  int64_t chunk_dims(int64_t ch) const { return std::min(kScreenDims, d - ch * kScreenDims); }
  const T* block(const Cloud<T>& c, int64_t v, int64_t ch) const {
    const int64_t i = v * nc + ch;
    once(state[i], [&] { pack(c, v, ch); });
    return vals.get() + i * kScreenDims * kW<T>;
  }
  const double* block_norms(int64_t v, int64_t ch) const { return norms.get() + (v * nc + ch) * kW<T>; }

 private:
  void pack(const Cloud<T>& c, int64_t v, int64_t ch) const {
    constexpr int W = kW<T>;
    const int64_t i = v * nc + ch, k0 = ch * kScreenDims, kn = chunk_dims(ch);
    using S = simd::Vec<T>;
    T* __restrict dst = vals.get() + i * kScreenDims * W;
    for (int l = 0; l < W; ++l) {
      const int64_t j = v * W + l;
      const T* __restrict src = c.y + j * d + k0;
      for (int64_t kk = 0; kk < kn; ++kk) dst[kk * W + l] = j < N ? src[kk] : T(0);
    }
    typename S::D acc[S::H] = {};      // |y|² per lane in double, W lanes at once (no serial chain)
    for (int64_t kk = 0; kk < kn; ++kk) {
      typename S::D wide[S::H] = {};
      const typename S::V row = simd::load<typename S::V>(dst + kk * W);
      simd::add_wide<T>(wide, row);
      for (int h = 0; h < S::H; ++h) acc[h] += wide[h] * wide[h];
    }
    for (int h = 0; h < S::H; ++h) simd::store(norms.get() + i * W + h * (W / S::H), acc[h]);
  }
};

// The exact stage's scratch (finish_row): one row's survivors, their exact logits, Σ e·y [d].
struct Rescore {
  std::vector<int64_t> cand;
  std::vector<double> logit, acc;
};

// Per-thread scratch of the screened path for one block of kScreenRows rows.
template <typename T>
struct ScreenWork {
  int64_t np;                                  // points padded to whole screening blocks
  PooledArray<double> lb;                      // [kScreenRows][np] bound on the distance so far (+inf: pruned)
  std::vector<double> yy;                      // [np] |y_j|² over the chunks done so far (shared by the rows)
  std::vector<uint8_t> live;                   // [np / (kScreenVecs·W)] a block with a live pair
  std::vector<uint16_t> survivors;             // [kScreenRows][blocks] a row's live pairs in a block
  std::vector<double> best;                    // [kScreenRows][kScreenVecs·W] the anchor search (track_best)
  std::vector<int64_t> best_block;
  Rescore rescore;                             // one row's survivors at a time
  std::vector<T> scratch;                      // D of the padding rows of a partial block
  explicit ScreenWork(const Cloud<T>& c)
      : np((c.N + kScreenVecs * kW<T> - 1) / (kScreenVecs * kW<T>) * (kScreenVecs * kW<T>)), lb(kScreenRows * np),
        yy(np), live(np / (kScreenVecs * kW<T>)), survivors(kScreenRows * live.size()),
        best(kScreenRows * kScreenVecs * kW<T>), best_block(best.size()), scratch(c.d) {
    rescore.acc.resize(c.d);
  }
};

// acc[r][v] = Σ_{kk < kn} x_r[kk] · blk_v[kk][lane]: the partial dot products of kScreenRows rows with the
// kScreenVecs·W points of a block over one chunk, one FMA each, accumulated in T.
template <typename T>
inline void screen_dots(const T* const* blk, int64_t kn, const T* const* xk,
                        typename simd::Vec<T>::V (&acc)[kScreenRows][kScreenVecs]) {
  using V = typename simd::Vec<T>::V;
  constexpr int W = kW<T>;
  for (int r = 0; r < kScreenRows; ++r)
    for (int v = 0; v < kScreenVecs; ++v) acc[r][v] = V{};
  for (int64_t kk = 0; kk < kn; ++kk) {
    V y[kScreenVecs];
    for (int v = 0; v < kScreenVecs; ++v) y[v] = simd::load<V>(blk[v] + kk * W);
    for (int r = 0; r < kScreenRows; ++r) {
      const V xb = simd::splat<T>(xk[r][kk]);
      for (int v = 0; v < kScreenVecs; ++v) acc[r][v] = simd::fma(xb, y[v], acc[r][v]);
    }
  }
}

// |x − αy|² of one row and G points by direct differences, exactly as the blocked kernel forms it: x − αy as
// (x − c1·y) + c2·y in T, kDimBlock terms per lane summed in T, then in double. A point's distance is +inf as soon
// as its sum so far exceeds its limit (every term is ≥ 0 and the roundings are monotone, so the whole sum would
// too). Why G at once: one point's block sum is a chain of kDimBlock dependent FMAs, so a single distance runs at
// the FMA latency (4 cycles a vector); G independent chains share each load of x and keep the FMA units busy
// (the exact stage at d = 3072 was half this chain). Each point's arithmetic is that of G = 1: the same bits.
// How far ahead of the loads the survivors' rows are prefetched: each survivor is a separate row of the cloud
// (12 KB at d = 3072, mostly not in L1/L2), and G interleaved streams are more than the hardware prefetcher follows.
inline constexpr int64_t kAheadBytes = 1024;
template <typename T, int G>
inline void exact_distances(const T* __restrict x, const T* const* ys, int64_t d, T c1, T c2, const double* limit,
                            double* out) {
  using S = simd::Vec<T>;
  using V = typename S::V;
  using D = typename S::D;
  constexpr int W = S::W;
  constexpr double inf = std::numeric_limits<double>::infinity();
  D acc[G][S::H] = {};
  bool over[G] = {}, checked = false;
  for (int g = 0; g < G; ++g) checked |= limit[g] < inf;
  auto lane_total = [&](int g) {
    double s = 0.0;
    for (int h = 0; h < S::H; ++h)
      for (int l = 0; l < W / S::H; ++l) s += acc[g][h][l];
    return s;
  };
  int64_t k = 0, blocks = 0;
  while (k + W <= d) {
    V part[G] = {};
    for (int b = 0; b < kDimBlock && k + W <= d; ++b, k += W) {
      const V xv = simd::load<V>(x + k);
      for (int g = 0; g < G; ++g) {
        __builtin_prefetch(ys[g] + k + kAheadBytes / sizeof(T));
        const V yv = simd::load<V>(ys[g] + k);
        const V diff = (xv - simd::splat<T>(c1) * yv) + simd::splat<T>(c2) * yv;
        part[g] += diff * diff;
      }
    }
    for (int g = 0; g < G; ++g) simd::add_wide<T>(acc[g], part[g]);
    if (++blocks % 4 == 0 && checked) {   // every 4·kDimBlock·W dims
      bool all = true;
      for (int g = 0; g < G; ++g) {
        over[g] = over[g] || lane_total(g) > limit[g];
        all = all && over[g];
      }
      if (all) break;
    }
  }
  for (int g = 0; g < G; ++g) {
    if (over[g]) {
      out[g] = inf;
      continue;
    }
    double s = lane_total(g);
    for (int64_t kk = k; kk < d; ++kk) {
      const T diff = (x[kk] - c1 * ys[g][kk]) + c2 * ys[g][kk];
      s += static_cast<double>(diff * diff);
    }
    out[g] = s;
  }
}

template <typename T>
inline double exact_distance(const T* __restrict x, const T* __restrict y, int64_t d, T c1, T c2,
                             double limit = std::numeric_limits<double>::infinity()) {
  double out;
  exact_distances<T, 1>(x, &y, d, c1, c2, &limit, &out);
  return out;
}

// exact_logit of points js[0..n) (any order), four distances at a time (exact_distances: the same bits).
template <typename T>
inline void exact_logits(const Cloud<T>& c, const T* x, const RowParams<T>& p, const int64_t* js, int64_t n,
                         double cut, double* out) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr int G = 4;
  const T* ys[G];
  double lws[G], limits[G], dist[G];
  int64_t at[G];
  int q = 0;
  auto flush = [&] {
    switch (q) {
      case 1: exact_distances<T, 1>(x, ys, c.d, p.c1, p.c2, limits, dist); break;
      case 2: exact_distances<T, 2>(x, ys, c.d, p.c1, p.c2, limits, dist); break;
      case 3: exact_distances<T, 3>(x, ys, c.d, p.c1, p.c2, limits, dist); break;
      case 4: exact_distances<T, 4>(x, ys, c.d, p.c1, p.c2, limits, dist); break;
      default: break;
    }
    for (int g = 0; g < q; ++g)
      out[at[g]] = dist[g] == inf && limits[g] < inf ? -inf : finite_logit<double, T>(lws[g] - dist[g] * p.inv2c,
                                                                                          lws[g]);
    q = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = js[i];
    const double lw = c.log_w ? static_cast<double>(c.log_w[j]) : 0.0;
    if (lw == -inf || lw < cut) {
      out[i] = -inf;
      continue;
    }
    ys[q] = c.y + j * c.d;
    lws[q] = lw;
    limits[q] = cut == -inf ? inf : (lw - cut) / p.inv2c;
    at[q++] = i;
    if (q == G) flush();
  }
  flush();
}

// The exact logit of point j for a row (finite_logit: the shared numeric rule); −inf when it is below `cut` (then
// its weight is negligible, as a pruned pair's: the distance stops at (lw − cut)/inv2c).
template <typename T>
inline double exact_logit(const Cloud<T>& c, const T* x, const RowParams<T>& p, int64_t j,
                          double cut = -std::numeric_limits<double>::infinity()) {
  double out;
  exact_logits(c, x, p, &j, 1, cut, &out);
  return out;
}

// D and L of one row from its survivors (ascending indices), the far rule as in the exact kernels. A survivor
// whose exact logit is below cut = l_a − T, or below m − T once the maximum m is known, is left out like a pruned
// pair (its weight is < e^{−T} of the largest).
template <typename T>
void finish_row(const Cloud<T>& c, const T* x, double alpha, double sigma, const RowParams<T>& p, double lw_max,
                double cut, double prune_nats, Rescore& w, T* D, T* L) {
  const int64_t d = c.d, n = static_cast<int64_t>(w.cand.size());
  w.logit.resize(n);
  exact_logits(c, x, p, w.cand.data(), n, cut, w.logit.data());
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, w.logit[i]);
  if (far::is_far(m, lw_max, d)) return posterior_row_far(c, x, alpha, sigma, D, L);
  double s = 0.0;
  std::fill(w.acc.begin(), w.acc.end(), 0.0);
  double* __restrict acc = w.acc.data();
  // Σ e·y over the kept survivors in index order, four points per pass over acc: each acc[k] takes the same
  // multiply-adds in the same order as one point at a time, but is loaded and stored once per four (at d = 784
  // the stores of acc were a third of this function)
  const T* ys[4];
  double es[4];
  int q = 0;
  for (int64_t i = 0; i <= n; ++i) {
    if (i < n) {
      if (!(w.logit[i] >= m - prune_nats)) continue;
      es[q] = std::exp(w.logit[i] - m);
      s += es[q];
      ys[q++] = c.y + w.cand[i] * d;
      if (q < 4) continue;
    }
    if (q == 4) {
      const T *__restrict y0 = ys[0], *__restrict y1 = ys[1], *__restrict y2 = ys[2], *__restrict y3 = ys[3];
      const double e0 = es[0], e1 = es[1], e2 = es[2], e3 = es[3];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        double a = acc[k];
        a += e0 * static_cast<double>(y0[k]);
        a += e1 * static_cast<double>(y1[k]);
        a += e2 * static_cast<double>(y2[k]);
        a += e3 * static_cast<double>(y3[k]);
        acc[k] = a;
      }
    } else {
      for (int j = 0; j < q; ++j) {
        const T* __restrict y = ys[j];
        const double e = es[j];
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) acc[k] += e * static_cast<double>(y[k]);
      }
    }
    q = 0;
  }
  const double scale = p.shrink / s;
  for (int64_t k = 0; k < d; ++k) D[k] = static_cast<T>(acc[k] * scale + p.pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(m + std::log(s));
}

// One row's bounds over one screening block after a chunk: pairs whose logit bound is below cut = l_a − T are
// pruned (lb = +inf). With ρ² = (lw − cut)/inv2c the test lw − root²·inv2c < cut (root as in the header) reads
// p > ((ρ + 4u|c2|·|y_K|) / (1 − 32u))², p the bound less its slack: no square root per pair without log-weights.
// Returns the live pairs left.
template <typename T>
inline int64_t prune_block(double* __restrict lb, const double* __restrict yy, const double* __restrict ny,
                           const T* __restrict lw, int64_t n, double xx, double alpha, double inv2c, double cut,
                           double gamma, double yterm) {
  constexpr double u = std::numeric_limits<T>::epsilon() / 2;
  const double inf = std::numeric_limits<double>::infinity(), f = 1.0 / (1.0 - 32.0 * u);
  const double slack_x = 2.0 * std::abs(alpha) * gamma * std::sqrt(xx), a2 = alpha * alpha;
  int64_t live = 0;
  if (!lw) {
    const double rho = std::sqrt(std::max(0.0, -cut) / inv2c);
#pragma omp simd reduction(+ : live)
    for (int64_t l = 0; l < n; ++l) {
      const double p = lb[l] - slack_x * ny[l] - 1e-12 * (xx + a2 * yy[l]);
      const double thr = (rho + yterm * ny[l]) * f;
      const bool keep = !(p > thr * thr);
      lb[l] = keep ? lb[l] : inf;
      live += keep;
    }
    return live;
  }
#pragma omp simd reduction(+ : live)
  for (int64_t l = 0; l < n; ++l) {
    const double room = static_cast<double>(lw[l]) - cut;   // −inf for a point of weight 0 (already pruned)
    const double p = lb[l] - slack_x * ny[l] - 1e-12 * (xx + a2 * yy[l]);
    const double thr = (std::sqrt(std::max(0.0, room) / inv2c) + yterm * ny[l]) * f;
    const bool keep = room >= 0.0 && !(p > thr * thr);
    lb[l] = keep ? lb[l] : inf;
    live += keep;
  }
  return live;
}

// The anchor search, lane by lane: best[l] = the best logit bound lw − lb·inv2c seen in lane l over the blocks so
// far (strictly better replaces: the first block wins a tie), block[l] its block. n: the block's valid lanes.
template <typename T>
inline void track_best(const double* __restrict lb, const T* __restrict lw, int64_t n, double inv2c, int64_t b,
                       double* __restrict best, int64_t* __restrict block) {
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    const double ub = (lw ? static_cast<double>(lw[l]) : 0.0) - lb[l] * inv2c;
    const bool better = ub > best[l];
    best[l] = better ? ub : best[l];
    block[l] = better ? b : block[l];
  }
}

// A row's anchor after the first chunk: the point with the best bound (the lowest index among equals), and its
// exact logit; −inf when no point has weight.
template <typename T>
double anchor_logit(const Cloud<T>& c, const T* x, const RowParams<T>& p, const double* best, const int64_t* block) {
  constexpr int64_t BP = kScreenVecs * kW<T>;
  double top = -std::numeric_limits<double>::infinity();
  int64_t j = -1;
  for (int64_t l = 0; l < BP; ++l) {
    const int64_t jl = block[l] * BP + l;
    if (best[l] > top || (best[l] == top && j >= 0 && jl < j)) { top = best[l]; j = jl; }
  }
  return j < 0 ? top : exact_logit(c, x, p, j);
}

// Screens nr ≤ kScreenRows rows (xs, alpha, sigma, their parameters prm; a partial block repeats its last row,
// results discarded) against the whole cloud and finishes every row that is not dense (D, L written). Returns a
// bit per row: 1 = dense, left to the blocked kernel.
template <typename T>
unsigned screen_block(const Cloud<T>& c, const ScreenCloud<T>& sc, int nr, const T* const* xs_in,
                      const double* alpha_in, const double* sigma_in, const RowParams<T>* prm_in, double lw_max,
                      ScreenWork<T>& w, T* const* D_in, T* const* L_in) {
  using V = typename simd::Vec<T>::V;
  constexpr int W = kW<T>, R = kScreenRows, BV = kScreenVecs, BP = kScreenVecs * W;
  const T* xs[R];
  double alpha[R], sigma[R];
  RowParams<T> prm[R];
  T* D[R];
  T* L[R];
  for (int r = 0; r < R; ++r) {
    const int i = std::min(r, nr - 1);
    xs[r] = xs_in[i]; alpha[r] = alpha_in[i]; sigma[r] = sigma_in[i]; prm[r] = prm_in[i];
    D[r] = r < nr ? D_in[r] : w.scratch.data();
    L[r] = r < nr ? L_in[r] : nullptr;
  }
  constexpr double u = std::numeric_limits<T>::epsilon() / 2;
  const double inf = std::numeric_limits<double>::infinity();
  const double gamma = 2.0 * kScreenDims * u;
  const double prune_nats = std::log(static_cast<double>(c.N)) + kPruneNats<T>;
  const double lowest = -0.5 * static_cast<double>(std::numeric_limits<T>::max());
  const int64_t N = c.N, d = c.d, np = w.np, nblocks = np / BP;
  unsigned dense = 0, settled = 0, overflow = 0;   // per row: left to the blocked kernel / survivors final /
                                                   // a bound overflowed float
  double xx[R] = {}, cut[R];
  // each row's best logit bound after the first chunk, lane by lane over the blocks (and the block), for the anchor
  double* best = w.best.data();
  int64_t* best_block = w.best_block.data();
  std::fill(best, best + R * BP, -inf);
  std::fill(best_block, best_block + R * BP, int64_t(0));
  std::fill(w.live.begin(), w.live.end(), uint8_t(1));
  alignas(64) double ny[BP];
  for (int64_t ch = 0; ch < sc.nc; ++ch) {
    const int64_t k0 = ch * kScreenDims, kn = sc.chunk_dims(ch);
    double xxc[R];
    const T* xk[R];
    for (int r = 0; r < R; ++r) {
      xk[r] = xs[r] + k0;
      const T* __restrict xr = xk[r];
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t kk = 0; kk < kn; ++kk) s += static_cast<double>(xr[kk]) * static_cast<double>(xr[kk]);
      xxc[r] = s;
      xx[r] += s;
    }
    // per row and lane: Σ (t − t) over the chunk's live pairs, 0 unless some bound is ±inf or NaN (a float dot
    // that overflowed); summed across lanes once per chunk, not once per block
    alignas(64) double probes[R][BP] = {};
    for (int64_t b = 0; b < nblocks; ++b) {   // the bounds over this chunk
      if (!w.live[b]) continue;
      const T* blk[BV];
      for (int v = 0; v < BV; ++v) blk[v] = sc.block(c, b * BV + v, ch);
      V acc[R][BV];
      screen_dots<T>(blk, kn, xk, acc);
      alignas(64) T dots[R][BP];
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < BV; ++v) simd::store(dots[r] + v * W, acc[r][v]);
      alignas(64) double nrm[BP];
      for (int v = 0; v < BV; ++v) std::copy(sc.block_norms(b * BV + v, ch), sc.block_norms(b * BV + v, ch) + W, nrm + v * W);
      double* __restrict yy = w.yy.data() + b * BP;
      const int64_t valid = std::min<int64_t>(BP, N - b * BP);   // the lanes past N stay +inf from chunk 0 on
      if (ch == 0) {
#pragma omp simd
        for (int64_t l = 0; l < BP; ++l) yy[l] = nrm[l];
      } else {
#pragma omp simd
        for (int64_t l = 0; l < BP; ++l) yy[l] += nrm[l];
      }
      for (int r = 0; r < R; ++r) {
        if ((dense | settled) >> r & 1u) continue;   // their bounds are final (row invariance: see the header)
        double* __restrict lb = w.lb.get() + r * np + b * BP;
        const double a = alpha[r], a2 = alpha[r] * alpha[r], base = xxc[r];
        // a float dot that overflowed (huge inputs the float64 rule left in float32) gives no bound: the row
        // goes to the blocked kernel. Only the row's live pairs count (pruned ones stay +inf, untouched).
        double* __restrict probe = probes[r];
        if (ch > 0) {
#pragma omp simd
          for (int64_t l = 0; l < BP; ++l) {
            const double t = base - 2.0 * a * static_cast<double>(dots[r][l]) + a2 * nrm[l];
            const bool dead = lb[l] == inf;
            probe[l] += dead ? 0.0 : t - t;
            lb[l] = dead ? inf : lb[l] + t;
          }
          continue;
        }
#pragma omp simd
        for (int64_t l = 0; l < BP; ++l) {   // the padding lanes' points are zeros: their t is finite
          const double t = base - 2.0 * a * static_cast<double>(dots[r][l]) + a2 * nrm[l];
          probe[l] += t - t;
          lb[l] = t;
        }
        for (int64_t l = valid; l < BP; ++l) lb[l] = inf;
        track_best(lb, c.log_w ? c.log_w + b * BP : nullptr, valid, prm[r].inv2c, b, best + r * BP, best_block + r * BP);
      }
    }
    for (int r = 0; r < R; ++r) {
      double probe = 0.0;
      for (int64_t l = 0; l < BP; ++l) probe += probes[r][l];
      if (probe != 0.0) overflow |= 1u << r;   // NaN != 0 too
    }
    dense |= overflow;
    if (ch == 0)
      for (int r = 0; r < R; ++r) {
        if (dense >> r & 1u) { cut[r] = inf; continue; }
        const double la = anchor_logit(c, xs[r], prm[r], best + r * BP, best_block + r * BP);
        if (!(la > lowest)) dense |= 1u << r;   // no weight, or logits at the clamp: the exact kernel decides
        cut[r] = la - prune_nats;
      }
    int64_t alive[R] = {};
    for (int64_t b = 0; b < nblocks; ++b) {   // prune; a block stays live while any of its pairs is
      if (!w.live[b]) continue;
      const double* yy = w.yy.data() + b * BP;
#pragma omp simd
      for (int64_t l = 0; l < BP; ++l) ny[l] = std::sqrt(yy[l]);
      bool any = false;
      for (int r = 0; r < R; ++r) {
        double* lb = w.lb.get() + r * np + b * BP;
        if (dense >> r & 1u) {
          std::fill(lb, lb + BP, inf);
          continue;
        }
        if (settled >> r & 1u) continue;   // its survivors are final; they keep no block live
        const int64_t n = prune_block<T>(lb, yy, ny, c.log_w ? c.log_w + b * BP : nullptr, std::min<int64_t>(BP, N - b * BP),
                                         xx[r], alpha[r], prm[r].inv2c, cut[r], gamma,
                                         4.0 * u * std::abs(static_cast<double>(prm[r].c2)));
        w.survivors[r * nblocks + b] = static_cast<uint16_t>(n);
        alive[r] += n;
        any = any || n > 0;
      }
      w.live[b] = any;
    }
    for (int r = 0; r < R; ++r) {   // per row, from its own survivors only (row invariance)
      if ((dense | settled) >> r & 1u) continue;
      if (2 * (k0 + kn) >= d && alive[r] * kDenseShare > N) dense |= 1u << r;   // from halfway on
      else if (alive[r] <= kSettled) settled |= 1u << r;
    }
    if (((dense | settled) & ((1u << R) - 1)) == (1u << R) - 1) break;
  }
  for (int r = 0; r < nr; ++r) {
    if (dense >> r & 1u) continue;
    std::vector<int64_t>& cand = w.rescore.cand;
    cand.clear();
    const double* lb = w.lb.get() + r * np;
    for (int64_t b = 0; b < nblocks; ++b)
      if (w.survivors[r * nblocks + b])
        for (int64_t j = b * BP; j < std::min(N, (b + 1) * BP); ++j)
          if (lb[j] != inf) cand.push_back(j);
    finish_row(c, xs[r], alpha[r], sigma[r], prm[r], lw_max, cut[r], prune_nats, w.rescore, D[r], L[r]);
  }
  return dense;
}

}  // namespace fastdiff::cpu
