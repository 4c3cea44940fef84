"""dynnet_ext: fused Linear + bias + ReLU kernels (C++ on CPU, CUDA on GPU) for PyTorch, and the
dynamic-depth DynamicNet built on them.

    import dynnet_ext
    model = dynnet_ext.DynamicNet(1000, 100, 10)          # the seed's model, fused layers
    layer = dynnet_ext.nn.FusedLinearReLU(1000, 100)       # drop-in for nn.Linear + nn.ReLU
    y = dynnet_ext.functional.fused_linear_relu(x, w, b)   # functional form
    fused = dynnet_ext.fuse(existing_model)                # nn.Linear + ReLU -> FusedLinearReLU
"""

import sys

from . import functional, nn, reference
from .fuse import FuseReport, fuse
from .models import DynamicNet
from .ops import BUILD_INFO, LinearReLUFunction, has_kernels, kernel_calls

if "torch.distributed.tensor" in sys.modules:
    # DTensor is in use: give the ops their sharding rules now. Otherwise importing
    # dynnet_ext.parallel does (DTensor takes a while to import; most users never need it).
    from . import parallel  # noqa: F401

__version__ = "0.1.0"

__all__ = ["DynamicNet", "FuseReport", "LinearReLUFunction", "fuse", "functional", "nn", "reference", "has_kernels", "kernel_calls", "BUILD_INFO"]
