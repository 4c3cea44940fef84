"""Multi-process training: the fused DynamicNet under DistributedDataParallel (gloo, 2 CPU
processes started by torchrun) follows single-process training on the whole batch."""

import subprocess
import sys
import textwrap

import torch

from conftest import tol
from dynnet_ext import cli
from test_training import kernel_counts
from torchrun import torchrun

SHAPE = {"N": 8, "D_in": 12, "H": 6, "D_out": 3}
STEPS = 6  # seed 0 draws depths 3, 3, 0, 2, 3, ...: depth 0 (hidden layer unused) included

WORKER = textwrap.dedent(
    f"""
    import sys, torch
    from dynnet_ext import cli, kernel_calls
    losses, _, depths, model = cli.train(epochs={STEPS}, seed=0, ddp=True, return_model=True, **{SHAPE!r})
    torch.save({{"state": model.state_dict(), "losses": losses, "depths": depths, "calls": kernel_calls()}},
               sys.argv[1] + f".rank{{torch.distributed.get_rank()}}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    """
)


def test_ddp_two_processes_equal_single_process_whole_batch(tmp_path, ran):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.pt"
    proc = torchrun(str(script), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in (0, 1)]
    losses, _, depths, model = cli.train(epochs=STEPS, seed=0, return_model=True, **SHAPE)
    assert 0 in depths and ranks[0]["depths"] == ranks[1]["depths"] == depths
    for r in ranks:
        ran.reported(r["calls"], "dynamic_net", "dynamic_net_backward")
        assert len(r["losses"]) == len(losses) == STEPS
        # Shards sum their losses and gradients in another order than one whole-batch GEMM:
        # float32 rounding, so the float32 tolerance, not equality.
        for a, b in zip(r["losses"], losses):
            assert abs(a - b) <= 1e-5 * abs(b)
        for name, p in model.state_dict().items():
            torch.testing.assert_close(r["state"][name], p, **tol(torch.float32), msg=name)


def test_cli_train_ddp_under_torchrun(ran):
    proc = torchrun("-m", "dynnet_ext", "train", "--ddp", "--epochs", "3", "--N", "8", "--D_in", "12",
                    "--H", "6", "--D_out", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP over 2 processes" in proc.stdout, proc.stdout
    assert proc.stdout.count("] epoch ") == 3, proc.stdout  # rank 0 reports, rank 1 stays quiet
    ran.reported(kernel_counts(proc.stdout), "dynamic_net", "dynamic_net_backward")


def test_cli_ddp_without_torchrun_says_how():
    proc = subprocess.run([sys.executable, "-m", "dynnet_ext", "train", "--ddp", "--epochs", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torchrun --nproc_per_node=2 -m dynnet_ext train --ddp" in proc.stderr
