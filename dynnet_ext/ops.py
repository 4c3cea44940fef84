"""The compiled ops (torch.ops.dynnet.*), their fake kernels, and the autograd.Functions that
wrap them (the path under torch.func transforms and forward-mode AD). Loading `_C` is the only thing in dynnet_ext allowed to fail softly: without it
the package still imports, warns once, and `functional` computes with stock PyTorch."""

import math
import os
import warnings

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------- CUDA paths
#
# The CUDA ops run each call on one of two paths (csrc/cuda/paths.h: "custom", the project's
# kernels, or "vendor", cuBLAS/cuBLASLt through ATen; for the whole-network op "one-launch" or
# "chain" of layer ops), chosen by one rule from one table of thresholds. These functions read
# and change the rule's state; they work on any build (the rule is plain C++), so the rule can be
# inspected and tested without a GPU.

CUDA_PATHS = ("auto", "custom", "vendor")
CUDA_PRECISIONS = ("float64", "float32", "tf32", "float16", "bfloat16")


def _require_C(what):
    if _C is None:
        raise RuntimeError(f"dynnet_ext: {what} needs the compiled library, which did not load ({LOAD_ERROR})")
    return _C


def cuda_path():
    """The forced CUDA path: 'auto' (the rule decides), 'custom' or 'vendor'. Set at load from
    DYNNET_EXT_CUDA_PATH, changed by set_cuda_path."""
    return _require_C("cuda_path").cuda_path()


def set_cuda_path(path):
    """Force every CUDA op onto one path ('custom', 'vendor') or let the rule choose ('auto');
    returns the previous setting. For tests and benchmarks: results are equal within the
    dtype's tolerance on every path, not bit for bit."""
    return _require_C("set_cuda_path").set_cuda_path(path)


def cuda_dispatch_table():
    """The live CUDA dispatch table: {entry: {precision: flops} or value} (csrc/cuda/paths.h)."""
    return _require_C("cuda_dispatch_table").cuda_dispatch_table()


def set_cuda_dispatch_table(changes):
    """Change entries of the live table (any subset of cuda_dispatch_table()'s keys and
    precisions); returns the previous table. reset_cuda_dispatch_table() restores the defaults."""
    return _require_C("set_cuda_dispatch_table").set_cuda_dispatch_table(dict(changes))


def reset_cuda_dispatch_table():
    _require_C("reset_cuda_dispatch_table").reset_cuda_dispatch_table()


def cuda_precision(dtype):
    """What the CUDA GEMMs of `dtype` compute in, the dispatch table's column: float32 is 'tf32'
    exactly where stock's cuBLAS GEMMs use TF32 (torch.backends.cuda.matmul.fp32_precision,
    inheriting torch.backends.fp32_precision, or the legacy allow_tf32 /
    torch.set_float32_matmul_precision), else 'float32'. The launchers' own function
    (csrc/cuda/precision.h) answers, so this is what the CUDA ops choose by."""
    names = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if dtype not in names:
        raise ValueError(f"dynnet_ext: no CUDA kernels for {dtype} (float64, float32, float16, bfloat16)")
    return _require_C("cuda_precision").cuda_gemm_precision(names[dtype])


def cuda_choose_layer(dtype, M, K, N, backward=False):
    """The path ('custom' or 'vendor') a CUDA layer op would take for x (M, K) and weight (N, K)."""
    return _require_C("cuda_choose_layer").cuda_choose_layer(cuda_precision(dtype), M, K, N, backward)


def cuda_choose_net(dtype, M, D_in, H, D_out, depth):
    """The path ('one-launch' or 'chain') a CUDA network op would take."""
    return _require_C("cuda_choose_net").cuda_choose_net(cuda_precision(dtype), M, D_in, H, D_out, depth)


def load_cuda_dispatch_table(path):
    """Set the live table from a thresholds file (the crossover sweep's thresholds.json, or any
    JSON with a "table" dict shaped like cuda_dispatch_table()); returns the previous table."""
    import json

    with open(path) as f:
        data = json.load(f)
    table = data.get("table", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"dynnet_ext: {path} holds no dispatch table (a JSON object with a 'table' object)")
    return set_cuda_dispatch_table(table)


if _C is not None and os.environ.get("DYNNET_EXT_CUDA_TABLE"):
    # A measured table (scripts/gpu_check.sh's thresholds.json) in place of the source's defaults.
    # A wrong file is an error at import: silently running on other thresholds would be worse.
    load_cuda_dispatch_table(os.environ["DYNNET_EXT_CUDA_TABLE"])


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


# ----------------------------------------------------------------------------- autograd
#
# Eager calls with no transform active go through the C++ autograd node on the Autograd key
# (csrc/autograd.cpp; ~2 us a call cheaper). The Functions below are the documented wrappers and
# the path under the torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and
# torch.autograd.forward_ad, which refuse a C++ autograd node: functorch runs an
# autograd.Function that has setup_context and, for vmap, a `vmap` staticmethod; forward mode
# needs a `jvp` staticmethod. The vmap rules are written by hand (generate_vmap_rule=True would
# vmap `forward`, i.e. the kernels, which have no batching rule): when only the input is
# batched, the vmapped dimension becomes one more leading dimension of x and every sample's rows
# go through ONE fused call; batched weights (model ensembles) loop over the members, one fused
# call each (see _per_member for why).
#
# Each op's backward is a Function too (LinearReLUBackwardFunction, DynamicNetBackwardFunction):
# torch.func.grad records every backward (it differentiates with create_graph=True), so a
# backward cannot tell whether its result will be differentiated again. As a Function whose
# forward is the fused backward kernel and whose own backward / jvp / vmap rules carry the
# higher derivatives (in stock ops), it leaves that to autograd and functorch: the fused kernel
# computes the gradients under every transform, and double backward, hessian and the rest stay
# exact.

_functorch_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_gradtracking = torch._C._functorch.is_gradtrackingtensor
_unwrap = torch._C._functorch.get_unwrapped
_level = torch._C._functorch.maybe_get_level


def transforms_active():
    """True under a torch.func transform or inside a torch.autograd.forward_ad dual level: where
    the C++ autograd node cannot serve and the Functions below must. One C call and one
    attribute read: ~0.3 us added to an eager call (measured A/B, ~2% of a 16-wide layer's
    forward, nothing measurable at the seed's shape)."""
    return _fwad._current_level >= 0 or _functorch_active()


def _tracked(*tensors, own_level=None):
    """Whether something outside the running rule may differentiate a result computed from
    `tensors`: a torch.func grad or jvp level they are wrapped by (other than `own_level`), or
    autograd (grad mode on and a tensor that requires grad). Rules that compute from the saved
    activations (which carry no derivative) recompute them instead when this is true."""
    for t in tensors:
        if t is None:
            continue
        while _is_wrapped(t):
            if _is_gradtracking(t) and _level(t) != own_level:
                return True
            t = _unwrap(t)
        if t.requires_grad and torch.is_grad_enabled():
            return True
    return False


def _jvp_level():
    """The functorch level whose tangent a jvp rule is computing (None under
    torch.autograd.forward_ad): its own wrappers do not make the tangent differentiated."""
    top = torch._C._functorch.peek_interpreter_stack()
    return top.level() if top is not None and top.key() == torch._C._functorch.TransformType.Jvp else None


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _relu_mask(g, y):
    """g where y > 0, else 0: threshold_backward's mask, the kernels' too (NaN lets g through)."""
    return g if y is None else g.masked_fill(y <= 0, 0)


def _weight_grad(g, a):
    """sum over rows of g^T a: g (..., rows, out), a (..., rows, in) -> (..., out, in). With one
    row (a sample, in per-sample gradients) an outer product: a broadcast multiply, about twice
    as fast on the CPU as the batched matmul with K=1 that stock's batching rule runs."""
    return g.mT * a if g.shape[-2] == 1 else g.mT @ a


def _linear_tangent(x, weight, y, dx, dweight, dbias):
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
    return None if dy is None else _relu_mask(dy, y)


def _sum(a, b):
    """a + b where None is zero."""
    return b if a is None else a if b is None else a + b


def _batched_first(t, dim, size):
    """t with its vmapped dimension first; an unbatched t expanded to `size` (a view)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _per_member(fn, size, in_dims, args, out_dim):
    """vmap of `fn` as a loop: fn on each member's slice of the batched arguments, outputs
    stacked along `out_dim` (an int, or one per output; None outputs stay None).

    The rule for batched weights (ensembles of models from torch.func.stack_module_state): each
    member is one fused call, forward and backward, with the results of running the members one
    by one. A stock batched matmul (bmm + bias + ReLU) would be one call for all members, but it
    is not fused (three ops and passes where the kernel does one) and would take the kernels out
    of the path; ensembles are a handful of models, so the loop's cost is a few fused calls.
    """
    results = [fn(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)))
               for i in range(size)]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results, out_dim), out_dim
    dims = out_dim if isinstance(out_dim, tuple) else (out_dim,) * len(results[0])
    outs = tuple(None if first is None else torch.stack([r[j] for r in results], dims[j])
                 for j, first in enumerate(results[0]))
    return outs, tuple(None if o is None else d for o, d in zip(outs, dims))


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
        return _per_member(fn, info.batch_size, in_dims, (x, weight, bias, activation), 0)


class LinearReLUJvpFunction(LinearReLUFunction):
    """LinearReLUFunction plus forward mode (torch.func.jvp, jacfwd, hessian,
    torch.autograd.forward_ad): dy = mask * (dx @ W.T + x @ dW.T + db), mask = y > 0. What the
    functional forms use under any transform (they never reach it under torch.compile)."""

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, _):
        x, weight, y = ctx.saved_tensors
        return _linear_tangent(x, weight, y, dx, dweight, dbias)


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
        g = _relu_mask(grad_y, y)
        # d/d grad_y of <ggx, g W> + <ggw, g^T x> + <ggb, sum g>: the forward's tangent formula.
        d_gy = _linear_tangent(x, weight, y, ggx, ggw, ggb) if need_gy else None
        d_x = torch.matmul(g, ggw) if need_x and ggw is not None else None
        d_w = _rows(g).mT @ _rows(ggx) if need_w and ggx is not None else None
        return d_gy, d_x, d_w, None, None, None

    @staticmethod
    def jvp(ctx, d_gy, dx, dweight, _dy, _act, _mask):
        grad_y, x, weight, y = ctx.saved_tensors
        g = _relu_mask(grad_y, y)
        dg = None if d_gy is None else _relu_mask(d_gy, y)
        # d(g W) = dg W + g dW;  d(g^T x) = dg^T x + g^T dx;  d(sum g) = sum dg.
        dgx = _sum(None if dg is None else dg @ weight, None if dweight is None else g @ dweight)
        dgw = _sum(None if dg is None else _rows(dg).mT @ _rows(x), None if dx is None else _rows(g).mT @ _rows(dx))
        dgb = None if dg is None else _rows(dg).sum(0)
        # An output with no tangent needs zeros, not None (autograd asserts on a None next to tensors).
        shapes = (x.shape, weight.shape, weight.shape[:1])
        return tuple((x.new_zeros(shape) if t is None else t) if m else None
                     for t, m, shape in zip((dgx, dgw, dgb), ctx.mask, shapes))

    @staticmethod
    def vmap(info, in_dims, grad_y, x, weight, y, activation, mask):
        gy_dim, x_dim, w_dim, y_dim = in_dims[:4]
        if w_dim is not None:
            return _per_member(LinearReLUBackwardFunction.apply, info.batch_size, in_dims,
                               (grad_y, x, weight, y, activation, mask), 0)
        n = info.batch_size
        gy, xb = _batched_first(grad_y, gy_dim, n), _batched_first(x, x_dim, n)
        yb = None if y is None else _batched_first(y, y_dim, n)
        gx = gw = gb = None
        if mask[0]:  # the vmapped dimension as rows: one fused call
            gx = LinearReLUBackwardFunction.apply(gy, xb, weight, yb, activation, (True, False, False))[0]
        if mask[1] or mask[2]:
            # Per-member weight gradients: a batch of g^T x products, which a kernel that sums
            # over all rows cannot give; a batched matmul, as stock computes them.
            g = _relu_mask(gy, yb).reshape(n, -1, weight.shape[0])
            if mask[1]:
                gw = _weight_grad(g, xb.reshape(n, -1, weight.shape[1]))
            if mask[2]:
                gb = g.sum(1)
        outs = (gx, gw, gb)
        return outs, tuple(None if o is None else 0 for o in outs)


def _stock_net_grads(grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    """Every gradient of the network (x, w_in, b_in, w_h, b_h, w_out, b_out; None for an absent
    w_h/b_h) by stock autograd, recomputing the forward: the fused backward's result as a
    function that torch.func can differentiate and batch to any order (the saved activations
    carry no derivative, the recomputed ones do)."""
    from . import reference

    inputs = (x, w_in, b_in, w_h, b_h, w_out, b_out)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def net(*args):
        full = list(inputs)
        for i, a in zip(present, args):
            full[i] = a
        return reference.dynamic_net(*full, depth)

    _, pullback = torch.func.vjp(net, *(inputs[i] for i in present))
    grads = [None] * 7
    for i, g in zip(present, pullback(grad_out)):
        grads[i] = g
    return tuple(grads)


def _net_grads_per_sample(grad_out, x, w_in, w_h, w_out, acts, depth, mask):
    """The gradients `mask` asks for (order of _stock_net_grads), one per sample, by the backward
    chain in stock ops from the saved activations: what dynamic_net_backward computes, without
    its sum over samples. grad_out (n, rows, D_out), x (n, rows, D_in), acts (depth + 1, n,
    rows, H) -> grad_x (n, rows, D_in), weight gradients (n, out, in), bias gradients (n, out)."""
    grads = [None] * 7

    def add(i, value):
        grads[i] = value if grads[i] is None else grads[i] + value

    g = grad_out
    if mask[5]:
        add(5, _weight_grad(g, acts[depth]))
    if mask[6]:
        add(6, g.sum(1))
    g = g @ w_out
    hidden = []  # the hidden layer's gradient at each of its uses: one product over all of them
    for k in range(depth, 0, -1):
        g = _relu_mask(g, acts[k])
        hidden.append(g)
        g = g @ w_h
    if hidden and (mask[3] or mask[4]):
        gs = torch.cat(hidden, 1)  # (n, depth * rows, H): uses k = depth..1
        if mask[3]:
            add(3, _weight_grad(gs, torch.cat([acts[k - 1] for k in range(depth, 0, -1)], 1)))
        if mask[4]:
            add(4, gs.sum(1))
    g = _relu_mask(g, acts[0])
    if mask[1]:
        add(1, _weight_grad(g, x))
    if mask[2]:
        add(2, g.sum(1))
    if mask[0]:
        add(0, g @ w_in)
    for i in (3, 4):  # depth 0 with the hidden layer given: it did not take part
        if mask[i] and grads[i] is None:
            grads[i] = g.new_zeros(g.shape[0], *(w_h.shape if i == 3 else w_h.shape[:1]))
    return tuple(grads)


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
            grads = torch.ops.dynnet.dynamic_net_backward(grad_out, x, w_in, w_h, w_out, _rows(acts), ctx.depth,
                                                          list(mask))
        return (*(g if m else None for g, m in zip(grads, mask)), None)

    @staticmethod
    def jvp(ctx, dx, dw_in, db_in, dw_h, db_h, dw_out, db_out, _):
        x, w_in, b_in, w_h, b_h, w_out, b_out, acts = ctx.saved_tensors
        depth = ctx.depth
        if _tracked(x, w_in, b_in, w_h, b_h, w_out, b_out, own_level=_jvp_level()):
            # The tangent will be differentiated (e.g. jacrev(jacfwd(f))): the chain over
            # activations recomputed with stock ops, which carry their derivatives.
            acts = _stock_activations(x, w_in, b_in, w_h, b_h, depth)
        dh = _linear_tangent(x, w_in, acts[0], dx, dw_in, db_in)
        for k in range(1, depth + 1):
            dh = _linear_tangent(acts[k - 1], w_h, acts[k], dh, dw_h, db_h)
        return _linear_tangent(acts[depth], w_out, None, dh, dw_out, db_out), None

    @staticmethod
    def vmap(info, in_dims, x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
        args = (x, w_in, b_in, w_h, b_h, w_out, b_out, depth)
        if any(d is not None for d in in_dims[1:7]):
            return _per_member(DynamicNetFunction.apply, info.batch_size, in_dims, args, (0, 1))
        # The vmapped dimension is one more leading dimension of x: all rows, one fused call.
        out, acts = DynamicNetFunction.apply(x.movedim(in_dims[0], 0), *args[1:])
        return (out, acts), (0, 1)


def _stock_activations(x, w_in, b_in, w_h, b_h, depth):
    """[h_0, ..., h_depth] of the network by stock ops."""
    hs = [F.relu(F.linear(x, w_in, b_in))]
    for _ in range(depth):
        hs.append(F.relu(F.linear(hs[-1], w_h, b_h)))
    return hs


def _grads_fn(ctx, moving, wanted):
    """The network's gradients `wanted` (indices into _stock_net_grads' result) as a stock
    function of the saved tensors at positions `moving` (grad_out, x, w_in, b_in, w_h, b_h,
    w_out, b_out), the others fixed: what DynamicNetBackwardFunction's rules differentiate."""
    tensors = ctx.saved_tensors

    def grads(*args):
        full = list(tensors)
        for i, a in zip(moving, args):
            full[i] = a
        g = _stock_net_grads(*full, ctx.depth)
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
        grads = torch.ops.dynnet.dynamic_net_backward(grad_out, x, w_in, w_h, w_out, _rows(acts), depth, list(mask))
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
            return _per_member(DynamicNetBackwardFunction.apply, info.batch_size, in_dims, args, 0)
        n, go_dim, x_dim, a_dim = info.batch_size, in_dims[0], in_dims[1], in_dims[8]
        gob, xb = _batched_first(grad_out, go_dim, n), _batched_first(x, x_dim, n)
        # acts (depth + 1, *, H): the batch goes second, after the layers, as the op lays out rows
        actsb = acts.unsqueeze(1).expand(acts.shape[0], n, *acts.shape[1:]) if a_dim is None else acts.movedim(a_dim, 1)
        if not any(mask[1:]):  # only grad_x: the vmapped dimension as rows, one fused call
            gx = DynamicNetBackwardFunction.apply(gob, xb, *args[2:8], actsb, depth, mask)[0]
            return (gx, *(None,) * 6), (0, *(None,) * 6)
        if _tracked(*args[:8]):
            # The gradients will be differentiated: from stock ops that recompute the
            # activations (the saved ones carry no derivative). Correct, not fast.
            wanted = [j for j, m in enumerate(mask) if m]

            def per_sample(go, xs):
                g = _stock_net_grads(go, xs, w_in, b_in, w_h, b_h, w_out, b_out, depth)
                return tuple(g[j] for j in wanted)

            grads = [None] * 7
            for j, g in zip(wanted, torch.vmap(per_sample, in_dims=(go_dim, x_dim))(grad_out, x)):
                # grad_b_out can be grad_out itself; functorch rejects an input returned as an output
                grads[j] = g.clone() if g is grad_out else g
        else:
            H = w_in.shape[0]
            grads = list(_net_grads_per_sample(gob.reshape(n, -1, gob.shape[-1]), xb.reshape(n, -1, xb.shape[-1]),
                                               w_in, w_h, w_out, actsb.reshape(depth + 1, n, -1, H), depth, mask))
            if grads[0] is not None:
                grads[0] = grads[0].reshape(xb.shape)
        return tuple(grads), tuple(None if g is None else 0 for g in grads)
