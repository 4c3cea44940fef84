"""The GELU, GELU-tanh and SiLU layers: fused_linear_act, FusedLinearGELU and FusedLinearSiLU. One
fused op each (torch.ops.dynnet.linear_relu, whose autograd node runs linear_act and saves the
pre-activation z; the kernels `ran` must see), against stock F.linear + F.gelu / F.silu: forward
and every gradient within the dtype's tolerance, the activation and its derivative within a few
float32 ulp of the float64 truth (stock's own float32 formulas are not, in the tails), NaN and inf
as stock's float64, the same memory saved, torch.compile, autocast, and the modules as drop-ins
for nn.Linear + nn.GELU / nn.SiLU. (torch.func: the cases of tests/test_torch_func.py; fuse:
tests/test_fuse.py.)"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynnet_ext
from conftest import set_cpu_gemm, tol
from dynnet_ext import reference
from dynnet_ext.functional import fused_linear, fused_linear_act, fused_linear_relu
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU

NEW = ["gelu", "gelu_tanh", "silu"]
KERNELS = ("linear_relu", "linear_relu_backward")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STOCK_MODULES = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": lambda: nn.SiLU()}


def fused_module(activation, *args, **kw):
    if activation == "silu":
        return FusedLinearSiLU(*args, **kw)
    return FusedLinearGELU(*args, approximate="tanh" if activation == "gelu_tanh" else "none", **kw)


def leaves(lead, k, n, device, dtype, bias=True):
    x = torch.randn(*lead, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, dtype=dtype, device=device) / k ** 0.5)
    b = torch.randn(n, dtype=dtype, device=device) if bias else None
    return [t if t is None else t.requires_grad_() for t in (x, w, b)]


def forward_and_grads(fn, x, w, b, grad_y=None):
    y = fn(x, w, b)
    inputs = [t for t in (x, w, b) if t is not None]
    grad_y = torch.randn_like(y) if grad_y is None else grad_y
    return y, grad_y, torch.autograd.grad(y, inputs, grad_y)


# ----------------------------------------------------------------------------- the functional form


@pytest.mark.parametrize("activation", NEW)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_and_gradients_match_stock(activation, dtype, bias, device, ran):
    x, w, b = leaves((3, 7), 24, 10, device, dtype, bias)
    with ran(*KERNELS, device=device):
        y, gy, got = forward_and_grads(lambda *a: fused_linear_act(*a, activation), x, w, b)
    want_y, _, want = forward_and_grads(lambda *a: reference.linear_act(*a, activation), x, w, b, gy)
    assert y.dtype == dtype and y.shape == (3, 7, 10)
    torch.testing.assert_close(y, want_y, **tol(dtype))
    for name, g, r in zip("xwb"[:len(got)], got, want, strict=True):
        torch.testing.assert_close(g, r, **tol(dtype), msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("activation", NEW)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_and_gradgradcheck(activation, bias, device, ran):
    x, w, b = leaves((6,), 5, 4, device, torch.float64, bias)
    fn = lambda x, w, b: fused_linear_act(x, w, b, activation)  # noqa: E731
    with ran(*KERNELS, device=device):
        assert torch.autograd.gradcheck(fn, (x, w, b))
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("activation", NEW)
def test_nan_and_inf_propagate_as_stock_float64(activation, device, ran):
    # Non-finite pre-activations give what stock's formulas give in float64: NaN -> NaN, +inf ->
    # +inf, -inf -> NaN, derivative NaN at +-inf. (Stock's float32 agrees except where its CPU
    # kernels differ between machines: exact GELU of +inf is NaN on AVX-512 CPUs.)
    x, w, b = leaves((5,), 3, 4, device, torch.float32)
    with torch.no_grad():
        x[1, 0] = float("nan")
        x[2, 0] = float("inf")
        x[3, 1] = float("-inf")
    with ran(*KERNELS, device=device):
        y, gy, got = forward_and_grads(lambda *a: fused_linear_act(*a, activation), x, w, b)
    wide = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want_y, _, want = forward_and_grads(lambda *a: reference.linear_act(*a, activation), *wide, gy.double())
    assert y[1].isnan().all() and not y[0].isnan().any()
    for g, r in zip((y, *got), (want_y, *want), strict=True):
        assert torch.equal(g.isnan(), r.isnan()) and torch.equal(g.isinf(), r.isinf())
        torch.testing.assert_close(g, r.float(), equal_nan=True, **tol(torch.float32))


@pytest.mark.parametrize("activation", NEW)
def test_one_node_saving_the_pre_activation(activation, device, ran):
    # One C++ autograd node for the whole layer; it saves x, W (and the bias, a reference to the
    # parameter, for the recorded backward) and the pre-activation z: the new memory is stock
    # nn.Linear + activation's (z), and the inputs are saved without copies.
    x, w, b = leaves((4,), 5, 3, device, torch.float32)
    saved = {}
    for name, fn in (("fused", fused_linear_act), ("stock", reference.linear_act)):
        saved[name] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, name=name: saved[name].append(t) or t, lambda t: t):
            with ran("linear_relu", device=device) if name == "fused" else contextlib.nullcontext():
                y = fn(x, w, b, activation)
        if name == "fused":
            node = y.grad_fn.name()
    assert "CppNode<dynnet::(anonymous namespace)::LinearReLU>" in node
    inputs = {x.data_ptr(), w.data_ptr(), b.data_ptr()}
    fused, stock = saved["fused"], saved["stock"]
    assert [t.data_ptr() for t in fused] == [x.data_ptr(), w.data_ptr(), fused[2].data_ptr(), b.data_ptr()]
    z = fused[2]
    assert z.shape == (4, 3) and torch.equal(z, fused_linear(x, w, b))
    new_bytes = lambda ts: sum(t.nbytes for t in ts if t.data_ptr() not in inputs)  # noqa: E731
    assert new_bytes(fused) == new_bytes(stock) == z.nbytes


def test_relu_and_none_take_the_unchanged_fused_path(device, ran):
    x, w, b = leaves((4,), 5, 3, device, torch.float32)
    with ran("linear_relu", device=device):
        for activation, fn in (("relu", fused_linear_relu), ("none", fused_linear)):
            y = fused_linear_act(x, w, b, activation)
            assert "CppNode<dynnet::(anonymous namespace)::LinearReLU>" in y.grad_fn.name()
            assert torch.equal(y, fn(x, w, b))
    assert fused_linear_act(x, w, b).equal(fused_linear_relu(x, w, b))  # relu is the default


@pytest.mark.parametrize("activation", ["tanh", "GELU", "", None, 1])
def test_unknown_activation_raises(activation):
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'silu', 'none'\)"):
        fused_linear_act(torch.randn(2, 3), torch.randn(4, 3), None, activation)
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.linear_act(torch.randn(2, 3), torch.randn(4, 3), None, activation)


@pytest.mark.parametrize("activation", NEW)
def test_stock_fallback_matches(activation, monkeypatch):
    # No kernels for the device: the whole layer is stock's, with the same results.
    monkeypatch.setitem(dynnet_ext.ops.BUILD_INFO, "cpu_kernels", False)
    x, w, b = leaves((4,), 5, 3, "cpu", torch.float64)
    y = fused_linear_act(x, w, b, activation)
    assert "LinearReLU" not in y.grad_fn.next_functions[0][0].name()
    torch.testing.assert_close(y, reference.linear_act(x, w, b, activation), rtol=0, atol=0)


# ----------------------------------------------------------------------------- torch.compile, autocast

COMPILE = [(a, "aot_eager") for a in NEW] + [("gelu", "inductor")]


@pytest.mark.parametrize("activation,backend", COMPILE, ids=str)
def test_torch_compile_fullgraph_matches_eager(activation, backend, device, ran):
    torch._dynamo.reset()
    layer = fused_module(activation, 8, 5, device=device)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    gy = torch.randn(3, 5, device=device)
    results = []
    for fn in (torch.compile(layer, fullgraph=True, backend=backend), layer):
        with ran(*KERNELS, device=device):
            y = fn(x)
            results.append((y, *torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("activation", NEW)
def test_autocast_bfloat16_behaves_like_stock(activation, ran):
    x = torch.randn(8, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer = fused_module(activation, 16, 4)
    stock = nn.Sequential(nn.Linear(16, 4), STOCK_MODULES[activation]())
    stock[0].load_state_dict(layer.state_dict())
    with ran(*KERNELS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = stock(x_ref)
    ref.float().sum().backward()
    assert y.dtype == ref.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(y, ref, **tol(torch.bfloat16))
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.bfloat16))
    torch.testing.assert_close(layer.weight.grad, stock[0].weight.grad, **tol(torch.bfloat16))


# ----------------------------------------------------------------------------- the modules


@pytest.mark.parametrize("activation", NEW)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modules_match_stock_linear_and_activation(activation, dtype, device, ran):
    layer = fused_module(activation, 16, 8, device=device, dtype=dtype)
    stock = nn.Sequential(nn.Linear(16, 8, device=device, dtype=dtype), STOCK_MODULES[activation]())
    stock[0].load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16, device=device, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    gy = torch.randn(2, 5, 8, device=device, dtype=dtype)
    with ran(*KERNELS, device=device):
        y = layer(x)
        y.backward(gy)
    ref = stock(x_ref)
    ref.backward(gy)
    assert layer.activation == activation
    for got, want in ((y, ref), (x.grad, x_ref.grad), (layer.weight.grad, stock[0].weight.grad),
                      (layer.bias.grad, stock[0].bias.grad)):
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("activation", NEW)
@pytest.mark.parametrize("bias", [True, False])
def test_modules_have_nn_linears_init_and_state_dict(activation, bias):
    torch.manual_seed(3)
    stock = nn.Linear(20, 7, bias=bias)
    torch.manual_seed(3)
    fused = fused_module(activation, 20, 7, bias=bias)
    assert isinstance(fused, FusedLinear) and not isinstance(fused, nn.Linear)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in stock.named_parameters()]
    for a, b in zip(fused.state_dict().values(), stock.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = fused_module(activation, 20, 7, bias=bias)
    other.load_state_dict(stock.state_dict())  # strict, both ways
    stock.load_state_dict(fused_module(activation, 20, 7, bias=bias).state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), fused.parameters()))
    assert fused.in_features == 20 and fused.out_features == 7


@pytest.mark.parametrize("activation", NEW)
def test_from_linear_shares_parameters(activation):
    lin = nn.Linear(6, 3).eval()
    rng = torch.get_rng_state()
    if activation == "silu":
        layer = FusedLinearSiLU.from_linear(lin)
    else:
        layer = FusedLinearGELU.from_linear(lin, approximate="tanh" if activation == "gelu_tanh" else "none")
    assert torch.equal(torch.get_rng_state(), rng)
    assert layer.weight is lin.weight and layer.bias is lin.bias and not layer.training
    assert layer.activation == activation
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), STOCK_MODULES[activation]()(lin(x)), **tol(torch.float32))


def test_module_reprs_and_approximate():
    assert repr(FusedLinearGELU(3, 2)) == "FusedLinearGELU(in_features=3, out_features=2, bias=True, approximate='none')"
    assert repr(FusedLinearGELU(3, 2, bias=False, approximate="tanh")) == \
        "FusedLinearGELU(in_features=3, out_features=2, bias=False, approximate='tanh')"
    assert repr(FusedLinearSiLU(3, 2)) == "FusedLinearSiLU(in_features=3, out_features=2, bias=True)"
    assert FusedLinearGELU(3, 2).activation == "gelu" and FusedLinearGELU(3, 2, approximate="tanh").activation == "gelu_tanh"
    assert FusedLinearSiLU(3, 2).activation == "silu" and FusedLinearReLU(3, 2).activation == "relu"
    for bad in ("erf", "Tanh", None):
        with pytest.raises(ValueError, match=r"approximate must be 'none' or 'tanh' \(as nn.GELU\)"):
            FusedLinearGELU(3, 2, approximate=bad)
        with pytest.raises(ValueError, match="approximate must be"):
            FusedLinearGELU.from_linear(nn.Linear(3, 2), approximate=bad)


def test_exported():
    assert dynnet_ext.FusedLinearGELU is FusedLinearGELU and dynnet_ext.FusedLinearSiLU is FusedLinearSiLU
    assert {"FusedLinearGELU", "FusedLinearSiLU", "ACTIVATIONS"} <= set(dynnet_ext.__all__)
    assert dynnet_ext.ACTIVATIONS == reference.ACTIVATIONS == ("relu", "gelu", "gelu_tanh", "silu", "none")


def test_stock_activation_is_stocks_op():
    z = torch.randn(50, dtype=torch.float64)
    for activation, want in (("relu", F.relu(z)), ("gelu", F.gelu(z)), ("gelu_tanh", F.gelu(z, approximate="tanh")),
                             ("silu", F.silu(z)), ("none", z)):
        assert torch.equal(reference.activation(z, activation), want), activation
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.activation(z, "tanh")


@pytest.mark.parametrize("activation", NEW)
def test_rowwise_parallel_refuses_an_activation(activation):
    # A row-parallel layer's output is summed over ranks: the activation cannot run before that.
    from dynnet_ext.parallel import RowwiseParallel

    layer = fused_module(activation, 4, 4)
    with pytest.raises(ValueError, match=f"RowwiseParallel cannot shard a {type(layer).__name__}.*ColwiseParallel"):
        RowwiseParallel()._apply(layer, None)


@pytest.mark.parametrize("activation", NEW)
def test_whole_module_pickles_and_copies(activation, tmp_path, ran):
    layer = fused_module(activation, 6, 3)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    for other in (torch.load(path, weights_only=False), copy.deepcopy(layer)):
        assert type(other) is type(layer) and other.activation == activation and repr(other) == repr(layer)
        x = torch.randn(4, 6)
        with ran("linear_relu"):
            assert torch.equal(other(x), layer(x))


@pytest.mark.parametrize("activation", NEW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_atens_path_gives_stocks_bits(activation, dtype, ran):
    # Where ATen runs the layer's GEMMs (large products, float64, DYNNET_EXT_CPU_GEMM=aten), the
    # activation is stock's op too, so the output is stock F.linear + activation's, bit for bit,
    # and the gradient at the pre-activation is stock's backward op's.
    set_cpu_gemm("aten")
    x, w, b = leaves((6,), 40, 24, "cpu", dtype)
    with ran(*KERNELS):
        y, gy, got = forward_and_grads(lambda *a: fused_linear_act(*a, activation), x, w, b)
    want_y, _, want = forward_and_grads(lambda *a: reference.linear_act(*a, activation), x, w, b, gy)
    assert torch.equal(y, want_y)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, **tol(dtype))


def _accuracy_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "activation_accuracy.py"
    spec = importlib.util.spec_from_file_location("activation_accuracy", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("activation", NEW)
def test_activation_and_derivative_within_float32_ulps_of_exact(activation, device, ran):
    # The layer with a 1 x 1 identity weight gives act(x) and, as the gradient of x, act'(x):
    # against the exact values (benchmarks/activation_accuracy.py), over [-20, 20].
    # Forward: within 6 + 2 cond ulp where the exact value is at least 2^-100 (cond = |x f' / f|,
    # what rounding an intermediate argument costs any float32 evaluation: gelu_tanh's u in its
    # left tail), within 2^-110 below that. Derivative: within (8 + 2 cond) ulp + 2^-22 (its
    # zeros, e.g. GELU's at x = -0.75, are a cancellation of O(1) terms: absolute error there).
    # On CUDA the kernels compute stock's CUDA formulas (csrc/cuda/activation.cuh), so they are held
    # to stock's op (within float32 tolerance: the compiler may contract them into FMAs otherwise).
    script = _accuracy_script()
    x = torch.linspace(-20, 20, 400_001, device=device)
    with ran(*KERNELS, device=device):
        y, d = script.with_derivative(script.layer(activation), x)
    if device == "cuda":
        want_y, want_d = script.with_derivative(lambda v: reference.activation(v, activation), x)
        torch.testing.assert_close(y, want_y, **tol(torch.float32))
        torch.testing.assert_close(d, want_d, **tol(torch.float32))
        return
    e = script.errors(x, activation, y, d)
    normal = e["f"].abs() >= script.TINY
    worst = lambda bad: f"x = {x[bad][:5].tolist()}, y = {y[bad][:5].tolist()}, exact {e['f'][bad][:5].tolist()}"  # noqa: E731
    bad = normal & (e["ulp"] > 6 + 2 * e["cond"])
    assert not bad.any(), worst(bad)
    bad = ~normal & (e["abs"] > 2.0 ** -110)
    assert not bad.any(), worst(bad)
    bad = e["d_abs"] > (8 + 2 * e["cond"]) * (e["d_abs"] / e["d_ulp"]).nan_to_num(0.0) + 2.0 ** -22
    assert not bad.any(), f"derivative at x = {x[bad][:5].tolist()}: {d[bad][:5].tolist()}, exact {e['df'][bad][:5].tolist()}"


def test_accuracy_sweep_runs_the_kernels_and_keeps_specials():
    # The script's rows: the fused rows ran dynnet's kernels, and +-inf and NaN come out as
    # stock's float64 formulas give them, forward and derivative.
    script = _accuracy_script()
    before = dynnet_ext.kernel_calls()["cpu"]["linear_relu"]
    rows = [r for r in script.sweep("cpu", 20001) if r["impl"] == "fused"]
    assert dynnet_ext.kernel_calls()["cpu"]["linear_relu"] > before
    assert [r["activation"] for r in rows] == NEW
    for r in rows:
        assert r["specials_as_float64"] is True, r
        assert r["max_ulp_per_cond"] <= 6, r
