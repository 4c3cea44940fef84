"""Builds dynnet_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

DYNNET_EXT_CUDA chooses: "1" builds CUDA or fails saying why, "0" builds CPU only, unset builds
CUDA when torch is a CUDA build and a CUDA toolkit (nvcc) is found. A GPU is not needed to
build: with none visible, TORCH_CUDA_ARCH_LIST defaults to 9.0 (Hopper, the GPU we test on).

Build without isolation, after torch is installed (`pip install --no-build-isolation .`): the
extension must be compiled against the very torch it will run with.
"""

import glob
import os
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
    if problem:
        if choice == "1":
            sys.exit(f"dynnet_ext: DYNNET_EXT_CUDA=1 but {problem}")
        return False, None, problem
    return True, home, f"torch CUDA {torch.version.cuda}, toolkit {home}"


def nvidia_wheel_includes():
    """Include folders of the nvidia-* pip wheels (cublas_v2.h, cusparse.h live there)."""
    found = []
    for base in sys.path:
        found += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(p for p in found if os.path.isdir(p)))


def sources(build_cuda):
    """The extension's translation units. csrc/cuda/harness/ (the CPU harness of the CUDA kernels)
    is the tests' and never part of the extension; the CUDA kernels and launchers themselves are
    headers, each with one .cu that nvcc compiles."""
    cpu = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    return cpu + (sorted(glob.glob("csrc/cuda/*.cu")) if build_cuda else [])


def make_extension():
    build_cuda, cuda_home, reason = want_cuda()
    print(f"dynnet_ext: building {'CPU + CUDA' if build_cuda else 'CPU-only'} kernels ({reason})")
    defines = [("DYNNET_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3"]
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
        include_dirs=nvidia_wheel_includes(),
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
