"""The CPU harness: the CPU engine's AVX-512 units (csrc/cpu/gemm_avx512.cpp,
gemm_avx512bf16.cpp - float32, float16, and bfloat16 on vdpbf16ps) compiled on SIMDe's portable
AVX-512 (csrc/cpu/harness/avx512.h) into a small library, so that their code runs on a CPU
without AVX-512 or AVX512_BF16 - where the extension itself takes the AVX2 kernels and the
test suite would never reach them. Tests only: built here on demand into build/cpu-harness/,
never part of the wheel. SIMDe's headers come from the simde-py package (requirements-dev.txt).

`load()` gives the library (ctypes): `gemm(...)` runs one GEMM problem on torch tensors as
gemm.cpp would (driver.cpp), `fma_loop_flops` the tables' register-only ceiling loops.
"""

import ctypes
import hashlib
import os
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(ROOT, "csrc", "cpu")
BUILD = os.path.join(ROOT, "build", "cpu-harness")
UNITS = ["gemm_avx512.cpp", "gemm_avx512bf16.cpp", "harness/driver.cpp"]
HEADERS = ["gemm_api.h", "gemm_kernel.h", "activation_kernel.h", "gemm_isa_avx512.h", "harness/avx512.h"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # gemm_api.h's DType
FORMS = {"packed": 0, "dot": 1, "direct": 2}  # gemm_api.h's Form


def simde_include():
    """SIMDe's include folder, or None when simde-py is not installed."""
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


def _flags():
    flags = ["-std=c++20", "-O2", "-fno-trapping-math", "-fPIC", "-shared", "-DDYNNET_CPU_HARNESS",
             f"-I{simde_include()}"]  # -fno-trapping-math: as setup.py builds the extension
    # SIMDe builds each 512-bit operation from the host's own vectors; AVX2 makes the emulation
    # faster where the CPU has it (the results are the same up to the FMA's rounding).
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def build():
    """The harness library's path, compiled if its sources or flags changed."""
    if simde_include() is None:
        raise RuntimeError("the CPU harness needs SIMDe's headers: pip install -r requirements-dev.txt (simde-py)")
    flags = _flags()
    digest = hashlib.sha256(" ".join(flags).encode())
    for name in UNITS + HEADERS:
        with open(os.path.join(CPU, name), "rb") as f:
            digest.update(f.read())
    path = os.path.join(BUILD, digest.hexdigest()[:16], "libdynnet_cpu_harness.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        cmd = ["g++", *flags, *[os.path.join(CPU, u) for u in UNITS], "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"CPU harness build failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, path)
    return path


_lib = None


def load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(build())
        fn = lib.dynnet_harness_gemm
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, i64, ptr, i64, i64, ptr, i64, i64,
                       ptr, i64, i64, ptr, i64, ptr, ctypes.c_int, ptr, i64, ctypes.c_int, ptr, i64, i64,
                       ctypes.c_int]
        fn.restype = ctypes.c_int
        lib.dynnet_harness_fma_loop.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.dynnet_harness_fma_loop.restype = ctypes.c_double
        lib.dynnet_harness_activation.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr,
                                                  ptr, i64]
        lib.dynnet_harness_activation.restype = ctypes.c_int
        _lib = lib
    return _lib


def fma_loop_flops(kernels, iters):
    """FLOPs the ceiling loop of `kernels` (avx512: FMA; avx512_bf16: vdpbf16ps) counts for
    `iters` rounds, after running them."""
    return load().dynnet_harness_fma_loop(int(kernels == "avx512_bf16"), iters)


def gemm(a, b, *, kernels="avx512_bf16", form="packed", a_mask=None, bias=None, relu=False, mask_y=None,
         act=None, z=None, tasks=1, by_panels=False):
    """C = epilogue(A @ B) by the emulated AVX-512 kernels: A (M, K), B (K, N) any strides (2-d
    views), a_mask (M, K) ReLU's backward mask on A, bias (N), mask_y (M, N) with unit column
    stride, act a smooth activation (ACTS) in the store, z (M, N) contiguous, of A's dtype: where
    the store writes the pre-activation (None: not kept). Returns C (M, N) contiguous, of A's dtype."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.full((M, N), float("nan"), dtype=a.dtype)
    mask_y = mask_y if mask_y is None or mask_y.stride(1) == 1 else mask_y.contiguous()

    def ptr(t):
        return None if t is None else t.data_ptr()

    am = a_mask if a_mask is not None else a
    rc = load().dynnet_harness_gemm(int(kernels == "avx512_bf16"), DTYPES[a.dtype], FORMS[form], M, N, K,
                ptr(a), a.stride(0), a.stride(1), ptr(a_mask), am.stride(0), am.stride(1),
                ptr(b), b.stride(0), b.stride(1), ptr(c), c.stride(0), ptr(bias), int(relu),
                ptr(mask_y), 0 if mask_y is None else mask_y.stride(0), -1 if act is None else ACTS[act],
                ptr(z), 0 if z is None else z.stride(0), tasks, int(by_panels))
    if rc != 0:
        raise ValueError(f"the harness refused the problem (code {rc}): form {form!r} cannot run it")
    return c


ACTS = {"gelu": 0, "gelu_tanh": 1, "silu": 2}  # gemm_api.h's Act


def activation(z, act, *, grad_y=None, kernels="avx512"):
    """act(z), or grad_y * act'(z), by the emulated AVX-512 units' activation kernels; z (and
    grad_y) contiguous, of one dtype. Returns a new tensor of z's shape and dtype."""
    out = torch.full_like(z, float("nan"))
    gy = grad_y.contiguous() if grad_y is not None else None
    rc = load().dynnet_harness_activation(int(kernels == "avx512_bf16"), DTYPES[z.dtype], ACTS[act],
                                          int(grad_y is not None), None if gy is None else gy.data_ptr(),
                                          z.data_ptr(), out.data_ptr(), z.numel())
    if rc != 0:
        raise ValueError(f"the harness has no {kernels} kernels")
    return out

