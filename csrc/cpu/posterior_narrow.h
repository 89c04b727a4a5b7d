// The AMX screen's exact stage at small d (kAmxMinD <= d < kScreenMinD): a row's survivors rescored sixteen at a
// time, each point one or two vectors of its dimensions. Included by posterior_amx.h (AVX-512 builds with AMX).
//
// Why: at d = 16 and σ = 0.5 (the bench's clustered data) a query keeps ~10-40% of the points within T of its best
// logit. finish_row (posterior_screened.h) rescores one survivor at a time: a distance of one vector ends in a
// horizontal sum into double, then a scalar exp and a weighted sum in double, ~60 cycles a survivor, more than
// the blocked kernel's ~3.5 cycles a pair over every point (14.6 against 11.5 ms). Here the squares of 16
// survivors go through one transpose-and-add tree (45 vector operations for 16 sums, lane i = survivor i), the
// logits are formed 8 to a double vector, e^{l − m} 16 to a float vector (exp_nonpositive), and Σ e·y is
// vectorised over the dimensions in float runs of kChunk survivors, as the blocked kernel sums.
//
// Arithmetic and error bound (u = 2⁻²⁴), against the blocked kernel's (posterior_blocked.h):
// - x − αy = (x − c1·y) + c2·y per dimension: c1 ∈ {0, 1} makes c1·y exact, so two roundings as there (one fewer
//   when the build contracts the add into an FMA), ≤ u·|x − αy| a component beyond the rounding of c2.
// - |x − αy|²: the ≤ 32 squares (the upper 16 dimensions added by one FMA) summed by a fixed tree of depth 4 in
//   float: ≤ 6u·|x − αy|² with the squares' own roundings, inside the 8u posterior_screened.h's pruning rule
//   assumes of the exact stage (its (1 − 32u) factor), so the screen prunes nothing this stage would keep.
// - logit l = −|x − αy|²·inv2c in double (finite_logit's clamp), e = exp_nonpositive(float(l − m)) (rounded once,
//   relative ~1e-7), left out (0) below m − T like a pruned pair; Σe and Σ e·y in float over runs of ≤ kChunk
//   survivors (≤ 128u relative to Σ e·|y|, as the blocked kernel), then in double. So D errs by ≤ ~8e-6·max|y| and
//   L by ≤ ~1e-6 beyond the pruned mass (posterior_screened.h: ≤ 4e^{−16} of the kept mass), within MATH.md §7.
// Row invariance: lane i of the tree sums survivor i's squares only, in an order fixed by d; the runs of kChunk
// follow the row's own survivor list.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/far.h"
#include "kernels.h"
#include "posterior_blocked.h"
#include "posterior_row.h"
#include "posterior_screened.h"

namespace fastdiff::cpu {

// out lane i = the sum of v[i]'s 16 lanes (a transpose-and-add tree: pairs within 128-bit lanes twice, then
// across them twice; lane i's order depends on nothing but v[i]).
inline __m512 lane_sums16(const __m512 (&v)[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i)   // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane q, position p: v[4i + p] summed over its lanes 4q..4q+3
    const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)    // [s2[2i] over 128-bit lanes 0+1, 2+3, s2[2i+1] the same]
    s3[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_f32x4(s2[2 * i], s2[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// exp_nonpositive (posterior_row.h) on 16 lanes: the same reduction and polynomial, so the same ~1e-7 relative
// error; 0 below −87.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 shift = _mm512_set1_ps(12582912.0f);   // 1.5·2²³: adding it rounds to an integer
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), shift), shift);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f),
                                    _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), e);
}

// One query's distances to 16 points at a time: x − αy = (x − c1·y) + c2·y per dimension, the squares summed by
// lane_sums16. D16: d is exactly 16 (no masks: plain loads the compiler can fold into the arithmetic). Used by the
// probe; narrow_sums keeps the same arithmetic inline, because through this struct its hot loop ran 15% slower
// (d = 16, σ = 0.5, 2048 x 8192: 5.9 against 5.1 ms, A/B in one session).
template <bool D16>
struct NarrowQuery {
  int64_t d;
  __mmask16 mlo, mhi;
  __m512 xlo, xhi, c1, c2;
  NarrowQuery(int64_t d_, const float* x, const RowParams<float>& p)
      : d(D16 ? 16 : d_),
        mlo(D16 || d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << d) - 1)),
        mhi(D16 || d <= 16 ? __mmask16(0) : d >= 32 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (d - 16)) - 1)),
        xlo(_mm512_maskz_loadu_ps(mlo, x)), xhi(_mm512_maskz_loadu_ps(mhi, x + 16)),
        c1(_mm512_set1_ps(p.c1)), c2(_mm512_set1_ps(p.c2)) {}
  __m512 lo(const float* y) const { return D16 ? _mm512_loadu_ps(y) : _mm512_maskz_loadu_ps(mlo, y); }
  __m512 hi(const float* y) const { return _mm512_maskz_loadu_ps(mhi, y + 16); }
  // lane i: |x − αy_i|² for the first k pointers of yp (0 past k)
  __m512 distances(const float* const* yp, int k) const {
    __m512 sq[16];
    for (int i = 0; i < 16; ++i) {
      if (i >= k) {
        sq[i] = _mm512_setzero_ps();
        continue;
      }
      const __m512 ylo = lo(yp[i]);
      const __m512 dlo = _mm512_fmadd_ps(c2, ylo, _mm512_fnmadd_ps(c1, ylo, xlo));
      __m512 sqi = _mm512_mul_ps(dlo, dlo);
      if (!D16 && mhi) {
        const __m512 yhi = hi(yp[i]);
        const __m512 dhi = _mm512_fmadd_ps(c2, yhi, _mm512_fnmadd_ps(c1, yhi, xhi));
        sqi = _mm512_fmadd_ps(dhi, dhi, sqi);
      }
      sq[i] = sqi;
    }
    return lane_sums16(sq);
  }
};

// One pass over a row's survivors against a reference logit r: m = the largest logit, s = Σ e, acc = Σ e·y
// (d ≤ 32 entries, zeros past d), e = e^{l − r} for l ≥ r − keep_nats and 0 below. Every e ≤ 1 when m ≤ r.
struct NarrowSums {
  double m, s;
  alignas(64) double acc[32];
};

// D16: d is exactly 16 (no masks: plain loads the compiler can fold into the arithmetic). Index: the survivor
// list's type (NarrowList).
template <bool D16, typename Index>
void narrow_sums(const Cloud<float>& c, const float* x, const RowParams<float>& p, const Index* cand, int64_t n,
                 double r, double keep_nats, NarrowSums& out) {
  const int64_t d = D16 ? 16 : c.d;
  const __mmask16 mlo = D16 || d >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << d) - 1);
  const __mmask16 mhi = D16 || d <= 16 ? 0 : d >= 32 ? 0xFFFF : static_cast<__mmask16>((1u << (d - 16)) - 1);
  const auto load_lo = [&](const float* q) { return D16 ? _mm512_loadu_ps(q) : _mm512_maskz_loadu_ps(mlo, q); };
  const __m512 xlo = _mm512_maskz_loadu_ps(mlo, x), xhi = _mm512_maskz_loadu_ps(mhi, x + 16);
  const __m512 c1 = _mm512_set1_ps(p.c1), c2 = _mm512_set1_ps(p.c2);
  const __m512d neg_inv2c = _mm512_set1_pd(-p.inv2c), ref = _mm512_set1_pd(r);
  const __m512d lowest = _mm512_set1_pd(-static_cast<double>(std::numeric_limits<float>::max()));
  const __m512 floor = _mm512_set1_ps(static_cast<float>(-keep_nats));
  const float* __restrict ys = c.y;
  __m512d mv = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
  __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
  double s = 0.0;
  alignas(64) float ebuf[16];
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = std::min(n, j0 + kChunk);
    // four interleaved partial sums of e·y: one chain would wait on each FMA's latency
    __m512 alo[4], ahi[4], es = _mm512_setzero_ps();
    for (int q = 0; q < 4; ++q) alo[q] = ahi[q] = _mm512_setzero_ps();
    for (int64_t i0 = j0; i0 < j1; i0 += 16) {
      const int k = static_cast<int>(std::min<int64_t>(16, j1 - i0));
      const Index* ci = cand + i0;
      __m512 sq[16];
      const float* yp[16];
      for (int i = 0; i < 16; ++i) {
        if (i >= k) {
          sq[i] = _mm512_setzero_ps();
          continue;
        }
        const float* y = yp[i] = ys + static_cast<int64_t>(ci[i]) * d;
        const __m512 ylo = load_lo(y);
        const __m512 dlo = _mm512_fmadd_ps(c2, ylo, _mm512_fnmadd_ps(c1, ylo, xlo));
        __m512 sqi = _mm512_mul_ps(dlo, dlo);
        if (!D16 && mhi) {
          const __m512 yhi = _mm512_maskz_loadu_ps(mhi, y + 16);
          const __m512 dhi = _mm512_fmadd_ps(c2, yhi, _mm512_fnmadd_ps(c1, yhi, xhi));
          sqi = _mm512_fmadd_ps(dhi, dhi, sqi);
        }
        sq[i] = sqi;
      }
      const __m512 dist = lane_sums16(sq);
      __m256 t[2];
      for (int h = 0; h < 2; ++h) {
        const __m256 half = h ? _mm512_extractf32x8_ps(dist, 1) : _mm512_castps512_ps256(dist);
        const __m512d l = _mm512_max_pd(_mm512_mul_pd(_mm512_cvtps_pd(half), neg_inv2c), lowest);   // finite_logit
        const int valid = std::clamp(k - 8 * h, 0, 8);
        mv = _mm512_mask_max_pd(mv, static_cast<__mmask8>((1u << valid) - 1), mv, l);
        t[h] = _mm512_cvtpd_ps(_mm512_sub_pd(l, ref));   // l − r in double, rounded once
      }
      const __m512 tv = _mm512_insertf32x8(_mm512_castps256_ps512(t[0]), t[1], 1);
      const __mmask16 valid = k == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << k) - 1);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(valid, tv, floor, _CMP_GE_OQ),
                                           exp_nonpositive16(tv));
      es = _mm512_add_ps(es, e);
      _mm512_store_ps(ebuf, e);
      for (int i = 0; i < 16; ++i) {
        if (i >= k) break;
        const __m512 ei = _mm512_set1_ps(ebuf[i]);
        alo[i & 3] = _mm512_fmadd_ps(ei, load_lo(yp[i]), alo[i & 3]);
        if (!D16 && mhi) ahi[i & 3] = _mm512_fmadd_ps(ei, _mm512_maskz_loadu_ps(mhi, yp[i] + 16), ahi[i & 3]);
      }
    }
    const __m512 lo = _mm512_add_ps(_mm512_add_ps(alo[0], alo[1]), _mm512_add_ps(alo[2], alo[3]));
    const __m512 hi = _mm512_add_ps(_mm512_add_ps(ahi[0], ahi[1]), _mm512_add_ps(ahi[2], ahi[3]));
    s += static_cast<double>(_mm512_reduce_add_ps(es));
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(lo)));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(_mm512_extractf32x8_ps(lo, 1)));
    acc[2] = _mm512_add_pd(acc[2], _mm512_cvtps_pd(_mm512_castps512_ps256(hi)));
    acc[3] = _mm512_add_pd(acc[3], _mm512_cvtps_pd(_mm512_extractf32x8_ps(hi, 1)));
  }
  out.m = _mm512_reduce_max_pd(mv);
  out.s = s;
  for (int q = 0; q < 4; ++q) _mm512_store_pd(out.acc + 8 * q, acc[q]);
}

// Below kScreenMinD, before any dot product: the share of kNarrowProbe points spread evenly through the cloud
// whose distance is within `window` (= T/inv2c) of the closest of them. It overstates the share a screen would
// keep (the closest probe is no closer than the closest point), so a row above kNarrowProbeDense is all but
// surely dense (at d = 16 and 24 on the bench's data: none of the rows at σ = 0.5 where 8% survive, ~all at
// σ ≥ 1 where 70-100% do). A guess about speed only: the rows it sends to the blocked kernel are exact too.
inline constexpr int kNarrowProbe = 64;
inline constexpr double kNarrowProbeDense = 0.75;

template <bool D16>
double probe_share(const Cloud<float>& c, const float* x, const RowParams<float>& p, double window) {
  const NarrowQuery<D16> q(c.d, x, p);
  const int64_t n = std::min<int64_t>(kNarrowProbe, c.N), stride = c.N / n;
  alignas(64) float dist[kNarrowProbe];
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int k = static_cast<int>(std::min<int64_t>(16, n - i0));
    const float* yp[16];
    for (int i = 0; i < k; ++i) yp[i] = c.y + (i0 + i) * stride * q.d;
    _mm512_store_ps(dist + i0, q.distances(yp, k));
  }
  const float best = *std::min_element(dist, dist + n);
  const double reach = static_cast<double>(best) + window;
  return static_cast<double>(std::count_if(dist, dist + n, [&](float v) { return v <= reach; })) /
         static_cast<double>(n);
}

// A row's survivors, ascending: 16-bit indices when the cloud has at most 2¹⁶ points (amx_pass gathers them 32 at a
// time, twice the rate of 32-bit ones: the gather was a third of amx_pass at d = 16), 32-bit beyond.
struct NarrowList {
  const void* index;
  bool wide;   // int32_t indices, else uint16_t
  int64_t n;
};

// D and L of one row of a float cloud without log-weights, d < 32, from its survivors (ascending), with
// finish_row's far rule. The weights' reference is r = l_a + 1 (cut = l_a − T: the anchor's exact logit, which
// the largest survivor logit m matches or beats by the screen's slack at most); survivors below l_a − T are left
// out, as pruned pairs are. If some survivor beats r (its weight would pass 1: a bf16 anchor more than a nat off),
// the pass is redone with r = m, leaving out what is below m − T as finish_row does.
inline void finish_row_narrow(const Cloud<float>& c, const float* x, double alpha, double sigma,
                              const RowParams<float>& p, double lw_max, double cut, double prune_nats,
                              const NarrowList& list, float* D, float* L) {
  const auto sums = [&](double ref, double keep_nats, NarrowSums& a) {
    if (list.wide) {
      const auto* idx = static_cast<const int32_t*>(list.index);
      c.d == 16 ? narrow_sums<true>(c, x, p, idx, list.n, ref, keep_nats, a)
                : narrow_sums<false>(c, x, p, idx, list.n, ref, keep_nats, a);
    } else {
      const auto* idx = static_cast<const uint16_t*>(list.index);
      c.d == 16 ? narrow_sums<true>(c, x, p, idx, list.n, ref, keep_nats, a)
                : narrow_sums<false>(c, x, p, idx, list.n, ref, keep_nats, a);
    }
  };
  NarrowSums a;
  double r = cut + prune_nats + 1.0;
  sums(r, prune_nats + 1.0, a);
  if (far::is_far(a.m, lw_max, c.d)) return posterior_row_far(c, x, alpha, sigma, D, L);
  if (a.m > r) {
    r = a.m;
    sums(r, prune_nats, a);
  }
  const double scale = p.shrink / a.s;
  for (int64_t k = 0; k < c.d; ++k)
    D[k] = static_cast<float>(a.acc[k] * scale + p.pull * static_cast<double>(x[k]));
  if (L) *L = static_cast<float>(r + std::log(a.s));
}

}  // namespace fastdiff::cpu
