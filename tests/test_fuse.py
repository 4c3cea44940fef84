"""dynnet_ext.fuse on existing models: what it fuses (nn.Sequential directly, other modules through
torch.fx, every ReLU, GELU and SiLU form, other libraries' activation modules by class name),
what it leaves alone and why, and that the fused model is the original model: same outputs and
gradients in train and eval mode and under torch.compile, the same Parameter objects, the same
state_dict keys."""

import copy
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynnet_ext
from conftest import tol
from dynnet_ext import fuse, reference
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU

KERNELS = ("linear_relu", "linear_relu_backward")
F32 = tol(torch.float32)


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 4))


class AllReLUForms(nn.Module):
    """Every ReLU form after a Linear, a shared nn.ReLU, a ModuleList loop, dropout, batch norm
    and a buffer: train and eval differ, the graph does not."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc4, self.fc5, self.fc6 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.act = nn.ReLU()
        self.act_inplace = nn.ReLU(inplace=True)
        self.blocks = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(32, 4)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = self.act(self.fc3(x))
        x = self.drop(self.act(self.fc4(x)))  # the same nn.ReLU again
        x = F.relu(self.fc5(x), inplace=True)
        x = self.act_inplace(self.norm(self.fc6(x)))  # fc6 feeds the norm, not the ReLU
        for block in self.blocks:
            x = block(x).relu_() if block is self.blocks[0] else block(x).relu()
        return self.head(x) * self.scale


def outputs_and_grads(model, x, mode):
    model.train(mode == "train")
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)  # the same dropout masks on both sides
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out))
    return [out, x.grad, *(p.grad for p in model.parameters())]


def assert_same_model(fused, model, x, ran, mode, fused_ops=KERNELS):
    with ran(*fused_ops, device=x.device):
        got = outputs_and_grads(fused, x, mode)
    want = outputs_and_grads(model, x, mode)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **F32)


def same_parameters(a, b):
    return [id(p) for p in a.parameters()] == [id(p) for p in b.parameters()]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_mlp(mode, device, ran):
    model = mlp().to(device)
    before = copy.deepcopy(model)
    fused, report = fuse(model, report=True)
    assert [type(m) for m in fused] == [FusedLinearReLU, nn.Identity, FusedLinearReLU, nn.Identity, nn.Linear]
    assert report.fused == [("0", "nn.ReLU '1'"), ("2", "nn.ReLU '3'")] and report.skipped == []
    assert same_parameters(fused, model)  # moved, not copied
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [type(m) for m in model] == [type(m) for m in before]  # inplace=False: the original is as it was
    assert_same_model(fused, model, torch.randn(16, 12, device=device), ran, mode)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_relu_form_through_torch_fx(mode, device, ran):
    model = AllReLUForms().to(device)
    fused, report = fuse(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule) and report.traced == [""]
    forms = dict(report.fused)
    assert forms == {"fc1": "F.relu", "fc2": "torch.relu", "fc3": "nn.ReLU 'act'", "fc4": "nn.ReLU 'act'",
                     "fc5": "F.relu", "blocks.0": ".relu_()", "blocks.1": ".relu()"}
    assert "fc6" in report.kept and "head" in report.kept and report.skipped == []
    for name in forms:
        assert type(fused.get_submodule(name)) is FusedLinearReLU
    assert "relu" not in fused.code.replace("act_inplace", "")  # every ReLU after a fused Linear is gone
    assert list(fused.state_dict()) == list(model.state_dict())
    assert same_parameters(fused, model)
    assert_same_model(fused, model, torch.randn(16, 12, device=device), ran, mode)


def test_state_dict_loads_both_ways_and_training_matches(ran):
    # The same keys both ways, and an optimizer built on the original's parameters trains the
    # fused model (they are the same Parameter objects): the same losses as training the original
    # (float64: Adam's steps amplify float32 rounding differences over the steps).
    torch.manual_seed(0)
    model = AllReLUForms().double()
    twin = copy.deepcopy(model)
    fused = fuse(model)
    fused.load_state_dict(twin.state_dict())
    twin.load_state_dict(fused.state_dict())
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    losses = []
    with ran(*KERNELS):
        for net in (fused, twin):
            opt = torch.optim.Adam((model if net is fused else twin).parameters(), lr=1e-2)
            torch.manual_seed(1)
            losses.append([])
            for _ in range(5):
                loss = F.mse_loss(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[-1].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), **tol(torch.float64))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fused.parameters()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_model_under_torch_compile(backend, ran):
    torch._dynamo.reset()
    model = AllReLUForms().eval()
    fused = fuse(model)
    x = torch.randn(8, 12)
    assert_same_model(torch.compile(fused, backend=backend), model, x, ran, "eval")


class OneLinear(nn.Module):
    """One Linear(12, 12) as `fc`; the subclasses below differ in what forward does with it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)


class Residual(OneLinear):
    def forward(self, x):
        h = self.fc(x)
        return F.relu(h) + h  # the Linear's output is used twice


class InplaceOnShared(OneLinear):
    def forward(self, x):
        h = self.fc(x)
        y = h * 2
        return F.relu_(h) + y  # an in-place ReLU on a tensor another op reads


class DataDependent(OneLinear):
    def forward(self, x):
        h = self.fc(x)
        return F.relu(h) if h.sum() > 0 else h


class SeedDynamicNet(nn.Module):
    """The seed's model as written: the depth drawn with random inside forward."""

    def __init__(self):
        super().__init__()
        self.input_layer, self.hidden_layer, self.output_layer = nn.Linear(12, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.relu(self.input_layer(x))
        for _ in range(random.randint(0, 3)):
            h = self.relu(self.hidden_layer(h))
        return self.output_layer(h)


class TrainingBranch(OneLinear):
    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h * 0.5
        return F.relu(h)


class OptionalArg(OneLinear):
    def forward(self, x, scale=None):
        return F.relu(self.fc(x)) * (1 if scale is None else scale)


class CalledTwice(OneLinear):
    def forward(self, x):
        return F.relu(self.fc(x)) + self.fc(x)


def hooked_sequential():
    model = mlp()
    model[0].register_forward_hook(lambda m, i, o: None)
    return model


def shared_sequential():
    lin = nn.Linear(12, 12)
    return nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(12, 4))


LEFT_ALONE = {
    "residual": (Residual, "fc", "used by relu, add"),
    "inplace_relu_on_shared_tensor": (InplaceOnShared, "fc", "used by mul, relu_"),
    "data_dependent_control_flow": (DataDependent, "fc", "torch.fx cannot trace"),
    "random_depth": (SeedDynamicNet, "hidden_layer", "different graphs"),
    "train_eval_branch": (TrainingBranch, "fc", "different graphs"),
    "optional_argument": (OptionalArg, "fc", "optional or variadic arguments"),
    "called_twice": (CalledTwice, "fc", "not only by a ReLU"),
    "hooks": (hooked_sequential, "0", "hooks"),
    "shared_module": (shared_sequential, "0", "also at '2'"),
}


@pytest.mark.parametrize("case", sorted(LEFT_ALONE))
def test_left_alone_with_the_reason(case):
    make, name, reason = LEFT_ALONE[case]
    model = make()
    state = random.getstate()
    fused, report = fuse(model, report=True)
    assert random.getstate() == state  # tracing does not consume the random stream
    skipped = dict(report.skipped)
    assert reason in skipped[name], report
    assert type(fused.get_submodule(name)) is nn.Linear
    assert name not in dict(report.fused)
    x = torch.randn(6, 12)
    random.seed(3)
    got = fused(x)
    random.seed(3)
    torch.testing.assert_close(got, model(x), **F32)


def test_left_alone_is_reported_as_a_warning(caplog):
    with caplog.at_level("INFO", logger="dynnet_ext.fuse"):
        fuse(Residual())
        fuse(mlp())
    levels = [(r.levelname, r.getMessage().splitlines()[0]) for r in caplog.records]
    assert levels == [("WARNING", "dynnet_ext.fuse: 0 Linear+ReLU fused, 0 Linear -> FusedLinear, 1 left alone"),
                      ("INFO", "dynnet_ext.fuse: 2 Linear+ReLU fused, 0 Linear -> FusedLinear, 0 left alone")]


class Attention(nn.Module):
    """An attention block's shape: projections, an optional mask (untraceable), no activation."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(12, 36), nn.Linear(12, 12)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) + (0 if mask is None else mask)
        return self.proj(scores.softmax(-1) @ v)


class ActivationChildUnused(Attention):
    """Untraceable, with an activation module beside the Linears: they may feed it."""

    def __init__(self):
        super().__init__()
        self.act = nn.GELU()


def test_untraceable_module_without_an_activation_in_sight_is_information(caplog):
    with caplog.at_level("INFO", logger="dynnet_ext.fuse"):
        fused, report = fuse(nn.Sequential(Attention(), nn.Linear(12, 12), nn.SiLU()), report=True)
    assert report.untraced == [("0.qkv", "its forward takes optional or variadic arguments, which a traced graph would fix"),
                               ("0.proj", "its forward takes optional or variadic arguments, which a traced graph would fix")]
    assert report.skipped == [] and [f for f, _ in report.fused] == ["1"]
    assert [(r.levelname, r.getMessage().splitlines()[0]) for r in caplog.records] == [
        ("INFO", "dynnet_ext.fuse: 0 Linear+ReLU fused, 1 Linear+SiLU fused, 0 Linear -> FusedLinear, 0 left alone, "
                 "2 in modules not traced")]
    assert "  untraced 0.qkv: its forward takes optional" in str(report)
    # With an activation module beside them, or forward naming one (OptionalArg's F.relu): skipped.
    for model, names in ((ActivationChildUnused(), ["qkv", "proj"]), (OptionalArg(), ["fc"])):
        _, report = fuse(model, report=True)
        assert [n for n, _ in report.skipped] == names and report.untraced == []


def test_linear_option_makes_every_remaining_linear_fused(ran):
    model = nn.Sequential(Residual(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4), AllReLUForms())
    model[4] = nn.Sequential(nn.Linear(4, 12), AllReLUForms())
    fused, report = fuse(model, linear=True, report=True)
    remaining = [n for n, m in fused.named_modules() if type(m) is nn.Linear]
    assert remaining == [] and report.kept == []
    assert {"0.fc", "3", "4.1.fc6", "4.1.head"} <= set(report.linear)
    assert ("1", "nn.ReLU '2'") in report.fused and ("0.fc", "its output is used by relu, add, not only by a ReLU") in report.skipped
    assert type(fused[0].fc) is FusedLinear and same_parameters(fused, model)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_model(fused, model, torch.randn(16, 12), ran, "eval", ("linear_relu",))


def test_nested_modules(ran):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(12, 12), nn.ReLU())
            self.fc = nn.Linear(12, 12)

        def forward(self, x):
            return self.fc(self.inner(x)).relu() + x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Block(), Block())
            self.head = nn.Linear(12, 4)

        def forward(self, x):
            return self.head(self.blocks(x))

    model = Model()
    fused, report = fuse(model, report=True)
    assert type(fused) is Model  # nothing to fuse in its own forward: kept as it is
    assert sorted(report.traced) == ["blocks.0", "blocks.1"]
    assert sorted(lin for lin, _ in report.fused) == ["blocks.0.fc", "blocks.0.inner.0", "blocks.1.fc", "blocks.1.inner.0"]
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_model(fused, model, torch.randn(5, 12), ran, "train")


def test_inplace_replaces_submodules_where_they_are(ran):
    model = mlp()
    params = list(model.parameters())
    fused = fuse(model, inplace=True)
    assert fused is model and type(model[0]) is FusedLinearReLU and type(model[1]) is nn.Identity
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    x = torch.randn(3, 12)
    with ran("linear_relu"):
        out = model(x)
    lin = [m for m in (nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 4))]
    for layer, (w, b) in zip(lin, zip(params[::2], params[1::2])):
        layer.weight, layer.bias = w, b
    torch.testing.assert_close(out, lin[2](F.relu(lin[1](F.relu(lin[0](x))))), **F32)


def test_dynnet_and_torch_modules_are_not_entered():
    net = dynnet_ext.DynamicNet(12, 8, 4)
    assert fuse(net, inplace=True) is net
    encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    fused, report = fuse(encoder, report=True, linear=True)
    assert type(fused.linear1) is nn.Linear and report.fused == report.linear == []
    stock = reference.DynamicNet(12, 8, 4)  # forward(x, depth=None): an optional argument
    _, report = fuse(stock, report=True)
    assert {n for n, _ in report.skipped} == {"input_layer", "hidden_layer", "output_layer"}


def test_from_linear_moves_parameters_without_drawing_random_numbers():
    lin = nn.Linear(5, 3, bias=False).eval()
    state = torch.get_rng_state()
    fused = FusedLinearReLU.from_linear(lin)
    assert torch.equal(torch.get_rng_state(), state)
    assert fused.weight is lin.weight and fused.bias is None and not fused.training
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        FusedLinear.from_linear(nn.ReLU())


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fuse(lambda x: x)


# ---- GELU, GELU-tanh, SiLU, and other libraries' activation modules ------------------------------

FUSE = sys.modules["dynnet_ext.fuse"]  # the module (dynnet_ext.fuse is the function)


@pytest.fixture
def registry(monkeypatch):
    """register_activation's registry, restored after the test."""
    monkeypatch.setattr(FUSE, "_REGISTRY", dict(FUSE._REGISTRY))
    return FUSE._REGISTRY


def act_mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(approximate="tanh"),
                         nn.Linear(32, 32), nn.SiLU(inplace=True), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sequential_gelu_silu(mode, device, ran):
    model = act_mlp().to(device)
    fused, report = fuse(model, report=True)
    assert [type(m) for m in fused] == [FusedLinearGELU, nn.Identity, FusedLinearGELU, nn.Identity, FusedLinearSiLU,
                                        nn.Identity, FusedLinearReLU, nn.Identity, nn.Linear]
    assert [m.approximate for m in fused[:4:2]] == ["none", "tanh"]
    assert report.fused == [("0", "nn.GELU '1'"), ("2", "nn.GELU '3'"), ("4", "nn.SiLU '5'"), ("6", "nn.ReLU '7'")]
    assert report.activations == {"0": "gelu", "2": "gelu_tanh", "4": "silu", "6": "relu"}
    assert str(report).splitlines() == [
        "dynnet_ext.fuse: 1 Linear+ReLU fused, 1 Linear+GELU fused, 1 Linear+GELU-tanh fused, 1 Linear+SiLU fused, "
        "0 Linear -> FusedLinear, 0 left alone",
        "  fused    0 + nn.GELU '1' (Linear+GELU)",
        "  fused    2 + nn.GELU '3' (Linear+GELU-tanh)",
        "  fused    4 + nn.SiLU '5' (Linear+SiLU)",
        "  fused    6 + nn.ReLU '7' (Linear+ReLU)"]
    assert same_parameters(fused, model) and list(fused.state_dict()) == list(model.state_dict())
    assert_same_model(fused, model, torch.randn(16, 12, device=device), ran, mode)


class AllActivationForms(nn.Module):
    """Every GELU and SiLU form after a Linear in a traced forward, and a ReLU among them."""

    def __init__(self):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(12 if i == 0 else 16, 16) for i in range(8)])
        self.gelu, self.silu = nn.GELU(approximate="tanh"), nn.SiLU()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.gelu(self.fc[0](x))
        x = F.gelu(self.fc[1](x), approximate="tanh")
        x = torch.nn.functional.gelu(self.fc[2](x), approximate="none")
        x = F.silu(self.fc[3](x))
        x = torch.nn.functional.silu(self.fc[4](x), inplace=True)
        x = self.gelu(self.fc[5](x))
        x = self.silu(self.fc[6](x))
        x = F.relu(self.fc[7](x))
        return self.head(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_gelu_and_silu_form_through_torch_fx(mode, device, ran):
    model = AllActivationForms().to(device)
    fused, report = fuse(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule) and report.traced == [""]
    assert report.fused == [("fc.0", "F.gelu"), ("fc.1", "F.gelu(approximate='tanh')"), ("fc.2", "F.gelu"),
                            ("fc.3", "F.silu"), ("fc.4", "F.silu"), ("fc.5", "nn.GELU 'gelu'"),
                            ("fc.6", "nn.SiLU 'silu'"), ("fc.7", "F.relu")]
    assert report.activations == {"fc.0": "gelu", "fc.1": "gelu_tanh", "fc.2": "gelu", "fc.3": "silu",
                                  "fc.4": "silu", "fc.5": "gelu_tanh", "fc.6": "silu", "fc.7": "relu"}
    assert report.kept == ["head"] and report.skipped == []
    assert [type(fused.fc[i]) for i in range(8)] == [FusedLinearGELU] * 3 + [FusedLinearSiLU] * 2 + \
        [FusedLinearGELU, FusedLinearSiLU, FusedLinearReLU]
    assert [fused.fc[i].activation for i in range(8)] == [report.activations[f"fc.{i}"] for i in range(8)]
    assert "gelu" not in fused.code and "silu" not in fused.code and "relu" not in fused.code
    assert str(report).splitlines()[0] == ("dynnet_ext.fuse: 1 Linear+ReLU fused, 2 Linear+GELU fused, "
                                           "2 Linear+GELU-tanh fused, 3 Linear+SiLU fused, 0 Linear -> FusedLinear, "
                                           "0 left alone")
    assert "  fused    fc.1 + F.gelu(approximate='tanh') (Linear+GELU-tanh)" in str(report).splitlines()
    assert same_parameters(fused, model) and list(fused.state_dict()) == list(model.state_dict())
    assert_same_model(fused, model, torch.randn(16, 12, device=device), ran, mode)


def transformers_like(name, forward):
    """A class named as transformers.activations' `name`, computing `forward`."""
    return type(name, (nn.Module,), {"forward": lambda self, x: forward(x), "__module__": "transformers.activations",
                                     "__qualname__": name})


TRANSFORMERS = {  # name: (what it computes, the activation fuse must see)
    "GELUActivation": (lambda x: F.gelu(x), "gelu"),
    "NewGELUActivation": (lambda x: 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))),
                          "gelu_tanh"),
    "PytorchGELUTanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "GELUTanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "SiLUActivation": (lambda x: x * torch.sigmoid(x), "silu"),
}


class Mlp(nn.Module):
    """A transformer block's MLP: up, act, down (as transformers' and timm's MLPs are)."""

    def __init__(self, act):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(12, 32), act, nn.Linear(32, 12)

    def forward(self, x):
        return self.down(self.act(self.up(x))) + x


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_transformers_activations_by_qualified_name(name, ran):
    forward, activation = TRANSFORMERS[name]
    cls = transformers_like(name, forward)
    for model in (Mlp(cls()), nn.Sequential(nn.Linear(12, 32), cls(), nn.Linear(32, 4))):
        fused, report = fuse(model, report=True)
        first = "up" if isinstance(model, Mlp) else "0"
        where = "act" if isinstance(model, Mlp) else "1"
        assert report.fused == [(first, f"{name} {where!r}")] and report.activations == {first: activation}
        assert f"  fused    {first} + {name} {where!r} (Linear+{FUSE.LABELS[activation]})" in str(report)
        assert fused.get_submodule(first).activation == activation
        assert_same_model(fused, model, torch.randn(6, 12), ran, "train")


def test_register_activation(registry, ran):
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Erf(nn.Module):
        def forward(self, x):
            return x * 0.5 * (1 + torch.erf(x / 2 ** 0.5))

    model = nn.Sequential(nn.Linear(12, 16), Swish(), nn.Linear(16, 16), Erf(), nn.Linear(16, 4))
    _, report = fuse(model, report=True)
    assert report.fused == [] and report.kept == ["0", "2", "4"]  # not known yet
    dynnet_ext.fuse.register_activation(Swish, "silu")  # by the class
    dynnet_ext.register_activation(f"{Erf.__module__}.{Erf.__qualname__}", "gelu")  # by its qualified name
    assert registry[f"{__name__}.test_register_activation.<locals>.Swish"] == "silu"
    fused, report = fuse(model, report=True)
    assert [type(m) for m in fused] == [FusedLinearSiLU, nn.Identity, FusedLinearGELU, nn.Identity, nn.Linear]
    assert report.fused == [("0", "Swish '1'"), ("2", "Erf '3'")] and report.activations == {"0": "silu", "2": "gelu"}
    assert_same_model(fused, model, torch.randn(6, 12), ran, "train")

    class SubSwish(Swish):  # exact classes only: a subclass may compute something else
        pass

    assert fuse(nn.Sequential(nn.Linear(12, 16), SubSwish()), report=True)[1].fused == []
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'silu'\)"):
        dynnet_ext.register_activation(Swish, "none")
    with pytest.raises(TypeError, match="a class or a qualified name 'module.ClassName'"):
        dynnet_ext.register_activation("Swish", "silu")


def hooked_gelu_sequential():
    model = act_mlp()
    model[1].register_forward_hook(lambda m, i, o: None)
    return model


class GELUResidual(OneLinear):
    def forward(self, x):
        h = self.fc(x)
        return F.gelu(h) + h


class TwoActivations(OneLinear):
    def forward(self, x):
        return F.gelu(self.fc(x)) + F.silu(self.fc(x))


class HookedGELU(OneLinear):
    def __init__(self):
        super().__init__()
        self.act = nn.GELU()
        self.act.register_forward_pre_hook(lambda m, i: None)

    def forward(self, x):
        return self.act(self.fc(x))


ACT_LEFT_ALONE = {
    "gelu_residual": (GELUResidual, "fc", "its output is used by gelu, add, not only by a GELU"),
    "different_activations": (TwoActivations, "fc", "its calls feed different activations (GELU, SiLU)"),
    "hooked_gelu_module": (HookedGELU, "fc", "the GELU 'act' has hooks"),
    "hooked_gelu_in_sequential": (hooked_gelu_sequential, "0", "the GELU has hooks"),
}


@pytest.mark.parametrize("case", sorted(ACT_LEFT_ALONE))
def test_gelu_and_silu_left_alone_with_the_reason(case):
    make, name, reason = ACT_LEFT_ALONE[case]
    model = make()
    fused, report = fuse(model, report=True)
    assert reason in dict(report.skipped)[name], report
    assert type(fused.get_submodule(name)) is nn.Linear and name not in report.activations
    x = torch.randn(6, 12)
    torch.testing.assert_close(fused(x), model(x), **F32)


def test_gelu_model_under_torch_compile(ran):
    torch._dynamo.reset()
    model = AllActivationForms().eval()
    assert_same_model(torch.compile(fuse(model), backend="aot_eager", fullgraph=True), model, torch.randn(8, 12), ran,
                      "eval")
