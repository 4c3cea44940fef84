"""Multi-process tests: the devices they run on, starting workers with torchrun, and the helpers
the workers (tests/*_worker.py) share. CPU runs use 2 gloo processes; CUDA runs use NCCL with
one process per GPU, at most 2 (NCCL cannot share a GPU between ranks, so with one GPU the run
has one process, which still takes every distributed code path on the GPU)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count()
PROCS = {"cpu": 2, "cuda": min(GPUS, 2)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not GPUS, reason="no CUDA GPU visible"))]


def torchrun(*args, nprocs=2, timeout=300):
    """torchrun ARGS in a session of its own; on timeout the whole session (launcher and workers)
    is killed, so a hung worker cannot outlive the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", "--standalone", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"torchrun {' '.join(args)} did not finish in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
    # Leave without the interpreter's teardown, as `python -m dynnet_ext train` does under
    # torchrun (dynnet_ext.cli.run says why): the result is saved, the group left.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def count_collectives():
    """A context manager counting the collectives run under it, by short name ({"all_reduce": 1}
    in its `counts`): the functional collectives DTensor issues, after DTensor has turned its ops
    into local ops and collectives, and the c10d collectives FSDP2 issues. What torch's
    CommDebugMode counts, without its module tracker, which on torch 2.11 leaves a hook behind on
    a module that runs twice (the reused hidden layer) and fails its next call."""
    from collections import Counter

    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    namespaces = {"_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d"}
    collectives = {  # functional collectives, then c10d's
        "all_gather_into_tensor", "all_gather_into_tensor_coalesced", "all_reduce", "all_reduce_coalesced",
        "all_to_all_single", "broadcast", "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced",
        "_allgather_base_", "_reduce_scatter_base_", "allgather_", "allgather_coalesced_",
        "allgather_into_tensor_coalesced_", "allreduce_", "allreduce_coalesced_", "alltoall_", "alltoall_base_",
        "broadcast_", "gather_", "scatter_", "reduce_", "reduce_scatter_", "reduce_scatter_tensor_coalesced_"}

    class Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented  # DTensor runs first and comes back with local tensors
            if isinstance(func, torch._ops.OpOverload):
                namespace, name = func.name().split("::")
                if namespace in namespaces and name in collectives:
                    self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    return Mode()


def full(t):
    """A worker's tensor as one process would have it: a DTensor gathered whole, a copy otherwise."""
    from torch.distributed.tensor import DTensor

    return None if t is None else (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def kernel_calls_since(before, device_type):
    """dynnet_ext.kernel_calls() on `device_type` minus `before`, as ran.reported takes it."""
    import dynnet_ext

    after = dynnet_ext.kernel_calls()[device_type]
    return {device_type: {op: after[op] - before[op] for op in after}}
