// fastdiff._C: the one file that registers the ops with Python (pybind11 through torch/extension.h).
#include <torch/extension.h>

#include "build_info.h"
#include "common/limits.h"
#include "cpu/kernels.h"
#include "ops/ops.h"

namespace {

py::dict build_config() {
  py::dict cfg;
  cfg["cpu"] = true;
#ifdef FASTDIFF_WITH_CUDA
  cfg["cuda"] = true;
  cfg["cuda_arch_list"] = FASTDIFF_CUDA_ARCHS;
#else
  cfg["cuda"] = false;
  cfg["cuda_arch_list"] = "";
#endif
#ifdef _OPENMP
  cfg["openmp"] = true;
#else
  cfg["openmp"] = false;
#endif
  // The kernels' limits, each stated once (csrc/common/limits.h); fastdiff/_backend.py refuses from these.
  cfg["cuda_max_d"] = fastdiff::kCudaMaxD;
  cfg["cxx_flags"] = FASTDIFF_CXX_FLAGS;
  cfg["torch_version"] = FASTDIFF_TORCH_VERSION;
  cfg["compiler"] = __VERSION__;
  // the widest vector ISA the CPU kernels were compiled for (simd_vec.h picks its vectors by the same macros)
#if defined(__AVX512F__)
  cfg["cpu_simd"] = "AVX-512";
#elif defined(__AVX2__)
  cfg["cpu_simd"] = "AVX2";
#elif defined(__ARM_NEON)
  cfg["cpu_simd"] = "NEON";
#else
  cfg["cpu_simd"] = "scalar";
#endif
  return cfg;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdiff compiled kernels (CPU always, CUDA when built with it)";
  m.def("build_config", &build_config, "what this extension was built with");
  m.def("cpu_amx", [] {
    py::dict state;
    const char* why = fastdiff::cpu::amx_unavailable();
    state["available"] = why == nullptr;
    state["reason"] = why ? py::str(why) : py::str("");
    state["enabled"] = fastdiff::cpu::amx_enabled();
    state["int8_screen"] = fastdiff::cpu::int8_screen_built_in();
    return state;
  }, "the CPU posterior's AMX screen: available (and why not), enabled (the switch); int8_screen: whether this "
     "build screens from d = 16 with 8-bit integer dot products where AMX is not in use");
  m.def("set_cpu_amx", &fastdiff::cpu::set_amx_enabled, py::arg("enabled"),
        "turn the CPU posterior's AMX screen on or off for this process (FASTDIFF_CPU_AMX=0 starts it off)");
  m.def("posterior", &fastdiff::ops::posterior, py::arg("x"), py::arg("data"), py::arg("alpha"), py::arg("sigma"),
        py::arg("log_weights") = py::none(), py::arg("bandwidth") = 0.0);
  m.def("value_ends", &fastdiff::ops::value_ends, py::arg("tensors"),
        "(min, max) of each tensor (CPU, float32/float64, contiguous, not empty; NaN at both ends when it holds one)");
  m.def("affine_step", &fastdiff::ops::affine_step, py::arg("x"), py::arg("D"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("seed"), py::arg("step"), py::arg("sample_offset") = 0, py::arg("out") = py::none(),
        py::arg("D1") = py::none(), py::arg("B1") = 0.0, py::arg("D2") = py::none(), py::arg("B2") = 0.0);
  m.def("pointcloud_step", &fastdiff::ops::pointcloud_step, py::arg("x"), py::arg("data"), py::arg("alpha"),
        py::arg("sigma"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("seed"), py::arg("step"),
        py::arg("sample_offset") = 0, py::arg("log_weights") = py::none(), py::arg("bandwidth") = 0.0,
        py::arg("out") = py::none());
  m.def("pointcloud_sample", &fastdiff::ops::pointcloud_sample, py::arg("x"), py::arg("data"), py::arg("table"),
        py::arg("seed"), py::arg("sample_offset") = 0, py::arg("log_weights") = py::none(),
        py::arg("bandwidth") = 0.0, py::arg("return_trajectory") = false);
}
