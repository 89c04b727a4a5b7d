// The point-cloud posterior of one query at a time (MATH.md §5), and the numeric rule every CPU posterior path
// shares. The data stream through in tiles with an online log-sum-exp; inner loops run over contiguous points of
// yT [d, N] and vectorise (omp simd). Used for d <= 4 (see use_blocked in posterior_blocked.h), shared by the
// posterior, pointcloud_step and pointcloud_sample kernels (csrc/cpu/<op>.cpp).
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/far.h"
#include "kernels.h"
#include "simd_vec.h"

namespace fastdiff::cpu {

// Points per tile of the d <= 4 path. A tile's logits and its maximum, then e^{l − m} with its sum and the d dot
// products, run in T over kTile/W terms a SIMD lane (≤ 64 in float, W = 16), and the lanes are summed once per
// tile: ≤ (kTile/W + log₂W)·u ≈ 68u ≈ 4e-6 relative to Σ e and Σ e·|y| (the terms are ≥ 0), so D errs by ≤ 4e-6·
// max|y| and L by ≤ 4e-6 from the sums (MATH.md §7: 1e-4·max|y| and 1e-3); the tiles merge in double. Why 1024
// and not 256: each tile ends in five or six horizontal reductions (the maximum, the sum, the dots), a chain of
// dependent scalar adds that cost ~20% of d = 2 and 3 at 256 points a tile (2 threads: 13.3 -> 10.8 ms at d = 2,
// 16.8 -> 13.5 ms at d = 3, 4096 x 16384).
inline constexpr int64_t kTile = 1024;

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

// Large d (the blocked and screened kernels, posterior_blocked.h / posterior_screened.h): distances summed in
// blocks of kDimBlock dimensions, logits in double.
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
inline constexpr int kDimBlock = 8;

// The largest of n log-weights (−inf when all are −inf): with the row's largest logit it says whether the row is
// far (csrc/common/far.h).
template <typename T>
inline double max_log_weight(const T* __restrict lw, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, lw[j]);
  return static_cast<double>(mx);
}

// The far row's screen: each point's logit in plain double with a bound on its error, so that the double-double
// pass below runs only on the points that can carry weight.
// Why: the double-double pass costs ~40 flops a coordinate in scalar code, and a far row used to run it on every
// point: 100-380x a near row. Far rows are not rare outside sampling (a score on a plot's grid, random queries, a
// trajectory that left the data), and a far row's weight sits on very few points. Zen 5, 1 thread, N = 10⁴,
// data N(0, I), far queries from 3·N(0, I), σ = 1e-2, µs a row before -> after (a near row): d = 2 386 -> 14 (3),
// d = 64 2548 -> 81 (7), d = 784 34941 -> 2137 (81), d = 3072 142078 -> 22457 (371). What remains at large d is
// the fast pass itself (a far row defeats the int8 screen, and the blocked kernel scores every point) and this
// screen's one read of the cloud.
// Bounds (u = 2⁻⁵³; the exact pass's distance is |x − αy|² with α = c1 − c2, exact in double):
//  - d ≤ 4, across points: with t1 = fl(x − c1·y), t2 = fl(c2·y) and a = |t1| + |t2| per coordinate, each
//    fl(t1 + t2) errs by ≤ 3u·a, its square by ≤ 7u·a², and the sum over d (the terms are ≥ 0) by ≤ (d + 1)u of
//    Σ a²: the distance errs by ≤ (d + 9)u·S with S = Σ a².
//  - d ≥ 5, a point at a time: |x|² − 2α x·y + α²|y|², two dot products (a convert and two FMAs a coordinate, a
//    third of the direct form's work), each within (d + 1)u of Σ|x_k y_k| ≤ |x||y| or of |y|², and three more
//    roundings: the distance errs by ≤ (d + 6)u·S with S = (|x| + |α||y|)². The cancellation this form invites
//    costs no accuracy (the bound is relative to S), only pruning where u·d·S·inv2c reaches tens of nats: data
//    with a common offset far larger than its spread, in float64 (σ = 1e-2, d = 3072, |x|² ≈ 3e4: ~1e-4 nats; a
//    row the screen cannot prune costs the screen's pass on top of the exact one, ~1.1-2x the old far row).
// Forming the logit and l ± e add ≤ 4u·(|l| + |lw|). Points of zero weight (lw = −inf) are skipped as in the
// exact pass; a point whose S nears double's range keeps its point (the exact pass decides: its distance may
// overflow to the floor where this one does not), as does a logit that is not finite; and the exact pass's floor
// (−max of T) applies to the bounds too (max(·, −floor) is monotone). No early exit on a partial sum: in high d
// the distances concentrate, and a partial sum rules a point out only near its end.
struct FarBounds {
  double lo, hi;   // the exact pass's logit lies in [lo, hi]; hi = −inf: a point of zero weight
};
inline FarBounds far_bounds(double lw, double dist, double S, int64_t d, double inv2c, double floor) {
  constexpr double u = 0x1p-53;
  const double l = lw - dist * inv2c;
  const double e = static_cast<double>(d + 16) * u * S * inv2c + 4.0 * u * (std::fabs(l) + std::fabs(lw));
  if (!std::isfinite(l) || !std::isfinite(e) || !(S < 0x1p1000))   // 2¹⁰⁰⁰: (d + 16)·S stays below 2¹⁰²⁴
    return {-floor, std::numeric_limits<double>::infinity()};
  return {std::max(l - e, -floor), std::max(l + e, -floor)};
}

template <typename T>
struct FarScreen {
  const Cloud<T>& c;
  const T* x;
  double alpha, c1, c2, inv2c, floor;
  std::vector<double> xd;   // d ≥ 5: x in double, and |x|² and |x|
  double xx = 0.0, xn = 0.0;

  FarScreen(const Cloud<T>& c_, const T* x_, double alpha_, const far::Diff& diff, double inv2c_, double floor_)
      : c(c_), x(x_), alpha(alpha_), c1(diff.c1), c2(diff.c2), inv2c(inv2c_), floor(floor_) {
    if (c.yT && c.d <= 4) return;
    xd.assign(x, x + c.d);
    for (const double v : xd) xx += v * v;
    xn = std::sqrt(xx);
  }
  double log_w(int64_t j) const { return c.log_w ? static_cast<double>(c.log_w[j]) : 0.0; }
  // W consecutive values of T as one vector of doubles.
  static simd::Vec<double>::V widen(const T* p) {
    using VD = simd::Vec<double>::V;
    if constexpr (sizeof(T) == sizeof(double)) {
      return simd::load<VD>(p);
    } else {
      typedef T VT __attribute__((vector_size(sizeof(VD) / 2)));
      return __builtin_convertvector(simd::load<VT>(p), VD);
    }
  }
  // Points j0 .. j0 + n − 1 (n ≤ kTile) from the row-major data (d ≥ 5, or no transposed copy): the dot products
  // a point at a time, then the bounds across points (they vectorise; one at a time they cost more than the dot
  // products at d = 64).
  template <bool Weighted>
  void rows(int64_t j0, int64_t n, double* __restrict lo, double* __restrict hi) const {
    const int64_t d = c.d;
    const double* __restrict xv = xd.data();
    using VD = simd::Vec<double>::V;
    constexpr int W = simd::Vec<double>::W;
    for (int64_t jj = 0; jj < n; ++jj) {
      const T* __restrict y = c.y + (j0 + jj) * d;
      // Whole vectors, two accumulators each, and one halving sum at the end: an omp simd reduction here ended
      // each point in a serial chain of 16 scalar adds, which cost more than the dot products at d = 64.
      VD xy0{}, xy1{}, yy0{}, yy1{};
      int64_t k = 0;
      for (; k + 2 * W <= d; k += 2 * W) {
        const VD a = widen(y + k), b = widen(y + k + W);
        xy0 = simd::fma(simd::load<VD>(xv + k), a, xy0);
        xy1 = simd::fma(simd::load<VD>(xv + k + W), b, xy1);
        yy0 = simd::fma(a, a, yy0);
        yy1 = simd::fma(b, b, yy1);
      }
      double xy = simd::lane_sum<double>(xy0 + xy1), yy = simd::lane_sum<double>(yy0 + yy1);
      for (; k < d; ++k) {
        const double yk = static_cast<double>(y[k]);
        xy += xv[k] * yk;
        yy += yk * yk;
      }
      lo[jj] = xy;
      hi[jj] = yy;
    }
#pragma omp simd
    for (int64_t jj = 0; jj < n; ++jj) {
      const double xy = lo[jj], yy = hi[jj];
      const double dist = xx - 2.0 * alpha * xy + alpha * alpha * yy;
      const double r = xn + std::fabs(alpha) * std::sqrt(yy);
      const double lw = Weighted ? static_cast<double>(c.log_w[j0 + jj]) : 0.0;
      const FarBounds b = far_bounds(lw, dist, r * r, d, inv2c, floor);
      const bool zero = !(lw > -std::numeric_limits<double>::infinity());
      lo[jj] = zero ? -std::numeric_limits<double>::infinity() : b.lo;
      hi[jj] = zero ? -std::numeric_limits<double>::infinity() : b.hi;
    }
  }
  // Points j0 .. j0 + n − 1 (n ≤ kTile) from the transposed data of d = DD ≤ 4, across points (they vectorise).
  // The log-weights are a template switch, not a select in the loop: a select vectorises to a masked load from
  // the null pointer, which this Zen 5 runs as a microcode assist (d = 2: 66 µs a far row instead of ~10).
  template <int DD, bool Weighted>
  void block(int64_t j0, int64_t n, double* __restrict lo, double* __restrict hi) const {
    const int64_t N = c.N;
    double xd[DD];
    for (int k = 0; k < DD; ++k) xd[k] = static_cast<double>(x[k]);
#pragma omp simd
    for (int64_t jj = 0; jj < n; ++jj) {
      double dist = 0.0, S = 0.0;
      for (int k = 0; k < DD; ++k) {
        const double yk = static_cast<double>(c.yT[k * N + j0 + jj]);
        const double t1 = xd[k] - c1 * yk, t2 = c2 * yk;
        const double diff = t1 + t2, a = std::fabs(t1) + std::fabs(t2);
        dist += diff * diff;
        S += a * a;
      }
      const double lw = Weighted ? static_cast<double>(c.log_w[j0 + jj]) : 0.0;
      const FarBounds b = far_bounds(lw, dist, S, DD, inv2c, floor);
      const bool zero = !(lw > -std::numeric_limits<double>::infinity());
      lo[jj] = zero ? -std::numeric_limits<double>::infinity() : b.lo;
      hi[jj] = zero ? -std::numeric_limits<double>::infinity() : b.hi;
    }
  }
};

// How far below the row's largest logit a point may be dropped: its weight is then < e^-80 of the largest, and all
// the dropped points together < N·e^-80 ≈ N·1.8e-35 of the sum, below double's rounding for any N that fits.
inline constexpr double kFarCut = 80.0;
// The most screen candidates a far row lists before it stops listing and screens every point again in the second
// pass (points spread evenly in logit, e.g. data on a sphere around the query): 1 MiB a thread.
inline constexpr size_t kFarCandidates = size_t{1} << 16;

// Pass 1 of a far row: the points that may pass the final cut, lo_max − kFarCut, where lo_max is the largest lower
// bound of a logit (ascending j: the order the exact sums take). listed = false: too many to list.
struct FarCandidates {
  struct Point {
    int64_t j;
    double hi;
  };
  std::vector<Point> points;
  bool listed = true;

  void offer(int64_t j, double hi, double lo_max) {
    if (!listed) return;
    points.push_back({j, hi});
    if (points.size() < kFarCandidates) return;
    std::erase_if(points, [&](const Point& p) { return p.hi < lo_max - kFarCut; });
    if (points.size() >= kFarCandidates / 2) listed = false, points.clear(), points.shrink_to_fit();
  }
};

// Every point through the screen, a tile at a time (the bounds of the layout and weights of the cloud), raising
// lo_max as it goes; visit(j, hi) for each point of nonzero weight not yet below lo_max − kFarCut. Run again with
// the final lo_max, it visits exactly the points that pass the final cut.
template <typename T, typename Visit>
void far_screen(const FarScreen<T>& screen, double& lo_max, Visit&& visit) {
  const Cloud<T>& c = screen.c;
  alignas(64) double lo[kTile], hi[kTile];
  for (int64_t j0 = 0; j0 < c.N; j0 += kTile) {
    const int64_t n = std::min(kTile, c.N - j0);
    const bool w = c.log_w != nullptr;
    switch (c.yT ? c.d : 0) {
      case 1: w ? screen.template block<1, true>(j0, n, lo, hi) : screen.template block<1, false>(j0, n, lo, hi); break;
      case 2: w ? screen.template block<2, true>(j0, n, lo, hi) : screen.template block<2, false>(j0, n, lo, hi); break;
      case 3: w ? screen.template block<3, true>(j0, n, lo, hi) : screen.template block<3, false>(j0, n, lo, hi); break;
      case 4: w ? screen.template block<4, true>(j0, n, lo, hi) : screen.template block<4, false>(j0, n, lo, hi); break;
      default: w ? screen.template rows<true>(j0, n, lo, hi) : screen.template rows<false>(j0, n, lo, hi);
    }
    double m = lo_max;
#pragma omp simd reduction(max : m)
    for (int64_t jj = 0; jj < n; ++jj) m = std::max(m, lo[jj]);
    lo_max = m;
    const double cut = m - kFarCut;
    for (int64_t jj = 0; jj < n; ++jj)   // !(<): a NaN bound keeps its point; hi = −inf (zero weight) never passes
      if (!(hi[jj] < cut) && hi[jj] > -std::numeric_limits<double>::infinity()) visit(j0 + jj, hi[jj]);
  }
}

// D and L of a far row (csrc/common/far.h: the reasoning and the bound), recomputed: logits in double-double, one
// pass with an online maximum, compensated double sums, over the points FarScreen cannot rule out. The weights are
// the old full pass's to e^-80 of the largest; D moves by at most N·e^-80·max|y| (bit for bit the old D on every
// far row tested). Only rows whose every logit is below lw_max − (d + 16) come here: in sampling, never in
// practice.
template <typename T>
void posterior_row_far(const Cloud<T>& c, const T* __restrict x, double alpha, double sigma, T* __restrict D, T* L) {
  const int64_t d = c.d;
  const double cdbl = alpha * alpha * c.bandwidth + sigma * sigma;
  const double inv2c = clamped_inv2c<T>(cdbl);
  const double floor = static_cast<double>(std::numeric_limits<T>::max());
  const far::Diff diff_of(alpha);
  const FarScreen<T> screen(c, x, alpha, diff_of, inv2c, floor);

  FarCandidates cand;
  double lo_max = -std::numeric_limits<double>::infinity();
  far_screen(screen, lo_max, [&](int64_t j, double hi) { cand.offer(j, hi, lo_max); });

  // Pass 2: the exact logits and sums over the points that pass the final cut.
  std::vector<double> acc(2 * d, 0.0);                 // [0, d): Σ e_j y_j, [d, 2d): their compensations
  far::DD m{-std::numeric_limits<double>::infinity(), 0.0};
  double s = 0.0, sc = 0.0;
  auto add = [&](int64_t j) {
    far::DD dist{0.0, 0.0};
    for (int64_t k = 0; k < d; ++k)
      far::sq_add(dist, diff_of(static_cast<double>(x[k]), static_cast<double>(c.at(j, k))));
    const far::DD l = far::far_logit_of(screen.log_w(j), dist, inv2c, floor);
    if (!(l.hi > -std::numeric_limits<double>::infinity())) return;
    if (far::dd_greater(l, m)) {                          // a new maximum: rescale what was summed
      const double r = m.hi > -std::numeric_limits<double>::infinity() ? far::dd_exp_diff(m, l) : 0.0;
      s *= r; sc *= r;
      for (int64_t k = 0; k < 2 * d; ++k) acc[k] *= r;
      m = l;
    }
    const double e = far::dd_exp_diff(l, m);
    far::comp_add(s, sc, e);
    for (int64_t k = 0; k < d; ++k) far::comp_add(acc[k], acc[d + k], e * static_cast<double>(c.at(j, k)));
  };
  const double cut = lo_max - kFarCut;
  if (cand.listed) {
    for (const auto& p : cand.points)
      if (!(p.hi < cut)) add(p.j);
  } else {
    far_screen(screen, lo_max, [&](int64_t j, double) { add(j); });
  }
  const double shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cdbl : 1.0;
  const double pull = c.bandwidth > 0 ? alpha * c.bandwidth / cdbl : 0.0;
  const double sum = s + sc;
  for (int64_t k = 0; k < d; ++k)
    D[k] = static_cast<T>((acc[k] + acc[d + k]) / sum * shrink + pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(m.hi + (m.lo + std::log(sum)));
}

// D (DD = d = 1..4 values) and L of one query x against the whole cloud. `buf` holds kTile scratch values of T,
// `acc` d doubles.
// Row-invariant: everything here depends on this query alone (one query per thread), so a row's result
// never depends on which other rows are computed in the same call.
template <typename T, int DD>
void posterior_row_d(const Cloud<T>& c, const T* __restrict x, double alpha, double sigma, T* __restrict buf,
                     double* __restrict acc, T* __restrict D, T* L) {
  static_assert(DD >= 1 && DD <= 4, "the fused small-d loops; larger d runs posterior_rows");
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
  double lw_max = c.log_w ? -std::numeric_limits<double>::infinity() : 0.0;   // for the far-row test
  std::fill(acc, acc + d, 0.0);
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const int64_t n = std::min(kTile, N - j0);
    if (c.log_w) lw_max = std::max(lw_max, max_log_weight(c.log_w + j0, n));
    const double tmax = c.log_w
        ? tile_logits_small<T, DD, true>(c.yT, N, j0, n, x, c1, c2, inv2c, c.log_w + j0, buf)
        : tile_logits_small<T, DD, false>(c.yT, N, j0, n, x, c1, c2, inv2c, nullptr, buf);
    if (!(tmax > -std::numeric_limits<double>::infinity())) continue;   // a tile of zero-weight points
    const double m_new = std::max(m, tmax);
    const double rescale = std::exp(m - m_new);                      // 0 on the first tile
    T dots[DD];
    const T tsum = tile_exp_dot_small<T, DD>(c.yT, N, j0, n, static_cast<T>(m_new), buf, dots);
    s = s * rescale + static_cast<double>(tsum);
    for (int k = 0; k < DD; ++k) acc[k] = acc[k] * rescale + static_cast<double>(dots[k]);
    m = m_new;
  }
  if (far::is_far(m, lw_max, d)) return posterior_row_far(c, x, alpha, sigma, D, L);
  const double shrink = c.bandwidth > 0 ? 1.0 - alpha * alpha * c.bandwidth / cdbl : 1.0;
  const double pull = c.bandwidth > 0 ? alpha * c.bandwidth / cdbl : 0.0;
  for (int64_t k = 0; k < d; ++k) D[k] = static_cast<T>(acc[k] / s * shrink + pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<T>(m + std::log(s));
}

// d <= 4 (use_blocked routes larger d elsewhere); any other d gets the exact double-double pass, never a read of
// the transposed copy the glue makes only for d <= 4.
template <typename T>
void posterior_row(const Cloud<T>& c, const T* __restrict x, double alpha, double sigma, T* __restrict buf,
                   double* __restrict acc, T* __restrict D, T* L) {
  switch (c.d) {
    case 1: return posterior_row_d<T, 1>(c, x, alpha, sigma, buf, acc, D, L);
    case 2: return posterior_row_d<T, 2>(c, x, alpha, sigma, buf, acc, D, L);
    case 3: return posterior_row_d<T, 3>(c, x, alpha, sigma, buf, acc, D, L);
    case 4: return posterior_row_d<T, 4>(c, x, alpha, sigma, buf, acc, D, L);
    default: return posterior_row_far(c, x, alpha, sigma, D, L);
  }
}

}  // namespace fastdiff::cpu
