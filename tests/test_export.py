"""torch.export and AOTInductor: an exported program of the fused layers and of DynamicNet keeps
dynnet's ops (torch.ops.dynnet.*, not decomposed into stock's), serves other batch sizes with
a dynamic batch dimension, survives torch.export.save / load and run_decompositions, trains
(backward through ep.module()), and compiles into an AOTInductor package that still calls the
kernels - each run checked against the eager module, the kernels seen by `ran`."""

import random

import pytest
import torch
from torch import nn

import dynnet_ext
from conftest import tol
from dynnet_ext import fuse
from dynnet_ext.models import draw_depth
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU

DYNNET_OPS = {torch.ops.dynnet.linear_relu.default, torch.ops.dynnet.linear_act.default,
              torch.ops.dynnet.dynamic_net.default}
# What the fused ops would become if a fused layer fell back to (or were decomposed into) stock's.
STOCK_GEMMS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
               torch.ops.aten.matmul.default}


def stock_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 3))


# name -> (model factory, extra positional arguments of forward, the dynnet ops its graph holds)
MODELS = {
    "FusedLinear": (lambda d: FusedLinear(8, 3, device=d), (), ["linear_relu"]),
    "FusedLinearReLU": (lambda d: FusedLinearReLU(8, 3, device=d), (), ["linear_relu"]),
    "FusedLinearGELU": (lambda d: FusedLinearGELU(8, 3, device=d), (), ["linear_relu"]),
    "FusedLinearGELU-tanh": (lambda d: FusedLinearGELU(8, 3, approximate="tanh", device=d), (), ["linear_relu"]),
    "FusedLinearSiLU": (lambda d: FusedLinearSiLU(8, 3, bias=False, device=d), (), ["linear_relu"]),
    "fuse(mlp, linear=True)": (lambda d: fuse(stock_mlp().to(d), linear=True), (), ["linear_relu"] * 3),
    "DynamicNet depth 0": (lambda d: dynnet_ext.DynamicNet(8, 16, 3, device=d), (0,), ["dynamic_net"]),
    "DynamicNet depth 3": (lambda d: dynnet_ext.DynamicNet(8, 16, 3, device=d), (3,), ["dynamic_net"]),
    "DynamicNet(fusion='layer') depth 2": (lambda d: dynnet_ext.DynamicNet(8, 16, 3, device=d, fusion="layer"), (2,),
                                           ["linear_relu"] * 4),
}


# run_decompositions traces the ops' autograd formulas: a GELU or SiLU layer's node runs linear_act
# (which returns the pre-activation beside the output), so that is the op the program keeps there.
DECOMPOSED = {"fuse(mlp, linear=True)": ["linear_act", "linear_act", "linear_relu"]}


def calls(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def dynnet_calls(ep):
    return [t._opname for t in calls(ep) if t in DYNNET_OPS]


def export(model, x, extra, strict=False):
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (x, *extra), dynamic_shapes=({0: batch}, *[None] * len(extra)), strict=strict)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_export_keeps_the_fused_ops(name, strict, device, ran):
    make, extra, ops = MODELS[name]
    model = make(device)
    with ran(*set(ops), device=device):
        ep = export(model, torch.randn(5, 8, device=device), extra, strict)
        assert dynnet_calls(ep) == ops and not STOCK_GEMMS & set(calls(ep)), ep.graph
        for n in (5, 9, 2):  # one program, any batch size (dynamic dimension)
            x = torch.randn(n, 8, device=device)
            assert torch.equal(ep.module()(x, *extra), model(x, *extra))


@pytest.mark.parametrize("name", ["fuse(mlp, linear=True)", "DynamicNet depth 3"])
def test_saved_loaded_and_decomposed_programs_run_the_kernels(name, tmp_path, ran):
    make, extra, ops = MODELS[name]
    model = make("cpu")
    x = torch.randn(6, 8)
    with ran(*set(ops)):
        ep = export(model, x, extra)
        torch.export.save(ep, tmp_path / "model.pt2")
        loaded = torch.export.load(tmp_path / "model.pt2")
        decomposed = ep.run_decompositions()  # to the core ATen opset: dynnet's ops stay whole
        for program, want in ((loaded, ops), (decomposed, DECOMPOSED.get(name, ops))):
            assert dynnet_calls(program) == want and not STOCK_GEMMS & set(calls(program)), program.graph
        assert torch.equal(loaded.module()(x, *extra), model(x, *extra))
        # The decomposition rewrites stock's SiLU as x * sigmoid(x) (another rounding): dtype's tolerance.
        torch.testing.assert_close(decomposed.module()(x, *extra), model(x, *extra), **tol(torch.float32))


@pytest.mark.parametrize("name", ["fuse(mlp, linear=True)", "DynamicNet depth 3", "DynamicNet(fusion='layer') depth 2"])
def test_exported_module_trains(name, device, ran):
    # Backward through ep.module(): the ops' autograd formulas (the fused backward kernels), the
    # same gradients as the eager module's, bit for bit (the same kernels on the same inputs).
    make, extra, ops = MODELS[name]
    model = make(device)
    x = torch.randn(7, 8, device=device)
    backward = {"linear_relu": "linear_relu_backward", "dynamic_net": "dynamic_net_backward"}[ops[0]]
    with ran(backward, device=device):
        exported = export(model, x, extra).module()
        exported(x, *extra).square().sum().backward()
    model(x, *extra).square().sum().backward()
    got, want = dict(exported.named_parameters()), dict(model.named_parameters())
    assert got.keys() == want.keys()
    for key, p in want.items():
        assert p.grad is not None and torch.equal(got[key].grad, p.grad), key


def test_export_fixes_the_drawn_depth(ran):
    # DynamicNet's depth=None draws with Python's random at trace time, as the stock model's loop
    # does under export: the program runs the depth drawn then (pass depth= to choose it).
    model = dynnet_ext.DynamicNet(8, 16, 3)
    x = torch.randn(4, 8)
    for seed in range(4):
        random.seed(seed)
        want = draw_depth()
        random.seed(seed)
        with ran("dynamic_net"):
            ep = torch.export.export(model, (x,))
            (node,) = [n for n in ep.graph.nodes if n.target == torch.ops.dynnet.dynamic_net.default]
            assert node.args[-1] == want
            assert torch.equal(ep.module()(x), model(x, want))


@pytest.mark.parametrize("name", ["fuse(mlp, linear=True)", "DynamicNet depth 3"])
def test_aoti_package_calls_the_kernels(name, tmp_path, ran):
    # AOTInductor compiles the program to a shared library; dynnet's ops run through its proxy
    # executor (the dispatcher, our kernels). Inductor generates its own code for the stock
    # GELU / SiLU between them, so the MLP's output is within float32's tolerance, not bit-equal.
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    make, extra, ops = MODELS[name]
    model = make("cpu")
    x = torch.randn(6, 8)
    ep = export(model, x, extra)
    package = aoti_load_package(aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2")))
    with ran(*set(ops)):
        out = package(x, *extra)
    torch.testing.assert_close(out, model(x, *extra), **tol(torch.float32))
