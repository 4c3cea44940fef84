"""Functional forms of the fused layers. Data path: functional -> torch.ops.dynnet.linear_relu
(its autograd formula registered in C++, csrc/autograd.cpp: the same formula as the Python
LinearReLUFunction without the Python per-call cost) -> CPU or CUDA kernel. In eager mode the
op is called through _C.linear_relu, the same dispatcher call minus torch.ops' Python-side
argument handling; torch.compile and tensors with __torch_function__ get torch.ops. Under a
torch.func transform (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) or a
torch.autograd.forward_ad dual level, which refuse the C++ autograd node, the same op goes
through the Python autograd.Functions of dynnet_ext.ops (one module per op), which carry vmap
and jvp rules for 'relu' and 'none'; there fused_linear_act's GELU and SiLU are that op without
activation followed by stock's activation op (dynnet_ext.ops.activations).
dynamic_net runs the whole DynamicNet the same way, through torch.ops.dynnet.dynamic_net.
Inputs the kernels cannot take (no kernels compiled for the device, or a dtype other than
float32/64, float16, bfloat16), and every input when DYNNET_EXT_FORCE_STOCK=1 is set, go through
stock PyTorch instead, with the same results: the stock formulas of dynnet_ext.ops' op modules,
which dynnet_ext.reference (the tests' oracle) re-exports; nothing here imports reference."""

import torch
from torch.overrides import has_torch_function

from .ops import FORCE_STOCK, SUPPORTED_DTYPES, DynamicNetFunction, LinearReLUJvpFunction, _C, has_kernels, transforms_active
from .ops import cuda_paths
from .ops.activations import SMOOTH_ACTIVATIONS, check_activation, stock_activation
from .ops.dynamic_net import stock_dynamic_net
from .ops.linear_relu import stock_linear_act


def _autocast(*tensors):
    """The arguments as torch.autocast casts nn.Linear's: a floating tensor of the autocast
    device other than float64 to the autocast dtype, the rest unchanged. For the torch.func path
    only: the ops themselves cast under autocast (csrc/autocast.cpp), stock's ops likewise."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    cast = torch.get_autocast_dtype(device_type)
    return tuple(t.to(cast) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 and t.device.type == device_type else t for t in tensors)


def _eligible(x):
    device = x.device.type
    if FORCE_STOCK or not has_kernels(device) or x.dtype not in SUPPORTED_DTYPES:
        return False
    if device == "cuda" and not cuda_paths.env_table_applied and not torch.compiler.is_compiling():
        cuda_paths.apply_env_table()  # DYNNET_EXT_CUDA_TABLE, read on the first CUDA call
    return True


@torch.compiler.disable
def _transformed(function, *args):
    """function.apply(*args) under a torch.func transform or forward AD. Never traced: Dynamo's
    fake tensors inside a traced transform reach the op's C++ autograd node, which refuses
    functorch (torch 2.11 raises there); as a graph break, the transform runs eagerly."""
    return function.apply(*args)


def _linear(x, weight, bias, activation):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if _eligible(x):
        if transforms_active():
            if activation in SMOOTH_ACTIVATIONS:
                return stock_activation(_transformed(LinearReLUJvpFunction, *_autocast(x, weight, bias), "none"), activation)
            return _transformed(LinearReLUJvpFunction, *_autocast(x, weight, bias), activation)
        if torch.compiler.is_compiling() or has_torch_function((x, weight, bias)):
            return torch.ops.dynnet.linear_relu(x, weight, bias, activation)
        return _C.linear_relu(x, weight, bias, activation)  # same op, ~2 us less per call
    return stock_linear_act(x, weight, bias, activation)


def fused_linear_relu(x, weight, bias=None):
    """relu(x @ weight.T + bias) in one fused op. x: (*, in), weight: (out, in), bias: (out,) or None -> (*, out)."""
    return _linear(x, weight, bias, "relu")


def fused_linear(x, weight, bias=None):
    """x @ weight.T + bias (no activation), same kernels. x: (*, in), weight: (out, in), bias: (out,) or None -> (*, out)."""
    return _linear(x, weight, bias, "none")


def fused_linear_act(x, weight, bias=None, activation="relu"):
    """act(x @ weight.T + bias), act one of "relu", "gelu" (F.gelu, exact), "gelu_tanh"
    (F.gelu(approximate="tanh")), "silu" (F.silu), "none". x: (*, in), weight: (out, in), bias:
    (out,) or None -> (*, out).

    One fused op for every activation: the smooth ones' activation and derivative are the
    kernels' (dynnet_ext.ops.activations says how they compare with stock's), and the backward
    saves the pre-activation z, as stock nn.Linear + nn.GELU / nn.SiLU do."""
    check_activation(activation)
    return _linear(x, weight, bias, activation)


def dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    """The whole DynamicNet forward in one fused op (and its backward in one more):
    h = relu(x @ w_in.T + b_in); `depth` times h = relu(h @ w_h.T + b_h); out = h @ w_out.T + b_out.

    x: (*, D_in), w_in: (H, D_in), b_in: (H,), w_h: (H, H), b_h: (H,), w_out: (D_out, H),
    b_out: (D_out,) -> (*, D_out). w_h and b_h may be None at depth 0 (then they are not part of
    the graph, as in the stock model). One autograd node; the shared hidden layer's gradients are
    summed over its `depth` uses inside the backward op.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    if _eligible(x):
        args = (x, w_in, b_in, w_h, b_h, w_out, b_out)
        if transforms_active():
            return _transformed(DynamicNetFunction, *_autocast(*args), depth)[0]
        if torch.compiler.is_compiling() or has_torch_function(args):
            return torch.ops.dynnet.dynamic_net(*args, depth)[0]
        return _C.dynamic_net(*args, depth)[0]
    return stock_dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth)
