"""Benchmark a transformer block's MLP, Linear -> activation -> Linear (GELU by default), made
fused by dynnet_ext.fuse(), against the stock module and torch.compile of it: forward+backward at
BERT-base (768 -> 3072 -> 768) and ViT-S (384 -> 1536 -> 384) widths, 128 to 2048 tokens.

    python benchmarks/transformer_mlp.py [--quick] [--device cuda] [--dtypes float32,autocast-bfloat16]
                                         [--mlp-shapes 512x768x3072,...] [--mlp-activations gelu,relu] [--out DIR]

Same engine and options as `python -m dynnet_ext bench`, subject mlp (see benchmarks/README.md).
"""

import sys

from dynnet_ext import bench

if __name__ == "__main__":
    sys.exit(bench.main(subjects=("mlp",), prog="benchmarks/transformer_mlp.py", description=__doc__))
