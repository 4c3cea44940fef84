"""dynnet::linear_relu, y = act(x @ weight.T + bias), on the Python side: its formulas, its fake
kernels (and linear_act's, which returns the pre-activation z of a smooth activation beside y),
and the autograd.Functions that wrap it, for 'relu' and 'none', under torch.func and forward-mode
AD (eager calls go through the C++ node of csrc/autograd.cpp, which states the same formulas
again: tests/test_autograd.py pins it to these; it also runs the smooth activations)."""

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS, FUNCTION_ACTIVATIONS, SMOOTH_ACTIVATIONS, check_activation, stock_activation
from .functorch import add, batched_first, per_member, rows, transforms_active
from .library import _C, SUPPORTED_DTYPES

# ----------------------------------------------------------------------------- formulas
# Stated once: the Functions below, the network's rules (dynamic_net.py) and the stock fallback
# of dynnet_ext.functional all use these. With g = relu_mask(grad_y, y):
#   grad_x = input_grad(g, W) = g W,  grad_W = weight_grad(g, x) = g^T x,  grad_b = bias_grad(g) = sum g;
#   forward mode: dy = tangent(x, W, y, dx, dW, db) = relu_mask(dx W^T + x dW^T + db, y).


def stock_linear_act(x, weight, bias=None, activation="relu"):
    """act(x @ weight.T + bias) with stock ops, act any of activations.ACTIVATIONS.
    x: (*, in), weight: (out, in), bias: (out,)."""
    check_activation(activation)
    return stock_activation(F.linear(x, weight, bias), activation)


def relu_mask(g, y):
    """g where y > 0, else 0: threshold_backward's mask, the kernels' too (NaN lets g through).
    y None: no ReLU, g itself."""
    return g if y is None else g.masked_fill(y <= 0, 0)


def input_grad(g, weight):
    """The gradient of x: g @ W. g (*, out), weight (out, in) -> (*, in)."""
    return torch.matmul(g, weight)


def weight_grad(g, a):
    """The gradient of W: the sum over rows of g^T a. g (..., rows, out), a (..., rows, in) ->
    (..., out, in). With one row (a sample, in per-sample gradients) an outer product: a
    broadcast multiply, about twice as fast on the CPU as the batched matmul with K=1 that
    stock's batching rule runs."""
    return g.mT * a if g.shape[-2] == 1 else g.mT @ a


def bias_grad(g):
    """The gradient of b: the sum over rows of g. g (..., rows, out) -> (..., out)."""
    return g.sum(-2)


def tangent(x, weight, y, dx, dweight, dbias):
    """Forward-mode derivative of y = act(x @ weight.T + bias):
    dy = mask * (dx @ weight.T + x @ dweight.T + dbias), mask = y > 0 (y None: no ReLU, no mask).
    Tangents may be None (zero); returns None when all are. Stock ops: two GEMMs and a mask,
    nothing a fused kernel would save, and differentiable and batchable to any order."""
    dy = None if dx is None else F.linear(dx, weight)
    if dweight is not None:
        t = F.linear(x, dweight, dbias)
        dy = t if dy is None else dy + t
    elif dbias is not None:
        dy = dbias.expand(*x.shape[:-1], weight.shape[0]).clone() if dy is None else dy + dbias
    return None if dy is None else relu_mask(dy, y)


# ----------------------------------------------------------------------------- fake kernels


def check_same(name, t, x):
    torch._check(t.dtype == x.dtype, lambda: f"dynnet: {name} must have the same dtype as x ({x.dtype}), got {t.dtype}")
    torch._check(t.device == x.device, lambda: f"dynnet: {name} must be on the same device as x ({x.device}), got {t.device}")


def check_fake_args(x, weight, bias=None):
    # The rules of check_linear_args in csrc/common.h, for the fake/meta kernels: a call with any
    # fake or meta argument lands here and never reaches the C++ checks.
    torch._check(x.dtype in SUPPORTED_DTYPES, lambda: f"dynnet: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() >= 1, lambda: f"dynnet: x must have at least 1 dimension (*, in_features), got a {x.dim()}-d tensor")
    torch._check(weight.dim() == 2, lambda: f"dynnet: weight must be 2-d (out_features, in_features), got shape {list(weight.shape)}")
    check_same("weight", weight, x)
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"dynnet: x's last dimension ({x.shape[-1]}) must equal weight's in_features ({weight.shape[1]})")
    if bias is not None:
        check_same("bias", bias, x)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"dynnet: bias must have shape (out_features,) = ({weight.shape[0]},), got {list(bias.shape)}")


def _check_activation(activation, allowed=ACTIVATIONS):
    torch._check(activation in allowed, lambda: _activation_error(activation, allowed))


def _activation_error(activation, allowed):
    if allowed == SMOOTH_ACTIVATIONS:
        return (f"dynnet: linear_act's activation must be 'gelu', 'gelu_tanh' or 'silu', got '{activation}' "
                "(linear_relu computes 'relu' and 'none')")
    return f"dynnet: activation must be 'relu', 'gelu', 'gelu_tanh', 'silu' or 'none', got '{activation}'"


def _check_fake_backward_args(grad_y, x, weight, y, activation):
    _check_activation(activation)
    torch._check(activation == "none" or y is not None,
                 lambda: "dynnet: linear_relu_backward needs y: the forward output for 'relu', the pre-activation z "
                         "(linear_act's second output) for 'gelu', 'gelu_tanh' and 'silu'")
    check_fake_args(x, weight)
    expected = (*x.shape[:-1], weight.shape[0])
    for name, t in (("grad_y", grad_y), ("y", y if y is not None else grad_y)):
        check_same(name, t, x)
        torch._check(tuple(t.shape) == expected, lambda: f"dynnet: {name} must have shape {list(expected)} (x's leading dims, out_features), got {list(t.shape)}")


if _C is not None:

    @torch.library.register_fake("dynnet::linear_relu")
    def _linear_relu_fake(x, weight, bias, activation="relu"):
        check_fake_args(x, weight, bias)
        _check_activation(activation)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("dynnet::linear_act")
    def _linear_act_fake(x, weight, bias, activation):
        check_fake_args(x, weight, bias)
        _check_activation(activation, SMOOTH_ACTIVATIONS)
        shape = (*x.shape[:-1], weight.shape[0])
        return x.new_empty(shape), x.new_empty(shape)

    @torch.library.register_fake("dynnet::linear_relu_backward")
    def _linear_relu_backward_fake(grad_y, x, weight, y, activation, output_mask):
        _check_fake_backward_args(grad_y, x, weight, y, activation)
        need_x, need_w, need_b = output_mask
        return (
            x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_w else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if need_b else x.new_empty(0),
        )


# ----------------------------------------------------------------------------- autograd
class LinearReLUFunction(torch.autograd.Function):
    """y = act(x @ weight.T + bias) with the fused kernels, forward and backward; activation
    'relu' or 'none'. x: (*, in), weight: (out, in), bias: (out,) or None -> y: (*, out).

    Saves x, weight and (for 'relu') y: the ReLU mask is recomputed from y, so no mask tensor is
    kept. Only the gradients autograd asks for are computed, by the fused backward kernel, also
    when the backward is recorded (create_graph=True) or runs under a torch.func transform; the
    second derivatives come from LinearReLUBackwardFunction's rules.

    Works with torch.compile(fullgraph=True) and the reverse-mode torch.func transforms (grad,
    vjp, jacrev, vmap): `vmap` folds a batched x into the rows of one fused call (batched
    weights: one fused call per member). It has no `jvp` (forward mode): torch.compile cannot
    trace a Function that defines one. The functional forms and modules (fused_linear_relu,
    FusedLinearReLU, ...) support forward mode too, through LinearReLUJvpFunction.
    """

    @staticmethod
    def forward(x, weight, bias, activation):
        if activation not in FUNCTION_ACTIVATIONS:
            raise ValueError(f"LinearReLUFunction's activation must be 'relu' or 'none', got {activation!r}: "
                             "dynnet_ext.functional.fused_linear_act computes 'gelu', 'gelu_tanh' and 'silu'")
        return torch.ops.dynnet.linear_relu(x, weight, bias, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.activation = activation
        ctx.has_bias = bias is not None
        y = output if activation == "relu" else None
        ctx.save_for_backward(x, weight, y)
        ctx.save_for_forward(x, weight, y)  # for LinearReLUJvpFunction.jvp

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, y = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
        if not any(mask):
            return None, None, None, None
        if torch.is_grad_enabled() or transforms_active():
            grads = LinearReLUBackwardFunction.apply(grad_y, x, weight, y, ctx.activation, mask)
        else:
            grads = torch.ops.dynnet.linear_relu_backward(grad_y, x, weight, y, ctx.activation, list(mask))
        return (*(g if m else None for g, m in zip(grads, mask)), None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, activation):
        # Recurses into LinearReLUJvpFunction, which is this Function plus `jvp`: the rule
        # serves both, and vmap inside a forward-mode transform (jacfwd) needs the jvp.
        fn = LinearReLUJvpFunction.apply
        x_dim, w_dim, b_dim, _ = in_dims
        if w_dim is None and b_dim is None:
            # The vmapped dimension is one more leading dimension of x: all rows, one fused call.
            return fn(x.movedim(x_dim, 0), weight, bias, activation), 0
        return per_member(fn, info.batch_size, in_dims, (x, weight, bias, activation), 0)


class LinearReLUJvpFunction(LinearReLUFunction):
    """LinearReLUFunction plus forward mode (torch.func.jvp, jacfwd, hessian,
    torch.autograd.forward_ad): dy = mask * (dx @ W.T + x @ dW.T + db), mask = y > 0. What the
    functional forms use under any transform (they never reach it under torch.compile)."""

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight, y = ctx.saved_tensors
        return tangent(x, weight, y, dx, dweight, dbias)


class LinearReLUBackwardFunction(torch.autograd.Function):
    """(grad_x, grad_weight, grad_bias) of linear_relu by the fused backward kernel (None where
    `mask` is False): with g = mask * grad_y, grad_x = g @ W, grad_W = g^T x, grad_b = sum(g).
    Its backward, jvp and vmap rules are stock ops (the mask is piecewise constant: no derivative)."""

    @staticmethod
    def forward(grad_y, x, weight, y, activation, mask):
        grads = torch.ops.dynnet.linear_relu_backward(grad_y, x, weight, y, activation, list(mask))
        return tuple(g if m else None for g, m in zip(grads, mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, weight, y, _, mask = inputs
        ctx.mask = mask
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_y, x, weight, y)
        ctx.save_for_forward(grad_y, x, weight, y)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        grad_y, x, weight, y = ctx.saved_tensors
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        g = relu_mask(grad_y, y)
        # d/d grad_y of <ggx, g W> + <ggw, g^T x> + <ggb, sum g>: the forward's tangent formula.
        d_gy = tangent(x, weight, y, ggx, ggw, ggb) if need_gy else None
        d_x = input_grad(g, ggw) if need_x and ggw is not None else None
        d_w = weight_grad(rows(g), rows(ggx)) if need_w and ggx is not None else None
        return d_gy, d_x, d_w, None, None, None

    @staticmethod
    def jvp(ctx, d_gy, dx, dweight, _dy, _act, _mask):
        grad_y, x, weight, y = ctx.saved_tensors
        g = relu_mask(grad_y, y)
        dg = None if d_gy is None else relu_mask(d_gy, y)
        # The backward's formulas are bilinear: d(g W) = dg W + g dW;  d(g^T x) = dg^T x + g^T dx;  d(sum g) = sum dg.
        dgx = add(None if dg is None else input_grad(dg, weight), None if dweight is None else input_grad(g, dweight))
        dgw = add(None if dg is None else weight_grad(rows(dg), rows(x)), None if dx is None else weight_grad(rows(g), rows(dx)))
        dgb = None if dg is None else bias_grad(rows(dg))
        # An output with no tangent needs zeros, not None (autograd asserts on a None next to tensors).
        shapes = (x.shape, weight.shape, weight.shape[:1])
        return tuple((x.new_zeros(shape) if t is None else t) if m else None
                     for t, m, shape in zip((dgx, dgw, dgb), ctx.mask, shapes))

    @staticmethod
    def vmap(info, in_dims, grad_y, x, weight, y, activation, mask):
        gy_dim, x_dim, w_dim, y_dim = in_dims[:4]
        if w_dim is not None:
            return per_member(LinearReLUBackwardFunction.apply, info.batch_size, in_dims,
                               (grad_y, x, weight, y, activation, mask), 0)
        n = info.batch_size
        gy, xb = batched_first(grad_y, gy_dim, n), batched_first(x, x_dim, n)
        yb = None if y is None else batched_first(y, y_dim, n)
        gx = gw = gb = None
        if mask[0]:  # the vmapped dimension as rows: one fused call
            gx = LinearReLUBackwardFunction.apply(gy, xb, weight, yb, activation, (True, False, False))[0]
        if mask[1] or mask[2]:
            # Per-member weight gradients: a batch of g^T x products, which a kernel that sums
            # over all rows cannot give; a batched matmul, as stock computes them.
            g = relu_mask(gy, yb).reshape(n, -1, weight.shape[0])
            if mask[1]:
                gw = weight_grad(g, xb.reshape(n, -1, weight.shape[1]))
            if mask[2]:
                gb = bias_grad(g)
        outs = (gx, gw, gb)
        return outs, tuple(None if o is None else 0 for o in outs)

