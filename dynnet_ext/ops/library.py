"""Loading the compiled library (`_C`) and what the build holds. Loading `_C` is the only thing in
dynnet_ext allowed to fail softly: without it the package still imports, warns once, and
`functional` computes with stock PyTorch."""

import os
import warnings

import torch

try:
    from .. import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = exc
    warnings.warn(
        f"dynnet_ext: the compiled kernels could not be loaded ({exc}); every fused op falls "
        "back to stock PyTorch (same results, no speed-up). Rebuild with "
        "`pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None

BUILD_INFO = dict(_C.build_info()) if _C is not None else {"cpu_kernels": False, "cuda_kernels": False}
if _C is not None and BUILD_INFO.get("torch_version") != torch.__version__:
    warnings.warn(
        f"dynnet_ext: compiled against torch {BUILD_INFO.get('torch_version')} but running with "
        f"torch {torch.__version__}; rebuild with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# DYNNET_EXT_FORCE_STOCK=1: every functional form (and so every module and DynamicNet) computes
# with stock PyTorch instead of the fused ops - to compare against stock without changing code,
# and in CI to prove that the tests of the fused path fail when the kernels do not run. Any value
# but "" and "0" means on, so no value is invalid and reading it here cannot fail.
FORCE_STOCK = os.environ.get("DYNNET_EXT_FORCE_STOCK", "0").strip() not in ("", "0")

_OPS = ("linear_relu", "linear_relu_backward", "dynamic_net", "dynamic_net_backward")


def kernel_calls():
    """How many times each op's compiled kernel has run in this process, per device type:
    {"cpu": {"linear_relu": n, "linear_relu_backward": n, "dynamic_net": n,
    "dynamic_net_backward": n}, "cuda": {...}}. Counted inside the kernels, so whatever the path
    (eager, autograd, torch.compile, autocast), a count that grew means dynnet's kernel computed
    the result; one that did not means stock PyTorch (or nothing) did."""
    if _C is None:
        return {device: dict.fromkeys(_OPS, 0) for device in ("cpu", "cuda")}
    return _C.kernel_calls()


def has_kernels(device_type):
    """True when compiled kernels exist for this device type ('cpu' or 'cuda')."""
    if device_type == "cpu":
        return bool(BUILD_INFO["cpu_kernels"])
    if device_type == "cuda":
        return bool(BUILD_INFO["cuda_kernels"])
    return False


def require_C(what):
    """The compiled library, or an error naming `what` needed it."""
    if _C is None:
        raise RuntimeError(f"dynnet_ext: {what} needs the compiled library, which did not load ({LOAD_ERROR})")
    return _C
