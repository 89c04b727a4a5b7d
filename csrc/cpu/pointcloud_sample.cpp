// CPU whole trajectories: every row of a step table (csrc/common/table.h), x updated in place.
#include <cstdint>

#include "kernels.h"
#include "steps.h"

namespace fastdiff::cpu {

template <typename T>
void pointcloud_sample(const Cloud<T>& c, T* x, int64_t M, int64_t K, const double* table, uint64_t seed,
                       uint64_t sample_offset, T* traj) {
  run_steps<T>(c, x, x, M, table, 0, K, seed, sample_offset, traj);
}

template void pointcloud_sample<float>(const Cloud<float>&, float*, int64_t, int64_t, const double*, uint64_t,
                                       uint64_t, float*);
template void pointcloud_sample<double>(const Cloud<double>&, double*, int64_t, int64_t, const double*, uint64_t,
                                        uint64_t, double*);

}  // namespace fastdiff::cpu
