"""Shared test settings: the devices to run on and the tolerance table per dtype."""

import pytest
import torch

import dynnet_ext

# (atol, rtol) per dtype for a fused result against the stock reference computed in the SAME
# dtype. Both sides round each product/sum at the dtype's precision but may order the K-long
# sums differently (another GEMM blocking, grad_bias accumulated in double on CPU), so the
# bound scales with the unit roundoff eps: float64 eps=2.2e-16, float32 eps=1.2e-7,
# bfloat16 eps=7.8e-3, float16 eps=9.8e-4. The factor (~100 eps for fp32/fp64) covers sums of
# up to ~1000 terms of mixed sign, relative to the magnitudes the tests use (|x|,|w| ~ 1).
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1.3e-5),
    # Half types: inputs are rounded once and products accumulate in fp32, but the OUTPUT is
    # rounded to the dtype, so a few ulps of the dtype at magnitude ~|y|.
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 3e-2),
}


def tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


CUDA = torch.cuda.is_available()
# With a GPU visible the CUDA cases always run: if the kernels were not built, the ops tests
# fail (tests/test_build.py says so) rather than silently checking the stock fallback.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CPU GEMM engines this machine and build can run (csrc/cpu/gemm.cpp): "avx512", "avx2",
# "aten" (ATen's BLAS, the path float64 always takes). Op tests run on each of them in-process.
_C = dynnet_ext.ops._C
CPU_GEMM_ISAS = list(_C.cpu_gemm_isas()) if _C is not None else []


def set_cpu_gemm(isa):
    """Switch the CPU ops to the GEMM engine `isa` for the rest of the test (None: leave it)."""
    if isa is not None:
        _C.set_cpu_gemm_isa(isa)


@pytest.fixture(autouse=True)
def _restore_cpu_gemm():
    previous = _C.cpu_gemm_isa() if _C is not None else None
    yield
    if previous is not None:
        _C.set_cpu_gemm_isa(previous)


@pytest.fixture(params=CPU_GEMM_ISAS or [None])
def cpu_gemm_isa(request):
    """Parametrises a test over the CPU GEMM engines (a no-op without compiled kernels)."""
    set_cpu_gemm(request.param)
    return request.param
