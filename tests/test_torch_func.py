"""torch.func transforms and forward-mode AD through the fused layers (ReLU, no activation, GELU,
GELU-tanh, SiLU) and networks: grad, vjp, jacrev, jvp, jacfwd, hessian, vmap, per-sample
gradients (vmap(grad)), functional_call, model ensembles (stack_module_state + vmap),
torch.autograd.forward_ad. Stock torch.func on the same weights is
the oracle; `ran` proves that dynnet's kernels computed the fused side, and the kernel call
counts that the batching rules fold the vmapped dimension into one fused call."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import dynnet_ext
from conftest import tol
from dynnet_ext import DynamicNet, LinearReLUFunction, reference
from dynnet_ext.functional import dynamic_net, fused_linear, fused_linear_act, fused_linear_relu
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU
from dynnet_ext.ops import LinearReLUJvpFunction, kernel_calls, transforms_active

D_IN, H, D_OUT = 7, 6, 3
F64 = tol(torch.float64)


class StockLinearReLU(nn.Linear):
    """nn.Linear + ReLU with nn.Linear's parameter names (FusedLinearReLU's too)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class StockLinearAct(nn.Linear):
    """nn.Linear + a stock activation (GELU, GELU-tanh, SiLU) with nn.Linear's parameter names."""

    def __init__(self, *args, activation, **kw):
        super().__init__(*args, **kw)
        self.activation = activation

    def forward(self, x):
        return reference.activation(super().forward(x), self.activation)


FUSED_ACT = {"gelu": lambda *a, **kw: FusedLinearGELU(*a, **kw),
             "gelu_tanh": lambda *a, **kw: FusedLinearGELU(*a, approximate="tanh", **kw),
             "silu": lambda *a, **kw: FusedLinearSiLU(*a, **kw)}


class Case:
    """A fused module, the stock module with the same weights, how to call them, and which
    dynnet ops compute the forward and the backward (the kernels `ran` must see)."""

    def __init__(self, fused, stock, depth=None, fwd="linear_relu", bwd="linear_relu_backward"):
        self.fused, self.stock, self.depth, self.fwd, self.bwd = fused, stock, depth, fwd, bwd
        stock.load_state_dict(fused.state_dict())
        # Fused layers per forward: the kernel calls one forward makes without vmap.
        self.calls_per_forward = 1 if fwd == "dynamic_net" or depth is None else depth + 2

    def args(self, x):
        return (x,) if self.depth is None else (x, self.depth)

    def params(self, model):
        return {n: p.detach() for n, p in model.named_parameters()}

    def out_features(self):
        return H if isinstance(self.fused, FusedLinear) else D_OUT


def make_case(name, device, dtype=torch.float64):
    kw = {"device": device, "dtype": dtype}
    if name == "linear_relu":
        return Case(FusedLinearReLU(D_IN, H, **kw), StockLinearReLU(D_IN, H, **kw))
    if name == "linear":
        return Case(FusedLinear(D_IN, H, **kw), nn.Linear(D_IN, H, **kw))
    if name.startswith("linear_"):  # "linear_gelu": FusedLinearGELU against nn.Linear + F.gelu
        activation = name.removeprefix("linear_")
        return Case(FUSED_ACT[activation](D_IN, H, **kw), StockLinearAct(D_IN, H, activation=activation, **kw))
    fusion, depth = name.split("-")  # "network-2": DynamicNet(fusion="network") at depth 2
    net = DynamicNet(D_IN, H, D_OUT, fusion=fusion, **kw)
    with torch.no_grad():
        net.hidden_layer.weight.mul_(2)  # keep a fair share of hidden units active at depth 3
    stock = reference.DynamicNet(D_IN, H, D_OUT, **kw)
    if fusion == "network":
        return Case(net, stock, int(depth), "dynamic_net", "dynamic_net_backward")
    return Case(net, stock, int(depth))


CASES = ["linear_relu", "linear", "linear_gelu", "linear_gelu_tanh", "linear_silu", "network-0", "network-2",
         "layer-0", "layer-3"]


@pytest.fixture(params=CASES)
def case_name(request):
    return request.param


def close(got, want, t=F64):
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), strict=True):
        torch.testing.assert_close(g, w, **t)


def loss_fn(case, model):
    def loss(params, x, target):
        return ((functional_call(model, params, case.args(x)) - target) ** 2).sum()

    return loss


def data(case, device, n=5, dtype=torch.float64):
    return torch.randn(n, D_IN, device=device, dtype=dtype), torch.randn(n, case.out_features(), device=device, dtype=dtype)


def same_as_stock(case, fn, ran, ops, device):
    """fn(model) on the fused model, whose kernels `ops` must run, equals fn on the stock one."""
    with ran(*ops, device=device):
        got = fn(case.fused)
    close(got, fn(case.stock))


def calls_of(op, device):
    return kernel_calls()[torch.device(device).type][op]


# ----------------------------------------------------------------------------- reverse mode

def test_grad_and_vjp_match_stock(case_name, device, ran):
    case = make_case(case_name, device)
    x, target = data(case, device)
    fused_loss, stock_loss = loss_fn(case, case.fused), loss_fn(case, case.stock)
    params = case.params(case.fused)
    with ran(case.fwd, case.bwd, device=device):
        g_fused = grad(fused_loss, argnums=(0, 1))(params, x, target)
        out, pullback = vjp(lambda p, x: functional_call(case.fused, p, case.args(x)), params, x)
        v_fused = pullback(torch.ones_like(out))
    close(g_fused, grad(stock_loss, argnums=(0, 1))(params, x, target))
    _, pullback = vjp(lambda p, x: functional_call(case.stock, p, case.args(x)), params, x)
    close(v_fused, pullback(torch.ones_like(out)))


def test_jacrev_matches_stock(case_name, device, ran):
    case = make_case(case_name, device)
    x, _ = data(case, device, n=3)
    params = case.params(case.fused)

    def jac(model, argnums):
        return jacrev(lambda p, x: functional_call(model, p, case.args(x)), argnums=argnums)(params, x)

    # The input Jacobian's rows (the cotangents are the vmapped dimension) go through one fused
    # backward call; the weights' Jacobians need a weight gradient per cotangent, which a kernel
    # that sums over all rows cannot give: batched matmuls from the fused forward's activations.
    with ran(case.fwd, case.bwd, device=device):
        got_x = jac(case.fused, 1)
    with ran(case.fwd, device=device):
        got_w = jac(case.fused, 0)
    close((got_x, got_w), (jac(case.stock, 1), jac(case.stock, 0)))


def test_gradient_of_gradient_matches_stock(case_name, device, ran):
    # grad(grad): the backward is differentiated again (a gradient penalty in torch.func form).
    case = make_case(case_name, device)
    x, target = data(case, device)
    params = case.params(case.fused)

    def penalty(model):
        inner = grad(loss_fn(case, model), argnums=1)
        return grad(lambda p, x: inner(p, x, target).pow(2).sum(), argnums=(0, 1))(params, x)

    same_as_stock(case, penalty, ran, (case.fwd, case.bwd), device)


# ----------------------------------------------------------------------------- forward mode

def test_jvp_and_jacfwd_match_stock(case_name, device, ran):
    case = make_case(case_name, device)
    x, _ = data(case, device, n=4)
    params = case.params(case.fused)
    tangents = ({n: torch.randn_like(p) for n, p in params.items()}, torch.randn_like(x))

    def fwd(model):
        f = lambda p, x: functional_call(model, p, case.args(x))  # noqa: E731
        return jvp(f, (params, x), tangents), jacfwd(f, argnums=(0, 1))(params, x)

    same_as_stock(case, fwd, ran, (case.fwd,), device)


def test_forward_ad_matches_stock(case_name, device, ran):
    # torch.autograd.forward_ad, the non-functorch forward mode: dual tensors in, dual out.
    import torch.autograd.forward_ad as fwAD

    case = make_case(case_name, device)
    x, _ = data(case, device, n=4)
    dx = torch.randn_like(x)
    with fwAD.dual_level():
        with ran(case.fwd, device=device):
            got = fwAD.unpack_dual(case.fused(*case.args(fwAD.make_dual(x, dx))))
        want = fwAD.unpack_dual(case.stock(*case.args(fwAD.make_dual(x, dx))))
    close((got.primal, got.tangent), (want.primal, want.tangent))


def test_hessian_matches_stock(case_name, device, ran):
    case = make_case(case_name, device)
    x, target = data(case, device, n=2)
    params = case.params(case.fused)

    def hess(model):
        loss = loss_fn(case, model)
        first = {n: p for n, p in params.items() if n.endswith("weight")}
        return hessian(lambda w, x: loss({**params, **w}, x, target), argnums=(0, 1))(first, x)

    same_as_stock(case, hess, ran, (case.fwd,), device)


def test_jacrev_of_jacfwd_matches_stock(case_name, device, ran):
    # Forward mode differentiated again by reverse mode: the network's jvp rule recomputes the
    # activations it chains over (the saved ones carry no derivative).
    case = make_case(case_name, device)
    x, _ = data(case, device, n=2)
    params = case.params(case.fused)

    def second(model):
        f = lambda p, x: functional_call(model, p, case.args(x)).pow(2).sum()  # noqa: E731
        return jacrev(jacfwd(f, argnums=1), argnums=0)(params, x)

    same_as_stock(case, second, ran, (case.fwd,), device)


FUNCTIONAL = {
    "fused_linear_relu": (lambda x, w, b: fused_linear_relu(x, w, b), lambda x, w, b: reference.linear_act(x, w, b),
                          "linear_relu"),
    "fused_linear": (lambda x, w, b: fused_linear(x, w, b), lambda x, w, b: reference.linear_act(x, w, b, "none"),
                     "linear_relu"),
    **{f"fused_linear_act-{act}": (lambda x, w, b, act=act: fused_linear_act(x, w, b, act),
                                   lambda x, w, b, act=act: reference.linear_act(x, w, b, act), "linear_relu")
       for act in ("gelu", "gelu_tanh", "silu")},
}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_gradcheck_forward_ad_functional_layer(name, device, ran):
    fn, _, op = FUNCTIONAL[name]
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(H, D_IN, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(H, dtype=torch.float64, device=device, requires_grad=True)
    with ran(op, "linear_relu_backward", device=device):
        assert torch.autograd.gradcheck(fn, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        # Forward over reverse (a Hessian-vector product by forward_ad over the backward).
        assert torch.autograd.gradgradcheck(fn, (x, w, b), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_gradcheck_forward_ad_functional_network(depth, device, ran):
    torch.manual_seed(depth)
    x = torch.randn(4, D_IN, dtype=torch.float64, device=device, requires_grad=True)
    shapes = [(H, D_IN), (H,), (H, H), (H,), (D_OUT, H), (D_OUT,)]
    params = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in shapes]
    if depth == 0:  # the hidden layer left out, as DynamicNet does at depth 0
        params[2:4] = [None, None]
    inputs = [x, *(p for p in params if p is not None)]

    def f(*args):
        it = iter(args[1:])
        return dynamic_net(args[0], *(None if p is None else next(it) for p in params), depth=depth)

    with ran("dynamic_net", "dynamic_net_backward", device=device):
        assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True,
                                        check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_layer_jacobians_match_stock(name, device, ran):
    fn, ref, op = FUNCTIONAL[name]
    x = torch.randn(4, D_IN, dtype=torch.float64, device=device)
    w = torch.randn(H, D_IN, dtype=torch.float64, device=device)
    b = torch.randn(H, dtype=torch.float64, device=device)
    with ran(op, "linear_relu_backward", device=device):
        got = jacrev(fn, argnums=(0, 1, 2))(x, w, b), jacfwd(fn, argnums=(0, 1, 2))(x, w, b)
    close(got, (jacrev(ref, argnums=(0, 1, 2))(x, w, b), jacfwd(ref, argnums=(0, 1, 2))(x, w, b)))


# ----------------------------------------------------------------------------- vmap

def test_vmap_folds_into_one_fused_call(case_name, device, ran):
    # A vmapped input is one more leading dimension: one kernel call per layer, not per sample.
    case = make_case(case_name, device)
    xs = torch.randn(6, 2, D_IN, device=device, dtype=torch.float64)  # 6 samples of 2 rows
    params = case.params(case.fused)
    f = lambda model: lambda x: functional_call(model, params, case.args(x))  # noqa: E731
    before = calls_of(case.fwd, device)
    with ran(case.fwd, device=device):
        got = vmap(f(case.fused), in_dims=1)(xs.movedim(0, 1))  # the vmapped dim not first
    assert calls_of(case.fwd, device) - before == case.calls_per_forward
    close(got, vmap(f(case.stock), in_dims=1)(xs.movedim(0, 1)))


def test_per_sample_gradients_match_stock(case_name, device, ran):
    # vmap(grad(loss)): per-sample gradients, as differential-privacy training computes them.
    case = make_case(case_name, device)
    x, target = data(case, device, n=8)
    params = case.params(case.fused)
    before = calls_of(case.fwd, device)
    with ran(case.fwd, device=device):
        got = vmap(grad(loss_fn(case, case.fused)), in_dims=(None, 0, 0))(params, x, target)
    assert calls_of(case.fwd, device) - before == case.calls_per_forward  # all 8 samples in one call
    want = vmap(grad(loss_fn(case, case.stock)), in_dims=(None, 0, 0))(params, x, target)
    close(got, want)
    assert all(g.shape == (8, *p.shape) for g, p in zip(got.values(), params.values()))


def test_per_sample_gradients_of_input_run_the_backward_kernel(case_name, device, ran):
    # grad_x per sample folds into one fused backward call too.
    case = make_case(case_name, device)
    x, target = data(case, device, n=8)
    params = case.params(case.fused)
    f = lambda model: vmap(grad(loss_fn(case, model), argnums=1), in_dims=(None, 0, 0))  # noqa: E731
    before = calls_of(case.bwd, device)
    with ran(case.fwd, case.bwd, device=device):
        got = f(case.fused)(params, x, target)
    assert calls_of(case.bwd, device) - before == case.calls_per_forward
    close(got, f(case.stock)(params, x, target))


def test_per_sample_gradients_at_the_seed_shape_float32(ran):
    # The benchmark's case: DynamicNet at N=64, D_in=1000, H=100, D_out=10, float32.
    torch.manual_seed(0)
    for fusion in ("network", "layer"):
        net = DynamicNet(1000, 100, 10, fusion=fusion)
        stock = reference.DynamicNet(1000, 100, 10)
        stock.load_state_dict(net.state_dict())
        params = {n: p.detach() for n, p in net.named_parameters()}
        x, target = torch.randn(64, 1000), torch.randn(64, 10)

        def per_sample(model):
            def loss(p, x, t):
                return ((functional_call(model, p, (x, 3)) - t) ** 2).sum()
            return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

        with ran("dynamic_net" if fusion == "network" else "linear_relu"):
            got = per_sample(net)
        close(got, per_sample(stock), tol(torch.float32))


def test_per_sample_gradients_with_params_that_require_grad(device, ran):
    # Parameters straight from named_parameters() (not detached): the per-sample gradients stay
    # connected to autograd, so a backward through them must be right too (the batching rule
    # recomputes the activations instead of using the saved ones, which carry no derivative).
    case = make_case("network-2", device)
    x, target = data(case, device, n=4)
    results = []
    for model in (case.fused, case.stock):
        params = dict(model.named_parameters())
        with ran(case.fwd, device=device) if model is case.fused else torch.enable_grad():
            per_sample = vmap(grad(loss_fn(case, model)), in_dims=(None, 0, 0))(params, x, target)
            total = sum(g.pow(2).sum() for g in per_sample.values())
            results.append((per_sample, torch.autograd.grad(total, list(params.values()))))
    close(*results)


@pytest.mark.parametrize("x_batched", [False, True], ids=["shared_x", "x_per_member"])
def test_ensemble_matches_stock(case_name, x_batched, device, ran):
    # stack_module_state + vmap over the members' weights: one fused call per member (forward
    # and backward), the members' own results.
    case = make_case(case_name, device)
    members = [copy.deepcopy(case.fused) for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 0.1 * i)
    params, buffers = stack_module_state(members)
    x, target = data(case, device, n=4)
    xs = x.expand(3, *x.shape) * torch.tensor([1.0, -1.0, 0.5], dtype=x.dtype, device=device).view(3, 1, 1)
    x_in, x_dim = (xs, 0) if x_batched else (x, None)

    def run(model):
        base = copy.deepcopy(model).to("meta")

        def loss(p, b, x):
            return ((functional_call(base, (p, b), case.args(x)) - target) ** 2).sum()

        out = vmap(lambda p, b, x: functional_call(base, (p, b), case.args(x)), in_dims=(0, 0, x_dim))(params, buffers, x_in)
        return out, vmap(grad(loss), in_dims=(0, 0, x_dim))(params, buffers, x_in)

    before = calls_of(case.fwd, device)
    with ran(case.fwd, case.bwd, device=device):
        got = run(case.fused)
    assert calls_of(case.fwd, device) - before == 2 * 3 * case.calls_per_forward  # 2 passes x 3 members
    close(got, run(case.stock))
    # and each member's slice is that member run alone
    for i, m in enumerate(members):
        x_i = xs[i] if x_batched else x
        torch.testing.assert_close(got[0][i], m(*case.args(x_i)), **F64)


def test_grad_of_vmap_matches_stock(case_name, device, ran):
    # The transforms the other way round: a batched forward inside grad.
    case = make_case(case_name, device)
    xs = torch.randn(3, 4, D_IN, device=device, dtype=torch.float64)
    params = case.params(case.fused)

    def total(model):
        f = vmap(lambda p, x: functional_call(model, p, case.args(x)), in_dims=(None, 0))
        return grad(lambda p, x: f(p, x).pow(2).sum(), argnums=(0, 1))(params, xs)

    same_as_stock(case, total, ran, (case.fwd, case.bwd), device)


# ----------------------------------------------------------------------------- routing

def test_eager_path_unchanged_and_transforms_detected(device, ran):
    # No transform: the C++ autograd node, as before. Under a transform: the Python Functions.
    layer = FusedLinearReLU(D_IN, H, device=device)
    net = DynamicNet(D_IN, H, D_OUT, device=device)
    x = torch.randn(2, D_IN, device=device)
    assert not transforms_active()
    with ran("linear_relu", "dynamic_net", device=device):
        assert "CppNode" in layer(x).grad_fn.name() and "CppNode" in net(x, 1).grad_fn.name()
        seen = []
        grad(lambda x: seen.append(transforms_active()) or layer(x).sum())(x)
        vmap(lambda x: seen.append(transforms_active()) or net(x, 1))(x)
        jvp(lambda x: seen.append(transforms_active()) or layer(x), (x,), (x,))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        seen.append(transforms_active())
    assert seen == [True, True, True, True]
    assert not transforms_active()


def test_linear_relu_function_under_vmap_and_grad(device):
    # The documented autograd.Function itself (it calls the op directly, DYNNET_EXT_FORCE_STOCK
    # does not apply): vmap with the vmapped rows in one fused call, per-sample gradients;
    # forward mode is LinearReLUJvpFunction's (see its docstring).
    x = torch.randn(5, D_IN, dtype=torch.float64, device=device)
    w = torch.randn(H, D_IN, dtype=torch.float64, device=device)
    b = torch.randn(H, dtype=torch.float64, device=device)
    fn = lambda w, b, x: LinearReLUFunction.apply(x, w, b, "relu").sum()  # noqa: E731
    ref = lambda w, b, x: reference.linear_act(x, w, b).sum()  # noqa: E731
    before = calls_of("linear_relu", device)
    got = vmap(grad(fn, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    got_y = vmap(lambda x: LinearReLUFunction.apply(x, w, b, "relu"))(x)
    assert calls_of("linear_relu", device) - before == 2
    close((got, got_y), (vmap(grad(ref, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x), reference.linear_act(x, w, b)))
    with pytest.raises(RuntimeError, match="jvp"):
        jvp(lambda x: LinearReLUFunction.apply(x, w, b, "relu"), (x,), (x,))
    got = jvp(lambda x: LinearReLUJvpFunction.apply(x, w, b, "relu"), (x,), (x,))
    close(got, jvp(lambda x: reference.linear_act(x, w, b), (x,), (x,)))


def test_stock_fallback_under_transforms_matches():
    # Inputs the kernels do not take (complex) keep working under transforms, through stock ops.
    x = torch.randn(3, 4, dtype=torch.complex128)
    w = torch.randn(2, 4, dtype=torch.complex128)
    before = kernel_calls()
    got = vmap(lambda x: fused_linear(x, w))(x)
    assert kernel_calls() == before
    torch.testing.assert_close(got, reference.linear_act(x, w, None, "none"))


def test_module_state_untouched_by_functional_call(device):
    # functional_call swaps parameters for the call only; the module keeps its own.
    net = DynamicNet(D_IN, H, D_OUT, device=device, dtype=torch.float64)
    before = {n: p.clone() for n, p in net.named_parameters()}
    params = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    out = functional_call(net, params, (torch.randn(2, D_IN, device=device, dtype=torch.float64), 1))
    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    assert dynnet_ext.DynamicNet is DynamicNet


def test_torch_compile_over_transforms_runs_them_eagerly(ran):
    # torch.compile(fullgraph=True) of vmap(grad(...)) over fused layers is not supported (README):
    # without fullgraph Dynamo falls back to running the transforms eagerly, with their results.
    torch._dynamo.reset()
    case = make_case("network-2", "cpu", torch.float32)
    x, target = data(case, "cpu", n=4, dtype=torch.float32)
    params = case.params(case.fused)
    per_sample = vmap(grad(loss_fn(case, case.fused)), in_dims=(None, 0, 0))
    with ran("dynamic_net"):
        got = torch.compile(per_sample, backend="aot_eager")(params, x, target)
    close(got, per_sample(params, x, target), tol(torch.float32))
