// Standard normals of many (sample, quad) counters at once, written so the compiler vectorises every loop:
// Philox on arrays of counters, then Box–Muller in double with libm-free, branch-free log and sincos.
//
// The result matches noise_row.h (libm) and fastdiff/noise.py to within a couple of float64 ulps, so the
// float32 output is bit for bit the reference's except when a double lands within those ulps of a float32
// rounding boundary (about 1 element in 10⁷–10⁸). The float64 kernels keep the libm path (noise_row.h),
// which agrees with the reference to its last ulp.
//
// log: fdlibm's reduction (u = 2^e·m, m in [√½, √2), s = f/(2+f)) with the Taylor series of
//      log((1+s)/(1−s)) = 2s + 2s³/3 + …, truncated where the next term is below 2⁻⁵⁶ of the result.
// sincos: of the same rounded angle fl(2π·u) as the reference, reduced by n·π/2 in three parts
//      (Cody–Waite; n ≤ 4 keeps every n·part exact), Taylor polynomials on |r| ≤ π/4.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

#include "../common/philox.h"

#ifdef __FAST_MATH__
#error "noise_block.h relies on IEEE evaluation order (the round-to-integer trick, fdlibm's rearrangements): build without -ffast-math"
#endif

namespace fastdiff::cpu {

// How many quads (4 normals each) one call of normal_quads handles: sized for L1.
inline constexpr int64_t kQuadBlock = 256;

namespace noise_detail {

// c[0]·x^(K−1) + … + c[K−1], unrolled by the compiler
template <int K>
inline double horner(double x, const double (&c)[K]) {
  double p = c[0];
  for (int i = 1; i < K; ++i) p = p * x + c[i];
  return p;
}

inline double log_unit(double u) {  // u in [2⁻²⁴, 1): a normal positive double
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  constexpr double sqrt2 = 1.41421356237309504880;
  constexpr double two52 = 4503599627370496.0;
  const uint64_t bits = std::bit_cast<uint64_t>(u);
  // exponent as a double without an int64 -> double conversion (none in AVX2): 2^52 + (bits >> 52)
  double e = std::bit_cast<double>((bits >> 52) | 0x4330000000000000ull) - (two52 + 1023.0);
  double m = std::bit_cast<double>((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  const bool high = m > sqrt2;
  m = high ? 0.5 * m : m;
  e = high ? e + 1.0 : e;
  const double f = m - 1.0;  // exact (Sterbenz)
  const double hfsq = 0.5 * f * f;
  const double s = f / (2.0 + f);
  const double z = s * s;  // <= 0.0295
  // R = 2·Σ_{k≥1} z^k/(2k+1), k ≤ 10: the k = 11 term is < 2⁻⁵⁶ relative
  constexpr double log_coeffs[] = {2.0 / 21, 2.0 / 19, 2.0 / 17, 2.0 / 15, 2.0 / 13,
                                   2.0 / 11, 2.0 / 9,  2.0 / 7,  2.0 / 5,  2.0 / 3};
  const double p = horner(z, log_coeffs);
  const double R = z * p;
  // log(1+f) = f − hfsq + s·(hfsq + R), arranged as fdlibm does to keep the error below one ulp
  return e * ln2_hi - ((hfsq - (s * (hfsq + R) + e * ln2_lo)) - f);
}

// sin and cos of a in [0, 2π + ulp]
inline void sincos_turn(double a, double& s_out, double& c_out) {
  constexpr double two_over_pi = 6.36619772367581382433e-01;
  // π/2 in three parts, the first two with trailing zeros so n·part is exact for n ≤ 4 (fdlibm's pio2_1..3)
  constexpr double pio2_1 = 1.57079632673412561417e+00, pio2_2 = 6.07710050630396597660e-11,
                   pio2_3 = 2.02226624871116645580e-21;
  constexpr double magic = 6755399441055744.0;  // 1.5·2^52: adding it rounds to an integer in the low bits
  const double t = a * two_over_pi + magic;
  const double n = t - magic;
  const uint64_t quadrant = std::bit_cast<uint64_t>(t) & 3u;
  const double r = ((a - n * pio2_1) - n * pio2_2) - n * pio2_3;  // |r| <= π/4 (+ rounding)
  const double r2 = r * r;
  // sin r = r + r³·(−1/3! + r²/5! − …), to r¹⁷: the r¹⁹ term is < 2⁻⁵⁸ relative
  constexpr double sin_coeffs[] = {1.0 / 355687428096000.0, -1.0 / 1307674368000.0, 1.0 / 6227020800.0,
                                   -1.0 / 39916800.0,       1.0 / 362880.0,         -1.0 / 5040.0,
                                   1.0 / 120.0,             -1.0 / 6.0};  // 1/17!, −1/15!, …, −1/3!
  const double ps = horner(r2, sin_coeffs);
  const double sin_r = r + r * r2 * ps;
  // cos r = 1 − r²/2 + r⁴·(1/4! − r²/6! + …), to r¹⁸; pc is minus the bracket
  constexpr double cos_coeffs[] = {1.0 / 6402373705728000.0, -1.0 / 20922789888000.0, 1.0 / 87178291200.0,
                                   -1.0 / 479001600.0,        1.0 / 3628800.0,         -1.0 / 40320.0,
                                   1.0 / 720.0,               -1.0 / 24.0};  // 1/18!, −1/16!, …, −1/4!
  const double pc = horner(r2, cos_coeffs);
  const double hz = 0.5 * r2;
  const double w = 1.0 - hz;
  const double cos_r = w + (((1.0 - w) - hz) - r2 * r2 * pc);
  // rotate by quadrant·π/2
  const bool swap = quadrant & 1u;
  const double s = swap ? cos_r : sin_r;
  const double c = swap ? sin_r : cos_r;
  s_out = (quadrant & 2u) ? -s : s;
  c_out = ((quadrant + 1u) & 2u) ? -c : c;
}

}  // namespace noise_detail

// Normals for `count` ≤ kQuadBlock quads: quad g has counter (quad[g], step, sample[g]); its four normals go to
// z[4g .. 4g+3]. Bit-compatible uniforms with philox.h; Box–Muller as documented above.
inline void normal_quads(uint64_t seed, uint32_t step, const uint32_t* __restrict quad,
                         const uint64_t* __restrict sample, int64_t count, double* __restrict z) {
  constexpr double two_pi = 6.283185307179586476925286766559;
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(64) double u[4 * kQuadBlock];
#pragma omp simd
  for (int64_t g = 0; g < count; ++g) {
    uint32_t c0 = quad[g], c1 = step, c2 = static_cast<uint32_t>(sample[g]), c3 = static_cast<uint32_t>(sample[g] >> 32);
    philox4x32_10_rounds(c0, c1, c2, c3, k0, k1);  // noise_words' counter layout
    u[4 * g] = philox_uniform(c0);  // exact float32 values, exact in double
    u[4 * g + 1] = philox_uniform(c1);
    u[4 * g + 2] = philox_uniform(c2);
    u[4 * g + 3] = philox_uniform(c3);
  }
  // pairs (u_radius, u_angle) at (4g, 4g+1) and (4g+2, 4g+3)
#pragma omp simd
  for (int64_t p = 0; p < 2 * count; ++p) {
    const double radius = std::sqrt(-2.0 * noise_detail::log_unit(u[2 * p]));
    double s, c;
    noise_detail::sincos_turn(two_pi * u[2 * p + 1], s, c);
    z[2 * p] = radius * c;
    z[2 * p + 1] = radius * s;
  }
}

}  // namespace fastdiff::cpu
