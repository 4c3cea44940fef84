"""Accuracy of the fused layers' activations against the float64 truth, beside stock's own.

    python benchmarks/activation_accuracy.py [--device cpu|cuda] [--points 4000001]

For each activation (gelu, gelu_tanh, silu) over a sweep of x in [-10, 10] (and +-inf, NaN): the
layer's output with a 1 x 1 identity weight and no bias (z = x exactly, so the error is the
activation's), `fused_linear_act(x, [[1]], None, act)`, and stock's `F.gelu` / `F.silu` on the
same float32 x, each against the activation computed in float64 and rounded to float32. Prints,
per range of x, the largest error in units in the last place of the float32 truth, where each
gives exactly 0 for nonzero truth, how many outputs differ from stock's bits, and whether inf
and NaN come out as stock's. Accuracy is a property of the code, not of the machine's load: one
run is the measurement.
"""

import argparse

import torch
import torch.nn.functional as F

from dynnet_ext.functional import fused_linear_act
from dynnet_ext.ops.activations import stock_activation

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
RANGES = ((-10.0, -3.0), (-3.0, -1.0), (-1.0, 10.0))


def ulp_error(y, truth64):
    """|y - truth| in units of the float32 spacing at the float32-rounded truth."""
    t32 = truth64.float()
    spacing = (torch.nextafter(t32.abs(), torch.tensor(float("inf"), device=t32.device)) - t32.abs()).double()
    return (y.double() - truth64).abs() / spacing


def sweep(device, points):
    x = torch.linspace(-10, 10, points, device=device)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device)
    one = torch.ones(1, 1, device=device)
    rows = []
    for act in ACTIVATIONS:
        truth = stock_activation(x.double(), act)
        outputs = {"fused": fused_linear_act(x[:, None], one, None, act)[:, 0], "stock": stock_activation(x, act)}
        for impl, y in outputs.items():
            err = ulp_error(y, truth)
            special = fused_linear_act(specials[:, None], one, None, act)[:, 0] if impl == "fused" else None
            rows.append({
                "activation": act, "impl": impl,
                "max_ulp": [err[(x >= lo) & (x < hi)].max().item() for lo, hi in RANGES],
                "zero_from": x[(y == 0) & (truth != 0)].max().item() if ((y == 0) & (truth != 0)).any() else None,
                "differs_from_stock": int((y != outputs["stock"]).sum()),
                "specials_as_stock": None if special is None else
                torch.equal(special.nan_to_num(7.0), stock_activation(specials, act).nan_to_num(7.0)),
            })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=4_000_001)
    args = parser.parse_args(argv)
    cpu = f" ({torch.backends.cpu.get_cpu_capability()})" if args.device == "cpu" else ""
    print(f"torch {torch.__version__}, {args.device}{cpu}, {args.points} points in [-10, 10]")
    ranges = " | ".join(f"max ulp x in [{lo:g}, {hi:g})" for lo, hi in RANGES)
    print(f"| activation | impl | {ranges} | 0 for nonzero truth from x <= | bits differing from stock | inf, NaN as stock |")
    print("|---|---|" + "--:|" * (len(RANGES) + 3))
    for r in sweep(args.device, args.points):
        cells = [f"{u:.3g}" for u in r["max_ulp"]]
        zero = "-" if r["zero_from"] is None else f"{r['zero_from']:.3f}"
        special = "-" if r["specials_as_stock"] is None else ("yes" if r["specials_as_stock"] else "NO")
        print(f"| {r['activation']} | {r['impl']} | {' | '.join(cells)} | {zero} | {r['differs_from_stock']} | {special} |")


if __name__ == "__main__":
    main()
