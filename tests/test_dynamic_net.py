"""The fused DynamicNet against the seed's stock model."""

import random

import pytest
import torch
import torch._dynamo.testing

from conftest import tol
from dynnet_ext import DynamicNet, reference


FUSIONS = ["network", "layer"]
# The ops whose kernels each fusion runs (forward, backward).
KERNELS = {"network": ("dynamic_net", "dynamic_net_backward"), "layer": ("linear_relu", "linear_relu_backward")}


def pair(D_in=12, H=8, D_out=3, device="cpu", dtype=torch.float32, fusion="network"):
    fused = DynamicNet(D_in, H, D_out, device=device, dtype=dtype, fusion=fusion)
    stock = reference.DynamicNet(D_in, H, D_out, device=device, dtype=dtype)
    stock.load_state_dict(fused.state_dict())
    return fused, stock


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_matches_stock_outputs_and_grads(depth, fusion, device, ran):
    fused, stock = pair(device=device, fusion=fusion)
    x = torch.randn(16, 12, device=device)
    g = torch.randn(16, 3, device=device)
    with ran(*KERNELS[fusion], device=device):
        out_f = fused(x, depth)
        out_f.backward(g)
    out_s = stock(x, depth)
    out_s.backward(g)
    torch.testing.assert_close(out_f, out_s, **tol(torch.float32))
    for (name, pf), ps in zip(fused.named_parameters(), stock.parameters(), strict=True):
        if depth == 0 and name.startswith("hidden_layer"):
            assert pf.grad is None and ps.grad is None  # unused at depth 0, as in stock
        else:
            torch.testing.assert_close(pf.grad, ps.grad, **tol(torch.float32), msg=name)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_other_dtypes_run_the_kernels(dtype, fusion, device, ran):
    # Stock rounds every layer's output to the dtype, and so do the kernels: the same dtype
    # tolerance as a single layer.
    fused, stock = pair(device=device, dtype=dtype, fusion=fusion)
    x = torch.randn(16, 12, device=device, dtype=dtype)
    g = torch.randn(16, 3, device=device, dtype=dtype)
    with ran(*KERNELS[fusion], device=device):
        out = fused(x, 2)
        out.backward(g)
    ref = stock(x, 2)
    ref.backward(g)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype))
    for (name, pf), ps in zip(fused.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, ps.grad, **tol(dtype), msg=name)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_gradcheck_and_gradgradcheck(depth, fusion, device, ran):
    # First and second derivatives (gradient penalties, Hessian-vector products) through every
    # layer, the shared hidden layer's reuse included.
    torch.manual_seed(depth)
    net = DynamicNet(5, 4, 3, device=device, dtype=torch.float64, fusion=fusion)
    names = [n for n, _ in net.named_parameters()]
    x = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(net, dict(zip(names, ps)), (x, depth))

    with ran(*KERNELS[fusion], device=device):
        assert torch.autograd.gradcheck(f, (x, *net.parameters()))
    assert torch.autograd.gradgradcheck(f, (x, *net.parameters()))


def test_depth_none_draws_like_the_seed(ran):
    fused, stock = pair()
    x = torch.randn(4, 12)
    random.seed(11)
    with ran("dynamic_net"):
        outs_f = [fused(x) for _ in range(8)]
    random.seed(11)
    outs_s = [stock(x) for _ in range(8)]
    for a, b in zip(outs_f, outs_s, strict=True):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    random.seed(11)
    assert {random.randint(0, 3) for _ in range(8)} != {0}  # the draws really vary


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_depth_raises(bad):
    with pytest.raises(ValueError, match="depth must be a non-negative int"):
        DynamicNet(4, 3, 2)(torch.randn(1, 4), bad)


def test_stock_checkpoint_loads_and_back(tmp_path, ran):
    fused, stock = pair()
    path = tmp_path / "stock.pt"
    torch.save(stock.state_dict(), path)
    other = DynamicNet(12, 8, 3)
    other.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 12)
    with ran("dynamic_net"):
        out = other(x, 2)
    torch.testing.assert_close(out, stock(x, 2), **tol(torch.float32))
    torch.save(other.state_dict(), path)
    stock2 = reference.DynamicNet(12, 8, 3)
    stock2.load_state_dict(torch.load(path, weights_only=True))
    assert sorted(stock2.state_dict()) == sorted(other.state_dict())


def test_seed_shape_and_leading_dims(ran):
    fused, stock = pair(1000, 100, 10)
    x = torch.randn(2, 32, 1000)
    with ran("dynamic_net"):
        out = fused(x, 3)
    torch.testing.assert_close(out, stock(x, 3), **tol(torch.float32))


@pytest.mark.parametrize("depth,backend", [(0, "aot_eager"), (3, "aot_eager"), (2, "inductor")])
def test_torch_compile_fullgraph(depth, backend, device, ran):
    torch._dynamo.reset()
    fused, stock = pair(device=device)
    x = torch.randn(5, 12, device=device)
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    with ran("dynamic_net", "dynamic_net_backward", device=device):
        out = compiled(x, depth)
        out.sum().backward()
    grads = [p.grad.clone() for p in fused.parameters() if p.grad is not None]
    ref = stock(x, depth)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    for g, p in zip(grads, [p for p in stock.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(g, p.grad, **tol(torch.float32))


def test_fusion_flag(ran):
    x = torch.randn(4, 12)
    network, stock = pair()
    layer = DynamicNet(12, 8, 3, fusion="layer")
    layer.load_state_dict(network.state_dict())
    with ran("dynamic_net", "linear_relu"):
        out_n, out_l = network(x, 3), layer(x, 3)
    torch.testing.assert_close(out_n, out_l, **tol(torch.float32))
    # network: one autograd node for the whole forward; layer: one per layer.
    assert "DynamicNet" in out_n.grad_fn.name() and "LinearReLU" in out_l.grad_fn.name()
    assert "fusion='network'" in repr(network)
    with pytest.raises(ValueError, match="fusion must be one of"):
        DynamicNet(4, 3, 2, fusion="model")


@pytest.mark.parametrize("depth", [0, 3])
def test_network_fusion_under_autocast_and_no_grad(depth, ran):
    fused, stock = pair()
    x = torch.randn(6, 12)
    with ran("dynamic_net"), torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_s = fused(x, depth), stock(x, depth)
    assert out_f.dtype == out_s.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_s, **tol(torch.bfloat16))
    with ran("dynamic_net"), torch.no_grad():
        out = fused(x, depth)
    assert out.grad_fn is None
    torch.testing.assert_close(out, stock(x, depth), **tol(torch.float32))


def casts_of(out, param):
    """How many cast nodes of the autograd graph behind `out` read `param`: under autocast, one
    when the cast is cached for the region, one per use when it is not."""
    seen, stack, casts = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is param:
                casts += node.name() == "ToCopyBackward0"
            stack.append(child)
    return casts


@pytest.mark.parametrize("fusion", ["network", "layer"])
def test_autocast_casts_as_stock(fusion, ran):
    # Under autocast the fused model's parameters are cast as stock's are: each once per autocast
    # region (the shared hidden layer too, used 3 times), float64 not at all.
    fused, stock = pair(fusion=fusion)
    x = torch.randn(6, 12)
    with ran("dynamic_net" if fusion == "network" else "linear_relu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_s = fused(x, 3), stock(x, 3)
    assert out_f.dtype == out_s.dtype == torch.bfloat16
    for (name, p_f), p_s in zip(fused.named_parameters(), stock.parameters()):
        assert casts_of(out_f, p_f) == casts_of(out_s, p_s) == 1, name
    fused, stock = fused.double(), stock.double()
    with ran("dynamic_net" if fusion == "network" else "linear_relu"), torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_s = fused(x.double(), 3), stock(x.double(), 3)
    assert out_f.dtype == out_s.dtype == torch.float64
    torch.testing.assert_close(out_f, out_s, **tol(torch.float64))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_torch_compile_under_autocast_matches_eager(fusion, ran):
    # Autocast inside the compiled function: the ops' Autocast kernels cast while AOTAutograd
    # traces, so the graph holds stock's casts and the compiled model gives the eager output's
    # bits; the gradients within bfloat16's tolerance (the shared layer's bfloat16 gradients are
    # summed in another order in the compiled backward, as stock's own are).
    torch._dynamo.reset()
    fused, _ = pair(fusion=fusion)
    x = torch.randn(5, 12)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused(x, 2)

    results = []
    for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
        with ran("dynamic_net" if fusion == "network" else "linear_relu"):
            out = fn(x)
            results.append((out, *torch.autograd.grad(out.float().sum(), list(fused.parameters()))))
    assert results[0][0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in results[0][1:])
    assert torch.equal(results[0][0], results[1][0])
    for got, want in zip(results[0][1:], results[1][1:], strict=True):
        torch.testing.assert_close(got, want, **tol(torch.bfloat16))


def test_torch_compile_one_model_every_depth(ran):
    # One compiled model called at changing depths: dynamo recompiles (and may make the depth a
    # symbolic int after the first change); every call still matches stock.
    torch._dynamo.reset()
    fused, stock = pair()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 12)
    for depth in (0, 1, 2, 3, 1):
        with ran("dynamic_net"):
            out = compiled(x, depth)
        torch.testing.assert_close(out, stock(x, depth), **tol(torch.float32))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_torch_compile_dynamic_batch_size(fusion, ran):
    # dynamic=True: one graph serves every batch size (the fake kernels' shapes are symbolic).
    # Sizes >= 2: dynamo specialises sizes 0 and 1 for any model, stock included.
    torch._dynamo.reset()
    fused, stock = pair(fusion=fusion)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused, fullgraph=True, dynamic=True, backend=counter)
    for n in (5, 9, 17, 2):
        x = torch.randn(n, 12)
        with ran(*KERNELS[fusion]):
            out = compiled(x, 2)
            out.sum().backward()
        grads = [p.grad.clone() for p in fused.parameters()]
        fused.zero_grad(set_to_none=True)
        ref = stock(x, 2)
        ref.sum().backward()
        torch.testing.assert_close(out, ref, **tol(torch.float32))
        for g, p in zip(grads, stock.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, **tol(torch.float32))
        stock.zero_grad(set_to_none=True)
    assert counter.frame_count == 1, f"recompiled for a new batch size: {counter.frame_count} graphs"


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("frozen", ["input_layer", "hidden_layer", "output_layer", "biases", "all_but_x"])
def test_frozen_layers_and_partial_requires_grad(fusion, frozen, device, ran):
    # Parameters with requires_grad=False get no gradient and the rest the stock gradients,
    # through the network op's output mask as through the per-layer ops.
    fused, stock = pair(device=device, fusion=fusion)
    for model in (fused, stock):
        for name, p in model.named_parameters():
            if frozen == "all_but_x" or (frozen == "biases" and name.endswith("bias")) or name.startswith(frozen):
                p.requires_grad_(False)
    x = torch.randn(7, 12, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(7, 3, device=device)
    with ran(*KERNELS[fusion], device=device):
        fused(x, 3).backward(g)
    stock(x_ref, 3).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol(torch.float32))
    for (name, pf), ps in zip(fused.named_parameters(), stock.parameters(), strict=True):
        assert (pf.grad is None) == (not pf.requires_grad) == (ps.grad is None), name
        if pf.grad is not None:
            torch.testing.assert_close(pf.grad, ps.grad, **tol(torch.float32), msg=name)
