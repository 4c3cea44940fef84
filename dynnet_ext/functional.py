"""Functional forms of the fused layers. Data path: functional -> torch.ops.dynnet.linear_relu
(its autograd formula registered in C++, csrc/autograd.cpp: the same formula as the Python
LinearReLUFunction without the Python per-call cost) -> CPU or CUDA kernel. In eager mode the
op is called through _C.linear_relu, the same dispatcher call minus torch.ops' Python-side
argument handling; torch.compile and tensors with __torch_function__ get torch.ops.
Inputs the kernels cannot take (no kernels compiled for the device, or a dtype other than
float32/64, float16, bfloat16) go through stock PyTorch instead, with the same results."""

import torch
from torch.overrides import has_torch_function

from . import reference
from .ops import SUPPORTED_DTYPES, _C, has_kernels


def _autocast_dtype(device_type):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _linear(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    # Under autocast, behave as nn.Linear does: compute in the autocast dtype.
    cast = _autocast_dtype(x.device.type) if x.is_floating_point() else None
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    if has_kernels(x.device.type) and x.dtype in SUPPORTED_DTYPES:
        if torch.compiler.is_compiling() or has_torch_function((x, weight, bias)):
            return torch.ops.dynnet.linear_relu(x, weight, bias, activation)
        return _C.linear_relu(x, weight, bias, activation)  # same op, ~2 us less per call
    return reference.linear_act(x, weight, bias, activation)


def fused_linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) in one fused op. x: (*, in), weight: (out, in), bias: (out,) or None -> (*, out)."""
    return _linear(x, weight, bias, "relu")


def fused_linear(x, weight, bias=None):
    """x @ weight.T + bias (no activation), same kernels. x: (*, in), weight: (out, in), bias: (out,) or None -> (*, out)."""
    return _linear(x, weight, bias, "none")
