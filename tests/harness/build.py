"""Builds the CUDA harness: the project's CUDA kernels and launchers (csrc/cuda/*.cuh) compiled by
the host compiler on a small CUDA shim (csrc/cuda/harness/) into a Python extension module that
runs them on the CPU. Tests only: built here on demand into build/cuda-harness/<variant>/, never
part of the wheel.

Variants (ENV_VARIANT picks the one a process loads, fixtures.load()):
  plain     -O2, what the test suite runs (the "harness" device of the CUDA tests);
  sanitize  AddressSanitizer + UBSan, every error fatal (sanitizer.py runs it);
  planted   the sanitize build of a copy of the kernel sources with the planted bugs behind their
            switches (planted.py builds it through build(..., kernels=...)).
"""

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import shlex
import subprocess
import sysconfig
import time

import torch
from torch.utils import cpp_extension

from . import CSRC, ROOT

BUILD = os.path.join(ROOT, "build", "cuda-harness")
MODULE_NAME = "_dynnet_cuda_harness"
ENV_VARIANT = "DYNNET_CUDA_HARNESS"
VARIANTS = ("plain", "sanitize", "planted")

# Translation units: the shim and the module are built once per flavor; the kernel units are what a
# planted bug changes.
SHIM_UNITS = ["cuda/harness/shim.cpp", "cuda/harness/module.cpp"]
KERNEL_UNITS = ["cuda/harness/linear_relu.cpp", "cuda/harness/dynamic_net.cpp"]

FLAVORS = {
    "plain": {"cflags": ["-O2"], "ldflags": []},
    "sanitize": {
        # -g1: line tables for the reports, at a fraction of -g's compile time.
        "cflags": ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
        "ldflags": ["-fsanitize=address,undefined"],
    },
}


def jobs():
    """Parallel compiles and test processes: MAX_JOBS (2 by default)."""
    return int(os.environ.get("MAX_JOBS", "2"))


def _compile_flags(flavor):
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    compiler = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    return (
        ["-std=c++20", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique", "-Wall", "-Wno-unknown-pragmas",
         "-DDYNNET_CUDA_HARNESS", f"-DDYNNET_HARNESS_FLAVOR=\"{flavor}\"",
         # Not used by the code: they make a new torch or compiler rebuild the harness.
         f"-DDYNNET_HARNESS_TORCH=\"{torch.__version__}\"", f"-DDYNNET_HARNESS_GXX=\"{compiler}\"",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={MODULE_NAME}"]
        + [f"-isystem{p}" for p in includes] + FLAVORS[flavor]["cflags"]
    )


def _link_flags(flavor):
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return ["-shared"] + libs + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"] + FLAVORS[flavor]["ldflags"]


def _digest(parts, files):
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() + b"\0")
    for f in sorted(files):
        h.update(f.encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def _deps(depfile):
    """The project headers a unit included (g++ -MMD leaves out the -isystem ones)."""
    with open(depfile) as f:
        text = f.read().replace("\\\n", " ")
    return [os.path.normpath(p) for p in shlex.split(text.split(":", 1)[1])]


class _Unit:
    """One object file, rebuilt when its command line or any of its project sources changed."""

    def __init__(self, source, obj, flags):
        self.source, self.obj, self.flags = source, obj, flags
        self.cmd = ["g++", *flags, "-MMD", "-MF", obj + ".d", "-c", source, "-o", obj]
        self.stamp = obj + ".stamp"

    def _key(self):
        files = [self.source] + (_deps(self.obj + ".d") if os.path.exists(self.obj + ".d") else [])
        files = [f for f in files if os.path.exists(f)]
        return _digest([self.cmd[0], *self.flags, self.source], files)

    def up_to_date(self):
        if not (os.path.exists(self.obj) and os.path.exists(self.stamp)):
            return False
        with open(self.stamp) as f:
            return f.read() == self._key()

    def build(self):
        os.makedirs(os.path.dirname(self.obj), exist_ok=True)
        proc = subprocess.run(self.cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA harness: compiling {self.source} failed:\n{shlex.join(self.cmd)}\n{proc.stderr}")
        with open(self.stamp, "w") as f:
            f.write(self._key())


def _build_units(units, n_jobs):
    todo = [u for u in units if not u.up_to_date()]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
        for future in [pool.submit(u.build) for u in todo]:
            future.result()
    return bool(todo)


def _units(names, src_root, out_dir, flags):
    return [_Unit(os.path.join(src_root, u), os.path.join(out_dir, "obj", u.replace("/", "_") + ".o"), flags)
            for u in names]


def build(variant="plain", n_jobs=None, quiet=True, kernels=None):
    """Builds a variant if not up to date; returns its .so path. plain and sanitize compile the
    kernels of csrc/; a variant with kernels of its own (planted) passes `kernels`, a function of
    the variant's build folder that writes its kernel sources there and returns (their root, extra
    compile flags); it runs under the build lock."""
    if variant not in VARIANTS:
        raise ValueError(f"CUDA harness: unknown variant {variant!r} ({', '.join(VARIANTS)})")
    if variant == "planted" and kernels is None:
        raise ValueError("CUDA harness: the planted variant is built by planted.build() (it plants the bugs first)")
    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(BUILD, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time: test processes may start together
        return _build(variant, n_jobs or jobs(), quiet, kernels)


def _build(variant, n_jobs, quiet, kernels):
    start = time.time()
    flavor = "plain" if variant == "plain" else "sanitize"
    flags = _compile_flags(flavor)
    out_dir = os.path.join(BUILD, variant)
    units = _units(SHIM_UNITS, CSRC, os.path.join(BUILD, flavor), flags)
    if kernels is None:
        units += _units(KERNEL_UNITS, CSRC, out_dir, flags)
    else:
        root, extra = kernels(out_dir)
        units += _units(KERNEL_UNITS, root, out_dir, flags + list(extra))
    rebuilt = _build_units(units, n_jobs)
    lib = os.path.join(out_dir, MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if rebuilt or not os.path.exists(lib):
        cmd = ["g++", *[u.obj for u in units], "-o", lib, *_link_flags(flavor)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA harness: linking {lib} failed:\n{shlex.join(cmd)}\n{proc.stderr}")
        if not quiet:
            print(f"CUDA harness: built {variant} in {time.time() - start:.0f} s: {lib}", flush=True)
    return lib
