"""The compiled ops (torch.ops.dynnet.*), their fake kernels, and the autograd.Function that
wraps them. Loading `_C` is the only thing in dynnet_ext allowed to fail softly: without it
the package still imports, warns once, and `functional` computes with stock PyTorch."""

import math
import os
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

# DYNNET_EXT_FORCE_STOCK=1: every functional form (and so every module and DynamicNet) computes
# with stock PyTorch instead of the fused ops - to compare against stock without changing code,
# and in CI to prove that the tests of the fused path fail when the kernels do not run.
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


def _check_same(name, t, x):
    torch._check(t.dtype == x.dtype, lambda: f"dynnet: {name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
    torch._check(t.device == x.device, lambda: f"dynnet: {name} must be on the same device as x ({x.device}), got {t.device}")


def _check_fake_args(x, weight, bias=None):
    # The rules of check_linear_args in csrc/common.h, for the fake/meta kernels: a call with any
    # fake or meta argument lands here and never reaches the C++ checks.
    torch._check(x.dtype in SUPPORTED_DTYPES, lambda: f"dynnet: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"dynnet: x must have at least 1 dimension (*, in_features), got a {x.dim()}-d tensor")
    torch._check(weight.dim() == 2, lambda: f"dynnet: weight must be 2-d (out_features, in_features), got shape {list(weight.shape)}")
    _check_same("weight", weight, x)
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"dynnet: x's last dimension ({x.shape[-1]}) must equal weight's in_features ({weight.shape[1]})")
    if bias is not None:
        _check_same("bias", bias, x)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"dynnet: bias must have shape (out_features,) = ({weight.shape[0]},), got {list(bias.shape)}")


def _check_activation(activation):
    torch._check(activation in ("relu", "none"), lambda: f"dynnet: activation must be 'relu' or 'none', got '{activation}'")


def _check_fake_backward_args(grad_y, x, weight, y, activation):
    _check_activation(activation)
    torch._check(activation == "none" or y is not None,
                 lambda: "dynnet: linear_relu_backward needs the forward output y when activation='relu'")
    _check_fake_args(x, weight)
    expected = (*x.shape[:-1], weight.shape[0])
    for name, t in (("grad_y", grad_y), ("y", y if y is not None else grad_y)):
        _check_same(name, t, x)
        torch._check(tuple(t.shape) == expected, lambda: f"dynnet: {name} must have shape {list(expected)} (x's leading dims, out_features), got {list(t.shape)}")


if _C is not None:

    @torch.library.register_fake("dynnet::linear_relu")
    def _linear_relu_fake(x, weight, bias, activation="relu"):
        _check_fake_args(x, weight, bias)
        _check_activation(activation)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("dynnet::linear_relu_backward")
    def _linear_relu_backward_fake(grad_y, x, weight, y, activation, output_mask):
        _check_fake_backward_args(grad_y, x, weight, y, activation)
        need_x, need_w, need_b = output_mask
        return (
            x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0),
        )


def _check_fake_dynamic_net_args(x, w_in, w_h, w_out, depth):
    # The rules of check_dynamic_net_args / check_dynamic_net_backward_args in csrc/common.h.
    torch._check(depth >= 0, lambda: f"dynnet: depth must be >= 0, got {depth}")
    _check_fake_args(x, w_in)
    H = w_in.shape[0]
    torch._check(w_h is not None or depth == 0,
                 lambda: f"dynnet: depth {depth} reuses the hidden layer, so w_h and b_h must be given")
    if w_h is not None:
        _check_same("w_h", w_h, x)
        torch._check(w_h.dim() == 2 and w_h.shape[0] == H and w_h.shape[1] == H,
                     lambda: f"dynnet: w_h must have shape (H, H) = ({H}, {H}), got {list(w_h.shape)}")
    _check_same("w_out", w_out, x)
    torch._check(w_out.dim() == 2 and w_out.shape[1] == H,
                 lambda: f"dynnet: w_out must have shape (D_out, H) with H = {H}, got {list(w_out.shape)}")


def _check_fake_bias(name, b, n, x):
    _check_same(name, b, x)
    torch._check(b.dim() == 1 and b.shape[0] == n, lambda: f"dynnet: {name} must have shape ({n},), got {list(b.shape)}")


if _C is not None:

    @torch.library.register_fake("dynnet::dynamic_net")
    def _dynamic_net_fake(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
        _check_fake_dynamic_net_args(x, w_in, w_h, w_out, depth)
        torch._check((w_h is None) == (b_h is None), lambda: "dynnet: w_h and b_h must both be given or both be None")
        H = w_in.shape[0]
        _check_fake_bias("b_in", b_in, H, x)
        if b_h is not None:
            _check_fake_bias("b_h", b_h, H, x)
        _check_fake_bias("b_out", b_out, w_out.shape[0], x)
        rows = math.prod(x.shape[:-1])
        return x.new_empty((*x.shape[:-1], w_out.shape[0])), x.new_empty(((depth + 1) * rows, H))

    @torch.library.register_fake("dynnet::dynamic_net_backward")
    def _dynamic_net_backward_fake(grad_out, x, w_in, w_h, w_out, acts, depth, output_mask):
        _check_fake_dynamic_net_args(x, w_in, w_h, w_out, depth)
        H, D_out = w_in.shape[0], w_out.shape[0]
        expected = (*x.shape[:-1], D_out)
        _check_same("grad_out", grad_out, x)
        torch._check(tuple(grad_out.shape) == expected,
                     lambda: f"dynnet: grad_out must have shape {list(expected)} (x's leading dims, D_out), got {list(grad_out.shape)}")
        _check_same("acts", acts, x)
        rows = math.prod(x.shape[:-1])
        torch._check(acts.dim() == 2 and acts.shape[0] == (depth + 1) * rows and acts.shape[1] == H,
                     lambda: f"dynnet: acts must have shape ((depth + 1) * M, H) = ({(depth + 1) * rows}, {H}), got {list(acts.shape)}")
        shapes = (x.shape, w_in.shape, (H,), (H, H), (H,), w_out.shape, (D_out,))
        return tuple(x.new_empty(shape if need else (0,)) for need, shape in zip(output_mask, shapes))


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
