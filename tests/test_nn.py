"""FusedLinear / FusedLinearReLU as drop-in replacements for nn.Linear (+ nn.ReLU)."""

import pytest
import torch
from torch import nn

from conftest import tol
from dynnet_ext.nn import FusedLinear, FusedLinearReLU

PAIRS = [(FusedLinearReLU, lambda m: nn.Sequential(m, nn.ReLU())), (FusedLinear, lambda m: m)]


@pytest.mark.parametrize("cls", [FusedLinear, FusedLinearReLU])
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


@pytest.mark.parametrize("cls,make_stock", PAIRS, ids=["relu", "linear"])
@pytest.mark.parametrize("lead", [(), (1,), (5,), (0,), (2, 3), (2, 0, 4)], ids=str)
def test_forward_backward_match_stock(cls, make_stock, lead, device):
    fused = cls(6, 4, device=device)
    lin = nn.Linear(6, 4, device=device)
    lin.load_state_dict(fused.state_dict())
    stock = make_stock(lin)
    x = torch.randn(*lead, 6, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = fused(x), stock(x_ref)
    assert y.shape == (*lead, 4)
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32))
    torch.testing.assert_close(fused.weight.grad, lin.weight.grad, **tol(torch.float32))
    torch.testing.assert_close(fused.bias.grad, lin.bias.grad, **tol(torch.float32))


@pytest.mark.parametrize("cls", [FusedLinear, FusedLinearReLU])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_module(cls, bias, device):
    m = cls(5, 3, bias=bias, device=device, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    params = tuple(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


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
