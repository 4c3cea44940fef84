"""dynnet::dynamic_net, the whole DynamicNet in one op, on the Python side: the stock network and
its backward chain (stated once, from the layer's formulas in linear_relu.py), the fake kernels,
and the autograd.Functions that wrap the op under torch.func and forward-mode AD (eager calls go
through the C++ node of csrc/autograd.cpp: tests/test_autograd.py pins it to these).

    h = relu(x @ w_in.T + b_in); `depth` times h = relu(h @ w_h.T + b_h); out = h @ w_out.T + b_out
"""

import math

import torch

from .functorch import batched_first, jvp_level, per_member, rows, tracked, transforms_active
from .library import _C
from .linear_relu import (bias_grad, check_fake_args, check_same, input_grad, relu_mask, stock_linear_act, tangent,
                          weight_grad)

# ----------------------------------------------------------------------------- formulas


def stock_activations(x, w_in, b_in, w_h, b_h, depth):
    """[h_0, ..., h_depth] of the network by stock ops."""
    hs = [stock_linear_act(x, w_in, b_in)]
    for _ in range(depth):
        hs.append(stock_linear_act(hs[-1], w_h, b_h))
    return hs


def stock_dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    """DynamicNet's forward as a function of its parameters, with stock ops (w_h, b_h may be None
    at depth 0). x: (*, D_in) -> (*, D_out)."""
    return stock_linear_act(stock_activations(x, w_in, b_in, w_h, b_h, depth)[-1], w_out, b_out, "none")


def stock_net_grads(grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    """Every gradient of the network (x, w_in, b_in, w_h, b_h, w_out, b_out; None for an absent
    w_h/b_h) by stock autograd, recomputing the forward: the fused backward's result as a
    function that torch.func can differentiate and batch to any order (the saved activations
    carry no derivative, the recomputed ones do)."""
    inputs = (x, w_in, b_in, w_h, b_h, w_out, b_out)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def net(*args):
        full = list(inputs)
        for i, a in zip(present, args):
            full[i] = a
        return stock_dynamic_net(*full, depth)

    _, pullback = torch.func.vjp(net, *(inputs[i] for i in present))
    grads = [None] * 7
    for i, g in zip(present, pullback(grad_out)):
        grads[i] = g
    return tuple(grads)


def net_grads_per_sample(grad_out, x, w_in, w_h, w_out, acts, depth, mask):
    """The gradients `mask` asks for (order of stock_net_grads), one per sample, by the backward
    chain of the layer's formulas from the saved activations: what dynamic_net_backward computes,
    without its sum over samples. grad_out (n, rows, D_out), x (n, rows, D_in), acts (depth + 1,
    n, rows, H) -> grad_x (n, rows, D_in), weight gradients (n, out, in), bias gradients (n, out)."""
    grads = [None] * 7

    def accumulate(i, value):
        grads[i] = value if grads[i] is None else grads[i] + value

    g = grad_out
    if mask[5]:
        accumulate(5, weight_grad(g, acts[depth]))
    if mask[6]:
        accumulate(6, bias_grad(g))
    g = input_grad(g, w_out)
    hidden = []  # the hidden layer's gradient at each of its uses: one product over all of them
    for k in range(depth, 0, -1):
        g = relu_mask(g, acts[k])
        hidden.append(g)
        g = input_grad(g, w_h)
    if hidden and (mask[3] or mask[4]):
        gs = torch.cat(hidden, 1)  # (n, depth * rows, H): uses k = depth..1
        if mask[3]:
            accumulate(3, weight_grad(gs, torch.cat([acts[k - 1] for k in range(depth, 0, -1)], 1)))
        if mask[4]:
            accumulate(4, bias_grad(gs))
    g = relu_mask(g, acts[0])
    if mask[1]:
        accumulate(1, weight_grad(g, x))
    if mask[2]:
        accumulate(2, bias_grad(g))
    if mask[0]:
        accumulate(0, input_grad(g, w_in))
    for i in (3, 4):  # depth 0 with the hidden layer given: it did not take part
        if mask[i] and grads[i] is None:
            grads[i] = g.new_zeros(g.shape[0], *(w_h.shape if i == 3 else w_h.shape[:1]))
    return tuple(grads)


# ----------------------------------------------------------------------------- fake kernels


def _check_fake_dynamic_net_args(x, w_in, w_h, w_out, depth):
    # The rules of check_dynamic_net_args / check_dynamic_net_backward_args in csrc/common.h.
    torch._check(depth >= 0, lambda: f"dynnet: depth must be >= 0, got {depth}")
    check_fake_args(x, w_in)
    H = w_in.shape[0]
    torch._check(w_h is not None or depth == 0,
                 lambda: f"dynnet: depth {depth} reuses the hidden layer, so w_h and b_h must be given")
    if w_h is not None:
        check_same("w_h", w_h, x)
        torch._check(w_h.dim() == 2 and w_h.shape[0] == H and w_h.shape[1] == H,
                     lambda: f"dynnet: w_h must have shape (H, H) = ({H}, {H}), got {list(w_h.shape)}")
    check_same("w_out", w_out, x)
    torch._check(w_out.dim() == 2 and w_out.shape[1] == H,
                 lambda: f"dynnet: w_out must have shape (D_out, H) with H = {H}, got {list(w_out.shape)}")


def _check_fake_bias(name, b, n, x):
    check_same(name, b, x)
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
        m = math.prod(x.shape[:-1])
        return x.new_empty((*x.shape[:-1], w_out.shape[0])), x.new_empty(((depth + 1) * m, H))

    @torch.library.register_fake("dynnet::dynamic_net_backward")
    def _dynamic_net_backward_fake(grad_out, x, w_in, w_h, w_out, acts, depth, output_mask):
        _check_fake_dynamic_net_args(x, w_in, w_h, w_out, depth)
        H, D_out = w_in.shape[0], w_out.shape[0]
        expected = (*x.shape[:-1], D_out)
        check_same("grad_out", grad_out, x)
        torch._check(tuple(grad_out.shape) == expected,
                     lambda: f"dynnet: grad_out must have shape {list(expected)} (x's leading dims, D_out), got {list(grad_out.shape)}")
        check_same("acts", acts, x)
        m = math.prod(x.shape[:-1])
        torch._check(acts.dim() == 2 and acts.shape[0] == (depth + 1) * m and acts.shape[1] == H,
                     lambda: f"dynnet: acts must have shape ((depth + 1) * M, H) = ({(depth + 1) * m}, {H}), got {list(acts.shape)}")
        shapes = (x.shape, w_in.shape, (H,), (H, H), (H,), w_out.shape, (D_out,))
        return tuple(x.new_empty(shape if need else (0,)) for need, shape in zip(output_mask, shapes))

# ----------------------------------------------------------------------------- autograd


class DynamicNetFunction(torch.autograd.Function):
    """The whole DynamicNet in one fused op, forward and backward:
    h = relu(x @ w_in.T + b_in); `depth` times h = relu(h @ w_h.T + b_h); out = h @ w_out.T + b_out.

    Returns (out, acts): out (*, D_out) and acts (depth + 1, *, H), the activations h_0..h_depth
    the backward needs, returned (not differentiable) because setup_context can only save
    inputs and outputs. w_h, b_h may be None at depth 0.

    torch.func: `vmap` folds a batched x into the rows of one fused call (batched weights: one
    fused call per member); `jvp` is the network's chain of dh = mask * (dh_prev @ W.T +
    h_prev @ dW.T + db), from the saved activations.
    """

    @staticmethod
    def forward(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
        out, acts = torch.ops.dynnet.dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth)
        return out, acts.view(depth + 1, *x.shape[:-1], w_in.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, depth = inputs
        acts = output[1]
        ctx.depth = depth
        ctx.mark_non_differentiable(acts)
        ctx.set_materialize_grads(False)  # acts never gets a gradient: no zeros tensor for it
        ctx.save_for_backward(*tensors, acts)
        ctx.save_for_forward(*tensors, acts)

    @staticmethod
    def backward(ctx, grad_out, _grad_acts):
        *inputs, acts = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:7])
        if grad_out is None or not any(mask):  # out unused: every gradient is zero
            return (None,) * 8
        if torch.is_grad_enabled() or transforms_active():
            grads = DynamicNetBackwardFunction.apply(grad_out, *inputs, acts, ctx.depth, mask)
        else:
            x, w_in, _, w_h, _, w_out, _ = inputs
            grads = torch.ops.dynnet.dynamic_net_backward(grad_out, x, w_in, w_h, w_out, rows(acts), ctx.depth,
                                                          list(mask))
        return (*(g if m else None for g, m in zip(grads, mask)), None)

    @staticmethod
    def jvp(ctx, dx, dw_in, db_in, dw_h, db_h, dw_out, db_out, _):
        x, w_in, b_in, w_h, b_h, w_out, b_out, acts = ctx.saved_tensors
        depth = ctx.depth
        if tracked(x, w_in, b_in, w_h, b_h, w_out, b_out, own_level=jvp_level()):
            # The tangent will be differentiated (e.g. jacrev(jacfwd(f))): the chain over
            # activations recomputed with stock ops, which carry their derivatives.
            acts = stock_activations(x, w_in, b_in, w_h, b_h, depth)
        dh = tangent(x, w_in, acts[0], dx, dw_in, db_in)
        for k in range(1, depth + 1):
            dh = tangent(acts[k - 1], w_h, acts[k], dh, dw_h, db_h)
        return tangent(acts[depth], w_out, None, dh, dw_out, db_out), None

    @staticmethod
    def vmap(info, in_dims, x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
        args = (x, w_in, b_in, w_h, b_h, w_out, b_out, depth)
        if any(d is not None for d in in_dims[1:7]):
            return per_member(DynamicNetFunction.apply, info.batch_size, in_dims, args, (0, 1))
        # The vmapped dimension is one more leading dimension of x: all rows, one fused call.
        out, acts = DynamicNetFunction.apply(x.movedim(in_dims[0], 0), *args[1:])
        return (out, acts), (0, 1)


def _grads_fn(ctx, moving, wanted):
    """The network's gradients `wanted` (indices into stock_net_grads' result) as a stock
    function of the saved tensors at positions `moving` (grad_out, x, w_in, b_in, w_h, b_h,
    w_out, b_out), the others fixed: what DynamicNetBackwardFunction's rules differentiate."""
    tensors = ctx.saved_tensors

    def grads(*args):
        full = list(tensors)
        for i, a in zip(moving, args):
            full[i] = a
        g = stock_net_grads(*full, ctx.depth)
        return tuple(g[j] for j in wanted)

    return grads


class DynamicNetBackwardFunction(torch.autograd.Function):
    """Every gradient of dynamic_net by the fused backward kernel (None where `mask` is False),
    from the saved activations acts (depth + 1, *, H). Its backward and jvp (second
    derivatives) recompute the network with stock ops: the activations were saved without a
    derivative. Under vmap, only grad_x folds into one fused call; per-sample weight gradients
    are batched matmuls (the kernel sums over all rows), as stock computes them."""

    @staticmethod
    def forward(grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, acts, depth, mask):
        grads = torch.ops.dynnet.dynamic_net_backward(grad_out, x, w_in, w_h, w_out, rows(acts), depth, list(mask))
        return tuple(g if m else None for g, m in zip(grads, mask))

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, _acts, depth, mask = inputs
        ctx.depth, ctx.mask = depth, mask
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, *ggrads):
        tensors = ctx.saved_tensors  # grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out
        wanted = [j for j, g in enumerate(ggrads) if g is not None]
        moving = [i for i, t in enumerate(tensors) if t is not None and ctx.needs_input_grad[i]]
        result = [None] * 11
        if wanted and moving:
            _, pullback = torch.func.vjp(_grads_fn(ctx, moving, wanted), *(tensors[i] for i in moving))
            for i, g in zip(moving, pullback(tuple(ggrads[j] for j in wanted))):
                result[i] = g
        return tuple(result)

    @staticmethod
    def jvp(ctx, *tangents):
        # By reverse mode twice: <vjp(u), t> is linear in the cotangent u, its gradient is the
        # jvp. torch.func.jvp would need a second forward-AD level, which
        # torch.autograd.forward_ad does not allow.
        tensors = ctx.saved_tensors
        moving = [i for i, t in enumerate(tensors) if t is not None and tangents[i] is not None]
        wanted = [j for j, m in enumerate(ctx.mask) if m]
        grads, pullback = torch.func.vjp(_grads_fn(ctx, moving, wanted), *(tensors[i] for i in moving))

        def dot(u):
            return sum((g * tangents[i]).sum() for g, i in zip(pullback(u), moving))

        result = [None] * 7
        for j, d in zip(wanted, torch.func.grad(dot)(tuple(torch.zeros_like(g) for g in grads))):
            result[j] = d
        return tuple(result)

    @staticmethod
    def vmap(info, in_dims, grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, acts, depth, mask):
        args = (grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, acts, depth, mask)
        if any(d is not None for d in in_dims[2:8]):
            return per_member(DynamicNetBackwardFunction.apply, info.batch_size, in_dims, args, 0)
        n, go_dim, x_dim, a_dim = info.batch_size, in_dims[0], in_dims[1], in_dims[8]
        gob, xb = batched_first(grad_out, go_dim, n), batched_first(x, x_dim, n)
        # acts (depth + 1, *, H): the batch goes second, after the layers, as the op lays out rows
        actsb = acts.unsqueeze(1).expand(acts.shape[0], n, *acts.shape[1:]) if a_dim is None else acts.movedim(a_dim, 1)
        if not any(mask[1:]):  # only grad_x: the vmapped dimension as rows, one fused call
            gx = DynamicNetBackwardFunction.apply(gob, xb, *args[2:8], actsb, depth, mask)[0]
            return (gx, *(None,) * 6), (0, *(None,) * 6)
        if tracked(*args[:8]):
            # The gradients will be differentiated: from stock ops that recompute the
            # activations (the saved ones carry no derivative). Correct, not fast.
            wanted = [j for j, m in enumerate(mask) if m]

            def per_sample(go, xs):
                g = stock_net_grads(go, xs, w_in, b_in, w_h, b_h, w_out, b_out, depth)
                return tuple(g[j] for j in wanted)

            grads = [None] * 7
            for j, g in zip(wanted, torch.vmap(per_sample, in_dims=(go_dim, x_dim))(grad_out, x)):
                # grad_b_out can be grad_out itself; functorch rejects an input returned as an output
                grads[j] = g.clone() if g is grad_out else g
        else:
            H = w_in.shape[0]
            grads = list(net_grads_per_sample(gob.reshape(n, -1, gob.shape[-1]), xb.reshape(n, -1, xb.shape[-1]),
                                               w_in, w_h, w_out, actsb.reshape(depth + 1, n, -1, H), depth, mask))
            if grads[0] is not None:
                grads[0] = grads[0].reshape(xb.shape)
        return tuple(grads), tuple(None if g is None else 0 for g in grads)
