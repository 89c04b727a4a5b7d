// The ops fastdiff._C exports (declared once; defined in ops/<op>.cpp, registered in fastdiff.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastdiff::ops {

std::tuple<at::Tensor, at::Tensor> posterior(const at::Tensor& x, const at::Tensor& data, const at::Tensor& alpha,
                                             const at::Tensor& sigma, const std::optional<at::Tensor>& log_weights,
                                             double bandwidth);

// out = A x + B D + C z, then out += B1 D1, then out += B2 D2 (D1/D2 none when unused).
at::Tensor affine_step(const at::Tensor& x, const at::Tensor& D, double A, double B, double C, uint64_t seed,
                       uint32_t step, uint64_t sample_offset, const std::optional<at::Tensor>& out,
                       const std::optional<at::Tensor>& D1, double B1, const std::optional<at::Tensor>& D2, double B2);

at::Tensor pointcloud_step(const at::Tensor& x, const at::Tensor& data, const at::Tensor& alpha,
                           const at::Tensor& sigma, double A, double B, double C, uint64_t seed, uint32_t step,
                           uint64_t sample_offset, const std::optional<at::Tensor>& log_weights, double bandwidth,
                           const std::optional<at::Tensor>& out);

// x [M, d] is updated in place through every row of `table` (float64 [K, 8] contiguous CPU tensor,
// csrc/common/table.h and fastdiff/_table.py); returns the trajectory [K+1, M, d] when asked, else None.
// The multistep columns B1/B2 use the D's of the table's earlier rows; a first row that would use D_{-1} or
// D_{-2} (B1 at row 0, B2 at rows 0 and 1) is refused.
std::optional<at::Tensor> pointcloud_sample(at::Tensor& x, const at::Tensor& data, const at::Tensor& table,
                                            uint64_t seed, uint64_t sample_offset,
                                            const std::optional<at::Tensor>& log_weights, double bandwidth,
                                            bool return_trajectory);

// (min, max) of each tensor (CPU, float32 or float64, contiguous, not empty), NaN at both ends when it holds a NaN:
// the value scan of fastdiff/_checks.py.
std::vector<std::tuple<double, double>> value_ends(const std::vector<at::Tensor>& tensors);

}  // namespace fastdiff::ops
