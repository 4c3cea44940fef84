"""Run by tests/test_tensor_parallel.py under torchrun: `tensor_parallel_worker.py DEVICE OUT`.
Runs the fused layers tensor-parallel (dynnet_ext.parallel styles through parallelize_module)
and saves what it saw - outputs, gradients, collectives, local shapes, kernel calls - to
OUT.rank<r>; the test compares them with one process."""

import os
import sys

import torch
from torch import nn

import dynnet_ext
from dynnet_ext.nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU
from torchrun import count_collectives, finish, full, kernel_calls_since

N, D, HIDDEN = 6, 8, 12  # the Megatron MLP: D -> HIDDEN (column-parallel, ReLU) -> D (row-parallel)
SHAPE = {"D_in": 10, "H": 6, "D_out": 4}  # DynamicNet
DEPTH = 2


FIRST_LAYERS = {"relu": FusedLinearReLU, "gelu": FusedLinearGELU, "silu": FusedLinearSiLU}


def megatron_mlp(device, activation="relu"):
    torch.manual_seed(0)
    return nn.Sequential(FIRST_LAYERS[activation](D, HIDDEN, device=device), FusedLinear(HIDDEN, D, device=device))


def dynamic_net(device, fusion):
    torch.manual_seed(1)
    return dynnet_ext.DynamicNet(**SHAPE, device=device, fusion=fusion)


def run(module, x, *args):
    """Forward and backward of module(x, *args).square().sum(), counting collectives per direction
    and kernel calls; returns what one process must match (DTensors as whole tensors)."""
    from torch.distributed.tensor import DTensor

    device_type = x.device.type
    before = dynnet_ext.kernel_calls()[device_type]
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with count_collectives() as forward_comms:
        y = module(x, *args)
    with count_collectives() as backward_comms:
        y.square().sum().backward()
    calls = kernel_calls_since(before, device_type)
    return {"y": full(y), "x_grad": full(x.grad), "y_is_dtensor": isinstance(y, DTensor),
            "grads": {name: full(p.grad) for name, p in module.named_parameters()},
            "local_shapes": {name: tuple(p.to_local().shape) for name, p in module.named_parameters()},
            "placements": {name: str(p.placements) for name, p in module.named_parameters()},
            "forward_comms": dict(forward_comms.counts), "backward_comms": dict(backward_comms.counts),
            "calls": calls}


def main():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    from dynnet_ext.parallel import ColwiseParallel, RowwiseParallel

    device_type, out = sys.argv[1], sys.argv[2]
    device = torch.device(device_type, int(os.environ["LOCAL_RANK"])) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    torch.manual_seed(2)
    x_mlp = torch.randn(N, D, device=device)  # the same on every rank: the input is replicated
    x_net = torch.randn(N, SHAPE["D_in"], device=device)

    mlp = parallelize_module(megatron_mlp(device), mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
    # DynamicNet tensor-parallel, one fused op per layer: the hidden layer takes the whole
    # activation (gathered from the column-parallel layer before it) and splits its output again.
    plan = {"input_layer": ColwiseParallel(), "hidden_layer": ColwiseParallel(input_layouts=Shard(-1)),
            "output_layer": RowwiseParallel()}
    net = parallelize_module(dynamic_net(device, "layer"), mesh, plan)
    result = {"mlp": run(mlp, x_mlp), "net": run(net, x_net, DEPTH), "x_mlp": x_mlp, "x_net": x_net}
    for activation in ("gelu", "silu"):  # the same MLP with a GELU or SiLU layer first
        result[f"mlp_{activation}"] = run(parallelize_module(megatron_mlp(device, activation), mesh,
                                                             {"0": ColwiseParallel(), "1": RowwiseParallel()}), x_mlp)
    # DTensors straight into the ops (distribute_module replicates the parameters): the input
    # split by rows (batch-parallel), or replicated.
    layer = distribute_module(megatron_mlp(device)[0], mesh)
    result["batch_layer"] = run(layer, distribute_tensor(x_mlp, mesh, [Shard(0)]))
    whole = distribute_module(dynamic_net(device, "network"), mesh)
    result["batch_net"] = run(whole, distribute_tensor(x_net, mesh, [Shard(0)]), DEPTH)
    result["replicated_net"] = run(whole, distribute_tensor(x_net, mesh, [Replicate()]), DEPTH)

    # Row-sharded input and weight into the layer op: without an activation it runs on the shards
    # (a partial sum); with the ReLU it has no rule there, so DTensor gathers - the same placements
    # one call apart, so a rule remembered for one activation must not answer for the other.
    first = megatron_mlp(device)[0]
    x_rows, w_rows = (distribute_tensor(t, mesh, [Shard(1)]) for t in (x_mlp, first.weight.detach()))
    b = distribute_tensor(first.bias.detach(), mesh, [Replicate()])
    row = {}
    for name, fn in (("none", dynnet_ext.functional.fused_linear), ("relu", dynnet_ext.functional.fused_linear_relu)):
        y = fn(x_rows, w_rows, b)
        row[name], row[name + "_placements"] = y.full_tensor(), str(y.placements)
    result["row_sharded"] = row

    network = parallelize_module(dynamic_net(device, "network"), mesh, plan)
    try:
        network(x_net, DEPTH)
    except RuntimeError as exc:
        result["network_error"] = str(exc)
    try:
        parallelize_module(FusedLinearReLU(D, D, device=device), mesh, RowwiseParallel())
    except ValueError as exc:
        result["rowwise_relu_error"] = str(exc)
    finish(result, out)


if __name__ == "__main__":
    main()
