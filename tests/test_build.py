"""The build: kernels really loaded (so tests above test them, not the fallback), CUDA kernels
present wherever a GPU is, the soft fallback when _C is missing, and setup.py's CUDA choice."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dynnet_ext
from dynnet_ext import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiled_kernels_are_loaded():
    assert ops.LOAD_ERROR is None, f"dynnet_ext._C failed to load: {ops.LOAD_ERROR}"
    assert dynnet_ext.has_kernels("cpu")
    assert ops.BUILD_INFO["torch_version"] == torch.__version__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_kernels_built_when_gpu_present():
    assert dynnet_ext.has_kernels("cuda"), "a GPU is visible but dynnet_ext was built without CUDA kernels"


def test_import_without_compiled_library_falls_back_with_one_warning():
    code = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "dynnet_ext._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, dynnet_ext
            from dynnet_ext import reference
        msgs = [str(w.message) for w in caught if "dynnet_ext" in str(w.message)]
        assert len(msgs) == 1 and "falls back to stock PyTorch" in msgs[0], msgs
        assert not dynnet_ext.has_kernels("cpu")
        net = dynnet_ext.DynamicNet(6, 5, 2)
        x = torch.randn(3, 6)
        out = net(x, 2)
        out.sum().backward()
        stock = reference.DynamicNet(6, 5, 2)
        stock.load_state_dict(net.state_dict())
        assert torch.allclose(out, stock(x, 2))
        print("fallback ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout


def load_setup_module():
    spec = importlib.util.spec_from_file_location("dynnet_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


@pytest.fixture
def setup_py(monkeypatch):
    monkeypatch.delenv("DYNNET_EXT_CUDA", raising=False)
    return load_setup_module()


def test_setup_cuda_choice_forced_off(setup_py, monkeypatch):
    monkeypatch.setenv("DYNNET_EXT_CUDA", "0")
    assert setup_py.want_cuda()[0] is False


def test_setup_cuda_choice_rejects_bad_value(setup_py, monkeypatch):
    monkeypatch.setenv("DYNNET_EXT_CUDA", "yes")
    with pytest.raises(SystemExit, match="must be 0, 1 or unset"):
        setup_py.want_cuda()


def test_setup_cuda_choice_follows_torch_and_toolkit(setup_py, monkeypatch):
    build, home, reason = setup_py.want_cuda()
    assert build == (torch.version.cuda is not None and setup_py.find_cuda_home() is not None), reason
    if build:
        assert os.path.isfile(os.path.join(home, "bin", "nvcc"))
    monkeypatch.setattr(setup_py.torch.version, "cuda", None)
    assert setup_py.want_cuda()[0] is False
    monkeypatch.setenv("DYNNET_EXT_CUDA", "1")
    with pytest.raises(SystemExit, match="CPU-only build"):
        setup_py.want_cuda()


def test_extension_sources_leave_out_the_cuda_harness(setup_py, monkeypatch):
    # The harness is built by the tests (tests/cuda_harness.py), never into the wheel; and no two
    # translation units of one folder share a stem (both would compile to the same .o).
    monkeypatch.chdir(ROOT)
    cuda = setup_py.sources(True)
    assert set(setup_py.sources(False)) < set(cuda)
    assert {"csrc/cuda/linear_relu.cu", "csrc/cuda/dynamic_net.cu"} <= set(cuda)
    assert not [s for s in cuda if "harness" in s]
    stems = [os.path.splitext(s)[0] for s in cuda]
    assert len(stems) == len(set(stems)), cuda


def test_setup_refuses_a_torch_below_the_floor_and_warns_above_the_tested_top(setup_py):
    floor = ".".join(map(str, setup_py.TORCH_FLOOR))
    below = f"{setup_py.TORCH_FLOOR[0]}.{setup_py.TORCH_FLOOR[1] - 1}.0+cu130"
    with pytest.raises(SystemExit, match=f"older than the oldest supported release, {floor}"):
        setup_py.check_torch_version(below)
    assert setup_py.check_torch_version(f"{floor}.0+cu130") is None
    top = setup_py.TORCH_TESTED_TOP
    assert setup_py.check_torch_version(f"{top[0]}.{top[1]}.1") is None
    assert "newer than the newest tested" in setup_py.check_torch_version(f"{top[0]}.{top[1] + 1}.0.dev20270101")
    # The running torch is inside the range CI proves.
    assert setup_py.TORCH_FLOOR <= setup_py.torch_release(torch.__version__) <= top


def test_pyproject_declares_the_floor_setup_enforces(setup_py):
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert f'"torch>={".".join(map(str, setup_py.TORCH_FLOOR))}"' in text


def test_setup_reads_the_toolkit_version_and_refuses_another_major(setup_py, tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda.h").write_text("#pragma once\n#define CUDA_VERSION 13020\n")
    assert setup_py.toolkit_version(str(tmp_path)) == (13, 2)
    assert setup_py.toolkit_version(str(tmp_path / "missing")) is None
    assert setup_py.toolkit_mismatch("13.2", (13, 0)) is None  # a newer minor in torch: as torch allows
    problem = setup_py.toolkit_mismatch("12.8", (13, 0))
    assert "install a CUDA 12.x toolkit" in problem and "DYNNET_EXT_CUDA=0" in problem


def test_setup_puts_the_toolkit_headers_before_the_wheels(setup_py, tmp_path):
    home, wheel = tmp_path / "cuda", tmp_path / "site" / "nvidia" / "cu13" / "include"
    wheel.mkdir(parents=True)
    (home / "include").mkdir(parents=True)
    wheels = setup_py.nvidia_wheel_includes([str(tmp_path / "site")])
    assert wheels == [str(wheel)]
    assert setup_py.cuda_include_dirs(str(home), wheels) == [str(home / "include"), str(wheel)]
    # A toolkit that is itself a wheel folder is not listed twice.
    assert setup_py.cuda_include_dirs(str(wheel.parent), wheels) == [str(wheel)]


def test_the_cuda_include_path_preprocesses_with_this_toolkit(setup_py):
    # What broke the CUDA build with torch 2.15 (CUDA 13.2 wheels) and a 13.0 toolkit: the wheels'
    # cuda_runtime.h ahead of the toolkit's made CCCL refuse the compiler. Preprocessing torch's
    # CUDA headers with the include path setup.py gives nvcc shows it without a full build.
    home = setup_py.find_cuda_home()
    if torch.version.cuda is None or home is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit (nvcc)")
    from torch.utils import cpp_extension

    includes = setup_py.cuda_include_dirs(home, setup_py.nvidia_wheel_includes())
    torch_includes = cpp_extension.include_paths(device_type="cuda")
    includes += torch_includes
    # The C++ standard torch builds extensions with: C++20 where its headers demand it (2.12 on).
    with open(os.path.join(torch_includes[0], "ATen", "ATen.h")) as f:
        std = "c++20" if "C++20 or later" in f.read() else "c++17"
    src = os.path.join(ROOT, "csrc", "cuda", "linear_relu.cu")
    cmd = [os.path.join(home, "bin", "nvcc"), "-E", "-x", "cu", f"-std={std}", "-o", os.devnull, src,
           *(f"-I{p}" for p in includes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_activation_loops_vectorise(setup_py, tmp_path):
    # The smooth activations (csrc/cpu/activation_kernel.h) are branch-free scalar code for the
    # compiler to vectorise. Compiled for the AVX2 unit's target with setup.py's flags, each
    # activation's loop and derivative loop must come out vectorised (GCC's own report): with
    # -ftrapping-math, GCC's default, none of them did, and the layers' activation ran 10x slower
    # than stock's.
    header = os.path.join(ROOT, "csrc", "cpu", "activation_kernel.h")
    with open(header) as f:
        lines = f.read().splitlines()
    loops = [i + 1 for i, line in enumerate(lines) if "= act_f(A, z[i])" in line or "= act_grad_f(A, gy[i], z[i])" in line]
    assert len(loops) == 2, loops
    src = tmp_path / "activations.cpp"
    src.write_text(f"""#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "{os.path.join(ROOT, "csrc", "cpu", "gemm_api.h")}"
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
namespace dynnet::gemm {{
namespace {{
#include "{header}"
}}
""" + "".join(f"""void y{a}(const float* z, float* y, int64_t n) {{ act_loop<Act::{a}>(z, y, n); }}
void g{a}(const float* gy, const float* z, float* g, int64_t n) {{ act_grad_loop<Act::{a}>(gy, z, g, n); }}
""" for a in ("Gelu", "GeluTanh", "Silu")) + "}\n")
    cmd = ["g++", "-std=c++20", *setup_py.CXX_FLAGS, "-fopt-info-vec-optimized", "-c", str(src), "-o", os.devnull]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in loops:
        done = proc.stderr.count(f"activation_kernel.h:{line}:25: optimized: loop vectorized using 32 byte vectors")
        assert done == 3, f"activation_kernel.h:{line}: {done} of 3 activations' loops vectorised"
