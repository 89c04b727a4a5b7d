// CPU fused point-cloud step: D of the cloud at (alpha, sigma), then out = A x + B D + C z, D never stored.
#include <cstdint>

#include "../common/table.h"
#include "kernels.h"
#include "steps.h"

namespace fastdiff::cpu {

template <typename T>
void pointcloud_step(const Cloud<T>& c, const T* x, T* out, int64_t M, double alpha, double sigma, double A,
                     double B, double C, uint64_t seed, uint32_t step, uint64_t sample_offset) {
  double row[kTableWidth] = {};   // the step as a one-row table, so one code path runs both ops
  row[kColP] = 1.0;               // no churn
  row[kColAlpha] = alpha;
  row[kColSigma] = sigma;
  row[kColA] = A;
  row[kColB0] = B;
  row[kColC] = C;
  run_steps<T>(c, x, out, M, row, step, static_cast<int64_t>(step) + 1, seed, sample_offset, nullptr);
}

template void pointcloud_step<float>(const Cloud<float>&, const float*, float*, int64_t, double, double, double,
                                     double, double, uint64_t, uint32_t, uint64_t);
template void pointcloud_step<double>(const Cloud<double>&, const double*, double*, int64_t, double, double, double,
                                      double, double, uint64_t, uint32_t, uint64_t);

}  // namespace fastdiff::cpu
