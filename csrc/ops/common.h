// Torch glue helpers: input checks whose messages name the argument, and conversions to kernel structs.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>

#include "../common/limits.h"
#include "../common/table.h"

namespace fastdiff::ops {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline void check_points(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [M, d], got ", shape_str(t));
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  // d = 0 has no noise quads and no distances: refused here rather than special-cased in every kernel
  TORCH_CHECK_VALUE(t.size(1) >= 1, name, " must have at least one column (d >= 1), got shape ", shape_str(t));
}

// Global sample indices sample_offset .. sample_offset + M - 1, and the range's end, are int64 on every backend
// (the torch reference indexes with int64 tensors): sample_offset + M < 2^63, so no index wraps the counter.
inline void check_sample_range(uint64_t sample_offset, int64_t M) {
  constexpr uint64_t kEnd = uint64_t{1} << 63;
  TORCH_CHECK_VALUE(sample_offset < kEnd && static_cast<uint64_t>(M) < kEnd - sample_offset,
                    "sample_offset + M must be < 2**63 (global sample indices are int64), got sample_offset=",
                    sample_offset, " with M=", M, " rows");
}

// An output the kernels can write: `out` itself when contiguous, else a contiguous temporary whose values
// finish_out copies into `out` (so a strided in-place update, out = x, still ends with the right values).
inline at::Tensor writable(const at::Tensor& out) { return out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous); }
inline void finish_out(at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) out.copy_(written);
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_supported_device(const at::Tensor& x) {
#ifdef FASTDIFF_WITH_CUDA
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "x must be a CPU or CUDA tensor, got ", x.device());
#else
  TORCH_CHECK(x.is_cpu(), "x is on ", x.device(), " but this fastdiff._C was built without CUDA kernels");
#endif
}

// The data set in x's dtype (fp16/bf16/fp32 storage upcast here), contiguous, same device.
inline at::Tensor prepare_data(const at::Tensor& data, const at::Tensor& x) {
  TORCH_CHECK(data.dim() == 2, "data must have shape [N, d], got ", shape_str(data));
  TORCH_CHECK(data.is_floating_point(), "data must be a floating tensor, got ", data.scalar_type());
  TORCH_CHECK(data.size(0) > 0, "data must contain at least one point");
  TORCH_CHECK(data.size(1) == x.size(1), "x has d=", x.size(1), " columns but data has d=", data.size(1));
  check_device(data, x, "data", "x");
  return data.to(x.scalar_type()).contiguous();
}

// The CPU kernels' view of the data (csrc/cpu/kernels.h Cloud): row-major data always, and the transposed copy
// [d, N] only for d <= 4, the loops that run over contiguous points (larger d reads rows; a per-call transpose of
// the whole cloud cost more than the screened posterior at d = 3072).
inline at::Tensor transposed_for_small_d(const at::Tensor& data) {
  return data.size(1) <= 4 ? data.t().contiguous() : at::Tensor();
}
template <typename T>
const T* ptr_or_null(const at::Tensor& t) {   // an optional operand: undefined → nullptr
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

inline std::optional<at::Tensor> prepare_log_weights(const std::optional<at::Tensor>& lw, const at::Tensor& x,
                                                     int64_t N) {
  if (!lw.has_value()) return std::nullopt;
  TORCH_CHECK(lw->dim() == 1 && lw->size(0) == N, "log_weights must have shape [N]=[", N, "], got ", shape_str(*lw));
  check_device(*lw, x, "log_weights", "x");
  return lw->to(x.scalar_type()).contiguous();
}

// alpha / sigma as float64 on `device`, length 1 or M.
inline at::Tensor prepare_coeff(const at::Tensor& v, int64_t M, const char* name, at::Device device) {
  TORCH_CHECK(v.dim() <= 1 && (v.numel() == 1 || v.numel() == M), name, " must be a scalar or have shape [M]=[", M,
              "], got ", shape_str(v));
  return v.to(device, at::kDouble).contiguous().reshape({-1});
}

// alpha and sigma broadcast together: both scalars (per_row = false) or both [M].
struct Coeffs {
  at::Tensor alpha, sigma;
  bool per_row;
};
inline Coeffs prepare_coeffs(const at::Tensor& alpha, const at::Tensor& sigma, int64_t M, at::Device device) {
  at::Tensor a = prepare_coeff(alpha, M, "alpha", device), s = prepare_coeff(sigma, M, "sigma", device);
  const bool per_row = M != 1 && (a.numel() == M || s.numel() == M);
  if (per_row) {
    a = a.expand({M}).contiguous();
    s = s.expand({M}).contiguous();
  }
  return {a, s, per_row};
}

// The CUDA point-cloud kernels' one limit on d (kCudaMaxD, also build_config()["cuda_max_d"]).
inline void check_cuda_d(int64_t d, const char* op) {
  TORCH_CHECK_VALUE(d <= kCudaMaxD, op, ": the CUDA kernels support d <= ", kCudaMaxD, ", got d=", d,
                    " (x has shape [M, d])");
}

// The step table of pointcloud_sample (csrc/common/table.h): float64 [K, kTableWidth], contiguous, in host memory
// (the kernels read it as it is; the CUDA glue copies it to the device once). Its first rows must not use D's
// from before the first step (there are none): B1 = 0 at row 0, B2 = 0 at rows 0 and 1.
inline void check_step_table(const at::Tensor& table) {
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == kTableWidth, "table must have shape [K, ", kTableWidth,
                    "] (fastdiff/_table.py COLUMNS), got ", shape_str(table));
  TORCH_CHECK_TYPE(table.scalar_type() == at::kDouble, "table must be float64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.is_cpu(), "table must be a CPU tensor (the step table is host data), got one on ",
                    table.device());
  TORCH_CHECK_VALUE(table.is_contiguous(), "table must be contiguous (row-major [K, ", kTableWidth, "])");
  const int64_t k = first_row_before_history(table.data_ptr<double>(), table.size(0));
  if (k >= 0) {
    const double* row = table.data_ptr<double>() + k * kTableWidth;
    TORCH_CHECK_VALUE(false, "pointcloud_sample: table row ", k, " uses a D from before the first step (B1=",
                      row[kColB1], ", B2=", row[kColB2], "); B1 must be 0 at row 0 and B2 at rows 0 and 1");
  }
  for (int64_t r = 0; r < table.size(0); ++r) {
    const double* row = table.data_ptr<double>() + r * kTableWidth;
    TORCH_CHECK_VALUE(!row_is_staged(row) || row[kColSigmaU] > 0, "pointcloud_sample: table row ", r,
                      " has a stage (BU != 0) but sigmaU = ", row[kColSigmaU], " (must be > 0)");
    TORCH_CHECK_VALUE(std::abs(row[kColRho]) <= 1, "pointcloud_sample: table row ", r, " has rho = ", row[kColRho],
                      " (a correlation: |rho| <= 1)");
  }
}

}  // namespace fastdiff::ops
