"""Accuracy of the fused layers' activations and their derivatives against the exact values, beside
stock's own float32 ops.

    python benchmarks/activation_accuracy.py [--device cpu|cuda] [--points 4000001]

For each activation (gelu, gelu_tanh, silu) over a sweep of float32 x in [-20, 20]: the layer with
a 1 x 1 identity weight and no bias (z = x exactly, so the error is the activation's),
`fused_linear_act(x, [[1]], None, act)`, its derivative (the gradient of x for a gradient of
ones), and stock's `F.gelu` / `F.silu` and their backward ops on the same x, each against the
exact value: computed in float64 from forms that do not cancel (x erfc(-x/sqrt 2) / 2, x
sigmoid(2u), x sigmoid(x); stock's own float64 formulas lose all bits for x below about -8).
Prints, per range of x, the largest error in units in the last place (ulp) of the float32 exact
value where it is at least 2^-100 (below that, results near float32's subnormals, the largest
absolute error), the largest error divided by 1 + cond (cond = |x f'(x) / f(x)|: the ulp any
float32 evaluation loses to rounding its own intermediate arguments), and whether +-inf and NaN
come out as stock's float64 formulas give them. Accuracy is a property of the code, not of the
machine's load: one run is the measurement.
"""

import argparse
import math

import torch

from dynnet_ext.functional import fused_linear_act
from dynnet_ext.ops.activations import stock_activation

ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
RANGES = ((-20.0, -8.0), (-8.0, -3.0), (-3.0, -1.0), (-1.0, 20.0))
TINY = 2.0 ** -100  # below this the ulp of a float32 result is near the subnormals'


def exact(x, activation):
    """The activation in float64 by forms without cancellation; x float64 (autograd gives f')."""
    if activation == "gelu":
        return x * 0.5 * torch.special.erfc(-x / math.sqrt(2))
    if activation == "gelu_tanh":
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))
    return x * torch.sigmoid(x)


def spacing(t32):
    """The float32 ulp at each element of t32, as float64."""
    return (torch.nextafter(t32.abs(), torch.tensor(float("inf"), device=t32.device)) - t32.abs()).double()


def with_derivative(fn, x):
    """fn(x) and fn'(x), elementwise, for a 1-d x."""
    x = x.detach().requires_grad_()
    y = fn(x)
    (d,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), d


def errors(x, activation, y, d):
    """Per element of x (float32): ulp error of y, of d, the conditioning, the exact f and f'."""
    f, df = with_derivative(lambda v: exact(v, activation), x.double())
    cond = (x.double() * df / f).abs().nan_to_num(0.0)
    return {"ulp": (y.double() - f).abs() / spacing(f.float()), "abs": (y.double() - f).abs(),
            "d_ulp": (d.double() - df).abs() / spacing(df.float()), "d_abs": (d.double() - df).abs(),
            "cond": cond, "f": f, "df": df}


def layer(activation):
    one = None

    def fn(x):
        nonlocal one
        one = torch.ones(1, 1, device=x.device, dtype=x.dtype) if one is None else one
        return fused_linear_act(x[:, None], one, None, activation)[:, 0]
    return fn


def sweep(device, points):
    x = torch.linspace(-20, 20, points, device=device)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan")], device=device)
    rows = []
    for act in ACTIVATIONS:
        impls = {"fused": layer(act), "stock": lambda v, act=act: stock_activation(v, act)}
        for impl, fn in impls.items():
            y, d = with_derivative(fn, x)
            e = errors(x, act, y, d)
            normal = e["f"].abs() >= TINY
            sy, sd = with_derivative(fn, specials)
            wy, wd = with_derivative(lambda v, act=act: stock_activation(v, act), specials.double())
            max_in = lambda t, m: t[m].max().item() if m.any() else float("nan")  # noqa: E731
            rows.append({
                "activation": act, "impl": impl,
                "max_ulp": [max_in(e["ulp"], (x >= lo) & (x < hi) & normal) for lo, hi in RANGES],
                "max_ulp_per_cond": max_in(e["ulp"] / (1 + e["cond"]), normal),
                "max_abs_tiny": max_in(e["abs"], ~normal),
                "d_max_abs": e["d_abs"].max().item(),
                "specials_as_float64": torch.equal(sy.double().nan_to_num(7.0), wy.nan_to_num(7.0))
                and torch.equal(sd.double().nan_to_num(7.0), wd.nan_to_num(7.0)),
            })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points", type=int, default=4_000_001)
    args = parser.parse_args(argv)
    cpu = f" ({torch.backends.cpu.get_cpu_capability()})" if args.device == "cpu" else ""
    print(f"torch {torch.__version__}, {args.device}{cpu}, {args.points} points in [-20, 20]")
    ranges = " | ".join(f"max ulp x in [{lo:g}, {hi:g})" for lo, hi in RANGES)
    print(f"| activation | impl | {ranges} | max ulp / (1 + cond) | max abs below 2^-100 | derivative max abs "
          "| inf, NaN as float64 |")
    print("|---|---|" + "--:|" * (len(RANGES) + 4))
    for r in sweep(args.device, args.points):
        cells = [f"{u:.3g}" for u in r["max_ulp"]]
        special = "yes" if r["specials_as_float64"] else "no"
        print(f"| {r['activation']} | {r['impl']} | {' | '.join(cells)} | {r['max_ulp_per_cond']:.3g} | "
              f"{r['max_abs_tiny']:.2g} | {r['d_max_abs']:.2g} | {special} |")


if __name__ == "__main__":
    main()
