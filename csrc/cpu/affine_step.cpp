// CPU affine sampler update with in-kernel noise: out = A x + B D + C z (DESIGN.md "Kernels" 2).
#include <vector>

#include "kernels.h"
#include "noise_row.h"

namespace fastdiff::cpu {

template <typename T>
void affine_step(const T* x, const T* D, T* out, int64_t M, int64_t d, double A, double B, double C, uint64_t seed,
                 uint32_t step, uint64_t sample_offset) {
#pragma omp parallel
  {
    std::vector<double> z(d + 4);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const T* xi = x + i * d;
      const T* Di = D + i * d;
      T* oi = out + i * d;
      if (C != 0.0) {
        normal_row(seed, sample_offset + static_cast<uint64_t>(i), step, d, z.data());
        for (int64_t k = 0; k < d; ++k)
          oi[k] = static_cast<T>(A * static_cast<double>(xi[k]) + B * static_cast<double>(Di[k]) + C * z[k]);
      } else {
        for (int64_t k = 0; k < d; ++k)
          oi[k] = static_cast<T>(A * static_cast<double>(xi[k]) + B * static_cast<double>(Di[k]));
      }
    }
  }
}

template void affine_step<float>(const float*, const float*, float*, int64_t, int64_t, double, double, double,
                                 uint64_t, uint32_t, uint64_t);
template void affine_step<double>(const double*, const double*, double*, int64_t, int64_t, double, double, double,
                                  uint64_t, uint32_t, uint64_t);

}  // namespace fastdiff::cpu
