// Fixed-width SIMD values through the GCC/Clang vector extensions: the register-blocked posterior kernel
// names its accumulators as whole vectors so they stay in registers, and the compiler emits the native
// instructions of the build's -march (AVX-512, AVX2 or SSE2) without intrinsics.
#pragma once
#include <cstring>
#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#endif
#include <utility>

namespace fastdiff::cpu::simd {

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kBytes)));
  typedef double D __attribute__((vector_size(kBytes)));
  static constexpr int W = kBytes / 4;   // lanes of T
  static constexpr int H = 2;            // double vectors per T vector
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kBytes)));
  typedef double D __attribute__((vector_size(kBytes)));
  static constexpr int W = kBytes / 8;
  static constexpr int H = 1;
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
// Every lane equal to s: s − 0 is exact for every s (−0 − 0 = −0), and compiles to one broadcast.
template <typename T>
inline typename Vec<T>::V splat(T s) {
  return s - typename Vec<T>::V{};
}

// a·b + c with one rounding where the build has FMA (the screening dot products: one instruction per
// (query, point, dimension)); a·b + c otherwise. -std=c++20 turns GCC's contraction off, so say it here.
template <typename V>
inline V fma(V a, V b, V c) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    if constexpr (sizeof(a[0]) == 4) return _mm512_fmadd_ps(a, b, c);
    else return _mm512_fmadd_pd(a, b, c);
  }
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) {
    if constexpr (sizeof(a[0]) == 4) return _mm256_fmadd_ps(a, b, c);
    else return _mm256_fmadd_pd(a, b, c);
  }
#endif
  return a * b + c;
}

namespace detail {
template <typename D, typename V, int... I>
inline D widen(V v, std::integer_sequence<int, I...>) {
  return __builtin_convertvector(__builtin_shufflevector(v, v, I...), D);
}
template <int Off, int... I>
constexpr auto shifted(std::integer_sequence<int, I...>) {
  return std::integer_sequence<int, (I + Off)...>{};
}
}  // namespace detail

// acc[0..H) (doubles) += the lanes of v, lane for lane: the exact conversion of T partial sums into double.
template <typename T>
inline void add_wide(typename Vec<T>::D* acc, typename Vec<T>::V v) {
  using S = Vec<T>;
  if constexpr (S::H == 1) {
    acc[0] += v;
#if defined(__AVX512F__)
  } else if constexpr (kBytes == 64) {   // one vcvtps2pd per half (GCC's generic lowering took three ops)
    const __m512 x = v;
    acc[0] += _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    acc[1] += _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#endif
  } else {
    constexpr auto lo = std::make_integer_sequence<int, S::W / 2>{};
    acc[0] += detail::widen<typename S::D>(v, lo);
    acc[1] += detail::widen<typename S::D>(v, detail::shifted<S::W / 2>(lo));
  }
}

// The lanes of v summed by halving (lane i + lane i + W/2, ...): one fixed order for every caller.
template <typename T>
inline T lane_sum(typename Vec<T>::V v) {
  T a[Vec<T>::W];
  std::memcpy(a, &v, sizeof v);
  for (int h = Vec<T>::W / 2; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) a[i] = a[i] + a[i + h];
  return a[0];
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// The mask of the first n of 16 lanes, n clamped to [0, 16]: the tail of a row read 16 floats at a time.
inline __mmask16 first_lanes16(int64_t n) {
  return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// acc + the squares of v's 16 floats, in double (exact squares: only the sums round), high half first.
inline __m512d add_squares(__m512d acc, __m512 v) {
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
  return _mm512_fmadd_pd(lo, lo, _mm512_fmadd_pd(hi, hi, acc));
}
#endif

}  // namespace fastdiff::cpu::simd
