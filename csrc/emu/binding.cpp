// Test-only Python module: the CUDA kernels of csrc/cuda/ compiled as host C++ against cuda_emu.h, one TU.
// Built by tests/test_cuda_emu.py (torch.utils.cpp_extension.load, -DFASTDIFF_CUDA_EMU), never installed
// (setup.py leaves csrc/emu/ out). Pointers are the data_ptr() of contiguous CPU tensors; the Python side of
// the tests does what csrc/ops/ does around each launcher (dtypes, per-row coefficients, scratch [M, d + 1]).
// pybind11 only (no torch headers), so the build takes seconds.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../common/limits.h"
#include "../common/table.h"
#include "../cuda/affine_step.cu"
#include "../cuda/pointcloud_sample.cu"
#include "../cuda/pointcloud_step.cu"
#include "../cuda/posterior.cu"

namespace {

namespace fc = fastdiff::cuda;

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastdiff ") + op + " CUDA launch failed: " + cudaGetErrorString(err));
}

template <typename T>
fc::Cloud<T> cloud(uintptr_t y, uintptr_t log_w, int64_t N, int64_t d, double bandwidth) {
  return fc::Cloud<T>{ptr<const T>(y), log_w ? ptr<const T>(log_w) : nullptr, N, d, bandwidth};
}

template <typename T>
void posterior(uintptr_t x, uintptr_t y, uintptr_t log_w, int64_t M, int64_t N, int64_t d, double bandwidth,
               uintptr_t alpha, uintptr_t sigma, bool per_row, uintptr_t D, uintptr_t L) {
  check(fc::launch_posterior<T>(cloud<T>(y, log_w, N, d, bandwidth), ptr<const T>(x), M, ptr<const double>(alpha),
                                ptr<const double>(sigma), per_row, ptr<T>(D), ptr<T>(L), nullptr),
        "posterior");
}

// D1, D2: the multistep history (0 when unused).
template <typename T>
void affine_step(uintptr_t x, uintptr_t D, uintptr_t out, int64_t M, int64_t d, double A, double B, double C,
                 uint64_t seed, uint32_t step, uint64_t sample_offset, uintptr_t D1, double B1, uintptr_t D2,
                 double B2) {
  check(fc::launch_affine_step<T>(ptr<const T>(x), ptr<const T>(D), ptr<T>(out), M, d, A, B, C, seed, step,
                                  sample_offset, nullptr, ptr<const T>(D1), B1, ptr<const T>(D2), B2),
        "affine_step");
}

template <typename T>
void pointcloud_step(uintptr_t x, uintptr_t y, uintptr_t log_w, uintptr_t out, int64_t M, int64_t N, int64_t d,
                     double bandwidth, uintptr_t alpha, uintptr_t sigma, double A, double B, double C, uint64_t seed,
                     uint32_t step, uint64_t sample_offset, uintptr_t scratch) {
  check(fc::launch_pointcloud_step<T>(cloud<T>(y, log_w, N, d, bandwidth), ptr<const T>(x), ptr<T>(out), M,
                                      ptr<const double>(alpha), ptr<const double>(sigma), A, B, C, seed, step,
                                      sample_offset, ptr<T>(scratch), nullptr),
        "pointcloud_step");
}

// The contract's order (x, data, table, seed, sample_offset, log_weights, bandwidth, trajectory), as pointers, with
// the sizes and the large-d scratch csrc/ops/ would supply (sample_scratch elements). table: float64 [K, kTableWidth]
// (csrc/common/table.h); a table whose first rows use D's from before row 0 is refused here as csrc/ops/ refuses it.
template <typename T>
void pointcloud_sample(uintptr_t x, uintptr_t y, uintptr_t table, int64_t M, int64_t N, int64_t d, int64_t K,
                       uint64_t seed, uint64_t sample_offset, uintptr_t log_w, double bandwidth, uintptr_t traj,
                       uintptr_t scratch) {
  const double* rows = ptr<const double>(table);
  const int64_t k = fastdiff::first_row_before_history(rows, K);
  if (k >= 0)
    throw pybind11::value_error("pointcloud_sample: table row " + std::to_string(k) +
                                " uses a D from before the first step");
  // The emulated device memory is host memory: the device and host copies of the table are the same array.
  check(fc::launch_pointcloud_sample<T>(cloud<T>(y, log_w, N, d, bandwidth), ptr<T>(x), M, K, rows, rows, seed,
                                        sample_offset, ptr<T>(traj), ptr<T>(scratch), nullptr),
        "pointcloud_sample");
}

// The scratch elements pointcloud_sample needs for this table (what csrc/ops/pointcloud_sample.cpp allocates).
int64_t sample_scratch(uintptr_t table, int64_t K, int64_t M, int64_t d) {
  const double* rows = ptr<const double>(table);
  return fc::pointcloud_sample_scratch(M, d, fastdiff::history_depth(rows, K), fastdiff::table_has_stages(rows, K));
}

// ---------------------------------------------------------------- the emulator's own checks
// 64 threads; dynamic shared memory: 64 doubles.
__global__ void fresh_shared_kernel(int* was_nan) {
  FD_SHARED(float, st, 64);
  FD_EXTERN_SHARED(double, dyn);
  if (threadIdx.x == 0) was_nan[blockIdx.x] = st[63] != st[63] && dyn[63] != dyn[63];   // NaN at every block start
  __syncthreads();
  st[threadIdx.x] = 1.0f;
  dyn[threadIdx.x] = 1.0;
}

__global__ void neighbour_kernel(int* out) {
  FD_SHARED(int, s, 1024);
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void shuffle_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x);
  const int64_t i = 3 * static_cast<int64_t>(threadIdx.x);
  out[i] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[i + 1] = __shfl_down_sync(0xffffffffu, v, 3);
  out[i + 2] = __shfl_sync(0xffffffffu, v, 7);
}

__global__ void nothing_kernel(int* out) {
  if (threadIdx.x == 0 && out) out[blockIdx.x] = 1;
}

__global__ void static_shared_kernel(int* out) {
  FD_SHARED(double, s, 2);   // 16 bytes of static shared memory
  if (threadIdx.x == 0 && out) out[blockIdx.x] = s[0] != s[0];
}

template <typename... P, typename... A>
int status(dim3 grid, dim3 block, size_t shmem, void (*k)(P...), A... args) {
  FD_LAUNCH(grid, block, shmem, nullptr, k)(args...);
  return static_cast<int>(cudaGetLastError());
}

// Each entry: what the emulator returned, for the tests to compare with the CUDA semantics.
pybind11::dict selftest() {
  pybind11::dict r;
  std::vector<int> flags(5, -1);
  r["fresh_shared_status"] = status(dim3(5), dim3(64), 64 * sizeof(double), fresh_shared_kernel, flags.data());
  r["fresh_shared"] = flags;
  std::vector<int> nb(2 * 96, -1);
  r["neighbour_status"] = status(dim3(2), dim3(96), 0, neighbour_kernel, nb.data());
  r["neighbour"] = nb;
  std::vector<int> sh(3 * 64, -1);
  r["shuffle_status"] = status(dim3(1), dim3(64), 0, shuffle_kernel, sh.data());
  r["shuffle"] = sh;
  int* none = nullptr;
  r["threads_1024"] = status(dim3(1), dim3(1024), 0, nothing_kernel, none);
  r["threads_1025"] = status(dim3(1), dim3(1025), 0, nothing_kernel, none);
  r["block_z_65"] = status(dim3(1), dim3(1, 1, 65), 0, nothing_kernel, none);
  r["grid_y_65535"] = status(dim3(1, 65535), dim3(1), 0, nothing_kernel, none);
  r["grid_y_65536"] = status(dim3(1, 65536), dim3(1), 0, nothing_kernel, none);
  r["grid_z_65536"] = status(dim3(1, 1, 65536), dim3(1), 0, nothing_kernel, none);
  r["dynamic_48k"] = status(dim3(1), dim3(32), 48 * 1024, nothing_kernel, none);
  r["dynamic_48k_plus_1"] = status(dim3(1), dim3(32), 48 * 1024 + 1, nothing_kernel, none);
  r["static16_dynamic_48k_minus_16"] = status(dim3(1), dim3(32), 48 * 1024 - 16, static_shared_kernel, none);
  r["static16_dynamic_48k"] = status(dim3(1), dim3(32), 48 * 1024, static_shared_kernel, none);
  r["set_attribute_227k_minus_16"] = static_cast<int>(
      cudaFuncSetAttribute(static_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 - 16));
  r["static16_dynamic_227k_minus_16"] = status(dim3(1), dim3(32), 227 * 1024 - 16, static_shared_kernel, none);
  r["static16_dynamic_227k_minus_15"] = status(dim3(1), dim3(32), 227 * 1024 - 15, static_shared_kernel, none);
  r["set_attribute_227k_minus_15"] = static_cast<int>(
      cudaFuncSetAttribute(static_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024 - 15));
  return r;
}

template <typename T>
void bind(pybind11::module_& m, const char* suffix) {
  const std::string s(suffix);
  m.def(("posterior_" + s).c_str(), &posterior<T>);
  m.def(("affine_step_" + s).c_str(), &affine_step<T>);
  m.def(("pointcloud_step_" + s).c_str(), &pointcloud_step<T>);
  m.def(("pointcloud_sample_" + s).c_str(), &pointcloud_sample<T>);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff's CUDA kernels under the CPU emulator (tests only)";
  bind<float>(m, "f32");
  bind<double>(m, "f64");
  m.def("selftest", &selftest);
  m.def("sample_scratch", &sample_scratch);
  m.attr("cuda_max_d") = fastdiff::kCudaMaxD;   // the launchers' limit, as fastdiff._C.build_config() reports it
}
