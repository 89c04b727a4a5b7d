// Glue for the value scan of the input checks: one call for all of a call's tensors, no tensors made.
#include "../cpu/kernels.h"
#include "common.h"
#include "ops.h"

namespace fastdiff::ops {

std::vector<std::tuple<double, double>> value_ends(const std::vector<at::Tensor>& tensors) {
  std::vector<std::tuple<double, double>> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.numel() > 0 &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "value_ends: tensor ", i, " must be a non-empty contiguous float32 or float64 CPU tensor, got ",
                t.scalar_type(), " ", shape_str(t), " on ", t.device());
    double lo = 0.0, hi = 0.0;
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "fastdiff_value_ends", [&] {
      cpu::value_ends<scalar_t>(t.data_ptr<scalar_t>(), t.numel(), &lo, &hi);
    });
    out.emplace_back(lo, hi);
  }
  return out;
}

}  // namespace fastdiff::ops
