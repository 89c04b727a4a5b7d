// CPU affine sampler update with in-kernel noise: out = A x + B D + C z (DESIGN.md "Kernels" 2), then the
// multistep history: out += B1 D1, then out += B2 D2 (fastdiff/reference/affine_step.py's order).
#include <algorithm>
#include <vector>

#include "kernels.h"
#include "noise_block.h"
#include "update_row.h"

namespace fastdiff::cpu {
namespace {

// Below this many elements a step runs on one thread (at::internal::GRAIN_SIZE's idea): the work is a few
// microseconds, and a parallel region's barrier on a loaded machine can wait a whole scheduler time slice
// (5-15 ms measured per step at M = 1024, d = 2 on 2 busy cores). Rows and groups are split the same way
// either way, so the bits do not depend on it.
constexpr int64_t kParallelMinElems = 1 << 14;

// n rows of d = DD < 4 values, their normals at z[4i .. 4i + DD): one loop, unrolled within the row.
template <int DD>
inline void update_short_rows(const float* x, const float* D, float* out, int64_t n, double A, double B, double C,
                              const double* __restrict z) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    for (int k = 0; k < DD; ++k)
      out[DD * i + k] = static_cast<float>(A * static_cast<double>(x[DD * i + k]) +
                                           B * static_cast<double>(D[DD * i + k]) + C * z[4 * i + k]);
}

// The history terms of rows [i0, i1) after their one-step update: out += B1 D1, then out += B2 D2, each in double and
// rounded once (as the whole-trajectory kernels' add_history). A null D_j (zero coefficient) adds and reads nothing,
// so the one-step update keeps its bits.
template <typename T>
void add_history_rows(T* out, int64_t i0, int64_t i1, int64_t d, const AffineHistory<T>& h) {
  const T* H[2] = {h.D1, h.D2};
  const double b[2] = {h.B1, h.B2};
  for (int j = 0; j < 2; ++j) {
    if (H[j] == nullptr) continue;
    const T* src = H[j] + i0 * d;
    T* dst = out + i0 * d;
    const double bj = b[j];
#pragma omp simd
    for (int64_t e = 0; e < (i1 - i0) * d; ++e)
      dst[e] = static_cast<T>(static_cast<double>(dst[e]) + bj * static_cast<double>(src[e]));
  }
}

// float32: rows in groups of about kQuadBlock quads, their noise drawn by the vectorised generator.
void affine_step_blocked(const float* x, const float* D, float* out, int64_t M, int64_t d, double A, double B,
                         double C, uint64_t seed, uint32_t step, uint64_t sample_offset, const AffineHistory<float>& h) {
  const int64_t nq = (d + 3) / 4;                          // quads per row
  const int64_t rows = std::max<int64_t>(1, kQuadBlock / nq);  // rows per group
  const int64_t groups = (M + rows - 1) / rows;
#pragma omp parallel if (M * d >= kParallelMinElems)
  {
    std::vector<double> z(4 * std::max(kQuadBlock, nq));
    std::vector<uint32_t> quad(kQuadBlock);
    std::vector<uint64_t> sample(kQuadBlock);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i0 = g * rows, i1 = std::min(M, i0 + rows);
      // (sample, quad) counters of the group, row-major, drawn kQuadBlock at a time
      const int64_t total = (i1 - i0) * nq;
      int64_t row = i0, q = 0;
      for (int64_t q0 = 0; q0 < total; q0 += kQuadBlock) {
        const int64_t count = std::min(kQuadBlock, total - q0);
        for (int64_t c = 0; c < count; ++c) {
          quad[c] = static_cast<uint32_t>(q);
          sample[c] = sample_offset + static_cast<uint64_t>(row);
          if (++q == nq) q = 0, ++row;
        }
        normal_quads(seed, step, quad.data(), sample.data(), count, z.data() + 4 * q0);
      }
      const int64_t off = i0 * d, n = i1 - i0;
      switch (d % 4 == 0 ? 4 : d) {   // z rows are 4·nq long: contiguous with the data only when 4 | d
        case 4: axpby_row(x + off, D + off, out + off, n * d, A, B, C, z.data()); break;
        case 1: update_short_rows<1>(x + off, D + off, out + off, n, A, B, C, z.data()); break;
        case 2: update_short_rows<2>(x + off, D + off, out + off, n, A, B, C, z.data()); break;
        case 3: update_short_rows<3>(x + off, D + off, out + off, n, A, B, C, z.data()); break;
        default:
          for (int64_t i = 0; i < n; ++i)
            axpby_row(x + off + i * d, D + off + i * d, out + off + i * d, d, A, B, C, z.data() + 4 * nq * i);
      }
      add_history_rows(out, i0, i1, d, h);
    }
  }
}

}  // namespace

template <typename T>
void affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C, uint64_t seed,
                 uint32_t step, uint64_t sample_offset, const AffineHistory<T>& history) {
  if (M <= 0 || d <= 0) return;   // nothing to write; and the blocked path divides by the quad count of a row
  AffineHistory<T> h = history;
  if (h.B1 == 0.0) h.D1 = nullptr;   // a zero coefficient reads nothing
  if (h.B2 == 0.0) h.D2 = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (C != 0.0) return affine_step_blocked(x, D, out, M, d, A, B, C, seed, step, sample_offset, h);
  }
#pragma omp parallel if (M * d >= kParallelMinElems)
  {
    std::vector<double> z(d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {  // float64 (or no noise): libm Box–Muller, the reference's last ulp
      update_row(x + i * d, D + i * d, out + i * d, d, A, B, C, seed, step, sample_offset + static_cast<uint64_t>(i),
                 z.data());
      add_history_rows(out, i, i + 1, d, h);
    }
  }
}

template void affine_step<float>(const float*, const float*, float*, int64_t, int64_t, double, double, double,
                                 uint64_t, uint32_t, uint64_t, const AffineHistory<float>&);
template void affine_step<double>(const double*, const double*, double*, int64_t, int64_t, double, double, double,
                                  uint64_t, uint32_t, uint64_t, const AffineHistory<double>&);

}  // namespace fastdiff::cpu
