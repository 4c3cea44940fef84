"""Multi-process tests: start workers with torchrun, and the devices they run on. CPU runs use 2
gloo processes; CUDA runs use NCCL with one process per GPU, at most 2 (NCCL cannot share a
GPU between ranks, so with one GPU the run has one process, which still takes every
distributed code path on the GPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count()
PROCS = {"cpu": 2, "cuda": min(GPUS, 2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not GPUS, reason="no CUDA GPU visible"))]


def torchrun(*args, nprocs=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
                           "--standalone", *args], capture_output=True, text=True, timeout=timeout)


def run_worker(worker, device, out):
    """Runs tests/<worker> DEVICE OUT under torchrun and returns what each rank saved (finish())."""
    proc = torchrun(str(Path(__file__).with_name(worker)), device, str(out),
                    nprocs=PROCS[device])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(PROCS[device])]


def finish(result, out):
    """A worker's last step: save this rank's result to OUT.rank<r>, then leave the group together."""
    import torch.distributed as dist

    torch.save(result, f"{out}.rank{dist.get_rank()}")
    dist.barrier()  # no rank tears its connections down while a peer still talks
    dist.destroy_process_group()
