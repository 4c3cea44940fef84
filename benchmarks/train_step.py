"""Benchmark the seed's training step (forward, MSELoss(reduction='sum'), zero_grad, backward,
Adam(lr=1e-4) step, with Adam as the seed builds it and as torch's fused kernel) and its memory:
fused against stock PyTorch and torch.compile, per shape (N x D_in x H, D_out = 10). --subjects
step or memory runs one of the two, --optimizers adam leaves the fused Adam out.

    python benchmarks/train_step.py [--quick] [--device cuda] [--subjects step,memory] [--optimizers adam,adam-fused] [--out DIR]

Same engine and options as `python -m dynnet_ext bench` (see benchmarks/README.md).
"""

import sys

from dynnet_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(subjects=("step", "memory"), prog="benchmarks/train_step.py", description=__doc__))
