"""Tensor parallelism through the fused layers: dynnet_ext.parallel's ColwiseParallel /
RowwiseParallel under torch's parallelize_module, and DTensors straight into the ops (their
sharding rules), in 2 processes started by torchrun (gloo on the CPU, NCCL on GPUs). Each case
must equal one process computing the same thing with stock PyTorch, run dynnet's kernels on the
local shards, and communicate only what the sharding needs (no gathered parameters). The worker
is tests/tensor_parallel_worker.py."""

import subprocess
import sys

import pytest
import torch

from conftest import tol
from dynnet_ext import reference
from tensor_parallel_worker import DEPTH, HIDDEN, dynamic_net, megatron_mlp
from torchrun import DEVICES, run_worker



@pytest.fixture(scope="module", params=DEVICES)
def tp_run(request, tmp_path_factory):
    """Runs tests/tensor_parallel_worker.py once per device; every test below reads its results."""
    device = request.param
    return device, run_worker("tensor_parallel_worker.py", device, tmp_path_factory.mktemp("tp") / "result.pt")


def stock(fn, x, params):
    """fn(x, *params) and its gradients by stock autograd on one process."""
    x = x.clone().requires_grad_()
    leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    y = fn(x, leaves)
    y.square().sum().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in leaves.items()}


def check(run, want):
    y, x_grad, grads = want
    torch.testing.assert_close(run["y"], y, **tol(torch.float32))
    torch.testing.assert_close(run["x_grad"], x_grad, **tol(torch.float32))
    for name, g in grads.items():
        torch.testing.assert_close(run["grads"][name], g, **tol(torch.float32), msg=name)


def mlp_stock(x, p, activation="relu"):
    h = reference.linear_act(x, p["0.weight"], p["0.bias"], activation)
    return reference.linear_act(h, p["1.weight"], p["1.bias"], "none")


def net_stock(x, p):
    return reference.dynamic_net(x, *(p[f"{layer}.{kind}"] for layer in ("input_layer", "hidden_layer", "output_layer")
                                      for kind in ("weight", "bias")), DEPTH)


def test_megatron_mlp_column_then_row_parallel(tp_run, ran):
    """FusedLinearReLU column-parallel, FusedLinear row-parallel: each rank holds half of each
    weight, the fused kernels run on those halves, and the only collectives are the row-parallel
    sum (forward) and the input gradient's sum (backward)."""
    device, ranks = tp_run
    for r in ranks:
        ran.reported(r["mlp"]["calls"], "linear_relu", "linear_relu_backward", device=device)
    want = stock(mlp_stock, ranks[0]["x_mlp"], dict(megatron_mlp(device).named_parameters()))
    world, part = len(ranks), HIDDEN // len(ranks)
    for r in ranks:
        run = r["mlp"]
        check(run, want)
        assert not run["y_is_dtensor"]  # use_local_output, as torch's styles give nn.Linear
        assert run["local_shapes"] == {"0.weight": (part, 8), "0.bias": (part,), "1.weight": (8, part), "1.bias": (8,)}
        assert run["placements"] == {"0.weight": "(Shard(dim=0),)", "0.bias": "(Shard(dim=0),)",
                                     "1.weight": "(Shard(dim=1),)", "1.bias": "(Replicate(),)"}
        if world > 1:
            assert run["forward_comms"] == {"all_reduce": 1} and run["backward_comms"] == {"all_reduce": 1}


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_gelu_and_silu_mlp_column_then_row_parallel(activation, tp_run, ran):
    """FusedLinearGELU / FusedLinearSiLU column-parallel (the activation is elementwise: it runs
    on each rank's half of the hidden units), FusedLinear row-parallel: the same shards,
    placements and collectives as the ReLU MLP."""
    device, ranks = tp_run
    for r in ranks:
        ran.reported(r[f"mlp_{activation}"]["calls"], "linear_relu", "linear_relu_backward", device=device)
    want = stock(lambda x, p: mlp_stock(x, p, activation), ranks[0]["x_mlp"],
                 dict(megatron_mlp(device, activation).named_parameters()))
    for r in ranks:
        run = r[f"mlp_{activation}"]
        check(run, want)
        assert not run["y_is_dtensor"]
        for key in ("local_shapes", "placements", "forward_comms", "backward_comms"):
            assert run[key] == r["mlp"][key], key


def test_dynamic_net_per_layer_fusion_tensor_parallel(tp_run, ran):
    """The seed's model tensor-parallel with fusion='layer': input layer column-parallel, the
    hidden layer column-parallel on the gathered activation (once per reuse), output layer
    row-parallel."""
    device, ranks = tp_run
    for r in ranks:
        ran.reported(r["net"]["calls"], "linear_relu", "linear_relu_backward", device=device)
    want = stock(net_stock, ranks[0]["x_net"], dict(dynamic_net(device, "layer").named_parameters()))
    for r in ranks:
        check(r["net"], want)
        if len(ranks) > 1:
            assert r["net"]["forward_comms"] == {"all_gather_into_tensor": DEPTH, "all_reduce": 1}


@pytest.mark.parametrize("case, ops, params", [
    ("batch_layer", ("linear_relu", "linear_relu_backward"), "layer"),
    ("batch_net", ("dynamic_net", "dynamic_net_backward"), "net"),
    ("replicated_net", ("dynamic_net", "dynamic_net_backward"), "net"),
])
def test_dtensors_into_the_ops(tp_run, case, ops, params, ran):
    """DTensors reach the ops directly (replicated parameters; the input split by rows or
    replicated): the kernels run on each rank's rows with no collective in the forward."""
    device, ranks = tp_run
    for r in ranks:
        ran.reported(r[case]["calls"], *ops, device=device)
    if params == "layer":
        layer = megatron_mlp(device)[0]
        want = stock(lambda x, p: reference.linear_act(x, p["weight"], p["bias"], "relu"), ranks[0]["x_mlp"],
                     dict(layer.named_parameters()))
    else:
        want = stock(net_stock, ranks[0]["x_net"], dict(dynamic_net(device, "network").named_parameters()))
    for r in ranks:
        check(r[case], want)
        assert r[case]["y_is_dtensor"] and r[case]["forward_comms"] == {}


def test_row_sharded_layer_op_with_and_without_relu(tp_run):
    """x and weight split by input features: without activation the op runs on the shards and
    its output is a partial sum; with the ReLU (which must follow the whole sum) DTensor gathers
    first. Same placements, consecutive calls: each gets its own rule."""
    device, ranks = tp_run
    layer = megatron_mlp(device)[0]
    for activation in ("none", "relu"):
        want = reference.linear_act(ranks[0]["x_mlp"], layer.weight.detach(), layer.bias.detach(), activation)
        for r in ranks:
            torch.testing.assert_close(r["row_sharded"][activation], want, **tol(torch.float32))
    if len(ranks) > 1:
        assert ranks[0]["row_sharded"]["none_placements"] == "(Partial(sum),)"
        assert ranks[0]["row_sharded"]["relu_placements"] != "(Partial(sum),)"


def test_what_has_no_tensor_parallel_form_says_so(tp_run):
    _, ranks = tp_run
    for r in ranks:
        assert "fusion='layer'" in r["network_error"], r["network_error"]
        assert "ColwiseParallel" in r["rowwise_relu_error"], r["rowwise_relu_error"]


IMPORT_ORDERS = {
    "dtensor_first": "import sys, torch.distributed.tensor as dt, dynnet_ext, torch\n",
    # DTensor imported after dynnet_ext: the rules come with it, and not before it is imported.
    # (with torch versions whose dynamo imports DTensor, `import dynnet_ext` loads it already; the
    # hook that registers the rules when DTensor comes later is tested by itself below)
    "dynnet_ext_first": "import sys, dynnet_ext\nimport torch.distributed.tensor as dt, torch\n",
}


def test_after_import_hook_runs_once_the_module_is_imported(tmp_path, monkeypatch):
    """What `import dynnet_ext` installs when DTensor is not loaded yet: the rules are registered
    right after DTensor's module has run, by whoever imports it."""
    import dynnet_ext

    (tmp_path / "late_module.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = dynnet_ext._AfterImport("late_module", lambda: seen.append(sys.modules["late_module"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        assert seen == [] and hook in sys.meta_path
        import late_module  # noqa: F401
        assert seen == [7] and hook not in sys.meta_path
    finally:
        sys.modules.pop("late_module", None)
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)


@pytest.mark.parametrize("order", IMPORT_ORDERS)
def test_import_registers_the_sharding_rules_when_dtensor_is_loaded(order):
    """Whatever the import order, DTensor comes with the ops' rules (dynnet_ext.parallel
    registers them), with every non-tensor argument in DTensor's cache key: a rule chosen for
    activation='none' (row-parallel, Partial) must not be reused for 'relu'."""
    code = (
        IMPORT_ORDERS[order] +
        "assert 'dynnet_ext.parallel' in sys.modules\n"
        "prop = dt.DTensor._op_dispatcher.sharding_propagator\n"
        "ops = torch.ops.dynnet\n"
        "for op, static in ((ops.linear_relu, 3), (ops.linear_relu_backward, 4), (ops.dynamic_net, 7), "
        "(ops.dynamic_net_backward, 6)):\n"
        "    assert op.default in prop.op_strategy_funcs, op\n"
        "    assert prop.op_to_schema_info[op.default].static_argnum == static, op\n"
        # ... and DTensors reach the kernel through them (one process, a one-rank mesh)
        "import tempfile, torch.distributed as dist\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "dist.init_process_group('gloo', init_method='file://' + tempfile.mktemp(), rank=0, world_size=1)\n"
        "mesh = init_device_mesh('cpu', (1,))\n"
        "x, w, b = (dt.distribute_tensor(torch.randn(*s), mesh, [dt.Replicate()]) for s in ((4, 3), (5, 3), (5,)))\n"
        "before = dynnet_ext.kernel_calls()['cpu']['linear_relu']\n"
        "y = dynnet_ext.functional.fused_linear_relu(x, w, b)\n"
        "assert isinstance(y, dt.DTensor) and dynnet_ext.kernel_calls()['cpu']['linear_relu'] > before\n"
        "torch.testing.assert_close(y.to_local(), torch.relu(x.to_local() @ w.to_local().T + b.to_local()))\n"
        "dist.destroy_process_group()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
