import os

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported, and any test module (or a peer such as
# diffusers or torch._dynamo) may import it first: without a GPU the interpreter must be on before that,
# for the whole session, or kernels defined later fail with "Cannot call @triton.jit'd outside of the scope
# of a kernel" depending on which file happened to run first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiff as fd  # after the interpreter switch: fastdiff may import triton


def _row_invariant_interpreter_dot():
    """Under the interpreter tl.dot is np.matmul, and OpenBLAS's float32 GEMM sums a row's products in an order
    that depends on how many rows the call has (seen on an AMD EPYC, AVX2 kernels: rows 0-15 of a 32-row product
    differ in the last bits from the same rows as a 16-row product). The kernels' row-invariance tests (block
    sizes BM = 16 against 32) then fail on the interpreter, not on the kernel. np.einsum sums each output
    element over k in the same order whatever the other rows, as the GPU's tiles do."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):   # another Triton's interpreter: leave it as is
        return
    matmul_dot = builder.create_dot

    def create_dot(self, a, b, d, *args, **kwargs):   # the precision arguments differ between Triton releases
        if a.data.dtype != np.float32 or b.data.dtype != np.float32 or d.data.dtype != np.float32:
            return matmul_dot(self, a, b, d, *args, **kwargs)
        return interpreter.TensorHandle(np.einsum("...ik,...kj->...ij", a.data, b.data) + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


_row_invariant_interpreter_dot()

# One instance of every process, with parameters from the papers (T kept moderate where the test
# integrates numerically; the extreme settings have their own tests).
PROCESSES = {
    "OU": lambda: fd.OU(theta=0.5, g=1.0, T=10.0),
    "VP": lambda: fd.VP(beta_min=0.1, beta_max=20.0),
    "VE": lambda: fd.VE(sigma_min=0.01, sigma_max=50.0),
    "PureVE": lambda: fd.PureVE(T=10.0),
    "DriftedVE-t": lambda: fd.DriftedVE(T=10.0, beta="t"),
    "DriftedVE-t2": lambda: fd.DriftedVE(T=10.0, beta="t^2"),
}


@pytest.fixture(params=list(PROCESSES))
def process(request):
    return PROCESSES[request.param]()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cuda_emu_backend(request):
    """The test-only cuda_emu backend (tests/contract.py) is registered in fastdiff._backend.BACKENDS only while
    a cuda_emu-marked test runs."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    from contract import register_cuda_emu, unregister_cuda_emu
    register_cuda_emu()
    try:
        yield
    finally:
        unregister_cuda_emu()


@pytest.fixture(autouse=True)
def _tsan_subset(request):
    """FASTDIFF_EMU_TSAN=1 (the emulator built with ThreadSanitizer, .ci/run): only contract.TSAN_SUBSET runs."""
    if os.environ.get("FASTDIFF_EMU_TSAN") != "1":
        return
    from contract import tsan_skip_reason
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    reason = tsan_skip_reason(request.node.originalname, params)
    if reason:
        pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    """Start the sm_90 ahead-of-time compile (tests/test_triton_aot.py) in the background as soon as the session
    knows it will run it, on all but one core: it takes minutes of CPU that the single-threaded interpreter tests
    leave idle, and its test near the end of the run collects the result."""
    if any(item.name == "test_every_kernel_compiles_for_sm90" for item in items):
        import test_triton_aot
        test_triton_aot._Compile.start(jobs=max(1, (os.cpu_count() or 1) - 1))


def pytest_sessionfinish(session, exitstatus):
    import sys
    mod = sys.modules.get("test_triton_aot")
    if mod is not None:
        mod._Compile.stop()          # a session that ends before the compile's test does not leave it running
