"""The ops torch.ops.dynnet.linear_relu / linear_relu_backward against the stock reference."""

import pytest
import torch

from conftest import TOLERANCES, tol
from dynnet_ext import reference

OPS = torch.ops.dynnet
# Every CPU case here runs on each CPU GEMM engine this machine has (conftest.CPU_GEMM_ISAS).
pytestmark = pytest.mark.usefixtures("cpu_gemm_isa")

# (leading dims of x, in_features, out_features): zero, one, odd and prime sizes, 3-D input.
SHAPES = [
    ((1,), 1, 1),
    ((7,), 13, 5),
    ((64,), 1000, 100),  # the seed's input layer
    ((31,), 97, 61),
    ((0,), 8, 4),  # empty batch
    ((5,), 0, 3),  # no input features: y = act(bias)
    ((4,), 6, 0),  # no output features
    ((2, 3), 11, 7),  # 3-D input
    ((), 9, 4),  # 1-D input
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def make(lead, k, n, dtype, device, bias=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / max(k, 1) ** 0.5
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return x, w, b


def expected_forward(x, w, b, activation):
    """The reference in the same dtype; half types via float32 then rounded (what the kernels do)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        up = [t.float() if t is not None else None for t in (x, w, b)]
        return reference.linear_act(*up, activation).to(x.dtype)
    return reference.linear_act(x, w, b, activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_forward_matches_reference(shape, dtype, bias, activation, device):
    x, w, b = make(*shape, dtype, device, bias)
    y = OPS.linear_relu(x, w, b, activation)
    assert y.shape == (*shape[0], shape[2]) and y.dtype == dtype and y.device == x.device
    torch.testing.assert_close(y, expected_forward(x, w, b, activation), **tol(dtype))
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_backward_matches_reference(shape, dtype, bias, activation, device):
    x, w, b = make(*shape, dtype, device, bias)
    y = OPS.linear_relu(x, w, b, activation)
    gy = torch.randn_like(y)
    gx, gw, gb = OPS.linear_relu_backward(gy, x, w, y, activation, [True, True, bias])
    rx, rw, rb = reference.linear_act_backward(gy, x, w, b, activation)
    torch.testing.assert_close(gx, rx, **tol(dtype))
    torch.testing.assert_close(gw, rw, **tol(dtype))
    if bias:
        torch.testing.assert_close(gb, rb, **tol(dtype))
    else:
        assert gb.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_half_types(dtype, device):
    # Half types: compare with the float32 reference on the same (rounded) inputs and the same
    # mask; the GEMMs round their outputs to the dtype, hence the dtype's tolerance.
    x, w, b = make((33,), 70, 24, dtype, device)
    y = OPS.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    gx, gw, gb = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    g = gy.float() * (y > 0)
    for got, want in ((gx, g @ w.float()), (gw, g.T @ x.float()), (gb, g.sum(0))):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tol(dtype))


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True], [True, True, False]])
def test_backward_output_mask(mask, device):
    x, w, b = make((9,), 12, 5, torch.float64, device)
    y = OPS.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    full = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    part = OPS.linear_relu_backward(gy, x, w, y, "relu", mask)
    for wanted, f, p in zip(mask, full, part):
        if wanted:
            assert torch.equal(f, p)
        else:
            assert p.shape == (0,)


def test_non_contiguous_inputs(device):
    base = torch.randn(10, 40, dtype=torch.float64, device=device)
    x = base[::2, ::3]  # (5, 14) with strides (80, 3)
    w = torch.randn(14, 6, dtype=torch.float64, device=device).T  # transposed view
    b = torch.randn(12, dtype=torch.float64, device=device)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    y = OPS.linear_relu(x, w, b, "relu")
    torch.testing.assert_close(y, reference.linear_act(x, w, b), **tol(torch.float64))
    gy = torch.randn(6, 5, dtype=torch.float64, device=device).T  # non-contiguous grad
    got = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    for g, r in zip(got, reference.linear_act_backward(gy, x, w, b)):
        torch.testing.assert_close(g, r, **tol(torch.float64))


def test_broadcast_grad(device):
    # The gradient of y.sum() arrives as an expanded tensor with stride 0.
    x, w, b = make((6,), 5, 4, torch.float64, device)
    y = OPS.linear_relu(x, w, b, "relu")
    gy = torch.ones(1, 1, dtype=torch.float64, device=device).expand_as(y)
    got = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    for g, r in zip(got, reference.linear_act_backward(gy, x, w, b)):
        torch.testing.assert_close(g, r, **tol(torch.float64))


def test_nan_propagates_like_torch_relu(device):
    x, w, b = make((4,), 3, 5, torch.float32, device)
    x[1, 0] = float("nan")
    y = OPS.linear_relu(x, w, b, "relu")
    ref = torch.relu(torch.nn.functional.linear(x, w, b))
    assert torch.equal(y.isnan(), ref.isnan()) and y[1].isnan().all()
    torch.testing.assert_close(y, ref, equal_nan=True, **tol(torch.float32))
    # Backward: stock's mask (threshold_backward) zeroes the gradient where y <= 0, which is
    # false for NaN, so the gradient flows through NaN entries; the kernels must do the same.
    gy = torch.ones_like(y)
    got = OPS.linear_relu_backward(gy, x, w, y, "relu", [True, True, True])
    want = reference.linear_act_backward(gy, x, w, b)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, equal_nan=True, **tol(torch.float32))


def test_inf_and_negative_zero(device):
    x = torch.tensor([[float("inf")], [float("-inf")], [0.0], [-0.0]], device=device)
    w = torch.ones(1, 1, device=device)
    y = OPS.linear_relu(x, w, None, "relu")
    assert y.tolist() == [[float("inf")], [0.0], [0.0], [0.0]]
    assert torch.equal(y.signbit(), torch.relu(torch.nn.functional.linear(x, w)).signbit())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
def test_no_input_features_return_the_bias_bits(dtype, activation, device):
    # K = 0: no products, y = act(bias) exactly, as stock's addmm returns its bias term - a -0
    # bias stays -0 (and ReLU keeps -0, as torch.relu does). With K > 0 the sign of an all-zero
    # sum depends on the order of the additions (an implementation detail of each GEMM), so it
    # is not compared.
    x = torch.zeros(2, 0, dtype=dtype, device=device)
    w = torch.ones(3, 0, dtype=dtype, device=device)
    b = torch.tensor([-0.0, 0.0, -1.5], dtype=dtype, device=device)
    y = OPS.linear_relu(x, w, b, activation)
    want = reference.linear_act(x, w, b, activation)
    assert torch.equal(y, want) and torch.equal(y.signbit(), want.signbit()), (y.signbit(), want.signbit())


def test_float64_forward_within_an_ulp_of_stock(device):
    # Same products, bias added to the GEMM's result once. On the CPU the engine sums in stock's
    # order at small K: nearly all entries agree to the bit, none is more than 2 ulps away. A GPU's
    # kernels and cuBLAS each order the K-long sums their own way (by the order of its output, the
    # first H200 run failed the CPU's claim here): each result is within a K-term dot product's
    # rounding bound of the exact value, so the two are within twice that bound of each other.
    x, w, b = make((16,), 8, 8, torch.float64, device)
    y = OPS.linear_relu(x, w, b, "relu")
    ref = reference.linear_act(x, w, b)
    eps = torch.finfo(torch.float64).eps
    if device == "cpu":
        ulp = eps * ref.abs().clamp_min(torch.finfo(torch.float64).tiny)
        assert ((y - ref).abs() <= 2 * ulp).all()
        assert (y == ref).float().mean() >= 0.9
    else:
        bound = 2 * (x.shape[-1] + 1) * eps * (x.abs() @ w.abs().T + b.abs())
        assert ((y - ref).abs() <= bound).all()


def test_results_are_deterministic(device):
    x, w, b = make((300,), 257, 129, torch.float32, device)
    y1 = OPS.linear_relu(x, w, b, "relu")
    y2 = OPS.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y1)
    g1 = OPS.linear_relu_backward(gy, x, w, y1, "relu", [True, True, True])
    g2 = OPS.linear_relu_backward(gy, x, w, y1, "relu", [True, True, True])
    assert torch.equal(y1, y2)
    assert len(g1) == len(g2) == 3 and all(torch.equal(a, c) for a, c in zip(g1, g2))


def test_grad_bias_accumulates_in_high_precision():
    # 100k rows of 1 + 1e-4: a float32 running sum drifts by ~1e-3 relative; the kernel's
    # accumulator (double on CPU) must land within float32 rounding of the exact value.
    M = 100_000
    x = torch.zeros(M, 1)
    w = torch.ones(1, 1)
    y = torch.ones(M, 1)
    gy = torch.full((M, 1), 1.0001)
    _, _, gb = OPS.linear_relu_backward(gy, x, w, y, "relu", [False, False, True])
    exact = M * 1.0001
    assert abs(gb.item() - exact) / exact < 1e-6


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "none", "gelu", "gelu_tanh", "silu"])
def test_opcheck(bias, activation, device):
    x, w, b = make((2, 5), 7, 3, torch.float32, device, bias)
    y = OPS.linear_relu(x, w, b, activation)
    torch.library.opcheck(OPS.linear_relu.default, (x, w, b, activation))
    # with inputs that require grad: checks the Autograd-key registration (csrc/autograd.cpp) too
    grad_args = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    torch.library.opcheck(OPS.linear_relu.default, (*grad_args, activation))
    if activation in ("gelu", "gelu_tanh", "silu"):  # the backward's saved tensor is z
        torch.library.opcheck(OPS.linear_act.default, (x, w, b, activation))
        y_act, y = OPS.linear_act(x, w, b, activation)
        assert torch.equal(y_act, OPS.linear_relu(x, w, b, activation))
        assert torch.equal(y, OPS.linear_relu(x, w, b, "none"))
    gy = torch.randn_like(y)
    torch.library.opcheck(OPS.linear_relu_backward.default, (gy, x, w, y, activation, [True, True, bias]))
    torch.library.opcheck(OPS.linear_relu_backward.default, (gy, x, w, y, activation, [False, True, False]))


# Bad inputs: each error names the argument and says what was expected and what it got.
BAD_INPUTS = [
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(5, 6, device=d), None), r"x's last dimension \(4\) must equal weight's in_features"),
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(5, 4, 1, device=d), None), r"weight must be 2-d .* got shape \[5, 4, 1\]"),
    (lambda d: (torch.randn((), device=d), torch.randn(5, 4, device=d), None), r"x must have at least 1 dimension"),
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(5, 4, device=d), torch.randn(4, device=d)), r"bias must have shape \(out_features,\) = \(5,\), got \[4\]"),
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(5, 4, device=d, dtype=torch.float64), None), r"weight must have the same dtype as x \(Float\), got Double"),
    (lambda d: (torch.ones(3, 4, device=d, dtype=torch.int32), torch.ones(5, 4, device=d, dtype=torch.int32), None), r"x must be float32, float64, float16 or bfloat16, got Int"),
    (lambda d: (torch.randn(3, 4, device=d), torch.randn(5, 4, device="meta"), None), r"weight must be on the same device as x"),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_inputs_raise_clear_errors(case, device):
    make_args, message = BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=message):
        OPS.linear_relu(*make_args(device), "relu")


def test_bad_activation(device):
    x, w, b = make((3,), 4, 2, torch.float32, device)
    with pytest.raises(RuntimeError, match="activation must be 'relu', 'gelu', 'gelu_tanh', 'silu' or 'none', got 'tanh'"):
        OPS.linear_relu(x, w, b, "tanh")
    for activation in ("relu", "none", "tanh"):
        with pytest.raises(RuntimeError, match="activation must be|linear_act's activation must be 'gelu', 'gelu_tanh' or 'silu'"):
            OPS.linear_act(x, w, b, activation)


def test_backward_bad_grad_shape(device):
    x, w, b = make((3,), 4, 2, torch.float32, device)
    y = OPS.linear_relu(x, w, b, "relu")
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[3, 2\]"):
        OPS.linear_relu_backward(torch.randn(3, 3, device=device), x, w, y, "relu", [True, True, True])
    for activation in ("relu", "gelu", "gelu_tanh", "silu"):
        with pytest.raises(RuntimeError, match="needs y: the forward output for 'relu', the pre-activation z"):
            OPS.linear_relu_backward(torch.randn_like(y), x, w, None, activation, [True, True, True])


def test_tolerance_table_covers_dtypes():
    assert set(DTYPES) == set(TOLERANCES)


def test_outputs_are_fresh_tensors_not_views(device):
    x, w, b = make((2, 3), 4, 5, torch.float32, device)
    y = OPS.linear_relu(x, w, b, "relu")
    grads = OPS.linear_relu_backward(torch.randn_like(y), x, w, y, "relu", [True, True, True])
    for t in (y, *grads):
        assert t._base is None and t.is_contiguous()


def half_ulp(exact, dtype):
    """Half the spacing of `dtype` at each value of `exact` (float64), normal range."""
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, exponent = torch.frexp(exact)
    return torch.ldexp(torch.full_like(exact, 0.5), exponent - 1 - bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_round_once_cpu(dtype, cpu_gemm_isa):
    # Half types: products and the bias are summed in fp32 and y is rounded to the dtype once,
    # so every element lies within half an ulp of the exact result (plus the fp32 sum's error).
    # Rounding the GEMM to the dtype and then adding the bias would be off by up to a whole ulp.
    x, w, b = make((64,), 1000, 100, dtype, "cpu")
    w = w * 8  # |y| well inside the dtypes' normal range
    y = OPS.linear_relu(x, w, b, "none").double()
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    fp32_sum_error = 1e-5 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    assert ((y - exact).abs() <= half_ulp(exact, dtype) + fp32_sum_error).all()
    if cpu_gemm_isa == "aten":  # ATen's path puts the bias in addmm's accumulator: stock's bits
        assert torch.equal(OPS.linear_relu(x, w, b, "relu"), torch.relu(torch.nn.functional.linear(x, w, b)))
