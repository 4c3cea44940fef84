"""FSDP2 (torch.distributed.fsdp.fully_shard) with the fused DynamicNet: 2 processes started by
torchrun (gloo on the CPU, NCCL on GPUs) train as one process does on the whole batch -
parameters and gradients at every step, depths 0-3 - with the per-module recipe (each layer,
then the root), root-only wrapping, fusion="layer", and bfloat16 parameters
(MixedPrecisionPolicy); and FSDP's mechanics (reshard after forward and backward, one
post-backward gradient reduce-scatter per layer inside the backward, prefetching) hold for the
whole-network op; the GELU, GELU-tanh and SiLU layers shard and train as stock's. The worker is
tests/fsdp_worker.py."""

import pytest
import torch

import dynnet_ext
from conftest import tol
from dynnet_ext import cli
from fsdp_worker import CONFIGS, LAYERS, SEED, SHAPE, STEPS, activation_mlp
from test_training import kernel_counts
from torchrun import DEVICES, PROCS, run_worker, torchrun

KERNELS = {"fused": ("dynamic_net", "dynamic_net_backward"), "fused-layer": ("linear_relu", "linear_relu_backward")}


def single_process(impl, device, dtype=None):
    """cli.train on one process and the whole batch: (losses, depths, final parameters, grads per step).
    dtype "bfloat16": autocast over float32 parameters, which rounds x, W and b to bfloat16 for each
    layer as FSDP's MixedPrecisionPolicy does (a float32 reference would round differently, and
    where a pre-activation near 0 lands on the other side, a ReLU mask flips and the gradients
    move by O(1): 8 of 40 weight draws failed so)."""
    steps = []

    def on_step(model, pred):
        steps.append({name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()})

    losses, _, depths, model = cli.train(epochs=STEPS, device=device, seed=SEED, impl=impl, on_step=on_step,
                                         return_model=True, **({"dtype": dtype} if dtype else {}), **SHAPE)
    return losses, depths, dict(model.named_parameters()), steps


@pytest.fixture(scope="module", params=DEVICES)
def fsdp_run(request, tmp_path_factory):
    """Runs tests/fsdp_worker.py once per device; every test below reads its results."""
    device = request.param
    return device, run_worker("fsdp_worker.py", device, tmp_path_factory.mktemp("fsdp") / "result.pt")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_equals_single_process_whole_batch(fsdp_run, config, ran):
    device, ranks = fsdp_run
    impl = CONFIGS[config]["impl"]
    for r in ranks:
        ran.reported(r[config]["calls"], *KERNELS[impl], device=device)
    dtype = CONFIGS[config].get("param_dtype", torch.float32)
    losses, depths, params, grads = single_process(impl, device, "bfloat16" if dtype == torch.bfloat16 else None)
    assert sorted(set(depths)) == [0, 1, 2, 3] and depths.index(0) < STEPS - 1
    # Shards sum their gradients in another order than one whole-batch GEMM: the dtype's rounding.
    # bfloat16 parameters: the forward and backward round in bfloat16 (the reference autocasts
    # to bfloat16 alike), so bfloat16's tolerance.
    for r in ranks:
        run = r[config]
        assert run["depths"] == depths  # rank 0's draws, broadcast
        assert all(step["pred_dtype"] == str(dtype) for step in run["steps"])
        for step, (got, want) in enumerate(zip(run["steps"], grads, strict=True)):
            for name, g in want.items():
                if g is None:  # depth 0: the hidden layer is not used
                    assert got["grads"][name] is None, (step, name)
                else:
                    torch.testing.assert_close(got["grads"][name], g, **tol(dtype), msg=f"step {step} grad {name}")
        for name, p in params.items():
            torch.testing.assert_close(run["state"][name], p.detach(), **tol(dtype), msg=name)
        rtol = tol(dtype)["rtol"]
        for a, b in zip(run["losses"], losses, strict=True):
            assert abs(a - b) <= rtol * abs(b)


def test_whole_network_op_keeps_fsdp_mechanics(fsdp_run, ran):
    """The per-module recipe on the whole-network op: layers resharded after forward and after
    backward, each layer's gradient reduce-scatter (post-backward) run exactly once, inside the
    backward (the input needs its gradient here), with forward and backward prefetching set;
    one all-gather per layer in each direction (the backward's proves the forward resharded) and
    one reduce-scatter per layer; the output and every gradient, the input's included, as one
    process computes them."""
    device, ranks = fsdp_run
    for r in ranks:
        ran.reported(r["mechanics"]["calls"], "dynamic_net", "dynamic_net_backward", device=device)
    m0 = ranks[0]["mechanics"]
    model = dynnet_ext.DynamicNet(SHAPE["D_in"], SHAPE["H"], SHAPE["D_out"], device=device)
    model.load_state_dict(m0["initial"])
    x = m0["x"].to(device).requires_grad_()
    y = model(x, 2)
    (y.square().sum()).backward()
    for rank, r in enumerate(ranks):
        m = r["mechanics"]
        assert m["is_fsdp"] == [True, True, True]
        assert all(m["resharded_after_forward"].values()), m["resharded_after_forward"]
        assert all(m["resharded_after_backward"].values()), m["resharded_after_backward"]
        assert set(m["grad_placements"].values()) == {"(Shard(dim=0),)"}
        assert sorted(fqn for fqn, _ in m["post_backward"]) == sorted(LAYERS), m["post_backward"]
        assert all(node is not None for _, node in m["post_backward"]), m["post_backward"]
        if len(ranks) > 1:  # each layer gathered once per direction (prefetched or not), reduced once
            assert m["forward_comms"] == {"_allgather_base_": 3}, m["forward_comms"]
            assert m["backward_comms"] == {"_allgather_base_": 3, "_reduce_scatter_base_": 3}, m["backward_comms"]
        rows = x.shape[0] // len(ranks)
        torch.testing.assert_close(m["y"], y.detach()[rank * rows:(rank + 1) * rows], **tol(torch.float32))
        torch.testing.assert_close(m["x_grad"], x.grad[rank * rows:(rank + 1) * rows] * len(ranks),
                                   **tol(torch.float32))
        for name, p in model.named_parameters():
            torch.testing.assert_close(m["grads"][name], p.grad, **tol(torch.float32), msg=name)


def test_activation_layers_under_the_per_module_recipe(fsdp_run, ran):
    """FusedLinearGELU (both approximations), FusedLinearSiLU and FusedLinear, each sharded and
    the root: the output and every gradient as stock's nn.Linear + activation compute them on
    one process, the fused layers' kernels run."""
    device, ranks = fsdp_run
    for r in ranks:
        ran.reported(r["activations"]["calls"], "linear_relu", "linear_relu_backward", device=device)
    a0 = ranks[0]["activations"]
    model = activation_mlp(fused=False).to(device)
    model.load_state_dict(a0["initial"])
    x = a0["x"].to(device)
    y = model(x)
    y.square().sum().backward()
    for rank, r in enumerate(ranks):
        a = r["activations"]
        rows = x.shape[0] // len(ranks)
        torch.testing.assert_close(a["y"], y.detach()[rank * rows:(rank + 1) * rows], **tol(torch.float32))
        assert set(a["grads"]) == {name for name, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(a["grads"][name], p.grad, **tol(torch.float32), msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_train_fsdp_under_torchrun(device, ran):
    """The command line's FSDP flags reach the training (the default per-module recipe is what
    the tests above train with)."""
    proc = torchrun("-m", "dynnet_ext", "train", "--fsdp", "--fsdp-wrap", "root", "--fsdp-param-dtype", "bfloat16",
                    "--device", device, "--epochs", "3", "--N", "8", "--D_in", "12", "--H", "6", "--D_out", "3",
                    nprocs=PROCS[device])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran.reported(kernel_counts(proc.stdout), "dynamic_net", "dynamic_net_backward", device=device)
    assert f"FSDP2 over {PROCS[device]} processes, root sharded, bfloat16 parameters" in proc.stdout, proc.stdout
    assert proc.stdout.count("] epoch ") == 3, proc.stdout  # rank 0 reports, rank 1 stays quiet


@pytest.mark.parametrize("argv, message", [
    (["train", "--fsdp", "--epochs", "1"], "torchrun --nproc_per_node=2 -m dynnet_ext train --fsdp"),
    (["train", "--fsdp", "--ddp"], "choose one"),
    (["train", "--fsdp-wrap", "root"], "go with --fsdp"),
    (["train", "--fsdp-param-dtype", "bfloat16"], "go with --fsdp"),
])
def test_cli_fsdp_misuse_says_what_to_do(argv, message, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert message in str(exc.value)


def test_train_rejects_ddp_with_fsdp_and_unknown_wrap():
    with pytest.raises(ValueError, match="choose one"):
        cli.train(epochs=1, ddp=True, fsdp=True)
    with pytest.raises(ValueError, match="fsdp_wrap must be one of"):
        cli.shard_fsdp(dynnet_ext.DynamicNet(4, 3, 2), "cpu", wrap="everything")
