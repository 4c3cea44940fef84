"""FusedLinear / FusedLinearReLU / FusedLinearGELU / FusedLinearSiLU as drop-in replacements for
nn.Linear (+ nn.ReLU, nn.GELU, nn.SiLU)."""

import functools

import pytest
import torch
from torch import nn

from conftest import tol
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU

FusedLinearGELUTanh = functools.partial(FusedLinearGELU, approximate="tanh")
PAIRS = [(FusedLinearReLU, lambda m: nn.Sequential(m, nn.ReLU())), (FusedLinear, lambda m: m),
         (FusedLinearGELU, lambda m: nn.Sequential(m, nn.GELU())),
         (FusedLinearGELUTanh, lambda m: nn.Sequential(m, nn.GELU(approximate="tanh"))),
         (FusedLinearSiLU, lambda m: nn.Sequential(m, nn.SiLU()))]
MODULES = [FusedLinear, FusedLinearReLU, FusedLinearGELU, FusedLinearGELUTanh, FusedLinearSiLU]
MODULE_IDS = ["linear", "relu", "gelu", "gelu_tanh", "silu"]


@pytest.mark.parametrize("cls", MODULES, ids=MODULE_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_same_init_params_and_state_dict_as_nn_linear(cls, bias):
    torch.manual_seed(3)
    stock = nn.Linear(20, 7, bias=bias)
    torch.manual_seed(3)
    fused = cls(20, 7, bias=bias)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in stock.named_parameters()]
    for a, b in zip(fused.state_dict().values(), stock.state_dict().values()):
        assert torch.equal(a, b)
    # state_dicts load both ways, strictly
    other = cls(20, 7, bias=bias)
    other.load_state_dict(stock.state_dict())
    stock.load_state_dict(other.state_dict())
    assert fused.in_features == 20 and fused.out_features == 7


@pytest.mark.parametrize("cls,make_stock", PAIRS, ids=["relu", "linear", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (0,), (2, 3), (2, 0, 4)], ids=str)
def test_forward_backward_match_stock(cls, make_stock, lead, device, ran):
    fused = cls(6, 4, device=device)
    lin = nn.Linear(6, 4, device=device)
    lin.load_state_dict(fused.state_dict())
    stock = make_stock(lin)
    x = torch.randn(*lead, 6, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(*lead, 4, device=device)
    with ran("linear_relu", "linear_relu_backward", device=device):
        y = fused(x)
        y.backward(g)
    y_ref = stock(x_ref)
    y_ref.backward(g)
    assert y.shape == (*lead, 4)
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32))
    torch.testing.assert_close(fused.weight.grad, lin.weight.grad, **tol(torch.float32))
    torch.testing.assert_close(fused.bias.grad, lin.bias.grad, **tol(torch.float32))


@pytest.mark.parametrize("cls", MODULES, ids=MODULE_IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_module(cls, bias, device, ran):
    m = cls(5, 3, bias=bias, device=device, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    params = tuple(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))

    with ran("linear_relu", "linear_relu_backward", device=device):
        assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_half_and_double_modules_run_the_kernels(dtype, device, ran):
    # Module-level half-precision and double: the fused kernels compute them, with stock's results.
    m = FusedLinearReLU(16, 8, dtype=dtype, device=device)
    lin = nn.Linear(16, 8, dtype=dtype, device=device)
    lin.load_state_dict(m.state_dict())
    x = torch.randn(5, 16, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with ran("linear_relu", "linear_relu_backward", device=device):
        y = m(x)
        y.sum().backward()
    y_ref = torch.relu(lin(x_ref))
    y_ref.sum().backward()
    assert y.dtype == dtype and m.weight.grad.dtype == dtype
    torch.testing.assert_close(y, y_ref, **tol(dtype))
    torch.testing.assert_close(m.weight.grad, lin.weight.grad, **tol(dtype))
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("model", ["layer", "network"])
def test_runs_on_the_current_cuda_stream(model, ran):
    # The input is written on a side stream after a long sleep there: a kernel launched on any
    # other stream than the current one would read it before it is written.
    import dynnet_ext

    torch.manual_seed(0)
    if model == "layer":
        fused, ops = FusedLinearReLU(256, 64, device="cuda"), ("linear_relu", "linear_relu_backward")
        stock = nn.Sequential(nn.Linear(256, 64, device="cuda"), nn.ReLU())
        stock[0].load_state_dict(fused.state_dict())
    else:
        fused, ops = dynnet_ext.DynamicNet(256, 64, 8, device="cuda"), ("dynamic_net", "dynamic_net_backward")
        stock = dynnet_ext.reference.DynamicNet(256, 64, 8, device="cuda")
        stock.load_state_dict(fused.state_dict())
    src = torch.randn(128, 256, device="cuda")
    x = torch.zeros(128, 256, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with ran(*ops, device="cuda"), torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on this stream before x is written
        with torch.no_grad():
            x.copy_(src)
        y = fused(x) if model == "layer" else fused(x, 2)
        y.sum().backward()
        side.synchronize()
    ref = stock(src) if model == "layer" else stock(src, 2)
    torch.testing.assert_close(y, ref, **tol(torch.float32))
    for pf, ps in zip(fused.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, ps.grad, **tol(torch.float32))


def test_dtype_and_device_arguments():
    m = FusedLinearReLU(3, 2, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert m(torch.randn(1, 3, dtype=torch.float64)).dtype == torch.float64
    assert repr(m) == "FusedLinearReLU(in_features=3, out_features=2, bias=True)"


def test_not_an_nn_linear():
    # Tools that rewrite every nn.Linear must not mistake FusedLinearReLU for one (the ReLU would be lost).
    assert not isinstance(FusedLinearReLU(2, 2), nn.Linear)


def test_wrong_input_size_raises():
    with pytest.raises(RuntimeError, match=r"x's last dimension \(5\) must equal weight's in_features"):
        FusedLinearReLU(4, 2)(torch.randn(3, 5))
