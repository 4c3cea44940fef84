"""Benchmark per-sample gradients of the seed's loss, torch.func.vmap(torch.func.grad(loss)), through
the fused DynamicNet (whole-network and per-layer fusion) against stock PyTorch and torch.compile of
stock's function, per shape (N x D_in x H, D_out = 10) and depth 0-3.

    python benchmarks/per_sample_grads.py [--quick] [--device cuda] [--shapes 64x1000x100,...] [--out DIR]

Same engine and options as `python -m dynnet_ext bench` (see benchmarks/README.md).
"""

import sys

from dynnet_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(subjects=("persample",), prog="benchmarks/per_sample_grads.py", description=__doc__))
