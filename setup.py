"""Build fastdiff._C from csrc/ with ninja (through torch.utils.cpp_extension, which binds with pybind11).

  C++ CPU kernels     always (OpenMP; -march=native unless FASTDIFF_CPU_ARCH says otherwise)
  CUDA kernels        when torch is a CUDA build and the CUDA toolkit is found
Environment:
  FASTDIFF_BUILD_EXT=0      pure-Python install (torch and Triton backends only)
  FASTDIFF_BUILD_CUDA=0|1   force the CUDA kernels off / on (on fails loudly if impossible)
  FASTDIFF_CPU_ARCH=native  the -march for the CPU kernels ("" for the compiler default)
  FASTDIFF_CXX_DEBUG=1      keep debug info in the C++ objects (-g; the default is -g0)
  CUDA_HOME                 the toolkit's own directory (found from /usr/local/cuda or nvcc otherwise)
  TORCH_CUDA_ARCH_LIST      defaults to "9.0" (Hopper) when unset;  MAX_JOBS  parallel compile jobs
Metadata lives in pyproject.toml. Install with: pip install --no-build-isolation -e .
"""
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
PACKAGES = find_packages(include=["fastdiff", "fastdiff.*"])


def _flag(name):
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no", "off")


def _find_cuda_home():
    """The toolkit directory: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or the parent of a real nvcc binary.
    (torch guesses it from the nvcc on PATH, which may be a wrapper script in /usr/local/bin.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def _extensions():
    if _flag("FASTDIFF_BUILD_EXT") is False:
        print("fastdiff: FASTDIFF_BUILD_EXT=0, installing without fastdiff._C (torch and Triton backends only)")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home                # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        sys.exit(f"fastdiff: building fastdiff._C needs torch in the build environment ({exc}).\n"
                 "  Install torch first and use `pip install --no-build-isolation -e .`,\n"
                 "  or set FASTDIFF_BUILD_EXT=0 for a pure-Python install.")

    want_cuda = _flag("FASTDIFF_BUILD_CUDA")
    can_cuda = torch.version.cuda is not None and cuda_home is not None
    if want_cuda and not can_cuda:
        sys.exit(f"fastdiff: FASTDIFF_BUILD_CUDA=1 but CUDA kernels cannot be built: torch CUDA build: "
                 f"{torch.version.cuda or 'no'}, CUDA toolkit: {cuda_home or 'not found (set CUDA_HOME)'}")
    with_cuda = can_cuda if want_cuda is None else want_cuda
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0") if with_cuda else ""

    cpu_arch = os.environ.get("FASTDIFF_CPU_ARCH", "native")
    # -fno-trapping-math lets GCC if-convert the exp kernel's clamps and selects, so the hot loops
    # vectorise (fastdiff never reads floating-point exception flags); -fno-wrapv undoes Python's
    # -fwrapv, which blocks vectorising loops with signed induction variables; -fno-math-errno lets sqrt
    # be one instruction, so the noise generator's Box–Muller loop vectorises (nothing reads errno).
    # -mprefer-vector-width=512: GCC and Clang vectorise `omp simd` loops 256 bits wide even where -march=native
    # has AVX-512 (a guard against the clock drop of early AVX-512 parts). The small-d posterior loops (exp and
    # FMA bound, written as omp simd) then use half of each core's FMA width: measured on this project's 2-core
    # Xeon, 512 bits makes the d = 3 posterior 12% and the d = 16 one 27% faster. Only a preference: a CPU
    # without AVX-512 gets what it has. x86 only (other compilers' targets reject the flag).
    wide = ["-mprefer-vector-width=512"] if cpu_arch and platform.machine().lower() in ("x86_64", "amd64") else []
    # -g0 after Python's own -g: debug info for torch's headers made each glue file 17 MB and a third slower to
    # compile (48 -> 31 s for csrc/ops/posterior.cpp on a 2-core AMD EPYC); FASTDIFF_CXX_DEBUG=1 keeps it
    debug = ["-g"] if _flag("FASTDIFF_CXX_DEBUG") else ["-g0"]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-fno-wrapv"] + debug + \
        ([f"-march={cpu_arch}"] if cpu_arch else []) + wide
    _write_build_info(cxx, arch_list, torch.__version__)
    # csrc/emu/ is the tests' CUDA emulator (built by tests/test_cuda_emu.py), never part of fastdiff._C
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("**/*.cpp")
                     if p.relative_to(ROOT / "csrc").parts[0] != "emu")
    kwargs = dict(name="fastdiff._C", extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        ext = CUDAExtension(sources=sources, define_macros=[("FASTDIFF_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"fastdiff: building fastdiff._C with CPU kernels{' and CUDA kernels for ' + arch_list if with_cuda else ''}"
          f" (CUDA_HOME={os.environ.get('CUDA_HOME', '-')})")

    class ExplainedBuild(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except (Exception, SystemExit) as exc:
                raise SystemExit(
                    f"fastdiff: compiling fastdiff._C failed: {exc}\n"
                    "  The compiler output above names the file and line. Common fixes:\n"
                    "  - CUDA toolkit missing or mismatched with torch: FASTDIFF_BUILD_CUDA=0 builds the CPU kernels "
                    "only;\n"
                    "  - no C++17 compiler / OpenMP: install g++ (>= 9) or set FASTDIFF_BUILD_EXT=0 for pure Python;\n"
                    "  - an old CPU: FASTDIFF_CPU_ARCH=x86-64-v2 (or empty) instead of -march=native.") from None

    return [ext], {"build_ext": ExplainedBuild.with_options(use_ninja=True)}


def _write_build_info(cxx, arch_list, torch_version):
    """csrc/build_info.h: what fastdiff._C.build_config() reports (generated, not committed)."""
    def q(s):   # a C string literal
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    (ROOT / "csrc" / "build_info.h").write_text(
        "// generated by setup.py\n#pragma once\n"
        f"#define FASTDIFF_CXX_FLAGS {q(' '.join(cxx))}\n"
        f"#define FASTDIFF_CUDA_ARCHS {q(arch_list)}\n"
        f"#define FASTDIFF_TORCH_VERSION {q(torch_version)}\n")


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
