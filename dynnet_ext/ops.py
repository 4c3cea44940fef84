"""The compiled ops (torch.ops.dynnet.*), their fake kernels, and the autograd.Function that
wraps them. Loading `_C` is the only thing in dynnet_ext allowed to fail softly: without it
the package still imports, warns once, and `functional` computes with stock PyTorch."""

import warnings

import torch

try:
    from . import _C
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


def has_kernels(device_type):
    """True when compiled kernels exist for this device type ('cpu' or 'cuda')."""
    if device_type == "cpu":
        return bool(BUILD_INFO["cpu_kernels"])
    if device_type == "cuda":
        return bool(BUILD_INFO["cuda_kernels"])
    return False


def _check_fake_args(x, weight):
    # The shape/dtype/device rules of csrc/common.h, for fake and meta tensors (which never
    # reach the C++ checks).
    torch._check(weight.dim() == 2, lambda: f"dynnet: weight must be 2-d (out_features, in_features), got shape {list(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"dynnet: weight must have the same dtype as x ({x.dtype}), got {weight.dtype}")
    torch._check(weight.device == x.device, lambda: f"dynnet: weight must be on the same device as x ({x.device}), got {weight.device}")
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"dynnet: x's last dimension ({x.shape[-1]}) must equal weight's in_features ({weight.shape[1]})")


if _C is not None:

    @torch.library.register_fake("dynnet::linear_relu")
    def _linear_relu_fake(x, weight, bias, activation="relu"):
        _check_fake_args(x, weight)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("dynnet::linear_relu_backward")
    def _linear_relu_backward_fake(grad_y, x, weight, y, activation, output_mask):
        _check_fake_args(x, weight)
        need_x, need_w, need_b = output_mask
        return (
            x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0),
        )


class LinearReLUFunction(torch.autograd.Function):
    """y = act(x @ weight.T + bias) with the fused kernels, forward and backward.

    Saves x, weight and (for 'relu') y: the ReLU mask is recomputed from y, so no mask tensor is
    kept. Only the gradients autograd asks for are computed. Twice differentiable: when the
    backward itself is recorded (create_graph=True, e.g. a gradient penalty), it is computed
    with stock differentiable ops from the same formula instead of the fused kernel.
    """

    @staticmethod
    def forward(x, weight, bias, activation):
        return torch.ops.dynnet.linear_relu(x, weight, bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, output if activation == "relu" else None)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b and ctx.has_bias]
        if not any(mask):
            return None, None, None, None
        if torch.is_grad_enabled():
            gx, gw, gb = _differentiable_backward(grad_y, x, weight, y, mask)
        else:
            gx, gw, gb = torch.ops.dynnet.linear_relu_backward(grad_y, x, weight, y, ctx.activation, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None)


def _differentiable_backward(grad_y, x, weight, y, mask):
    """The backward formula in stock ops, so autograd can differentiate it (double backward).
    The mask is threshold_backward's (zero where y <= 0; NaN lets the gradient through)."""
    g = grad_y if y is None else torch.where(y <= 0, torch.zeros_like(grad_y), grad_y)
    g2 = g.reshape(-1, weight.shape[0])
    gx = (g @ weight) if mask[0] else None
    gw = (g2.T @ x.reshape(-1, weight.shape[1])) if mask[1] else None
    gb = g2.sum(0) if mask[2] else None
    return gx, gw, gb
