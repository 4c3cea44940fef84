"""Benchmark DynamicNet forward+backward at each depth 0-3: fused (dynnet_ext.DynamicNet)
against stock PyTorch (dynnet_ext.reference.DynamicNet) and torch.compile of the stock model,
per shape (N x D_in x H, D_out = 10).

    python benchmarks/dynamic_net.py [--quick] [--device cuda] [--shapes 64x1000x100,...] [--out DIR]

Same engine and options as `python -m dynnet_ext bench` (see benchmarks/README.md).
"""

import sys

from dynnet_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(subjects=("net",), prog="benchmarks/dynamic_net.py", description=__doc__))
