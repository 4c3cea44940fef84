"""dynnet_ext: fused Linear + bias + ReLU kernels (C++ on CPU, CUDA on GPU) for PyTorch, the
Linear + GELU / SiLU layers built on them, and the dynamic-depth DynamicNet.

    import dynnet_ext
    model = dynnet_ext.DynamicNet(1000, 100, 10)          # the seed's model, fused layers
    layer = dynnet_ext.nn.FusedLinearReLU(1000, 100)       # drop-in for nn.Linear + nn.ReLU
    layer = dynnet_ext.nn.FusedLinearGELU(1000, 100)       # nn.Linear + nn.GELU (FusedLinearSiLU: + nn.SiLU)
    y = dynnet_ext.functional.fused_linear_relu(x, w, b)   # functional form
    y = dynnet_ext.functional.fused_linear_act(x, w, b, "gelu")  # relu, gelu, gelu_tanh, silu, none
    fused = dynnet_ext.fuse(existing_model)                # nn.Linear + ReLU/GELU/SiLU -> fused layers
"""

import importlib.abc
import importlib.util
import sys

from . import functional, nn, reference
from .fuse import FuseReport, fuse, register_activation
from .models import DynamicNet
from .nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU
from .ops import ACTIVATIONS, BUILD_INFO, LinearReLUFunction, has_kernels, kernel_calls

class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then()` right after module `name` is first imported, whoever imports it (once)."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # once, and not again for the look-up below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then(module):
            exec_module(module)
            self.then()

        spec.loader.exec_module = exec_then
        return spec


def _register_sharding_rules():
    from . import parallel  # noqa: F401  (registers the ops' DTensor sharding rules)


# The ops' DTensor sharding rules whenever DTensor is used, whatever the import order: now if it is
# loaded, else as soon as it is imported (DTensor takes a while to import; most users never need it).
if "torch.distributed.tensor" in sys.modules:
    _register_sharding_rules()
else:
    sys.meta_path.insert(0, _AfterImport("torch.distributed.tensor", _register_sharding_rules))

__version__ = "0.1.0"

__all__ = ["ACTIVATIONS", "DynamicNet", "FuseReport", "FusedLinear", "FusedLinearGELU", "FusedLinearReLU",
           "FusedLinearSiLU", "LinearReLUFunction", "fuse", "functional", "nn", "reference", "has_kernels",
           "kernel_calls", "register_activation", "BUILD_INFO"]
