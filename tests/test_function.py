"""LinearReLUFunction and the functional forms: gradcheck, needs_input_grad, fallbacks, autocast."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dynnet_ext
from conftest import tol
from dynnet_ext import LinearReLUFunction, reference
from dynnet_ext.functional import fused_linear, fused_linear_relu


def leaves(lead, k, n, device, dtype=torch.float64, bias=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("fn", [fused_linear_relu, fused_linear], ids=["relu", "none"])
@pytest.mark.parametrize("shape", [((5,), 7, 3), ((2, 3), 4, 6), ((), 5, 2), ((1,), 1, 1)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck(fn, shape, bias, device):
    x, w, b = leaves(*shape, device, bias=bias)
    # Keep pre-activations away from 0, where ReLU's derivative jumps and finite differences lie.
    with torch.no_grad():
        y = torch.nn.functional.linear(x, w, b)
        x.add_(0)  # noqa: keep x as leaf
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_function_directly(device):
    x, w, b = leaves((6,), 5, 4, device)
    assert torch.autograd.gradcheck(lambda x, w, b: LinearReLUFunction.apply(x, w, b, "relu"), (x, w, b))


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
def test_only_requested_grads_are_computed(needs, device):
    x = torch.randn(4, 5, device=device, requires_grad=needs[0])
    w = torch.randn(3, 5, device=device, requires_grad=needs[1])
    b = torch.randn(3, device=device, requires_grad=needs[2])
    y = fused_linear_relu(x, w, b)
    with OpLog() as log:
        y.sum().backward()
    masks = [args[5] for name, args in log.calls if "linear_relu_backward" in name]
    assert masks == [list(needs)]
    for t, need in zip((x, w, b), needs):
        assert (t.grad is not None) == need


def test_saves_only_x_weight_y(device):
    x, w, b = leaves((4,), 5, 3, device, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fused_linear_relu(x, w, b)
    assert len(saved) == 3
    assert saved[0] is x and saved[1] is w and saved[2].data_ptr() == y.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_linear(x, w, b)
    assert len(saved) == 2  # no activation: y is not needed


def test_one_autograd_node_per_layer(device):
    x, w, b = leaves((4,), 5, 3, device, dtype=torch.float32)
    y = fused_linear_relu(x, w, b)
    assert type(y.grad_fn).__name__ == "LinearReLUFunctionBackward"
    assert all(fn is None or type(fn).__name__ == "AccumulateGrad" for fn, _ in y.grad_fn.next_functions)


@pytest.mark.parametrize("fn", [fused_linear_relu, fused_linear], ids=["relu", "none"])
def test_gradgradcheck(fn, device):
    x, w, b = leaves((2, 3), 5, 4, device)
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradient_penalty_matches_stock(device):
    # A loss that contains a gradient: the fused layer must not silently drop its dependence.
    x, w, b = leaves((6,), 5, 4, device)
    grads = []
    for f in (fused_linear_relu, reference.linear_act):
        out = f(x, w, b)
        (gx,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
        loss = out.sum() + gx.pow(2).sum()
        grads.append(torch.autograd.grad(loss, (x, w, b)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol(torch.float64))


def test_inplace_change_of_output_is_detected(device):
    x, w, b = leaves((4,), 5, 3, device)
    y = fused_linear_relu(x, w, b)
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
    assert y.grad_fn is not None and "LinearReLUFunction" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, reference.linear_act(x, w, b))


def test_autocast_cpu_bfloat16_behaves_like_nn_linear():
    x = torch.randn(8, 16, requires_grad=True)
    layer = dynnet_ext.nn.FusedLinearReLU(16, 4)
    stock = torch.nn.Linear(16, 4)
    stock.load_state_dict(layer.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.relu(stock(x))
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, **tol(torch.bfloat16))
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_non_tensor_input_raises():
    with pytest.raises(TypeError, match="x and weight must be tensors"):
        fused_linear_relu([[1.0]], torch.ones(1, 1))


def test_torch_compile_fullgraph_matches_eager():
    layer = dynnet_ext.nn.FusedLinearReLU(8, 5)
    x = torch.randn(3, 8, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), layer.weight.grad.clone()
    x.grad = None
    layer.weight.grad = None
    y_eager = layer(x)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager, **tol(torch.float32))
    torch.testing.assert_close(gx, x.grad, **tol(torch.float32))
    torch.testing.assert_close(gw, layer.weight.grad, **tol(torch.float32))
