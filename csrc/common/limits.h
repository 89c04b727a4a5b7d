// Limits of the kernels, each written once: the kernels, the glue (csrc/ops/) and build_config() (which
// fastdiff/_backend.py reads for its refusals) take them from here. Torch-free and CUDA-free, so a CPU-only
// build includes it too.
#pragma once
#include <cstdint>

namespace fastdiff {

// The CUDA point-cloud kernels' largest d: the large-d posterior gives each of its 256 threads at most 48
// slices of a query (csrc/cuda/posterior.cu), and holds the query in shared memory as double (96 KiB).
inline constexpr int64_t kCudaMaxD = 12288;

}  // namespace fastdiff
