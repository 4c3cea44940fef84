"""Shared test settings: the devices to run on, the tolerance table per dtype, and `ran`, the
fixture with which a test of the fused path proves that dynnet's kernels computed its results.

`ran`: `with ran("dynamic_net", "dynamic_net_backward", device=device): ...` fails the test
(KernelNotRun) unless each named op's compiled kernel ran on that device inside the block;
`ran.reported(calls, *ops)` checks counts that a subprocess reported (dynnet_ext.kernel_calls()
differences). Every test that requests `ran` is marked `fused`. With DYNNET_EXT_FORCE_STOCK=1
(stock PyTorch everywhere) each such test must fail on that check: CI runs
`DYNNET_EXT_FORCE_STOCK=1 pytest -m fused` and a fused test that still passes, or fails for
another reason, fails the run; one that fails on the kernel check is reported as xfailed.
"""

import contextlib

import pytest
import torch

import dynnet_ext
from dynnet_ext.ops import FORCE_STOCK, kernel_calls

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
# "aten" (ATen's BLAS, the path float64 always takes). Op tests run on each of them in-process
# (their CPU cases: see cpu_gemm_isa).
_C = dynnet_ext.ops._C
CPU_GEMM_ISAS = list(_C.cpu_gemm_isas()) if _C is not None else []
# Whether ATen's bfloat16 GEMM has AMX tiles here: then bfloat16 ops from 2^20 multiply-adds
# take ATen's path unless a form is forced (csrc/cpu/gemm.cpp, kAmxBfloat16AtenMacs).
AMX_BF16 = bool(torch._C._cpu._get_cpu_capability().get("amx_bf16")) and torch._C._cpu._init_amx()
# Whether this is an Intel CPU: there AVX-512's float32 kernels give way to ATen's BLAS from
# 9 x 2^23 multiply-adds, elsewhere from 2^27 (csrc/cpu/gemm.cpp, kIntelAvx512Float32AtenMacs).
INTEL_CPU = any(line.split(":")[-1].strip() == "GenuineIntel"
                for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("vendor_id"))


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
        _C.set_cpu_gemm_form("auto")


@pytest.fixture(params=CPU_GEMM_ISAS or [None])
def cpu_gemm_isa(request):
    """Parametrises a test over the CPU GEMM engines (a no-op without compiled kernels). Only its
    CPU cases run on each engine: a case whose device or target is not "cpu" ("cuda",
    "cuda-split", "harness-vendor", ...) runs once, on the first engine (_engine_free_duplicate)."""
    set_cpu_gemm(request.param)
    return request.param


def _engine_free_duplicate(item):
    """Whether `item` is a copy, on another CPU GEMM engine than the first, of a case that does not
    run dynnet's CPU GEMMs: its "device" or "target" parameter is not "cpu" (a GPU, or the CUDA
    kernels compiled for the CPU, tests/cuda_harness.py), so every engine would run the same test."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "cpu_gemm_isa" not in params or params["cpu_gemm_isa"] == (CPU_GEMM_ISAS or [None])[0]:
        return False
    device = params.get("device", params.get("target"))
    return device is not None and str(device) != "cpu"


@pytest.fixture(params=["dot", "packed", "direct"] if CPU_GEMM_ISAS else [None])
def cpu_gemm_form(request):
    """Parametrises a test over the engine's float32 forms, forced (gemm.cpp's choose_form: a
    forced form runs every problem it can - dot the forward's, direct the backward's on AVX-512 -
    and the others follow the shape rule; packed runs everything)."""
    if request.param is not None:
        _C.set_cpu_gemm_form(request.param)
    return request.param


class KernelNotRun(AssertionError):
    """A fused-path test's results did not come from dynnet's kernels."""


def _missing(delta, ops):
    return [op for op in ops if delta.get(op, 0) <= 0]


class KernelCheck:
    def __init__(self):
        self.used = False

    @contextlib.contextmanager
    def __call__(self, *ops, device="cpu"):
        """Fails unless each op in `ops` ran its `device` kernel inside the block. A failure
        inside the block is reported as KernelNotRun too when the kernels did not run (a stock
        fallback usually fails a fused-path assertion before the block ends)."""
        assert ops, "name the ops whose kernels must run"
        self.used = True
        kind = torch.device(device).type
        before = kernel_calls()[kind]

        def missing():
            after = kernel_calls()[kind]
            return _missing({op: after[op] - before[op] for op in ops}, ops)

        try:
            yield
        except Exception as exc:
            if missing():
                raise KernelNotRun(f"dynnet {kind} kernels did not run: {missing()} ({exc})") from exc
            raise
        lost = missing()
        if lost:
            raise KernelNotRun(f"dynnet {kind} kernels did not run: {lost}")

    def reported(self, calls, *ops, device="cpu"):
        """Checks kernel call counts a subprocess reported: calls[device][op] > 0 for each op."""
        self.used = True
        lost = _missing(calls.get(torch.device(device).type, {}), ops)
        if lost:
            raise KernelNotRun(f"dynnet {device} kernels did not run in the subprocess: {lost} (reported {calls})")


@pytest.fixture
def ran():
    return KernelCheck()


def pytest_configure(config):
    config.addinivalue_line("markers", "fused: the test proves with `ran` that dynnet's kernels ran (CI runs these "
                                       "again with DYNNET_EXT_FORCE_STOCK=1 and requires each to fail that check)")
    config.addinivalue_line("markers", "cuda: the test needs a GPU (it skips without one); scripts/gpu_tests.py "
                                       "runs these on the lent GPU")


def _needs_gpu(item):
    # The rule every GPU test follows: it skips without a GPU, with a reason that names it.
    return any("GPU" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    # The non-CPU cases of the engine-parametrised tests run once (cpu_gemm_isa): the other
    # engines' copies are deselected (counted as such in pytest's summary).
    duplicates = [item for item in items if _engine_free_duplicate(item)]
    if duplicates:
        config.hook.pytest_deselected(items=duplicates)
        items[:] = [item for item in items if not _engine_free_duplicate(item)]
    for item in items:
        if "ran" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fused)
        if _needs_gpu(item):
            item.add_marker(pytest.mark.cuda)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not FORCE_STOCK or report.when != "call" or "ran" not in getattr(item, "fixturenames", ()):
        return
    if call.excinfo is not None and call.excinfo.errisinstance(KernelNotRun):
        report.outcome = "skipped"
        report.wasxfail = "fails as it must with DYNNET_EXT_FORCE_STOCK=1: the kernels did not run"
    elif report.passed:
        report.outcome = "failed"
        report.longrepr = ("passed with DYNNET_EXT_FORCE_STOCK=1 (stock PyTorch everywhere): this fused-path test "
                           "does not check that dynnet's kernels ran")
