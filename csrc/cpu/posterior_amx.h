// The screened posterior's dot products on Intel AMX (issue 15): the first pass of posterior_screened.h, x·y_j of
// 16 queries with every point, as bf16 tile products accumulated in float, with a bound on their error; then the
// same anchor, pruning rule and exact rescoring (finish_row) as there.
//
// Why: the AVX-512 screen spends one float FMA per (query, point, dimension) on the dots and ~15 double
// operations per (query, point) on the bound (perf at d = 64: 43% and 57% of screen_block). One TDPBF16PS does
// 16×16×32 multiply-adds in ~16 cycles, 16x the float FMA rate, and the bound below costs 3 float FMAs per 16
// pairs. The price is precision: bf16 keeps 8 significant bits, so the dot errs by up to ~2⁻⁷·|αx|·|y| where the
// float dot erred by ~2⁻¹⁷·|αx|·|y|. At σ = 0.5 that slack is < 2 nats at d = 64, against the ~200 nats that
// separate a query's cluster of points from the next. A pair the slack keeps is rescored exactly: precision costs
// speed, never accuracy.
//
// Error bound (u_b = 2⁻⁸ for bf16, u = 2⁻²⁴ for float, K = the dimensions screened so far, a multiple of 32;
// x, y and their norms below are over those dimensions, whose partial distance bounds the whole one from below):
// - The queries go in as xa = fl(fl(α)·x), both operands rounded to bf16 (nearest even). Each product
//   bf(xa_k)·bf(y_k) is then within (2u_b + u_b² + 4u)·|α x_k y_k| of α x_k y_k, is exact in float, and the K
//   products are summed in float in some order (≤ γ_K·Σ|products|, any order). Denormal inputs and results may be
//   flushed: ≤ 2⁻¹²⁴ per operation. By Cauchy–Schwarz the dot g satisfies
//     |g − α x·y| ≤ cd·|αx|·|y| + e0,   cd = 2u_b + u_b² + 4u + 1.01·γ_K,   e0 = 2⁻¹²⁰·(K + √K·(|αx| + |y|)).
// - So |x − αy|² ≥ P = |x|²(1 − 1e-12) + α²|y|²(1 − 1e-12) − 2g − 2cd·|αx|·|y| − 2e0: posterior_screened.h's
//   lower bound with its float-dot slack replaced by this one. A pair is pruned by that file's rule,
//   P > f²(ρ + y_term·|y|)², which expands to  H = Q + A·|y|² − S·|y| − 2g > 0  with Q, A, S per row.
// - H is evaluated in float as fma(−2, g, fma(A', |y|², fma(−S', |y|, Q'))), each coefficient moved against
//   pruning by 6u of the magnitudes in play (|Q| + |A|·|y|² + S·|y| + 2|g|, with |g| ≤ 1.02·|αx|·|y| + e0): that
//   covers the roundings of the coefficients, of |y|² and |y| to float and of the three FMAs. So the float test
//   prunes only pairs the exact rule prunes.
// - Overflow and underflow: a row with |αx| > kAmxMaxNorm, a coefficient beyond kAmxMaxCoef, or 0 < |α| below
//   float's smallest normal (fl(α) would not be within u of α) goes to the blocked kernel, and a point with
//   |y| > kAmxMaxNorm carries NaN norms, which no test prunes (NaN > 0 is false). So |2g| ≤ 2.04e36 and each FMA
//   rounds once: a term that overflows can only make H −inf (the pair is kept) unless H itself is beyond float,
//   which |2g| ≤ 2.04e36 rules out. |y|² or |y| rounded into float's denormal range err by ≤ 2⁻¹⁴⁹ absolute: Q
//   carries (|A| + S)·2⁻¹⁴⁹ more margin.
// Bits: a row's D and L equal posterior_screened.h's whenever both screen it (neither finds it dense): the exact
// stage sums exactly the survivors whose logit is ≥ m − T, in index order, and both screens keep all of those.
// (Up to a tie: a survivor whose exact logit falls within an ulp of the cut l_a − T, which the two screens place
// differently since their anchors may differ, can be left out by one and kept by the other; its weight is
// e^{−T} of the largest either way.)
// Row invariance: each element of a C tile is one query's dot with one point, and the anchor, the test and the
// dense decision read that query's lane only.
// The int8 engine: where AMX is not in use, an AVX-512 build runs this pass with 8-bit integer dot products
// (int8_sweep: its own bound, which puts the dots above α x·y up to float rounding); the test, the levels, the
// gather and the exact stages are the same (screen_engine says where it runs and why).
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "buffer_pool.h"
#include "kernels.h"
#include "once.h"
#include "posterior_blocked.h"
#include "posterior_row.h"
#include "posterior_screened.h"
#include "simd_vec.h"

// The 16-query screen needs AVX-512 (F, BW, VL, DQ, VBMI2 for the 16-bit survivor gather and VNNI for the int8
// engine: Ice Lake, Zen 4 and later); its AMX engine needs AMX-BF16 and AVX512-BF16 too, and Linux for the tile
// state.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VBMI2__) && defined(__AVX512VNNI__)
#define FASTDIFF_CPU_SCREEN16 1
#include <immintrin.h>

#include "posterior_narrow.h"
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define FASTDIFF_CPU_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#if !defined(FASTDIFF_CPU_AMX) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>   // amx_unavailable_reason asks the CPU itself (any x86 build)
#endif

namespace fastdiff::cpu {

inline constexpr int kAmxRows = 16;          // queries per block: the columns of a C tile
inline constexpr int kAmxK = 32;             // bf16 per tile row: the dimensions of one TDPBF16PS
inline constexpr int kAmxSweep = 64;         // points per sweep step: 4 C tiles of 16
inline constexpr int64_t kAmxMinD = 16;      // below, the blocked kernel (a tile's 32 dimensions mostly padding)
inline constexpr int64_t kNarrowDenseShare = 2;   // below kScreenMinD a row with more than N / 2 survivors is dense
                                                  // (N / 3 measured 5-10% slower at d = 16, σ = 0.5)
inline constexpr int64_t kNarrowSample = 8;       // below kScreenMinD the pruning test runs on every 8th point first
inline constexpr int64_t kInt8ScreenEndD = int64_t(1) << 16;   // the int8 engine below (screen_engine; its
                                                                // int32 sums hold 255·127·d)
inline constexpr int64_t kAmxFirstDims = 256;   // the first screen's dimensions (amx_screen_block)
inline constexpr int64_t kAmxMaxPoints = int64_t(1) << 18;   // the dots of a block are kept: 16 floats a point
inline constexpr double kAmxMaxNorm = 1e18;  // |αx|·|y| ≤ 1e36: no float overflow in the dots
inline constexpr double kAmxMaxCoef = 1e36;

// The nearest float at or above x ≥ 0 (or +inf): a bound stored in float stays a bound.
inline float float_up(double x) { return static_cast<float>(x * (1.0 + std::ldexp(1.0, -22)) + std::ldexp(1.0, -149)); }

// Why this process cannot use AMX, or nullptr when it can. Asked once: the build must enable AMX-BF16 (its -march),
// the CPU must have it and Linux must grant this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM).
inline const char* amx_unavailable_reason() {
#ifndef FASTDIFF_CPU_AMX
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // A CPU without AMX is the reason whatever the build (AMX-BF16: CPUID leaf 7, EDX bit 22).
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22))) return "this CPU has no AMX-BF16";
#endif
  return "this build's -march does not enable AMX-BF16 with AVX512-BF16, VBMI2 and VNNI (FASTDIFF_CPU_ARCH=native "
         "on a CPU with AMX enables them)";
#else
  static const char* const reason = []() -> const char* {
    if (!__builtin_cpu_supports("amx-bf16")) return "this CPU has no AMX-BF16";
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0)
      return "Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)";
    return nullptr;
  }();
  return reason;
#endif
}

// The switch (on unless FASTDIFF_CPU_AMX=0 at import): tests run both paths in one process.
inline std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("FASTDIFF_CPU_AMX");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return on;
}

inline bool amx_in_use() { return amx_switch().load(std::memory_order_relaxed) && !amx_unavailable_reason(); }

// The engine of the 16-query screen (AmxCloud), picked per call by screen_engine.
enum class Engine : uint8_t {
  none,   // no 16-query screen: the AVX-512 screen of posterior_screened.h from kScreenMinD, the blocked kernel
  amx,    // bf16 tile products (TDPBF16PS)
  int8,   // 8-bit integer dot products (VPDPBUSD) with a per-point and per-query scale (int8_sweep)
};

// Where AMX is not in use (an AVX-512 CPU without it, or turned off), the same screen runs with 8-bit integer dot
// products: VPDPBUSD does 64 multiply-adds at the float FMA's rate (16), where VDPBF16PS, the AVX-512 bf16 dot,
// runs at half that rate on Sapphire Rapids (2 cycles an instruction against 0.5: benchmarks/dot_product_rates.cpp).
// It replaces the blocked kernel alone below kScreenMinD (where posterior_screened.h's bound costs as much as a
// point) and that screen above (its float dots and double bound per 64-dimension chunk). Xeon with AMX turned
// off, bench data, σ = 0.5, 2 threads, against those (and against the float-FMA engine this one replaced below
// d = 128):
// d = 16 7.0 -> 6.2 ms, d = 40 2.3 -> 1.5, d = 64 3.3 -> 1.8, d = 96 4.6 -> 2.2, d = 128 5.4 -> 2.6,
// d = 256 2.1 -> 1.5, d = 784 1.5 -> 0.82, d = 3072 1.6 -> 1.03 (then 0.70 and 0.92 with the vector query
// packing and the inline-asm VPDPBUSD); dense rows (σ = 4) within noise.
inline bool int8_screen_built() {
#ifdef FASTDIFF_CPU_SCREEN16
  return true;
#else
  return false;
#endif
}

template <typename T>
inline Engine screen_engine(const Cloud<T>& c) {
  // float only (a double call needs more than bf16 or 8 bits can screen); log-weights keep the AVX-512 screen
  // (their per-point threshold is not in the three-FMA test)
  if (sizeof(T) != 4 || c.log_w || c.d < kAmxMinD || c.N > kAmxMaxPoints) return Engine::none;
  if (amx_in_use()) return Engine::amx;
  return int8_screen_built() && c.d < kInt8ScreenEndD ? Engine::int8 : Engine::none;
}

#ifdef FASTDIFF_CPU_SCREEN16

// The screens' dimension prefixes: [0, k0), [0, 2k0), [0, 4k0), ... up to every dimension (see amx_screen_block).
inline std::vector<int64_t> amx_screen_ends(int64_t kp) {
  std::vector<int64_t> ends;
  for (int64_t k = std::min(kp, kAmxFirstDims);; k = std::min(kp, 2 * k)) {
    ends.push_back(k);
    if (k == kp) return ends;
  }
}

// The int8 engine's quantisation of one vector (a point's or a query's dimensions of a level), shared by pack_int8
// and int8_pack_queries: scale = max/127 (1 for a zero vector), bytes q = v·(127/max) rounded to nearest (the
// MXCSR default) and clamped to ±127, and the residual v − scale·q as one FMA in float (within u·|r| + 2⁻¹⁴⁹ of
// its exact value). Any q would do: the bounds use the residual of the q chosen.
struct ByteScale {
  float scale;
  __m512 inv, neg_scale;
  explicit ByteScale(double max)
      : scale(max > 0.0 ? static_cast<float>(max / 127.0) : 1.0f),
        inv(_mm512_set1_ps(max > 0.0 ? static_cast<float>(std::min(127.0 / max, 3e38)) : 0.0f)),
        neg_scale(_mm512_set1_ps(-scale)) {}
  __m512i bytes(__m512 v) const {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    return _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
  }
  __m512 residual(__m512 v, __m512i q) const { return _mm512_fmadd_ps(neg_scale, _mm512_cvtepi32_ps(q), v); }
};

// The largest |a·v_k| over v's first n floats (a = 1: exact; the query's fl(fl(α)·x) otherwise).
inline double max_abs_scaled(const float* v, int64_t n, float a) {
  const __m512 sign = _mm512_set1_ps(-0.0f), av = _mm512_set1_ps(a);
  __m512 top = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __m512 vk = _mm512_maskz_loadu_ps(simd::first_lanes16(n - k), v + k);
    top = _mm512_max_ps(top, _mm512_andnot_ps(sign, _mm512_mul_ps(av, vk)));
  }
  return _mm512_reduce_max_ps(top);
}

// The cloud as each engine reads it, and its norms in float over each screen's dimensions, packed lazily, a screen
// level and a sweep group of 64 points at a time, by whichever thread first needs it (once.h): at d = 3072 the
// bench's rows decide within 512 dimensions, and packing all 3072 cost as much as the screen.
// - AMX: the A operand in bf16 (zeros past d and N), [groups][kp / 32][64 points][32]: the 64 points of a sweep
//   group, 32 dimensions each, are one 4 KB run, so each A tile (16 points) is 1 KB at a stride of 64 bytes.
//   Row-major [np][kp] put a tile's 16 rows kp·2 bytes apart (6 KB at d = 3072): 16 lines on 16 pages per load,
//   and the tile products stalled on them.
// - int8: each point's dimensions of a level as y ≈ s·q, q = round(y/s) in [−127, 127], s = max|y|/127 over the
//   level, row-major [np][kp] (kp = d rounded up to 4), with s, 128·Σq and bounds on the level's |y| and on the
//   residual |y − s·q| (pack_int8; int8_sweep says how they are used).
struct AmxCloud {
  const float* src;
  Engine engine;
  int64_t d, N, kp, np, groups;
  std::vector<int64_t> ends;   // amx_screen_ends(kp)
  std::vector<double> mean_y;  // below kScreenMinD: the cloud's mean point and mean |y|² (amx_pass's dense guess)
  double mean_yy = 0.0;
  PooledArray<uint16_t> y;     // AMX: [groups][kp / 32][64][32] (slice())
  PooledArray<int8_t> q;       // int8: [np][kp]
  PooledArray<float> qscale;   // int8, [ends][np]: s over each level's own dimensions
  PooledArray<float> qres;     //   ≥ |y − s·q| over them
  PooledArray<float> qnorm;    //   ≥ |y| + |y − s·q| over them (≥ |s·q|)
  PooledArray<int32_t> qoff;   //   128·Σq over them (the queries' bytes carry +128: int8_sweep)
  PooledArray<double> sums;    // [ends][np]: |y|² over [0, ends[l]) in double
  PooledArray<float> yy, ny;   // [ends][np]: the same and |y| in float (NaN past kAmxMaxNorm: never pruned)
  std::unique_ptr<std::atomic<uint8_t>[]> state;   // [ends][groups] (once.h)
  AmxCloud(const Cloud<float>& c, Engine engine_)
      : src(c.y), engine(engine_), d(c.d), N(c.N),
        kp(engine_ == Engine::int8 ? (c.d + 3) / 4 * 4 : (c.d + kAmxK - 1) / kAmxK * kAmxK),
        np((c.N + kAmxSweep - 1) / kAmxSweep * kAmxSweep), groups(np / kAmxSweep), ends(amx_screen_ends(kp)),
        y(engine_ == Engine::amx ? np * kp : 0), q(engine_ == Engine::int8 ? np * kp : 0),
        qscale(per_level(Engine::int8)), qres(per_level(Engine::int8)), qnorm(per_level(Engine::int8)),
        qoff(per_level(Engine::int8)), sums(ends.size() * np), yy(ends.size() * np), ny(ends.size() * np),
        state(new std::atomic<uint8_t>[ends.size() * groups]()) {
    if (d >= kScreenMinD) return;
    mean_y.assign(d, 0.0);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < d; ++k) {
        const double v = c.y[j * d + k];
        mean_y[k] += v;
        mean_yy += v * v;
      }
    for (double& m : mean_y) m /= static_cast<double>(N);
    mean_yy /= static_cast<double>(N);
  }
  // a [ends][np] array's length when the engine is e, else 0 (for the constructor: ends and np already set)
  size_t per_level(Engine e) const { return engine == e ? ends.size() * np : 0; }
  // Level l's dimensions of the 64 points of group g, and their norms over [0, ends[l]).
  void ensure(size_t l, int64_t g) const {
    once(state[l * groups + g], [&] {
      if (l > 0) ensure(l - 1, g);
      pack(l, g);
    });
  }
  // ensure(l, g) for a sweep about to read group g: when another thread is packing g, pack the next unclaimed
  // groups of the level meanwhile instead of waiting (once_helping)
  void ensure_sweep(size_t l, int64_t g) const {
    once_helping(state.get() + l * groups, g, groups, [&](int64_t h) {
      if (l > 0) ensure(l - 1, h);
      pack(l, h);
    });
  }
  const float* level_yy(size_t l) const { return yy.get() + l * np; }
  // the 64 × 32 block of group g's points over dimensions [k, k + 32), k a multiple of 32
  uint16_t* slice(int64_t g, int64_t k) const { return y.get() + ((g * (kp / kAmxK) + k / kAmxK) * kAmxSweep) * kAmxK; }
  const float* level_ny(size_t l) const { return ny.get() + l * np; }
  // whether survivor lists fit 16-bit indices (gather_survivors16)
  bool short_index() const { return np <= (int64_t(1) << 16); }

 private:
  void pack(size_t l, int64_t g) const {
    if (engine == Engine::int8) return pack_int8(l, g);
#ifdef FASTDIFF_CPU_AMX
    const int64_t k_begin = l ? ends[l - 1] : 0, k_end = ends[l];
    for (int64_t j = g * kAmxSweep; j < (g + 1) * kAmxSweep; ++j) {
      const float* row = src + std::min(j, N - 1) * d;   // padding points read nothing (masks of 0)
      // the next point's dimensions: a new page, where the hardware prefetcher would start over
      for (int64_t k = k_begin; k < k_end; k += 16) __builtin_prefetch(row + d + k);
      __m512d acc = _mm512_setzero_pd();
      for (int64_t k = k_begin; k < k_end; k += kAmxK) {
        const int64_t n = j < N ? std::clamp<int64_t>(d - k, 0, kAmxK) : 0;   // padding points are zeros
        const __m512 a = _mm512_maskz_loadu_ps(simd::first_lanes16(n), row + k);
        const __m512 b = _mm512_maskz_loadu_ps(simd::first_lanes16(n - 16), row + k + 16);
        _mm512_storeu_si512(slice(g, k) + (j - g * kAmxSweep) * kAmxK, (__m512i)_mm512_cvtne2ps_pbh(b, a));
        acc = simd::add_squares(simd::add_squares(acc, b), a);
      }
      set_norms(l, j, (l ? sums[(l - 1) * np + j] : 0.0) + _mm512_reduce_add_pd(acc));
    }
#endif
  }
  // Level l of group g for the int8 engine: per point, s = max|y_k|/127 over the level's dimensions (1 when they
  // are all 0) and q_k = y_k·(127/max) rounded to nearest and clamped to ±127; then the residual e_k = y_k − s·q_k
  // as one FMA in float, within u·|e_k| + 2⁻¹⁴⁹ of its exact value. Any q would do: the bound uses the residual
  // of the q chosen. Its squares are summed in float, 16 lanes of ≤ n/16 terms then a tree (≤ γ_{n/16+4} ≤ 1e-3
  // relative for n ≤ 2¹⁶, and ≤ 2⁻¹⁴⁹ absolute per operation in the denormal range), |y|² in double (exact
  // squares, as the other norms). qres ≥ |e| (1e-3 and 1e-6 relative, 2⁻¹⁴⁸·n and 2⁻¹⁴⁸·√n absolute cover those
  // and u), qnorm ≥ |y_l| + |e| (so ≥ |s·q|). |e_k| ≤ 0.5001·s (y_k·inv is within 127·3u of y_k/s), so
  // |e| ≤ |y_l|·√n/253.9, n the level's dimensions: amx_pass's κ.
  void pack_int8(size_t l, int64_t g) const {
    const int64_t k_begin = l ? ends[l - 1] : 0, width = ends[l] - k_begin;   // a multiple of 4
    const int64_t n = std::max<int64_t>(0, std::min(d - k_begin, width));   // the level's real dimensions
    for (int64_t j = g * kAmxSweep; j < (g + 1) * kAmxSweep; ++j) {
      const int64_t nj = j < N ? n : 0;   // padding points are zeros
      const float* row = src + std::min(j, N - 1) * d + k_begin;
      int8_t* out = q.get() + j * kp + k_begin;
      const ByteScale bs(max_abs_scaled(row, nj, 1.0f));
      __m512d yacc = _mm512_setzero_pd();
      __m512 eacc = _mm512_setzero_ps();
      __m512i qsum = _mm512_setzero_si512();
      for (int64_t k = 0; k < width; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(simd::first_lanes16(nj - k), row + k);
        const __m512i qi = bs.bytes(v);
        const __m128i bytes = _mm512_cvtepi32_epi8(qi);
        if (width - k >= 16) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), bytes);
        else _mm_mask_storeu_epi8(out + k, simd::first_lanes16(width - k), bytes);   // not past the row
        qsum = _mm512_add_epi32(qsum, qi);
        const __m512 e = bs.residual(v, qi);
        yacc = simd::add_squares(yacc, v);
        eacc = _mm512_fmadd_ps(e, e, eacc);
      }
      const double ys = _mm512_reduce_add_pd(yacc);
      const double n_sq = static_cast<double>(nj);
      const double res = std::sqrt(static_cast<double>(_mm512_reduce_add_ps(eacc)) * (1.0 + 1e-3) +
                                   n_sq * std::ldexp(1.0, -148)) * (1.0 + 1e-6) +
                         std::sqrt(n_sq) * std::ldexp(1.0, -148);
      const size_t at = l * np + j;
      qscale[at] = bs.scale;
      qres[at] = float_up(res);
      qnorm[at] = float_up((std::sqrt(ys) + res) * (1.0 + 1e-6));
      qoff[at] = 128 * _mm512_reduce_add_epi32(qsum);
      set_norms(l, j, (l ? sums[(l - 1) * np + j] : 0.0) + ys);
    }
  }
  void set_norms(size_t l, int64_t j, double s) const {
    sums[l * np + j] = s;
    const double n = std::sqrt(s);
    const bool huge = !(n <= kAmxMaxNorm);
    yy[l * np + j] = huge ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(s);
    ny[l * np + j] = huge ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(n);
  }
};

// Per-thread scratch for one block of kAmxRows queries.
struct AmxWork {
  PooledArray<uint16_t> xb;                    // AMX: [kp / 32][16 pairs][16 queries][2]: the B operand
  PooledArray<uint8_t> xq;                     // int8 engine: [level dims / 4][16 queries][4] p + 128
  alignas(64) float qt[kAmxRows], qa[kAmxRows], qb[kAmxRows];   // int8: per query t, ≥ |αx − t·p|, ≥ |αx|
  double qa_sum[kAmxRows];                     //   Σ qa over the levels so far (amx_pass's coarse test)
  PooledArray<float> dots;                     // [np][16]: point j's dots with the block's queries
  PooledArray<uint16_t> keep;                  // [np]: point j's pruning test, bit r for query r
  PooledArray<int32_t> found;                  // [np + 16]: one query's survivors as they are gathered (int32,
                                               // or uint16_t in the same memory when np ≤ 2¹⁶)
  std::vector<int64_t> cand[kAmxRows];         // each query's surviving points, ascending (d ≥ kScreenMinD)
  int64_t near_stride;                         // np + 32
  PooledArray<int32_t> near;                   // d < kScreenMinD: [kAmxRows][np + 32] the same as a NarrowList's
  int64_t near_n[kAmxRows] = {};               //   indices (uint16_t when N ≤ 2¹⁶, else int32_t), and their count
  Rescore rescore;                             // finish_row's scratch
  explicit AmxWork(const AmxCloud& ac)
      : xb(ac.engine == Engine::amx ? ac.kp / 2 * kAmxRows * 2 : 0),
        xq(ac.engine == Engine::int8 ? ac.kp * kAmxRows : 0),
        dots(ac.np * kAmxRows),
        keep(ac.np), found(ac.np + 16), near_stride(ac.np + 32),
        near(ac.d < kScreenMinD ? kAmxRows * near_stride : 0) {
    rescore.acc.resize(ac.d);
  }
  int32_t* near_row(int r) const { return near.get() + r * near_stride; }
};

#ifdef FASTDIFF_CPU_AMX

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0–3: C (16 points × 16 queries, float); 4: B (the queries' 32 dimensions, pairs); 5, 6: A (16 points).
inline void amx_configure() {
  AmxTileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The block's queries α_r·x_r over dimensions [k_begin, k_end) in the B layout: for 32 dimensions kb·32 + 2p +
// {0, 1}, row p of the tile holds the pair of every query r at dword r. A partial block repeats its last row.
inline void amx_pack_queries(const AmxCloud& ac, const float* const* xs, const double* alpha, int64_t k_begin,
                             int64_t k_end, AmxWork& w) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(kAmxRows));
  const int64_t d = ac.d;
  for (int r = 0; r < kAmxRows; ++r) {
    const __m512 a = _mm512_set1_ps(static_cast<float>(alpha[r]));
    for (int64_t k = k_begin; k < k_end; k += kAmxK) {
      const int64_t n = std::clamp<int64_t>(d - k, 0, kAmxK);
      const __m512 x0 = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(simd::first_lanes16(n), xs[r] + k));
      const __m512 x1 = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(simd::first_lanes16(n - 16), xs[r] + k + 16));
      int* tile = reinterpret_cast<int*>(w.xb.get() + k / kAmxK * (kAmxK * kAmxRows)) + r;
      _mm512_i32scatter_epi32(tile, lanes, (__m512i)_mm512_cvtne2ps_pbh(x1, x0), 4);
    }
  }
}

#endif   // FASTDIFF_CPU_AMX

// The anchor search of a level-0 sweep, shared by both engines: per query the largest 2g − α²|y|² (the smallest
// approximate distance), a sweep group of 64 points at a time, then the first point that reaches it.
struct AnchorSearch {
  alignas(64) float a2[kAmxRows];
  __m512 neg_a2, best;        // per query: the largest value so far
  __m512i best_group;         // the first sweep group that reached it
  explicit AnchorSearch(const double* alpha) {
    for (int r = 0; r < kAmxRows; ++r) a2[r] = static_cast<float>(alpha[r] * alpha[r]);
    neg_a2 = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_load_ps(a2));
    best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    best_group = _mm512_set1_epi32(-1);
  }
  // the group at p0 (out: its dots, 64 points × 16 queries): its largest value per query (four max chains;
  // max(v, acc) keeps acc when v is NaN, as a compare would), then whether it beats the best (strict >). The
  // point inside the group is found at the end: one value and one index tracked per point cost two more
  // instructions each.
  void group(const float* out, const float* yy, int64_t p0, int64_t N) {
    const int64_t n = std::min<int64_t>(kAmxSweep, N - p0);
    if (n <= 0) return;
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 gmax[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
    for (int64_t l0 = 0; l0 < n; l0 += 4)
      for (int q = 0; q < 4; ++q) {
        const int64_t l = l0 + q;
        if (l >= n) break;
        const __m512 g = _mm512_load_ps(out + l * kAmxRows);
        gmax[q] = _mm512_max_ps(_mm512_fmadd_ps(neg_a2, _mm512_set1_ps(yy[p0 + l]), _mm512_add_ps(g, g)), gmax[q]);
      }
    const __m512 m = _mm512_max_ps(_mm512_max_ps(gmax[0], gmax[1]), _mm512_max_ps(gmax[2], gmax[3]));
    const __mmask16 better = _mm512_cmp_ps_mask(m, best, _CMP_GT_OQ);
    best = _mm512_mask_mov_ps(best, better, m);
    best_group = _mm512_mask_mov_epi32(best_group, better, _mm512_set1_epi32(static_cast<int32_t>(p0)));
  }
  // each query's anchor: the first point of its best group with the best value (the same float arithmetic as
  // above, so exactly one match exists); −1 when no point has a finite value
  void resolve(const float* dots, const float* yy, int64_t N, int32_t* best_point) const {
    alignas(64) float top[kAmxRows];
    alignas(64) int32_t grp[kAmxRows];
    _mm512_store_ps(top, best);
    _mm512_store_si512(grp, best_group);
    for (int r = 0; r < kAmxRows; ++r) {
      best_point[r] = -1;
      const int64_t p0 = grp[r];
      for (int64_t j = p0; p0 >= 0 && j < std::min<int64_t>(p0 + kAmxSweep, N); ++j) {
        const float g = dots[j * kAmxRows + r];
        if (std::fma(-a2[r], yy[j], g + g) == top[r]) {
          best_point[r] = static_cast<int32_t>(j);
          break;
        }
      }
    }
  }
};

#ifdef FASTDIFF_CPU_AMX

// dots[j][r] += the bf16 dot of query r with point j over screen `level`'s new dimensions [k_begin, k_end), for
// every point (dots start from 0 at level 0; reloading a float tile is exact, so the sums are those of one sweep
// over [0, k_end)). With best_point, each query's anchor candidate too (AnchorSearch).
inline void amx_sweep(const AmxCloud& ac, size_t level, const double* alpha, AmxWork& w, int32_t* best_point) {
  const int64_t N = ac.N, k_begin = level ? ac.ends[level - 1] : 0, k_end = ac.ends[level];
  const float* yy = ac.level_yy(level);
  const uint16_t* xb = w.xb.get();
  float* dots = w.dots.get();
  AnchorSearch anchor(alpha);
  amx_configure();
  for (int64_t p0 = 0; p0 < ac.np; p0 += kAmxSweep) {
    ac.ensure_sweep(level, p0 / kAmxSweep);
    asm volatile("" ::: "memory");   // GCC's _tile_loadd declares no memory input: order it after the packing
    float* out = dots + p0 * kAmxRows;
    if (k_begin == 0) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    } else {
      _tile_loadd(0, out, 64);
      _tile_loadd(1, out + 256, 64);
      _tile_loadd(2, out + 512, 64);
      _tile_loadd(3, out + 768, 64);
    }
    for (int64_t k = k_begin; k < k_end; k += kAmxK) {
      const uint16_t* y0 = ac.slice(p0 / kAmxSweep, k);
      _tile_loadd(4, xb + k * kAmxRows, 64);
      _tile_loadd(5, y0, 64);
      _tile_dpbf16ps(0, 5, 4);
      _tile_loadd(6, y0 + 16 * kAmxK, 64);
      _tile_dpbf16ps(1, 6, 4);
      _tile_loadd(5, y0 + 32 * kAmxK, 64);
      _tile_dpbf16ps(2, 5, 4);
      _tile_loadd(6, y0 + 48 * kAmxK, 64);
      _tile_dpbf16ps(3, 6, 4);
    }
    _tile_stored(0, out, 64);
    _tile_stored(1, out + 256, 64);
    _tile_stored(2, out + 512, 64);
    _tile_stored(3, out + 768, 64);
    if (best_point) anchor.group(out, yy, p0, N);
  }
  _tile_release();
  if (best_point) anchor.resolve(dots, yy, N, best_point);
}

#endif   // FASTDIFF_CPU_AMX

// The int8 engine (kAmxMinD ≤ d < kInt8ScreenEndD, any number of levels). Over a level's n dimensions, each
// query's xa = fl(fl(α)·x) is written t·p + f (t = max|xa_k|/127, p_k = xa_k·(127/max) rounded to nearest and
// clamped to ±127, f the residual: one FMA in float, its norm summed in double and rounded up, as the points'
// in pack_int8) and each point's y = s·q + e (pack_int8). Any p and q would do. Then exactly
//   xa·y = t·s·(p·q) + s·(f·q) + xa·e,   |s·(f·q)| ≤ |f|·|s·q| ≤ |f|·qnorm,   |xa·e| ≤ |xa|·qres,
// with p·q an exact integer: VPDPBUSD sums 4 products of an unsigned and a signed byte into int32, so the
// queries go in as p + 128 (1 to 255) and 128·Σq (qoff) comes off. The level adds to dots
//   G = fl(fl(I)·fl(t·s)) + fl(qa·qnorm + fl(qb·qres)),   qa ≥ |f|, qb ≥ |xa|   (int8_sweep)
// an upper bound on xa·y over the level up to the float roundings: with I exact below 2²⁴ (|I| ≤ 127²·n), each
// level's G is within 4u of |t·s·I| + qa·qnorm + qb·qres, and the running sum over L levels within (4 + L)·u of
// the sum of those, which is ≤ (1 + 2κ)·|xa|·|y| over [0, K) (Cauchy–Schwarz over the levels; κ = 2r + r²,
// r = √n/253.9 bounds |f|/|xa| and |e|/|y|, the float roundings of xa from α·x 4u·|αx|·|y| more): amx_pass's cd.
// In float's denormal range each operation errs by ≤ 2⁻¹⁵⁰ more, fl(t·s)'s times |I| ≤ 2¹⁴·n: ≤ 2⁻¹³⁵·n in all,
// inside e0.
// So dots ≥ α x·y − cd·|αx|·|y| − e0: the same bound as the other engines, on an upper estimate, plus room in
// the 6u margins for |G| ≤ 1.02·(1 + 2κ)·|αx|·|y|. The anchor search reads the same G (any point is a valid
// anchor: its logit is computed exactly).
// Why: 64 byte products an instruction at the float FMA's rate, and a level costs n/4 VPDPBUSD and ~8 vector
// operations per (point, 16 queries) against n FMAs. The price: the slack, |f|/|αx| + |e|/|y| ≈ 2⁻⁶ of |αx|·|y|
// for Gaussian coordinates (the max ~3.5 root mean squares, a rounding error 1/√12 of a step), is about twice
// bf16's; a pair it keeps is rescored exactly.
inline void int8_pack_queries(const AmxCloud& ac, const float* const* xs, const double* alpha, size_t level,
                              AmxWork& w) {
  const int64_t k_begin = level ? ac.ends[level - 1] : 0, width = ac.ends[level] - k_begin;   // a multiple of 4
  const int64_t n = std::max<int64_t>(0, std::min(ac.d - k_begin, width));   // the level's real dimensions
  const __m512i bias = _mm512_set1_epi32(128);
  int32_t* xq = reinterpret_cast<int32_t*>(w.xq.get());   // [width / 4][16 queries]: 4 bytes a query
  for (int r = 0; r < kAmxRows; ++r) {
    const float a = static_cast<float>(alpha[r]);
    const float* x = xs[r] + k_begin;
    const ByteScale bs(max_abs_scaled(x, n, a));
    __m512d ff = _mm512_setzero_pd(), xx = _mm512_setzero_pd();
    for (int64_t k = 0; k < width; k += 16) {
      const __m512 xa = _mm512_mul_ps(_mm512_set1_ps(a), _mm512_maskz_loadu_ps(simd::first_lanes16(n - k), x + k));
      const __m512i p = bs.bytes(xa);
      ff = simd::add_squares(ff, bs.residual(xa, p));
      xx = simd::add_squares(xx, xa);
      alignas(16) int32_t word[4];   // dimensions k + 4i .. k + 4i + 3 as bytes p + 128
      _mm_store_si128(reinterpret_cast<__m128i*>(word), _mm512_cvtepi32_epi8(_mm512_add_epi32(p, bias)));
      for (int64_t i = 0; i < 4 && k + 4 * i < width; ++i) xq[(k / 4 + i) * kAmxRows + r] = word[i];
    }
    w.qt[r] = bs.scale;
    w.qa[r] = float_up(std::sqrt(_mm512_reduce_add_pd(ff)) * (1.0 + 1e-6) +
                       std::sqrt(static_cast<double>(n)) * std::ldexp(1.0, -148));
    w.qb[r] = float_up(std::sqrt(_mm512_reduce_add_pd(xx)) * (1.0 + 1e-9));
    w.qa_sum[r] = (level ? w.qa_sum[r] : 0.0) + w.qa[r];
  }
}

// acc += per lane the 4 products of xv's unsigned bytes with the 4 signed bytes at y (VPDPBUSD, the word at y
// broadcast from memory). Inline asm: GCC 12 copies each accumulator out and back around the intrinsic.
inline __m512i dpbusd_broadcast(__m512i acc, __m512i xv, const int32_t* y) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(xv), "m"(*y));
  return acc;
}

// dots[j][r] (+)= G of query r with point j over screen `level`'s dimensions (header), eight points at a time
// (eight int32 accumulators of 16 queries); with best_point, each query's anchor candidate too (AnchorSearch).
inline void int8_sweep(const AmxCloud& ac, size_t level, const double* alpha, AmxWork& w, int32_t* best_point) {
  constexpr int P = 8;
  using Word = int32_t __attribute__((may_alias, aligned(1)));
  const int64_t N = ac.N, k_begin = level ? ac.ends[level - 1] : 0, k_end = ac.ends[level];
  const int64_t n4 = (k_end - k_begin) / 4;
  const size_t at = level * ac.np;
  const float *yy = ac.level_yy(level), *scale = ac.qscale.get() + at, *res = ac.qres.get() + at;
  const float* norm = ac.qnorm.get() + at;
  const int32_t* off = ac.qoff.get() + at;
  const __m512i* xq = reinterpret_cast<const __m512i*>(w.xq.get());
  const __m512 t = _mm512_load_ps(w.qt), qa = _mm512_load_ps(w.qa), qb = _mm512_load_ps(w.qb);
  float* dots = w.dots.get();
  AnchorSearch anchor(alpha);
  for (int64_t p0 = 0; p0 < ac.np; p0 += kAmxSweep) {
    ac.ensure_sweep(level, p0 / kAmxSweep);
    float* out = dots + p0 * kAmxRows;
    for (int64_t l = 0; l < kAmxSweep; l += P) {
      const Word* y[P];
      __m512i acc[P];
      for (int q = 0; q < P; ++q) {
        y[q] = reinterpret_cast<const Word*>(ac.q.get() + (p0 + l + q) * ac.kp + k_begin);
        acc[q] = _mm512_setzero_si512();
      }
      for (int64_t i = 0; i < n4; ++i) {
        const __m512i xv = _mm512_load_si512(xq + i);
        for (int q = 0; q < P; ++q) acc[q] = dpbusd_broadcast(acc[q], xv, y[q] + i);
      }
      for (int q = 0; q < P; ++q) {
        const int64_t j = p0 + l + q;
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[q], _mm512_set1_epi32(off[j])));
        const __m512 bound = _mm512_fmadd_ps(qa, _mm512_set1_ps(norm[j]), _mm512_mul_ps(qb, _mm512_set1_ps(res[j])));
        __m512 g = _mm512_fmadd_ps(dot, _mm512_mul_ps(t, _mm512_set1_ps(scale[j])), bound);
        if (level) g = _mm512_add_ps(_mm512_load_ps(out + (l + q) * kAmxRows), g);
        _mm512_store_ps(out + (l + q) * kAmxRows, g);
      }
    }
    if (best_point) anchor.group(out, yy, p0, N);
  }
  if (best_point) anchor.resolve(dots, yy, N, best_point);
}

// Row r's survivors from the keep masks (bit r of keep[j], zero past N up to np), ascending, into out (room for
// np + 32 indices), stopping once more than cap are found. Returns how many were written (> cap: crowded).
// 16-bit indices (np ≤ 2¹⁶): 32 points per test and compress, half the work of 32-bit ones.
inline int64_t gather_survivors16(const uint16_t* keep, int64_t np, int r, int64_t cap, uint16_t* out) {
  alignas(64) static constexpr uint16_t kIota[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,
                                                     16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const __m512i bit = _mm512_set1_epi16(static_cast<int16_t>(1u << r)), step = _mm512_set1_epi16(32);
  __m512i idx = _mm512_load_si512(kIota);
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < np && n <= cap; j0 += 32) {
    const __mmask32 m = _mm512_test_epi16_mask(_mm512_loadu_si512(keep + j0), bit);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi16(m, idx));
    n += __builtin_popcount(m);
    idx = _mm512_add_epi16(idx, step);
  }
  return n;
}

inline int64_t gather_survivors32(const uint16_t* keep, int64_t np, int r, int64_t cap, int32_t* out) {
  const __m256i bit = _mm256_set1_epi16(static_cast<int16_t>(1u << r));
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t j0 = 0; j0 < np && n <= cap; j0 += 16) {
    const __mmask16 m = _mm256_test_epi16_mask(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keep + j0)), bit);
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32(m, idx));
    n += __builtin_popcount(m);
    idx = _mm512_add_epi32(idx, step);
  }
  return n;
}

// Screen `level` of the rows in `rows`: the dots over [0, ends[level]) (accumulated onto the previous level's) and
// the pruning test on them (a partial distance is a lower bound on the whole one, so pruning on it is as safe),
// with each row's survivors in w.cand. Level 0 also picks each row's anchor and its cut (kept by later levels).
// xx: each row's |x|² over the previous level's dimensions, updated. A row is dense when its anchor has no weight
// or its bound does not fit float; crowded when more than N / kDenseShare points survive; and coarse when crowded
// with a bf16 slack wider than its whole pruning window (2cd·|αx|·max|y| > f²ρ²): data far from the origin
// against its spread (|x|·|y| ≫ the distances, as with a large common offset), where only the AVX-512 screen's
// float slack can tell the points apart.
struct AmxPass {
  unsigned dense = 0, crowded = 0, coarse = 0;
};

// Below kScreenMinD, where posteriors are often spread: a row's pruning window ρ² against its mean squared distance
// to the cloud, |x|² − 2α x·ȳ + α²·mean|y|². At 1 or more, most points would survive and the blocked kernel costs
// less than screening them. A guess about speed only: the rows it sends to the blocked kernel are exact too.
inline double window_share(const Cloud<float>& c, const AmxCloud& ac, const float* x, double alpha, double rho2) {
  double xx = 0.0, xm = 0.0;
  for (int64_t k = 0; k < c.d; ++k) {
    xx += static_cast<double>(x[k]) * static_cast<double>(x[k]);
    xm += static_cast<double>(x[k]) * ac.mean_y[k];
  }
  return rho2 / (xx - 2.0 * alpha * xm + alpha * alpha * ac.mean_yy);
}

// Below kScreenMinD, before any dot product: whether a row is so spread that the blocked kernel costs less than
// screening it. Its window ρ² ≥ T/inv2c whatever the anchor; the row is spread when that reaches its mean squared
// distance to the data, or half of it with 3/4 of the probe points inside (the probe, 64 exact distances, only
// there: at d = 16, σ = 0.5 on the bench data the share is ~0.4 and the probe would cost ~6% of the row). A guess
// about speed only: the rows it sends to the blocked kernel are exact too.
inline bool amx_spread_row(const Cloud<float>& c, const AmxCloud& ac, const float* x, double alpha,
                           const RowParams<float>& p) {
  if (c.d >= kScreenMinD) return false;
  const double window = (std::log(static_cast<double>(c.N)) + kPruneNats<float>) / p.inv2c;
  const double share = window_share(c, ac, x, alpha, window);
  return share >= 1.0 || (share >= 0.5 && (c.d == 16 ? probe_share<true>(c, x, p, window)
                                                      : probe_share<false>(c, x, p, window)) > kNarrowProbeDense);
}

inline AmxPass amx_pass(const Cloud<float>& c, const AmxCloud& ac, size_t level, unsigned rows,
                        const float* const* xs, const double* alpha, const RowParams<float>* prm, AmxWork& w,
                        double* cut, double* xx) {
  constexpr int R = kAmxRows;
  constexpr double u = std::numeric_limits<float>::epsilon() / 2, ub = 1.0 / 256.0;
  const int64_t N = c.N, k_begin = level ? ac.ends[level - 1] : 0, k_end = ac.ends[level];
  const float *yy = ac.level_yy(level), *ny = ac.level_ny(level);   // packed by the sweep
  const double K = static_cast<double>(k_end), rootK = std::sqrt(K);
  // the dots' error per |αx|·|y| (AMX: header; int8: its float roundings, the quantisation being in the dots
  // already: int8_sweep), and a bound on |dots| per |αx|·|y| for the 6u margins below
  const double gammaK = K * u / (1.0 - K * u), rq = rootK / 253.9, kappa = 2.0 * rq + rq * rq;
  const double cd = ac.engine == Engine::int8 ? 4.0 * u + (5.0 + static_cast<double>(level)) * u * (1.0 + 2.0 * kappa)
                                              : 2.0 * ub + ub * ub + 4.0 * u + 1.01 * gammaK;
  const double gmax = ac.engine == Engine::int8 ? 1.02 * (1.0 + 2.0 * kappa) : 1.02;
  const double e0_unit = std::ldexp(1.0, -120), f = 1.0 / (1.0 - 32.0 * u);
  const double prune_nats = std::log(static_cast<double>(N)) + kPruneNats<float>;
  const double lowest = -0.5 * static_cast<double>(std::numeric_limits<float>::max());
  alignas(64) int32_t best_point[R];
  if (ac.engine == Engine::amx) {
#ifdef FASTDIFF_CPU_AMX
    amx_pack_queries(ac, xs, alpha, k_begin, k_end, w);
    asm volatile("" ::: "memory");     // as in amx_sweep: the tile loads read what was just stored
    amx_sweep(ac, level, alpha, w, level == 0 ? best_point : nullptr);
#endif
  } else {
    int8_pack_queries(ac, xs, alpha, level, w);
    int8_sweep(ac, level, alpha, w, level == 0 ? best_point : nullptr);
  }
  AmxPass out;
  alignas(64) float Qf[R] = {}, Af[R] = {}, Sf[R] = {};
  double slack[R] = {}, window[R] = {};   // per row: 2cd·|αx| (times |y|: the bf16 or int8 slack) and f²ρ²
  for (int r = 0; r < R; ++r) {
    if (!(rows >> r & 1u)) continue;
    const float* __restrict x = xs[r];
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (int64_t k = std::min(c.d, k_begin); k < std::min(c.d, k_end); ++k)
      part += static_cast<double>(x[k]) * static_cast<double>(x[k]);
    xx[r] += part;
    const double nax = std::abs(alpha[r]) * std::sqrt(xx[r]), a2 = alpha[r] * alpha[r];
    if (level == 0) {
      const double la = best_point[r] < 0 ? -std::numeric_limits<double>::infinity()
                                          : exact_logit(c, x, prm[r], best_point[r]);
      cut[r] = la - prune_nats;
      if (!(la > lowest)) out.dense |= 1u << r;   // no weight, or logits at the clamp: the exact kernel decides
      if (c.d < kScreenMinD && window_share(c, ac, x, alpha[r], -cut[r] / prm[r].inv2c) >= 1.0) out.dense |= 1u << r;
    }
    // the pruning rule's terms (header): ρ² = (0 − cut)/inv2c, y_term = 4u|c2|
    const double rho = std::sqrt(std::max(0.0, -cut[r]) / prm[r].inv2c);
    slack[r] = 2.0 * cd * nax + (ac.engine == Engine::int8 ? 4.0 * w.qa_sum[r] : 0.0);   // int8: ~2|f|·2
    window[r] = f * f * rho * rho;
    const double yterm = 4.0 * u * std::abs(static_cast<double>(prm[r].c2));
    const double e0 = e0_unit * (K + rootK * nax);
    const double Q = xx[r] * (1.0 - 1e-12) - 2.0 * e0 - f * f * rho * rho;
    const double A = a2 * (1.0 - 1e-12) - f * f * yterm * yterm;
    const double S = 2.0 * cd * nax + 2.0 * e0_unit * rootK + 2.0 * f * f * rho * yterm;
    const double Am = A - 6.0 * u * std::abs(A);
    const double Sm = S + 6.0 * u * (S + 2.0 * gmax * nax + 4.0 * e0_unit * rootK);
    const double Qm = Q - 6.0 * u * (std::abs(Q) + 2.0 * e0) - std::ldexp(1.0, -100) -
                      (std::abs(Am) + Sm) * std::ldexp(1.0, -149);
    const double abs_alpha = std::abs(alpha[r]);
    const bool alpha_ok = abs_alpha == 0.0 || (abs_alpha >= static_cast<double>(std::numeric_limits<float>::min()) &&
                                               abs_alpha <= kAmxMaxCoef);
    const bool fits = alpha_ok && nax <= kAmxMaxNorm && std::abs(Qm) <= kAmxMaxCoef &&
                      std::abs(Am) <= kAmxMaxCoef && Sm <= kAmxMaxCoef;
    if (!fits) out.dense |= 1u << r;   // an α or a bound that float cannot carry (header: overflow)
    Qf[r] = static_cast<float>(Qm); Af[r] = static_cast<float>(Am); Sf[r] = static_cast<float>(Sm);
  }
  // the survivors, point by point: H > 0 prunes, NaN keeps
  const __m512 Q = _mm512_load_ps(Qf), A = _mm512_load_ps(Af);
  const __m512 negS = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_load_ps(Sf));
  const __m512 minus2 = _mm512_set1_ps(-2.0f), zero = _mm512_setzero_ps();
  // the survivors: H > 0 prunes, NaN keeps. A keep mask per point (bit r: row r), then each row's points from
  // its bit, 16 points at a time, stopping once it has more than `cap` (crowded)
  const int64_t cap = N / (c.d < kScreenMinD ? kNarrowDenseShare : kDenseShare);
  const float* dots = w.dots.get();
  if (c.d < kScreenMinD) {
    // Below kScreenMinD posteriors are often spread: the test on every kNarrowSample-th point first, and a row
    // that would keep clearly more than cap goes to the blocked kernel without the full test (speed only)
    const __mmask16 open = static_cast<__mmask16>(rows & ~out.dense);
    __m512i count = _mm512_setzero_si512();
    for (int64_t j = 0; j < N && open; j += kNarrowSample) {
      const __m512 h = _mm512_fmadd_ps(A, _mm512_set1_ps(yy[j]), _mm512_fmadd_ps(negS, _mm512_set1_ps(ny[j]), Q));
      const __m512 F = _mm512_fmadd_ps(minus2, _mm512_load_ps(dots + j * R), h);
      count = _mm512_mask_add_epi32(count, _mm512_mask_cmp_ps_mask(open, F, zero, _CMP_NGT_UQ), count,
                                    _mm512_set1_epi32(1));
    }
    alignas(64) int32_t counts[R];
    _mm512_store_si512(counts, count);
    for (int r = 0; r < R; ++r)
      if ((open >> r & 1u) && 4 * static_cast<int64_t>(counts[r]) * kNarrowSample > 5 * cap) out.dense |= 1u << r;
  }
  const __mmask16 active = static_cast<__mmask16>(rows & ~out.dense);
  uint16_t* __restrict keep = w.keep.get();
  for (int64_t j = 0; j < N && active; ++j) {
    const __m512 h = _mm512_fmadd_ps(A, _mm512_set1_ps(yy[j]), _mm512_fmadd_ps(negS, _mm512_set1_ps(ny[j]), Q));
    const __m512 F = _mm512_fmadd_ps(minus2, _mm512_load_ps(dots + j * R), h);
    keep[j] = _mm512_mask_cmp_ps_mask(active, F, zero, _CMP_NGT_UQ);
  }
  std::fill(keep + N, keep + ac.np, uint16_t(0));
  for (int r = 0; r < R; ++r) {
    if (!(active >> r & 1u)) continue;
    int64_t n;
    if (c.d < kScreenMinD) {   // the narrow stage reads the list in place (NarrowList)
      int32_t* out = w.near_row(r);
      n = ac.short_index() ? gather_survivors16(keep, ac.np, r, cap, reinterpret_cast<uint16_t*>(out))
                           : gather_survivors32(keep, ac.np, r, cap, out);
      w.near_n[r] = n;
    } else if (ac.short_index()) {   // finish_row's int64 list, widened from the 16-bit gather (few survivors)
      uint16_t* found = reinterpret_cast<uint16_t*>(w.found.get());
      n = gather_survivors16(keep, ac.np, r, cap, found);
      if (n <= cap) w.cand[r].assign(found, found + n);
    } else {
      int32_t* found = w.found.get();   // N ≤ kAmxMaxPoints: indices fit int32
      n = gather_survivors32(keep, ac.np, r, cap, found);
      if (n <= cap) w.cand[r].assign(found, found + n);
    }
    if (n > cap) out.crowded |= 1u << r;
  }
  if (out.crowded) {   // the widest point's |y| (NaN norms are never pruned anyway: left out)
    float ny_max = 0.0f;
    for (int64_t j = 0; j < N; ++j) ny_max = ny[j] > ny_max ? ny[j] : ny_max;
    for (int r = 0; r < R; ++r)
      if ((out.crowded >> r & 1u) && slack[r] * ny_max > window[r]) out.coarse |= 1u << r;
  }
  return out;
}

// Screens nr ≤ kAmxRows rows against the whole cloud and finishes every row that is neither dense nor coarse (D,
// L written), as screen_block does. Returns a bit per row: 1 = dense, left to the blocked kernel; `coarse` gets the
// rows left to the AVX-512 screen (AmxPass).
// Screens over growing prefixes of the dimensions, k0 = 256, then 512, 1024, ... (amx_screen_ends), each adding
// its dimensions' dots onto the last: a row is decided at the first level where at most N / kDenseShare points
// survive, and dense if none does. Why: the threshold ρ² is a whole distance (the anchor's, plus T), and the
// partial distances must pass it. At σ = 0.5 on the bench's clustered data the other clusters add ~1.9 a
// dimension against the anchor's 0.25, so d = 3072 rows decide at 512 dimensions (1/6 of the dots) and d = 784
// rows at 256; data alike in its first dimensions (the blank top rows of MNIST digits) goes on further.
inline unsigned amx_screen_block(const Cloud<float>& c, const AmxCloud& ac, int nr, const float* const* xs_in,
                                 const double* alpha_in, const double* sigma_in, const RowParams<float>* prm_in,
                                 double lw_max, AmxWork& w, float* const* D_in, float* const* L_in,
                                 unsigned& coarse) {
  constexpr int R = kAmxRows;
  const float* xs[R];
  double alpha[R], sigma[R], cut[R], xx[R] = {};
  RowParams<float> prm[R];
  for (int r = 0; r < R; ++r) {
    const int i = std::min(r, nr - 1);
    xs[r] = xs_in[i]; alpha[r] = alpha_in[i]; sigma[r] = sigma_in[i]; prm[r] = prm_in[i];
  }
  unsigned dense = 0, open = (1u << nr) - 1;
  coarse = 0;
  const double prune_nats = std::log(static_cast<double>(c.N)) + kPruneNats<float>;
  for (size_t level = 0; open && level < ac.ends.size(); ++level) {
    const AmxPass pass = amx_pass(c, ac, level, open, xs, alpha, prm, w, cut, xx);
    dense |= pass.dense;
    coarse |= pass.coarse;   // more dimensions only widen the slack
    open = pass.crowded & ~pass.coarse;
  }
  dense |= open;   // crowded over every dimension
  for (int r = 0; r < nr; ++r) {
    if ((dense | coarse) >> r & 1u) continue;
    if (c.d < kScreenMinD) {
      const NarrowList list{w.near_row(r), !ac.short_index(), w.near_n[r]};
      finish_row_narrow(c, xs[r], alpha[r], sigma[r], prm[r], lw_max, cut[r], prune_nats, list, D_in[r], L_in[r]);
      continue;
    }
    w.rescore.cand.swap(w.cand[r]);
    finish_row(c, xs[r], alpha[r], sigma[r], prm[r], lw_max, cut[r], prune_nats, w.rescore, D_in[r], L_in[r]);
    w.rescore.cand.swap(w.cand[r]);
  }
  return dense;
}

#else   // no AVX-512 screen in this build: screen_engine() is none, so these are never made or called

struct AmxCloud {
  AmxCloud(const Cloud<float>&, Engine) {}
};
struct AmxWork {
  explicit AmxWork(const AmxCloud&) {}
};
inline bool amx_spread_row(const Cloud<float>&, const AmxCloud&, const float*, double, const RowParams<float>&) {
  return false;
}
inline unsigned amx_screen_block(const Cloud<float>&, const AmxCloud&, int nr, const float* const*, const double*,
                                 const double*, const RowParams<float>*, double, AmxWork&, float* const*,
                                 float* const*, unsigned& coarse) {
  coarse = 0;
  return (1u << nr) - 1;
}

#endif

}  // namespace fastdiff::cpu
