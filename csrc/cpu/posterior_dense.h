// Dense rows at large d, float: the logits from dot products with a centred copy of the cloud (the form a matrix
// product computes) instead of direct differences, wherever that is as accurate. posterior_rows (posterior_large.h)
// sends here the rows a screen finds dense; a row the test below refuses goes through the direct kernel
// (posterior_blocked.h) instead, so this file changes speed, never the bound.
//
// Why: a row whose posterior weight is spread over much of the cloud (large σ: the first half of a sampler's steps
// at d = 3072) goes through every point. Direct differences cost 3 vector ops a (query, point, dimension):
// x − c1·y, + c2·y, the square added; a dot product costs one FMA. On the bench's dense rows the direct kernel ran at
// 0.55-0.85x torch.compile(naive) and SDPA (Zen 5, 2 threads, d = 64 to 3072), which use the dot form.
//
// Arithmetic (u = 2⁻²⁴). c is the cloud's centre (float), a = x − αc and b_j = y_j − c in double, x̃ = fl(a) and
// ỹ_j = fl(b_j) in float (≤ u relative a component). Then
//   |x − αy_j|² = |a|² − 2α a·b_j + α²|b_j|²,
// with |a|² and |b_j|² summed in double and a·b_j ≈ s_j = Σ_k x̃_k ỹ_jk: in float over blocks of kDotBlock = 16
// dimensions (one FMA a term, each block ≤ γ₁₆ of its Σ|x̃_k ỹ_jk|), the blocks added in double. So
//   |s_j − a·b_j| ≤ (γ₁₆(1 + u)² + 2u + u²)·Σ_k |a_k||b_jk| ≤ 19u·|a|·|b_j|
// (19 rather than 18: the double roundings of a, b_j and the blocks' sum, each ~2⁻⁵³ of its terms), and the distance
// errs by E_j ≤ 2|α|·19u·|a||b_j|. The direct kernel's own bound is 8u·|x − αy_j|² from its sums, plus the
// rounding of x − αy (posterior_blocked.h). A row keeps the dot form only when E_j ≤ 10u·dist_j for every point j,
// i.e. when its computed distance dist_j ≥ 3.8·(1 + 1e-4)·|α|·|a|·|b_j| (1e-4 for the roundings of the test and of
// |a|² − 2αs_j + α²|b_j|² in double: ≤ 40·2⁻⁵³·dist_j where the test passes). That holds where a row is far from
// the cloud against the cloud's size (|a| ≳ 6|α|·max|b_j|: large σ), i.e. where rows are dense; near-duplicate
// data at small σ (dense too, but dist_j ≪ |a||b_j|) fails it and goes direct.
//
// The weights, their sum, the weighted sums (of y itself, row-major) and D and L are the direct kernel's
// (tile_sums, finish_row), with its bounds. Row invariance as there: a row's result depends on (d, N) and the
// cloud only (the centre is a function of the cloud; padding rows copy a row).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "buffer_pool.h"
#include "kernels.h"
#include "once.h"
#include "posterior_blocked.h"
#include "posterior_screened.h"
#include "simd_vec.h"

namespace fastdiff::cpu {

inline constexpr int64_t kDotMinD = 32;     // below, the direct kernel alone (few dense rows, little to gain)
inline constexpr int kDotBlock = 16;        // dimensions summed in float before a dot goes to double
inline constexpr double kDotErr = 19.0;     // |s_j − a·b_j| ≤ kDotErr·u·|a||b_j| (above)
inline constexpr double kDirectErr = 10.0;  // the direct kernel's 8u sums + 2u from x − αy
// the test dist_j ≥ kDotTest·|α|·|a|·|b_j|: 2·kDotErr·u·|α||a||b_j| ≤ kDirectErr·u·dist_j, 1e-4 to spare (above)
inline constexpr double kDotTest = 2.0 * kDotErr / kDirectErr * (1.0 + 1e-4);
inline constexpr int64_t kCentrePoints = 32;    // the centre: the mean of this many evenly spaced points (every
                                                // call pays for it; |y − c| grows by ~1/(2·32) from the sampling)
inline constexpr int64_t kDotTileBytes = 393216;   // one layout of a dot-form tile (x2: its columns and rows), in L2

// Points per dot-form tile: whole tiles of the direct kernel's tiling (nt, whose rows it reads in place), as many as
// fit kDotTileBytes, at most 1024 points. Larger than nt at large d (d = 3072: 32 points, not 16): a 16-point tile
// gave one point vector a row block (4 FMA chains: half the FMA rate, latency-bound) and flushed the weighted sums to
// double every 16 points.
inline int64_t dot_tile_points(int64_t d, int64_t nt) {
  const int64_t k = std::max<int64_t>(1, std::min<int64_t>(kDotTileBytes / (nt * d * 4), 1024 / nt));
  return k * nt;
}

// The cloud centred for the dot form, per tile of the direct kernel's tiling: y − c packed in columns (pack_columns)
// with |y_j − c|² and an upper bound on |y_j − c| in double; each tile packed by the first thread that needs it.
// Nothing is computed or allocated before the first dense row of a call asks (prepare).
struct DotCloud {
  int64_t d, nt, ntiles, per;          // points per tile, tiles, direct-kernel tiles per tile (nt = per·their nt)
  mutable std::vector<float> centre;
  mutable PooledArray<float> P;          // tile t at P + t·nt·d
  mutable PooledArray<double> bb, nb;    // [ntiles·nt]
  std::unique_ptr<std::atomic<uint8_t>[]> state;
  mutable std::atomic<uint8_t> ready{0};
  mutable double radius2 = 0.0;        // the mean of |y − c|² over the centre's points (dot_spread_row)
  DotCloud(const Cloud<float>& c, int64_t packed_nt)
      : d(c.d), nt(dot_tile_points(c.d, packed_nt)), ntiles((c.N + nt - 1) / nt), per(nt / packed_nt),
        state(new std::atomic<uint8_t>[ntiles]()) {}
  void prepare(const Cloud<float>& c) const {
    once(ready, [&] {
      P.reset(ntiles * nt * d);
      bb.reset(ntiles * nt);
      nb.reset(ntiles * nt);
      // any centre keeps the bound (the test above holds for every c); one near the data's mean makes |b_j| small
      const int64_t n = std::min(c.N, kCentrePoints);
      std::vector<double> sum(d, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        const float* __restrict y = c.y + (i * c.N / n) * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) sum[k] += y[k];
      }
      centre.resize(d);
      for (int64_t k = 0; k < d; ++k) centre[k] = static_cast<float>(sum[k] / static_cast<double>(n));
      double r2 = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const float* __restrict y = c.y + (i * c.N / n) * d;
        const float* __restrict m = centre.data();
#pragma omp simd reduction(+ : r2)
        for (int64_t k = 0; k < d; ++k) {
          const double b = static_cast<double>(y[k]) - static_cast<double>(m[k]);
          r2 += b * b;
        }
      }
      radius2 = r2 / static_cast<double>(n);
    });
  }
  void select(const Cloud<float>& c, int64_t t) const {
    once_helping(state.get(), t, ntiles, [&](int64_t h) {
      const int64_t j0 = h * nt, n = std::min(nt, c.N - j0);
      pack_columns(c, j0, n, P.get() + j0 * d, centre.data());
      for (int64_t j = 0; j < nt; ++j) {
        double s = 0.0;
        if (j < n) {
          const float* y = c.y + (j0 + j) * d;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < d; ++k) {
            const double b = static_cast<double>(y[k]) - static_cast<double>(centre[k]);
            s += b * b;
          }
        }
        bb[j0 + j] = s;
        nb[j0 + j] = std::sqrt(s) * (1.0 + 0x1p-50);   // rounded up
      }
    });
  }
  const float* columns(int64_t t) const { return P.get() + t * nt * d; }
};

// Before any screening: whether a row is so spread that a screen would find it dense, so that it comes here
// directly (the screen's int8 or AMX pass and its packing were ~15% of a dense call at d = 3072). A guess about speed
// only: both paths are exact. The row's pruning window ρ² = (ln N + kPruneNats)/inv2c (posterior_screened.h) against
// the spread of its distances over the cloud, whose varying part 2α a·b_j has a standard deviation of about
// 2|α|·|a|·√(V/d) when the cloud's mean square radius V is spread over its d dimensions and a points in a random
// direction (the noise's, at large σ): spread when ρ² covers kSpreadDeviations of them (then most points lie in the
// window, where a screen keeps them all). VE at d = 3072 on unit-variance data: σ ≳ 10.
inline constexpr double kSpreadDeviations = 4.0;

inline bool dot_spread_row(const Cloud<float>& c, const DotCloud& dc, const float* x, double alpha, double inv2c) {
  dc.prepare(c);
  const float af = static_cast<float>(alpha);
  const float* __restrict m = dc.centre.data();
  float aa = 0.0f;   // a guess: float is plenty
#pragma omp simd reduction(+ : aa)
  for (int64_t k = 0; k < c.d; ++k) {
    const float a = x[k] - af * m[k];
    aa += a * a;
  }
  const double window = (std::log(static_cast<double>(c.N)) + kPruneNats<float>) / inv2c;
  return window >= kSpreadDeviations * 2.0 * std::abs(alpha) * std::sqrt(aa * dc.radius2 / static_cast<double>(c.d));
}

// Per-thread scratch: each row's x̃ (padded to dp), |a|², the test's factor and whether every pair so far passed.
struct DotWork {
  int64_t dp;
  std::vector<float> xt;
  std::vector<double> aa, kappa;
  std::vector<uint8_t> ok;
  DotWork(int64_t rows, int64_t dp_) : dp(dp_), xt(rows * dp_, 0.0f), aa(rows), kappa(rows), ok(rows) {}
  const float* row(int64_t i) const { return xt.data() + i * dp; }
};

// s[r][l] for R rows and the V·W centred points of V consecutive packed columns P [V][d][W]: float over blocks of
// kDotBlock dimensions, added in double; out [R][V·W]. R·V = 8 chains of FMAs: enough to hide their latency.
template <int R, int V>
inline void block_dots(const float* __restrict P, int64_t d, const float* const* xt, double* __restrict out) {
  using S = simd::Vec<float>;
  using F = typename S::V;
  using D = typename S::D;
  constexpr int W = S::W;
  D acc[R][V][S::H] = {};
  auto block = [&](int64_t k0, int64_t kn) {
    F part[R][V] = {};
    for (int64_t kk = 0; kk < kn; ++kk) {
      F y[V];
      for (int v = 0; v < V; ++v) y[v] = simd::load<F>(P + v * d * W + (k0 + kk) * W);
      for (int r = 0; r < R; ++r) {
        const F xb = simd::splat<float>(xt[r][k0 + kk]);
        for (int v = 0; v < V; ++v) part[r][v] = simd::fma(xb, y[v], part[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) simd::add_wide<float>(acc[r][v], part[r][v]);
  };
  int64_t k0 = 0;
  for (; k0 + kDotBlock <= d; k0 += kDotBlock) block(k0, kDotBlock);
  if (k0 < d) block(k0, d - k0);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      for (int h = 0; h < S::H; ++h) simd::store(out + (r * V + v) * W + h * (W / S::H), acc[r][v][h]);
}

// One block of R rows (first row b; kRows, or 2·kRows: each point vector loaded serves 8 rows) against tile t of n
// points: the logits in the dot form, each pair tested, then tile_sums.
template <int R>
void dot_tile(BlockedWork<float>& w, DotWork& dw, const DotCloud& dc, int64_t t, int64_t b, int64_t n,
              const double* alpha) {
  constexpr int W = kW<float>, VMAX = 8 / R;
  const int64_t np = (n + W - 1) / W * W, nv = np / W, d = w.d;
  const float* P = dc.columns(t);
  const double *bb = dc.bb.get() + t * dc.nt, *nb = dc.nb.get() + t * dc.nt;
  const float* xt[R];
  for (int r = 0; r < R; ++r) xt[r] = dw.row(b + r);
  alignas(64) double lane_max[R][W];
  for (int r = 0; r < R; ++r) std::fill(lane_max[r], lane_max[r] + W, -std::numeric_limits<double>::infinity());
  alignas(64) double s[R * VMAX * W];
  bool fail[R] = {};
  for (int64_t v = 0; v < nv; v += VMAX) {
    const int V = v + VMAX <= nv ? VMAX : 1;
    if (V == 2) block_dots<R, VMAX>(P + v * d * W, d, xt, s);
    else block_dots<R, 1>(P + v * d * W, d, xt, s);
    for (int r = 0; r < R; ++r) {
      const int64_t i = b + r;
      const double a2 = alpha[i] * alpha[i], two_a = 2.0 * alpha[i], aa = dw.aa[i], kappa = dw.kappa[i];
      const double inv2c = w.prm[i].inv2c;
      double* __restrict tm = lane_max[r];
      bool bad = false;
      for (int h = 0; h < V; ++h) {
        const int64_t j0 = (v + h) * W;
        const double* __restrict sr = s + (r * V + h) * W;
        const double* __restrict lw = w.lwt.data() + j0;
        double* __restrict lg = w.Lg.data() + r * w.np + j0;
#pragma omp simd reduction(| : bad)
        for (int l = 0; l < W; ++l) {
          const double dist = aa + a2 * bb[j0 + l] - two_a * sr[l];
          // a point of weight zero (padding) is never tested; NaN fails
          bad |= lw[l] != -std::numeric_limits<double>::infinity() && !(dist >= kappa * nb[j0 + l]);
          lg[l] = finite_logit<double, float>(lw[l] - dist * inv2c, lw[l]);
          tm[l] = std::max(tm[l], lg[l]);
        }
      }
      fail[r] = fail[r] || bad;
    }
  }
  double tmax[R];
  for (int r = 0; r < R; ++r) {
    tmax[r] = *std::max_element(lane_max[r], lane_max[r] + W);
    if (fail[r]) dw.ok[b + r] = 0;
  }
  tile_sums<float, R>(w, b, n, tmax);
}

// g rows (a multiple of kRows; rows from `real` on pad with copies of a row) in the dot form: D and L of the rows
// that pass the test at every point; the others below `real` (indices into the group) appended to `refused`, their D
// and L not written.
inline void dot_group(const Cloud<float>& c, int64_t g, int64_t real, const float* const* xs, const double* alpha,
                      const double* sigma, float* const* D, float* const* L, const PackedCloud<float>& pc,
                      const DotCloud& dc, BlockedWork<float>& w, DotWork& dw, std::vector<int64_t>& refused) {
  dc.prepare(c);
  start_rows(c, g, alpha, sigma, w);
  const int64_t d = c.d;
  for (int64_t i = 0; i < g; ++i) {
    float* xt = dw.xt.data() + i * dw.dp;
    double aa = 0.0;
    for (int64_t k = 0; k < d; ++k) {
      const double a = static_cast<double>(xs[i][k]) - alpha[i] * static_cast<double>(dc.centre[k]);
      xt[k] = static_cast<float>(a);
      aa += a * a;
    }
    dw.aa[i] = aa;
    dw.kappa[i] = kDotTest * std::abs(alpha[i]) * std::sqrt(aa) * (1.0 + 0x1p-50);   // |a| rounded up
    dw.ok[i] = 1;
  }
  double lw_max = c.log_w ? -std::numeric_limits<double>::infinity() : 0.0;
  for (int64_t j0 = 0, t = 0; j0 < c.N; j0 += w.nt, ++t) {   // w.nt == dc.nt
    const int64_t n = std::min(w.nt, c.N - j0);
    for (int64_t h = t * dc.per; h < std::min(pc.ntiles, (t + 1) * dc.per); ++h) pc.ensure_rows(c, h);
    w.Yt = pc.rows(t * dc.per);
    dc.select(c, t);
    tile_log_weights(c, j0, n, w, lw_max);
    const auto open = [&](int64_t b, int rows) {
      return std::any_of(dw.ok.begin() + b, dw.ok.begin() + b + rows, [](uint8_t o) { return o != 0; });
    };
    // 8 rows at a time while both halves have rows still in the dot form; a block whose rows have all failed is
    // done with (they go direct; the group's other blocks go on)
    for (int64_t b = 0; b < g;) {
      if (b + 2 * kRows <= g && open(b, kRows) && open(b + kRows, kRows)) {
        dot_tile<2 * kRows>(w, dw, dc, t, b, n, alpha);
        b += 2 * kRows;
      } else {
        if (open(b, kRows)) dot_tile<kRows>(w, dw, dc, t, b, n, alpha);
        b += kRows;
      }
    }
  }
  for (int64_t i = 0; i < g; ++i) {
    if (dw.ok[i]) finish_row(c, i, xs[i], alpha[i], sigma[i], D[i], L[i], lw_max, w);
    else if (i < real) refused.push_back(i);
  }
}

}  // namespace fastdiff::cpu
