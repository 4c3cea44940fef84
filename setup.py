"""Builds dynnet_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

DYNNET_EXT_CUDA chooses: "1" builds CUDA or fails saying why, "0" builds CPU only, unset builds
CUDA when torch is a CUDA build and a CUDA toolkit (nvcc) is found. A GPU is not needed to
build: with none visible, TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper, the GPU we test on).

Build without isolation, after torch is installed (`pip install --no-build-isolation .`): the
extension must be compiled against the very torch it will run with.

Supported torch: TORCH_FLOOR (refused below, saying so) to TORCH_TESTED_TOP (newer builds, with a
warning that it is untested); CI proves both ends and the pinned version on every run.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only by a broken install
    sys.exit(
        "dynnet_ext: torch must be installed before building, and the build must see it:\n"
        "  pip install torch && pip install --no-build-isolation ."
    )

# The torch range CI proves (.ci/run): keep in step with pyproject.toml and the README.
TORCH_FLOOR = (2, 11)
TORCH_TESTED_TOP = (2, 15)


def torch_release(version):
    """(major, minor) of a torch version string such as '2.11.0+cu130' or '2.16.0.dev20260101'."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_version(version):
    """Refuses a torch older than the floor (SystemExit naming what to install); returns a warning
    for one newer than the newest tested release, or None."""
    found = torch_release(version)
    floor, top = ".".join(map(str, TORCH_FLOOR)), ".".join(map(str, TORCH_TESTED_TOP))
    if found < TORCH_FLOOR:
        sys.exit(
            f"dynnet_ext: torch {version} is older than the oldest supported release, {floor} "
            f"(supported and tested: {floor} to {top}). Install a newer torch, e.g. "
            f"`pip install 'torch>={floor}'`, then build again with `pip install --no-build-isolation .`"
        )
    if found > TORCH_TESTED_TOP:
        return (f"dynnet_ext: torch {version} is newer than the newest tested release, {top} "
                f"(tested: {floor} to {top}); building anyway")
    return None

def find_cuda_home():
    """A real CUDA toolkit folder (with bin/nvcc and lib64/libcudart), or None.

    nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), from which torch would
    derive /usr/local as CUDA_HOME and then fail to link -lcudart; so resolve it properly.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and glob.glob(
            os.path.join(home, "lib*", "libcudart*")
        ):
            return os.path.realpath(home)
    return None


def want_cuda():
    """(build_cuda, cuda_home, reason) following DYNNET_EXT_CUDA."""
    choice = os.environ.get("DYNNET_EXT_CUDA", "").strip().lower()
    if choice not in ("", "0", "1", "auto"):
        sys.exit(f"dynnet_ext: DYNNET_EXT_CUDA must be 0, 1 or unset, got {choice!r}")
    if choice == "0":
        return False, None, "DYNNET_EXT_CUDA=0"
    home = find_cuda_home()
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    else:
        mismatch = toolkit_mismatch(torch.version.cuda, toolkit_version(home))
        if mismatch:  # a build that cannot work: stop now, not an hour into nvcc
            sys.exit(f"dynnet_ext: {mismatch}")
    if problem:
        if choice == "1":
            sys.exit(f"dynnet_ext: DYNNET_EXT_CUDA=1 but {problem}")
        return False, None, problem
    version = toolkit_version(home)
    return True, home, (f"torch CUDA {torch.version.cuda}, toolkit "
                        f"{'.'.join(map(str, version)) if version else 'of unknown version'} at {home}")


def toolkit_version(cuda_home):
    """(major, minor) of the CUDA toolkit in cuda_home, from its cuda.h (CUDA_VERSION 13000 is 13.0),
    or None when it cannot be read."""
    try:
        with open(os.path.join(cuda_home, "include", "cuda.h")) as f:
            match = re.search(r"^#define CUDA_VERSION (\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    return (int(match.group(1)) // 1000, int(match.group(1)) % 1000 // 10) if match else None


def toolkit_mismatch(torch_cuda, toolkit):
    """Why torch built with CUDA `torch_cuda` ('13.2') cannot be extended with a toolkit of version
    `toolkit` ((13, 0)), or None. Torch's rule: the major versions must match; the minor may differ."""
    if toolkit is None:
        return None  # unknown: let the compiler decide, as torch does
    want = int(torch_cuda.split(".")[0])
    if toolkit[0] != want:
        return (f"torch {torch.__version__} is built with CUDA {torch_cuda}, but the CUDA toolkit found is "
                f"{toolkit[0]}.{toolkit[1]}: install a CUDA {want}.x toolkit and point CUDA_HOME at it, "
                "or build CPU-only with DYNNET_EXT_CUDA=0")
    return None


def nvidia_wheel_includes(search_path=None):
    """Include folders of the nvidia-* pip wheels that torch's CUDA builds install (cublas_v2.h,
    cusparse.h live there, not in a bare toolkit)."""
    found = []
    for base in sys.path if search_path is None else search_path:
        found += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(p for p in found if os.path.isdir(p)))


def cuda_include_dirs(cuda_home, wheel_includes):
    """The -I folders for nvcc and the host compiler: the toolkit's own headers first, so every
    header it has comes from it; the wheels' after it, for what the toolkit lacks (the cuBLAS and
    cuSPARSE headers torch's own headers include). The wheels may hold a newer CUDA minor than
    the toolkit (torch 2.15's 13.2 against a 13.0 nvcc): their cuda_runtime.h ahead of the
    toolkit's makes CCCL stop with "CUDA compiler and CUDA toolkit headers are incompatible"."""
    own = os.path.join(cuda_home, "include")
    return [own] + [p for p in wheel_includes if os.path.realpath(p) != os.path.realpath(own)]


def sources(build_cuda):
    """The extension's translation units. csrc/cuda/harness/ (the CPU harness of the CUDA kernels)
    is the tests' and never part of the extension; the CUDA kernels and launchers themselves are
    headers, each with one .cu that nvcc compiles."""
    cpu = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/autocast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    return cpu + (sorted(glob.glob("csrc/cuda/*.cu")) if build_cuda else [])


# The C++ sources' flags. -fno-trapping-math: nothing here reads the floating-point exception
# flags, and without it GCC will not turn a select that guards arithmetic (x < 0 ? a : 1 - a)
# into a blend - the activation kernels' loops (csrc/cpu/activation_kernel.h) then stay scalar,
# about 10x slower (tests/test_build.py checks that they vectorise). It changes no result:
# rounding, NaN and signed zeros are as before.
CXX_FLAGS = ("-O3", "-fno-trapping-math")


def make_extension():
    newer = check_torch_version(torch.__version__)
    if newer:
        print(newer)
    build_cuda, cuda_home, reason = want_cuda()
    print(f"dynnet_ext: building {'CPU + CUDA' if build_cuda else 'CPU-only'} kernels ({reason})")
    defines = [("DYNNET_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = list(CXX_FLAGS)
    link = []
    if torch._C.has_openmp:
        # at::parallel_for is a header template: compiled without OpenMP it runs every task on
        # the calling thread. -fopenmp makes it use torch's thread pool (the libgomp torch loaded
        # first; the same soname, so the dynamic linker reuses it rather than loading a second).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not build_cuda:
        return cpp_extension.CppExtension(
            "dynnet_ext._C", sources(False), define_macros=defines, extra_compile_args={"cxx": cxx},
            extra_link_args=link
        )

    # torch reads CUDA_HOME at import; point it at the real toolkit before building.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to detect: build for Hopper
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")
    defines += [("DYNNET_WITH_CUDA", None), ("DYNNET_CUDA_ARCHS", f'"{archs}"')]
    nvcc = ["-O3", "-lineinfo", "-Xptxas=-v"]
    return cpp_extension.CUDAExtension(
        "dynnet_ext._C",
        sources(True),
        include_dirs=cuda_include_dirs(cuda_home, nvidia_wheel_includes()),
        define_macros=defines,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    setup(
        packages=find_packages(include=["dynnet_ext", "dynnet_ext.*"]),
        ext_modules=[make_extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )
