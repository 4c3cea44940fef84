"""Run by tests/test_fsdp.py under torchrun: `fsdp_worker.py DEVICE OUT`. Trains the fused
DynamicNet with FSDP2 in each configuration of CONFIGS (cli.train, fsdp=True) and runs one
forward/backward that looks at FSDP's mechanics; saves what it saw to OUT.rank<r>."""

import sys

import torch

import dynnet_ext
from dynnet_ext import cli
from torchrun import count_collectives, finish, full, kernel_calls_since

# tests/test_fsdp.py imports the constants below; torch.distributed.fsdp and DTensor are
# imported only where the worker runs, so collecting the tests does not load them.

SHAPE = {"N": 8, "D_in": 12, "H": 6, "D_out": 3}
SEED, STEPS = 4, 5  # seed 4 draws depths 1, 2, 0, 3, 3: every depth, and a step after depth 0
CONFIGS = {
    "per-module": {"impl": "fused", "fsdp_wrap": "layers"},
    "root-only": {"impl": "fused", "fsdp_wrap": "root"},
    "fusion-layer": {"impl": "fused-layer", "fsdp_wrap": "layers"},
    "bf16-params": {"impl": "fused", "fsdp_wrap": "layers", "param_dtype": torch.bfloat16},
}
LAYERS = ("input_layer", "hidden_layer", "output_layer")
# (in, out, activation) of each layer of the activation MLP (activation_layers).
ACTIVATION_MLP = ((12, 16, "gelu"), (16, 16, "gelu_tanh"), (16, 8, "silu"), (8, 3, "none"))


def activation_mlp(fused=True):
    """ACTIVATION_MLP as fused layers, or as the stock nn.Linear + activation modules they stand
    for (fused=False), the same parameter names either way (layer i's weight: "i.weight")."""
    from torch import nn

    from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearSiLU

    fused_layers = {"gelu": FusedLinearGELU, "gelu_tanh": lambda i, o: FusedLinearGELU(i, o, approximate="tanh"),
                    "silu": FusedLinearSiLU, "none": FusedLinear}
    stock = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "none": nn.Identity}
    if fused:
        return nn.Sequential(*(fused_layers[a](i, o) for i, o, a in ACTIVATION_MLP))

    class Layer(nn.Linear):
        def __init__(self, i, o, a):
            super().__init__(i, o)
            self.act = stock[a]()

        def forward(self, x):
            return self.act(super().forward(x))

    return nn.Sequential(*(Layer(i, o, a) for i, o, a in ACTIVATION_MLP))


def train(device, config):
    steps = []

    def on_step(model, pred):
        steps.append({"pred_dtype": str(pred.dtype),
                      "grads": {name: full(p.grad) for name, p in model.named_parameters()}})

    before = dynnet_ext.kernel_calls()[device]
    losses, _, depths, model = cli.train(epochs=STEPS, device=device, seed=SEED, fsdp=True, on_step=on_step,
                                         return_model=True, **config, **SHAPE)
    return {"losses": losses, "depths": depths, "steps": steps, "calls": kernel_calls_since(before, device),
            "state": {name: full(p) for name, p in model.named_parameters()}}


def mechanics(device):
    """One step of the per-module recipe with an input that needs its gradient and explicit
    prefetching: are the layers resharded after forward and after backward, does each layer's
    post-backward (gradient reduce-scatter) run once, inside the backward, which collectives
    run in each direction, and which gradients come out."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.tensor import DTensor, Shard

    where = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
    torch.manual_seed(0)
    model = dynnet_ext.DynamicNet(SHAPE["D_in"], SHAPE["H"], SHAPE["D_out"], device=where)
    x = torch.randn(SHAPE["N"], SHAPE["D_in"], device=where)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    cli.shard_fsdp(model, where)
    inp, hid, out = (getattr(model, name) for name in LAYERS)
    inp.set_modules_to_forward_prefetch([hid, out])
    out.set_modules_to_backward_prefetch([hid, inp])
    rank, world = dist.get_rank(), dist.get_world_size()
    x_local = x.chunk(world)[rank].clone().requires_grad_()

    post_backward, original = [], FSDPParamGroup.post_backward

    def spy(group, *args):
        node = torch._C._current_autograd_node()
        post_backward.append((group._module_fqn, None if node is None else node.name()))
        return original(group, *args)

    def resharded():
        return {name: isinstance(getattr(model, name).weight, DTensor)
                and getattr(model, name).weight.placements == (Shard(0),) for name in LAYERS}

    before = dynnet_ext.kernel_calls()[device]
    FSDPParamGroup.post_backward = spy
    try:
        with count_collectives() as forward_comms:
            y = model(x_local, 2)
        after_forward = resharded()
        with count_collectives() as backward_comms:
            (y.square().sum() * world).backward()
    finally:
        FSDPParamGroup.post_backward = original
    return {"x": x, "initial": initial, "y": y.detach(), "x_grad": x_local.grad,
            "calls": kernel_calls_since(before, device), "is_fsdp": [isinstance(layer, FSDPModule) for layer in (inp, hid, out)],
            "resharded_after_forward": after_forward, "resharded_after_backward": resharded(),
            "grads": {name: full(p.grad) for name, p in model.named_parameters()},
            "grad_placements": {name: str(p.grad.placements) for name, p in model.named_parameters()},
            "post_backward": post_backward,
            "forward_comms": dict(forward_comms.counts), "backward_comms": dict(backward_comms.counts)}


def activation_layers(device):
    """The GELU, GELU-tanh and SiLU layers under FSDP2's per-module recipe: one forward and
    backward of ACTIVATION_MLP, each layer and the root sharded; the output slice, the gathered
    gradients and the kernel calls."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    where = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
    torch.manual_seed(0)
    model = activation_mlp().to(where)
    x = torch.randn(SHAPE["N"], ACTIVATION_MLP[0][0], device=where)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    rank, world = dist.get_rank(), dist.get_world_size()
    before = dynnet_ext.kernel_calls()[device]
    y = model(x.chunk(world)[rank])
    (y.square().sum() * world).backward()  # FSDP averages over ranks: the whole batch's sum
    return {"x": x, "initial": initial, "y": y.detach(), "calls": kernel_calls_since(before, device),
            "grads": {name: full(p.grad) for name, p in model.named_parameters()}}


def main():
    device, out = sys.argv[1], sys.argv[2]
    result = {name: train(device, config) for name, config in CONFIGS.items()}
    result["mechanics"] = mechanics(device)
    result["activations"] = activation_layers(device)
    finish(result, out)


if __name__ == "__main__":
    main()
