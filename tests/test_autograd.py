"""The autograd of the fused layer, both ways it exists: the C++ formula on the Autograd key
(what torch.ops.dynnet.linear_relu and the functional forms use) and the Python
LinearReLUFunction. Gradcheck, needs_input_grad, saved tensors, double backward, fallbacks,
autocast, torch.compile; and the C++ nodes (layer and network) pinned to the Python formulas."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dynnet_ext
from conftest import tol
from dynnet_ext import LinearReLUFunction, reference
from dynnet_ext.functional import fused_linear, fused_linear_act, fused_linear_relu


PATHS = {
    "cpp": lambda x, w, b, act: torch.ops.dynnet.linear_relu(x, w, b, act),
    "python": lambda x, w, b, act: LinearReLUFunction.apply(x, w, b, act),
}
NODE_NAMES = {"cpp": "CppNode<dynnet::(anonymous namespace)::LinearReLU>", "python": "LinearReLUFunctionBackward"}


@pytest.fixture(params=sorted(PATHS))
def path(request):
    return request.param


def leaves(lead, k, n, device, dtype=torch.float64, bias=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True) if bias else None
    return x, w, b


FUNCTIONAL = {"relu": fused_linear_relu, "none": fused_linear,
              **{act: functools.partial(fused_linear_act, activation=act) for act in ("gelu", "gelu_tanh", "silu")}}


@pytest.mark.parametrize("fn", FUNCTIONAL.values(), ids=FUNCTIONAL.keys())
@pytest.mark.parametrize("shape", [((5,), 7, 3), ((2, 3), 4, 6), ((), 5, 2), ((1,), 1, 1)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(fn, shape, bias, device, ran):
    x, w, b = leaves(*shape, device, bias=bias)
    with ran("linear_relu", "linear_relu_backward", device=device):
        assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_each_path(path, activation, bias, device):
    x, w, b = leaves((6,), 5, 4, device, bias=bias)
    fn = PATHS[path]
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, activation), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: fn(x, w, b, activation), (x, w, b))


class OpLog(TorchDispatchMode):
    """Records every aten/dynnet op call with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_only_requested_grads_are_computed(needs, path, device):
    x = torch.randn(4, 5, device=device, requires_grad=needs[0])
    w = torch.randn(3, 5, device=device, requires_grad=needs[1])
    b = torch.randn(3, device=device, requires_grad=needs[2])
    y = PATHS[path](x, w, b, "relu")
    with OpLog() as log:
        y.sum().backward()
    masks = [args[5] for name, args in log.calls if "linear_relu_backward" in name]
    assert masks == [list(needs)]
    for t, need in zip((x, w, b), needs):
        assert (t.grad is not None) == need


def test_saves_only_x_weight_y(path, device):
    x, w, b = leaves((4,), 5, 3, device, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = PATHS[path](x, w, b, "relu")
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), w.data_ptr(), y.data_ptr()]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        PATHS[path](x, w, b, "none")
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), w.data_ptr()]  # no activation: y is not needed


def test_one_autograd_node_per_layer(path, device):
    x, w, b = leaves((4,), 5, 3, device, dtype=torch.float32)
    y = PATHS[path](x, w, b, "relu")
    assert NODE_NAMES[path] in y.grad_fn.name()
    assert all(fn is None or type(fn).__name__ == "AccumulateGrad" for fn, _ in y.grad_fn.next_functions)


def test_gradient_penalty_matches_stock(path, device):
    # A loss that contains a gradient: the fused layer must not silently drop its dependence.
    x, w, b = leaves((6,), 5, 4, device)
    grads = []
    for f in (lambda x, w, b: PATHS[path](x, w, b, "relu"), reference.linear_act):
        out = f(x, w, b)
        (gx,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
        loss = out.sum() + gx.pow(2).sum()
        grads.append(torch.autograd.grad(loss, (x, w, b)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_inplace_change_of_output_is_detected(path, device):
    x, w, b = leaves((4,), 5, 3, device)
    y = PATHS[path](x, w, b, "relu")
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_unsupported_dtype_falls_back_to_stock():
    # complex: no fused kernel; the functional form computes it with stock PyTorch.
    x = torch.randn(3, 4, dtype=torch.complex64)
    w = torch.randn(2, 4, dtype=torch.complex64)
    torch.testing.assert_close(fused_linear(x, w), reference.linear_act(x, w, None, "none"))


def test_no_kernels_for_device_falls_back(monkeypatch):
    monkeypatch.setitem(dynnet_ext.ops.BUILD_INFO, "cpu_kernels", False)
    x, w, b = leaves((4,), 5, 3, "cpu")
    y = fused_linear_relu(x, w, b)
    assert y.grad_fn is not None and "LinearReLU" not in y.grad_fn.name()
    torch.testing.assert_close(y, reference.linear_act(x, w, b))


AUTOCAST = [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")),
]


@pytest.mark.parametrize("device_type,dtype", AUTOCAST, ids=str)
def test_autocast_behaves_like_nn_linear(device_type, dtype, ran):
    x = torch.randn(8, 16, device=device_type, requires_grad=True)
    layer = dynnet_ext.nn.FusedLinearReLU(16, 4, device=device_type)
    stock = torch.nn.Linear(16, 4, device=device_type)
    stock.load_state_dict(layer.state_dict())
    with ran("linear_relu", "linear_relu_backward", device=device_type):
        with torch.autocast(device_type, dtype=dtype):
            y = layer(x)
        y.float().sum().backward()
    with torch.autocast(device_type, dtype=dtype):
        ref = torch.relu(stock(x))
    assert y.dtype == ref.dtype == dtype
    torch.testing.assert_close(y, ref, **tol(dtype))
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone_as_nn_linear(ran):
    # torch.autocast casts nn.Linear's float32 arguments, never float64 ones (cached_cast's rule;
    # csrc/autocast.cpp): a float64 fused layer computes in float64 under autocast as stock's does.
    x = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    layer = dynnet_ext.nn.FusedLinearGELU(16, 4, dtype=torch.float64)
    stock = torch.nn.Linear(16, 4, dtype=torch.float64)
    stock.load_state_dict(layer.state_dict())
    with ran("linear_relu", "linear_relu_backward"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.gelu(stock(x))
    assert y.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(y, ref, **tol(torch.float64))
    assert layer.weight.grad.dtype == torch.float64


def test_non_tensor_input_raises():
    with pytest.raises(TypeError, match="x and weight must be tensors"):
        fused_linear_relu([[1.0]], torch.ones(1, 1))


def test_torch_compile_fullgraph_matches_eager(path):
    torch._dynamo.reset()
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 8, requires_grad=True)

    def f(x, w, b):
        return PATHS[path](x, w, b, "relu") * 2

    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        y = fn(x, w, b)
        results.append((y, *torch.autograd.grad(y.sum(), (x, w, b))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_the_module_runs_the_kernels(backend, device, ran):
    torch._dynamo.reset()
    layer = dynnet_ext.nn.FusedLinearReLU(8, 5, device=device)
    stock = torch.nn.Linear(8, 5, device=device)
    stock.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    with ran("linear_relu", "linear_relu_backward", device=device):
        y = compiled(x)
        y.sum().backward()
    ref = torch.relu(stock(x))
    ref.sum().backward()
    torch.testing.assert_close(y, ref, **tol(torch.float32))
    torch.testing.assert_close(layer.weight.grad, stock.weight.grad, **tol(torch.float32))
    torch.testing.assert_close(layer.bias.grad, stock.bias.grad, **tol(torch.float32))


class Logged(torch.Tensor):
    """A tensor subclass that records the functions called on it (__torch_function__)."""

    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_torch_function_subclasses_see_the_op(ran):
    # Eager calls take the _C fast path, which bypasses __torch_function__; a subclass that
    # overrides it must still be dispatched through torch.ops and see the op.
    Logged.calls.clear()
    x, w, b = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2)
    with ran("linear_relu"):
        y = fused_linear_relu(x.as_subclass(Logged), w, b)
    assert any("dynnet.linear_relu" in c for c in Logged.calls), Logged.calls
    torch.testing.assert_close(y.as_subclass(torch.Tensor), reference.linear_act(x, w, b), **tol(torch.float32))


def test_eager_fast_path_matches_torch_ops(device, ran):
    x, w, b = leaves((5,), 6, 4, device)
    with ran("linear_relu", "linear_relu_backward", device=device):
        fast = fused_linear_relu(x, w, b)
        assert NODE_NAMES["cpp"] in fast.grad_fn.name()
        g_fast = torch.autograd.grad(fast.sum(), (x, w, b))
    slow = torch.ops.dynnet.linear_relu(x, w, b, "relu")
    assert torch.equal(fast, slow)
    g_slow = torch.autograd.grad(slow.sum(), (x, w, b))
    assert len(g_fast) == len(g_slow) == 3
    assert all(torch.equal(a, c) for a, c in zip(g_fast, g_slow))


# ---- the C++ node states the formulas again: pinned to the Python statement ----------------------
# csrc/autograd.cpp's nodes (what eager calls run) compute the gradients with the backward kernels,
# or, when the backward is recorded, with their own stock-op copy of the formulas. Both must give
# what the Python formulas of dynnet_ext.ops.linear_relu / .dynamic_net give for the same inputs.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("recorded", [False, True], ids=["kernel", "recorded"])
def test_cpp_layer_node_matches_the_python_formulas(dtype, activation, bias, recorded):
    from dynnet_ext.ops.functorch import rows
    from dynnet_ext.ops.linear_relu import bias_grad, input_grad, relu_mask, weight_grad

    x, w, b = leaves((3, 5), 7, 6, "cpu", dtype=dtype, bias=bias)
    y = torch.ops.dynnet.linear_relu(x, w, b, activation)
    assert "CppNode<dynnet::(anonymous namespace)::LinearReLU>" in y.grad_fn.name()
    grad_y = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, inputs, grad_y, create_graph=recorded)
    g = relu_mask(grad_y, y.detach() if activation == "relu" else None)
    want = [input_grad(g, w.detach()), weight_grad(rows(g), rows(x.detach())), bias_grad(rows(g))][:len(inputs)]
    for name, a, e in zip("xwb", got, want):
        torch.testing.assert_close(a.detach(), e, **tol(dtype), msg=f"grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("recorded", [False, True], ids=["kernel", "recorded"])
def test_cpp_network_node_matches_the_python_formulas(dtype, depth, recorded):
    from dynnet_ext.ops.dynamic_net import net_grads_per_sample, stock_activations

    D_in, H, D_out, lead = 7, 5, 3, (2, 4)
    x = torch.randn(*lead, D_in, dtype=dtype, requires_grad=True)
    params = [torch.randn(*shape, dtype=dtype, requires_grad=True)
              for shape in ((H, D_in), (H,), (H, H), (H,), (D_out, H), (D_out,))]
    if depth == 0:
        params[2] = params[3] = None  # the hidden layer takes no part
    out, _ = torch.ops.dynnet.dynamic_net(x, *params, depth)
    assert "CppNode<dynnet::(anonymous namespace)::DynamicNet>" in out.grad_fn.name()
    grad_out = torch.randn_like(out)
    inputs = [t for t in (x, *params) if t is not None]
    got = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=recorded))

    x_, (w_in, b_in, w_h, b_h, w_out, _) = x.detach(), [None if p is None else p.detach() for p in params]
    acts = torch.stack(stock_activations(x_, w_in, b_in, w_h, b_h, depth)).reshape(depth + 1, 1, -1, H)
    mask = [True, True, True, depth > 0, depth > 0, True, True]
    want = net_grads_per_sample(grad_out.reshape(1, -1, D_out), x_.reshape(1, -1, D_in), w_in, w_h, w_out, acts,
                                depth, mask)
    for name, m, e in zip(("x", "w_in", "b_in", "w_h", "b_h", "w_out", "b_out"), mask, want):
        if m:
            a = next(got).detach()
            torch.testing.assert_close(a, e.reshape(a.shape), **tol(dtype), msg=f"grad_{name}")
