"""Benchmark the fused Linear + bias + ReLU layer against stock PyTorch (nn.Linear + nn.ReLU)
and torch.compile: forward, backward, forward+backward, per shape (batch x in x out).

    python benchmarks/linear_relu.py [--quick] [--device cuda] [--shapes 64x1000x100,...] [--out DIR]

Same engine and options as `python -m dynnet_ext bench` (see benchmarks/README.md).
"""

import sys

from dynnet_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(subjects=("layer",), prog="benchmarks/linear_relu.py", description=__doc__))
