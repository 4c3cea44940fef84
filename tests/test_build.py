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
