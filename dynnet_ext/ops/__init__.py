"""The compiled ops (torch.ops.dynnet.*) on the Python side, one module per op:

    library.py      loading `_C`, the build checks, BUILD_INFO, kernel_calls, has_kernels
    cuda_paths.py   the CUDA path controls and the dispatch table
    functorch.py    the helpers the ops' torch.func rules share
    activations.py  the activations (relu, gelu, gelu_tanh, silu, none) and their stock formulas
    linear_relu.py  the layer op: its formulas, fake kernels, autograd.Functions
    dynamic_net.py  the network op: the same, from the layer's formulas

The names below are the ones user code, the rest of dynnet_ext and the tests use."""

from .activations import ACTIVATIONS, FUNCTION_ACTIVATIONS, SMOOTH_ACTIVATIONS, stock_activation
from .cuda_paths import (CUDA_PATHS, CUDA_PRECISIONS, cuda_choose_layer, cuda_choose_net, cuda_dispatch_table,
                         cuda_path, cuda_precision, load_cuda_dispatch_table, reset_cuda_dispatch_table,
                         set_cuda_dispatch_table, set_cuda_path)
from .dynamic_net import DynamicNetBackwardFunction, DynamicNetFunction
from .functorch import transforms_active
from .library import _C, BUILD_INFO, FORCE_STOCK, LOAD_ERROR, SUPPORTED_DTYPES, has_kernels, kernel_calls
from .linear_relu import LinearReLUBackwardFunction, LinearReLUFunction, LinearReLUJvpFunction

__all__ = ["ACTIVATIONS", "BUILD_INFO", "CUDA_PATHS", "CUDA_PRECISIONS", "DynamicNetBackwardFunction",
           "DynamicNetFunction", "FORCE_STOCK", "FUNCTION_ACTIVATIONS", "LOAD_ERROR", "LinearReLUBackwardFunction",
           "LinearReLUFunction", "LinearReLUJvpFunction", "SUPPORTED_DTYPES", "cuda_choose_layer", "cuda_choose_net",
           "cuda_dispatch_table", "cuda_path", "cuda_precision", "has_kernels", "kernel_calls",
           "load_cuda_dispatch_table", "reset_cuda_dispatch_table", "set_cuda_dispatch_table", "set_cuda_path",
           "SMOOTH_ACTIVATIONS", "stock_activation", "transforms_active"]
