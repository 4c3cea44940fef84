"""Multi-process tests: the devices they run on, starting workers with torchrun, and the helpers
the workers (tests/*_worker.py) share. CPU runs use 2 gloo processes; CUDA runs use NCCL with
one process per GPU, at most 2 (NCCL cannot share a GPU between ranks, so with one GPU the run
has one process, which still takes every distributed code path on the GPU)."""

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
    """Runs tests/<worker> DEVICE OUT under torchrun and returns what each rank saved (finish()),
    every tensor on `device` (the current GPU for "cuda": rank r saved from GPU r)."""
    proc = torchrun(str(Path(__file__).with_name(worker)), device, str(out), nprocs=PROCS[device])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", map_location=device, weights_only=False) for r in range(PROCS[device])]


def finish(result, out):
    """A worker's last step: save this rank's result to OUT.rank<r>, then leave the group together."""
    import torch.distributed as dist

    torch.save(result, f"{out}.rank{dist.get_rank()}")
    dist.barrier()  # no rank tears its connections down while a peer still talks
    dist.destroy_process_group()


def comm_counts(mode):
    """A CommDebugMode's collective counts by short name, e.g. {"all_reduce": 1}."""
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}


def full(t):
    """A worker's tensor as one process would have it: a DTensor gathered whole, a copy otherwise."""
    from torch.distributed.tensor import DTensor

    return None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def kernel_calls_since(before, device_type):
    """dynnet_ext.kernel_calls() on `device_type` minus `before`, as ran.reported takes it."""
    import dynnet_ext

    after = dynnet_ext.kernel_calls()[device_type]
    return {device_type: {op: after[op] - before[op] for op in after}}
