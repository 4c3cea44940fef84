"""Benchmark engine: fused (dynnet_ext) vs stock PyTorch vs torch.compile, in one process.

Behind `python -m dynnet_ext bench` and the scripts in benchmarks/ (one per subject). The
method, the options and the results.json schema are documented in benchmarks/README.md.

Subjects (each timed per shape and dtype, implementations interleaved rep by rep):
  layer   Linear + bias + ReLU: forward, backward, forward+backward
  net     DynamicNet forward+backward at each depth 0-3
  step    the seed's training step (forward, MSELoss(sum), zero_grad, backward, Adam(lr=1e-4)
          step), depths cycled 0,1,2,3 over the iterations; with Adam as the seed builds it
          (phase train-step) and as torch's fused kernel (phase train-step-adam-fused)
  memory  of a training step at depth 3: bytes autograd saves for backward (every device) and,
          on CUDA, the peak allocation above the pre-step baseline
  persample  per-sample gradients of the seed's loss, torch.func.vmap(torch.func.grad(loss)),
          at each depth 0-3 (what differential-privacy training computes)
  mlp     a transformer block's MLP, Linear -> activation -> Linear (GELU by default), at
          BERT-base and ViT-S widths: forward+backward, fused = fuse() of the stock module.
          Run when named (--subjects, benchmarks/transformer_mlp.py), not by default
The layer, net, step and mlp subjects also run in each dtype of --dtypes (DTYPES): parameters
and input in bfloat16 or float16, or float32 parameters under torch.autocast to bfloat16.
"""

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .cli import OPTIMIZERS, SEED_OPTIMIZER, choose_optimizer, make_optimizer

SUBJECTS = ("layer", "net", "step", "memory", "persample", "mlp")
# What runs without --subjects: the seed's model. The transformer MLP is asked for by name.
DEFAULT_SUBJECTS = ("layer", "net", "step", "memory", "persample")
IMPLS = ("fused", "fused-layer", "stock", "compile", "compile-reduce-overhead", "compile-max-autotune",
         "addmm-activation", "fused-all", "stock-gemms")
DEFAULT_IMPLS = {"cpu": ("fused", "fused-layer", "stock", "compile", "fused-all", "stock-gemms"), "cuda": IMPLS}
# Implementations that exist for one subject kind only: a layer's forward (addmm-activation), a
# network's per-layer fusion (fused-layer; in the layer subject it would be `fused` again), the
# MLP with every Linear fused (fused-all: fuse(linear=True); the fused seed models already have
# every layer fused) and the MLP's GEMMs alone, run as stock runs them (stock-gemms).
LAYER_ONLY, NET_ONLY, MLP_ONLY = ("addmm-activation",), ("fused-layer",), ("fused-all", "stock-gemms")
# Per-sample gradients: the fused models, stock, and torch.compile of stock's vmap(grad) function
# (the CUDA-graph compile modes are left out: the function returns a fresh dict of gradients).
PERSAMPLE_IMPLS = ("fused", "fused-layer", "stock", "compile")
# The transformer MLP: Linear(d_model, hidden) -> activation -> Linear(hidden, d_model), shapes
# TOKENSxD_MODELxHIDDEN: BERT-base's widths (768 -> 3072 -> 768) and ViT-S's (384 -> 1536 -> 384)
# at 128, 512 and 2048 tokens. The activation is a dimension of its rows (the other subjects'
# models are ReLU's).
MLP_SHAPES = ("128x768x3072", "512x768x3072", "2048x768x3072", "128x384x1536", "512x384x1536", "2048x384x1536")
MLP_QUICK_SHAPES = ("128x384x1536",)
MLP_ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                   "silu": lambda: nn.SiLU(), "relu": lambda: nn.ReLU()}
DEFAULT_MLP_ACTIVATIONS = ("gelu",)
SEED_ACTIVATION = "relu"  # the activation of the layer, net, step, memory and persample rows
# Per-sample gradients take N times the parameters' memory: shapes above this are not measured
# (of the default sweep, 1024x1000x100 and 64x1024x1024).
PERSAMPLE_MAX_BYTES = 128 * 2**20
LAYER_PHASES = ("forward", "backward", "forward+backward")
DEPTHS = (0, 1, 2, 3)
MEMORY_DEPTH = 3  # the deepest graph the seed draws: the peak over its steps
STEP_DEPTHS = "0-3"  # `depth` of step rows: iterations cycle 0,1,2,3 (the seed draws them uniformly)
# The step's phase per optimizer (dynnet_ext.cli.OPTIMIZERS); the seed's is the baseline of
# every step row's ratio_vs_seed and is always run.
STEP_PHASES = {"adam": "train-step", "adam-fused": "train-step-adam-fused"}
D_OUT = 10  # the network's output width (the seed's); --shapes sets batch x D_in x H
LR = 1e-4

# The dtype dimension of the layer, net and step subjects (memory and persample: float32): the
# models' parameters and the input in the dtype, or float32 parameters with the forward (and the
# loss) under torch.autocast to bfloat16, as mixed-precision training runs.
DTYPES = ("float32", "bfloat16", "autocast-bfloat16", "float16")
DTYPE_SUBJECTS = ("layer", "net", "step", "mlp")

SEED_SHAPE = "64x1000x100"
# Full sweep: batch at the seed's widths, then width at the seed's batch.
FULL_SHAPES = (
    "1x1000x100", "16x1000x100", SEED_SHAPE, "256x1000x100", "1024x1000x100",
    "64x256x256", "64x1024x1024",
)
# The layer subject's full sweep adds a transformer's MLP widths (768 <-> 3072) at 128 and 512 tokens.
TRANSFORMER_SHAPES = ("128x768x3072", "128x3072x768", "512x768x3072", "512x3072x768")

# (reps, warm-up seconds per implementation and case, target milliseconds per rep)
SETTINGS = {"quick": (5, 0.05, 2.0), "full": (21, 0.3, 10.0)}
SCHEMA = 5
# The calibration GEMM run at start: every float32 GEMM engine in reach multiplies these shapes
# (M x K x N) on all threads, interleaved; the fastest rate is the machine's measured peak, the
# yardstick of every row's GFLOP/s.
CALIBRATION_SHAPE = (1024, 1024, 1024)
CALIBRATION_SETTINGS = {"quick": (3, 0.05, 20.0), "full": (9, 0.3, 50.0)}


# ----------------------------------------------------------------------------- options

def _csv(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return [c for c in choices if c in items]  # canonical order, no duplicates

    return parse


def parse_shape(text):
    """'64x1000x100' -> (64, 1000, 100)."""
    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"a shape is three positive ints joined by 'x' (e.g. 64x1000x100), got {text!r}")
    return dims


def _shapes(text):
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    if not shapes:
        raise argparse.ArgumentTypeError("--shapes needs at least one shape")
    for s in shapes:
        parse_shape(s)
    return list(dict.fromkeys(s.lower() for s in shapes))


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def add_arguments(parser, subjects=SUBJECTS, default_subjects=None):
    """Add the bench options to `parser`. `subjects` narrows --subjects (the per-subject scripts);
    `default_subjects` is what runs without it (default: DEFAULT_SUBJECTS among `subjects`, or all
    of `subjects` if none of them is a default one)."""
    if default_subjects is None:
        default_subjects = [s for s in subjects if s in DEFAULT_SUBJECTS] or list(subjects)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    seed_model = set(subjects) - {"mlp"}  # subjects measured at --shapes
    quick = [f"seed shape only ({SEED_SHAPE}) unless --shapes"] if seed_model else []
    quick += [f"mlp: {','.join(MLP_QUICK_SHAPES)} unless --mlp-shapes"] if "mlp" in subjects else []
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {'; '.join(quick)}; {SETTINGS['quick'][0]} reps, short warm-up")
    if seed_model:
        parser.add_argument("--shapes", type=_shapes, default=None,
                            help="comma-separated BATCHxINxOUT: for the layer batch x in_features x out_features, for "
                                 f"net/step/memory N x D_in x H with D_out={D_OUT}. Default: {','.join(FULL_SHAPES)}, "
                                 f"and for the layer also {','.join(TRANSFORMER_SHAPES)} (--quick: {SEED_SHAPE})")
    else:
        parser.set_defaults(shapes=None)
    if "layer" in subjects:
        parser.add_argument("--layer-shapes", type=_shapes, default=None,
                            help="comma-separated BATCHxINxOUT measured by the layer subject only. Default: "
                                 f"{','.join(TRANSFORMER_SHAPES)} in the full sweep, none with --shapes or --quick")
    else:
        parser.set_defaults(layer_shapes=None)
    if "mlp" in subjects:
        parser.add_argument("--mlp-shapes", type=_shapes, default=None,
                            help="comma-separated TOKENSxD_MODELxHIDDEN measured by the mlp subject (Linear(d_model, "
                                 f"hidden) -> activation -> Linear(hidden, d_model)). Default: {','.join(MLP_SHAPES)} "
                                 f"(--quick: {','.join(MLP_QUICK_SHAPES)})")
        parser.add_argument("--mlp-activations", type=_csv(tuple(MLP_ACTIVATIONS)), default=None,
                            help=f"the mlp subject's activations, comma-separated among {', '.join(MLP_ACTIVATIONS)} "
                                 f"(default {','.join(DEFAULT_MLP_ACTIVATIONS)})")
    else:
        parser.set_defaults(mlp_shapes=None, mlp_activations=None)
    if len(subjects) > 1:
        default_text = "all" if list(default_subjects) == list(subjects) else ",".join(default_subjects)
        parser.add_argument("--subjects", type=_csv(subjects), default=list(default_subjects),
                            help=f"comma-separated, among {', '.join(subjects)} (default: {default_text})")
    else:
        parser.set_defaults(subjects=list(subjects))
    if set(subjects) & set(DTYPE_SUBJECTS):
        parser.add_argument("--dtypes", type=_csv(DTYPES), default=["float32"],
                            help=f"comma-separated, among {', '.join(DTYPES)} (default float32): the dtypes of the "
                                 f"{', '.join(DTYPE_SUBJECTS)} rows (bfloat16, float16: parameters and input in the "
                                 "dtype; autocast-bfloat16: float32 parameters under torch.autocast)")
    else:
        parser.set_defaults(dtypes=["float32"])
    parser.add_argument("--impls", type=_csv(IMPLS), default=None,
                        help=f"comma-separated, among {', '.join(IMPLS)}; stock (the baseline) is always run. "
                             f"Default on cpu: {','.join(DEFAULT_IMPLS['cpu'])}; on cuda: all "
                             "(fused: the default DynamicNet, whole-network ops; in mlp rows fuse() of the stock "
                             "MLP; fused-all: fuse(linear=True) of it, mlp only; stock-gemms: the MLP's six GEMMs alone "
                             "(torch.mm), mlp only; fused-layer: "
                             "DynamicNet(fusion='layer'), net/step/memory only; addmm-activation = "
                             "torch._addmm_activation, layer forward only)")
    parser.add_argument("--optimizers", type=_csv(OPTIMIZERS), default=None,
                        help=f"step subject, comma-separated among {', '.join(OPTIMIZERS)}; {SEED_OPTIMIZER} (the "
                             "seed's, the baseline) is always run. Default: both where the running torch has "
                             "Adam's fused kernel for the device")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads, set for the run and reported (default: torch's current count)")
    parser.add_argument("--reps", type=_positive_int, default=None,
                        help=f"timed repetitions per implementation and row (default {SETTINGS['full'][0]}, "
                             f"--quick {SETTINGS['quick'][0]})")
    parser.add_argument("--out", type=Path, default=None,
                        help="write OUT/results.json, OUT/results.md and OUT/speedup.png")
    parser.add_argument("--no-plot", action="store_true", help="with --out, skip speedup.png")
    return parser


def main(argv=None, subjects=SUBJECTS, prog=None, description=None):
    """Entry point of the benchmarks/ scripts: parse argv, run, return the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, subjects)
    return run(parser.parse_args(argv))


# ----------------------------------------------------------------------------- timing

class Runner:
    """One implementation in one row: `fn()` is the timed work; `setup()`, when given, runs
    before each call outside the timed region (e.g. the forward whose backward is timed)."""

    def __init__(self, fn, setup=None, multiple=1):
        self.fn, self.setup, self.multiple = fn, setup, multiple


def _time_rep(runner, iters, device):
    """Seconds per iteration over `iters` iterations (CUDA: events, synchronised)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()  # nothing of the previous rep or implementation leaks in
    if runner.setup is None:  # time the whole batch in one region
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                runner.fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            runner.fn()
        return (time.perf_counter() - t0) / iters
    total, events = 0.0, []
    for _ in range(iters):
        runner.setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.fn()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            runner.fn()
            total += time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        total = sum(s.elapsed_time(e) for s, e in events) / 1e3
    return total / iters


def _warm_up(runner, device, seconds):
    """Run until `seconds` have passed after the first call (compilation, lazy init); return
    the median seconds per iteration seen."""
    _time_rep(runner, runner.multiple, device)
    times, t0 = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - t0 < seconds:
        times.append(_time_rep(runner, runner.multiple, device))
    return statistics.median(times)


def measure(runners, device, reps, warmup_s, target_s):
    """Time every Runner in `runners` ({impl: Runner}): warm each up, pick one iteration count
    for all (the slowest reaches `target_s` per rep), then `reps` reps interleaved round-robin,
    the order rotating each rep. Returns ({impl: [ms per iteration, one per rep]}, iters)."""
    per_iter = max(_warm_up(r, device, warmup_s) for r in runners.values())
    multiple = max(r.multiple for r in runners.values())
    iters = max(1, math.ceil(target_s / max(per_iter, 1e-9)))
    iters = min(math.ceil(iters / multiple) * multiple, 10000)
    names = list(runners)
    samples = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            samples[name].append(_time_rep(runners[name], iters, device) * 1e3)
    return samples, iters


def summarize(samples_ms):
    """(median, p20, p80) of a list of milliseconds."""
    if len(samples_ms) < 2:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    q = statistics.quantiles(samples_ms, n=5, method="inclusive")
    return statistics.median(samples_ms), q[0], q[3]


# ----------------------------------------------------------------------------- subjects

class _AddmmReLU(nn.Module):
    """relu(x @ weight.T + bias) with torch._addmm_activation (cuBLASLt's fused epilogue on
    CUDA). It has no derivative: forward rows only."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return torch._addmm_activation(self.linear.bias, x, self.linear.weight.t())


class _MarkedStep(nn.Module):
    """A module compiled with a mode that replays CUDA graphs ("reduce-overhead",
    "max-autotune"). Each call starts a new step for CUDA graph trees (the benchmark never reads
    an earlier call's output after the next call): without the mark, forwards repeated without a
    backward (the forward rows) would leave pending backwards and make the graphs fall back."""

    def __init__(self, model, mode):
        super().__init__()
        self.compiled = torch.compile(model, mode=mode)

    def forward(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args)


def _compiled(model, impl):
    return torch.compile(model) if impl == "compile" else _MarkedStep(model, impl.removeprefix("compile-"))


def _clear(tensors):
    for t in tensors:
        t.grad = None


def dtype_setup(dtype, device):
    """(the parameters' and input's torch dtype, a context manager factory for the forward) of a
    DTYPES entry."""
    if dtype == "autocast-bfloat16":
        return torch.float32, lambda: torch.autocast(device, dtype=torch.bfloat16)
    return getattr(torch, dtype), contextlib.nullcontext


def compute_dtype(dtype):
    """The dtype the GEMMs of a DTYPES entry run in ("bfloat16" under autocast)."""
    return dtype.removeprefix("autocast-")


class LayerCase:
    """Linear(in, out) + ReLU at one shape, one model per implementation, identical weights."""

    def __init__(self, shape, impls, device, dtype="float32"):
        from .nn import FusedLinearReLU

        N, fin, fout = shape
        param_dtype, self.autocast = dtype_setup(dtype, device)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(fin, fout, device=device, dtype=param_dtype), nn.ReLU())
        self.models = {}
        for impl in impls:
            if impl in NET_ONLY or impl in MLP_ONLY:
                continue
            if impl == "fused":
                model = FusedLinearReLU(fin, fout, device=device, dtype=param_dtype)
                model.load_state_dict(base[0].state_dict())
            elif impl == "stock":
                model = copy.deepcopy(base)
            elif impl == "addmm-activation":
                model = _AddmmReLU(copy.deepcopy(base[0]))
            else:
                model = _compiled(copy.deepcopy(base), impl)
            self.models[impl] = model
        # x requires grad: the backward computes grad_x, grad_weight and grad_bias, as for a
        # layer inside a network.
        self.x = torch.randn(N, fin, device=device, dtype=param_dtype, requires_grad=True)
        self.grad_y = torch.randn(N, fout, device=device, dtype=getattr(torch, compute_dtype(dtype)))

    def runners(self, phase):
        return {impl: self._runner(model, phase) for impl, model in self.models.items()
                if phase == "forward" or impl != "addmm-activation"}

    def _runner(self, model, phase):
        x, grad_y = self.x, self.grad_y
        grads = [x, *model.parameters()]

        def forward():
            with self.autocast():
                return model(x)

        if phase == "forward":  # grad mode on, as in training: the graph is recorded, then dropped
            return Runner(forward)
        if phase == "forward+backward":
            return Runner(lambda: forward().backward(grad_y), setup=lambda: _clear(grads))
        out = []

        def setup():  # the forward whose backward the next call times
            _clear(grads)
            out[:] = [forward()]

        return Runner(lambda: out.pop().backward(grad_y), setup=setup)


class MlpCase(LayerCase):
    """A transformer block's MLP, nn.Sequential(Linear(d_model, hidden), activation,
    Linear(hidden, d_model)), at one shape (tokens x d_model x hidden), one model per
    implementation, identical weights: stock; fused = dynnet_ext.fuse() of the stock module (the
    first Linear and the activation one fused layer, the second Linear stock's); fused-all =
    fuse(linear=True) (the second Linear a FusedLinear too); compile modes of the stock module;
    stock-gemms = no model, the GEMMs stock's autograd runs and nothing else (_mlp_gemms). Timed
    as the layer's phases are (x requires grad: inside a network)."""

    def __init__(self, shape, impls, device, dtype="float32", activation="gelu"):
        from .fuse import fuse

        tokens, d_model, hidden = shape
        param_dtype, self.autocast = dtype_setup(dtype, device)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(d_model, hidden, device=device, dtype=param_dtype),
                             MLP_ACTIVATIONS[activation](),
                             nn.Linear(hidden, d_model, device=device, dtype=param_dtype))
        self.models = {}
        self.gemms = _mlp_gemms(base, tokens, compute_dtype(dtype)) if "stock-gemms" in impls else None
        for impl in impls:
            if impl in LAYER_ONLY or impl in NET_ONLY or impl == "stock-gemms":
                continue
            if impl in ("fused", "fused-all"):
                model, report = fuse(copy.deepcopy(base), linear=impl == "fused-all", report=True)
                if report.activations != {"0": activation}:  # else 'fused' would time stock's layers
                    raise RuntimeError(f"fuse did not fuse the MLP's Linear + {activation}: {report}")
            elif impl == "stock":
                model = copy.deepcopy(base)
            else:
                model = _compiled(copy.deepcopy(base), impl)
            self.models[impl] = model
        self.x = torch.randn(tokens, d_model, device=device, dtype=param_dtype, requires_grad=True)
        self.grad_y = torch.randn(tokens, d_model, device=device, dtype=getattr(torch, compute_dtype(dtype)))

    def runners(self, phase):
        runners = super().runners(phase)
        if self.gemms is not None:
            runners["stock-gemms"] = Runner(self.gemms[phase])
        return runners


def _mlp_gemms(base, tokens, dtype):
    """{phase: fn} running the GEMMs stock's autograd runs for the MLP `base` at `tokens` rows,
    and nothing else: torch.mm in the compute dtype on operands made beforehand (forward: x W1^T,
    h W2^T; backward: grad_x and grad_weight of each layer). What is left of stock's time without
    its bias adds, activation, activation backward, bias sums and autocast casts: stock's time over
    this is the most that fusing that elementwise work can gain with ATen's GEMMs run as stock
    runs them (one after the other, each on all threads)."""
    w1, w2 = (lin.weight.detach().to(getattr(torch, dtype)) for lin in (base[0], base[2]))
    hidden, d_model = w1.shape

    def randn(*size):
        return torch.randn(*size, device=w1.device, dtype=w1.dtype)

    x, h, gy, g = randn(tokens, d_model), randn(tokens, hidden), randn(tokens, d_model), randn(tokens, hidden)

    def forward():
        return x.mm(w1.t()), h.mm(w2.t())

    def backward():
        return gy.mm(w2), gy.t().mm(h), g.mm(w1), g.t().mm(x)

    return {"forward": forward, "backward": backward, "forward+backward": lambda: (forward(), backward())}


class NetCase:
    """DynamicNet(D_in, H, D_OUT) at one shape, one model per implementation, identical weights,
    and an Adam per implementation and optimizer kind (made on first use; the optimizers of one
    implementation share its model). Serves the net, step and memory subjects."""

    def __init__(self, shape, impls, device, dtype="float32"):
        from .models import DynamicNet
        from .reference import DynamicNet as StockNet

        N, D_in, H = shape
        param_dtype, self.autocast = dtype_setup(dtype, device)
        torch.manual_seed(0)
        base = StockNet(D_in, H, D_OUT, device=device, dtype=param_dtype)
        self.models, self.optimizers = {}, {}
        for impl in impls:
            if impl in LAYER_ONLY or impl in MLP_ONLY:
                continue
            if impl in ("fused", "fused-layer"):
                model = DynamicNet(D_in, H, D_OUT, device=device, dtype=param_dtype,
                                   fusion="network" if impl == "fused" else "layer")
                model.load_state_dict(base.state_dict())
            elif impl == "stock":
                model = copy.deepcopy(base)
            else:
                model = _compiled(copy.deepcopy(base), impl)
            self.models[impl] = model
        self.x = torch.randn(N, D_in, device=device, dtype=param_dtype)  # the seed's input: no grad
        self.label = torch.randn(N, D_OUT, device=device, dtype=param_dtype)
        self.grad_y = torch.randn(N, D_OUT, device=device, dtype=getattr(torch, compute_dtype(dtype)))
        self.loss_fn = nn.MSELoss(reduction="sum")

    def net_runners(self, depth):
        def runner(model):
            params = list(model.parameters())

            def run():
                with self.autocast():
                    out = model(self.x, depth)
                out.backward(self.grad_y)

            return Runner(run, setup=lambda: _clear(params))

        return {impl: runner(model) for impl, model in self.models.items()}

    def optimizer(self, impl, kind=SEED_OPTIMIZER):
        key = (impl, kind)
        if key not in self.optimizers:
            self.optimizers[key] = make_optimizer(kind, self.models[impl].parameters(), LR)
        return self.optimizers[key]

    def step(self, impl, depth, optimizer=SEED_OPTIMIZER):
        """The seed's training step, in the seed's order (as dynnet_ext.cli.train runs it)."""
        model, opt = self.models[impl], self.optimizer(impl, optimizer)
        with self.autocast():
            loss = self.loss_fn(model(self.x, depth), self.label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def step_runners(self, optimizers=(SEED_OPTIMIZER,)):
        """{(phase, impl): Runner} for each optimizer's phase (STEP_PHASES), all timed together."""
        def runner(impl, optimizer):
            depths = itertools.cycle(DEPTHS)
            return Runner(lambda: self.step(impl, next(depths), optimizer), multiple=len(DEPTHS))

        return {(STEP_PHASES[opt], impl): runner(impl, opt) for opt in optimizers for impl in self.models}

    def persample_runners(self, depth):
        """Per-sample gradients of the seed's loss: vmap(grad(loss)) over the batch, with the
        parameters detached (as the torch.func documentation does). `compile` compiles stock's
        function (the stock model, not the compiled module: torch.compile wraps the whole
        vmap(grad) function, once per depth, during warm-up)."""
        from torch.func import functional_call, grad, vmap

        runners = {}
        for impl in self.models:
            if impl not in PERSAMPLE_IMPLS:
                continue
            model = self.models["stock" if impl == "compile" else impl]
            params = {n: p.detach() for n, p in model.named_parameters()}

            def loss(p, x, t, model=model):
                return self.loss_fn(functional_call(model, p, (x, depth)), t)

            fn = vmap(grad(loss), in_dims=(None, 0, 0))
            if impl == "compile":
                fn = torch.compile(fn)
            runners[impl] = Runner(lambda fn=fn, params=params: fn(params, self.x, self.label))
        return runners

    def saved_tensor_bytes(self, impl, depth):
        """Bytes of the distinct storages autograd saves for backward in one forward, without
        the parameters and the input batch (which exist anyway): the activation memory."""
        model = self.models[impl]
        exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        exclude.add(self.x.untyped_storage().data_ptr())
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(self.x, depth)  # keeps the saved tensors alive until the sum
        total = sum(seen.values())
        del out
        return total

    def cuda_peak_step_bytes(self, impl, depth):
        """Peak CUDA allocation during one training step above what was allocated before it
        (parameters, Adam state, data): activations, gradients, temporaries."""
        self.optimizer(impl).zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.step(impl, depth)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------- machine

def _git(*args):
    try:
        res = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device):
    from . import BUILD_INFO, __version__, has_kernels

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "dynnet_ext_version": __version__,
        "build_info": dict(BUILD_INFO),
        "fused_kernels": has_kernels(device),
        "git_commit": commit,
        "git_dirty": bool(status) if commit else None,
    }
    return info


# ----------------------------------------------------------------------------- run

def _plan(subjects, shapes, dtypes=("float32",), layer_shapes=(), mlp_shapes=(), mlp_activations=("gelu",)):
    """Every row to measure, as (shape, subject, phase, depth, dtype, activation), grouped by shape
    and dtype (and the mlp's activation) so each shape's models are built (and compiled) once per
    dtype. `layer_shapes`: shapes of the layer subject only; `mlp_shapes`, `mlp_activations`: the
    mlp subject's (its only shapes)."""
    plan = []
    a = SEED_ACTIVATION
    for shape, dtype in itertools.product(list(dict.fromkeys([*shapes, *layer_shapes])), dtypes):
        main = shape in shapes
        if "layer" in subjects:
            plan += [(shape, "layer", phase, None, dtype, a) for phase in LAYER_PHASES]
        if "net" in subjects and main:
            plan += [(shape, "net", "forward+backward", d, dtype, a) for d in DEPTHS]
        if "step" in subjects and main:
            plan.append((shape, "step", "train-step", STEP_DEPTHS, dtype, a))
        if dtype != "float32" or not main:
            continue
        if "memory" in subjects:
            plan.append((shape, "memory", "saved-tensors", MEMORY_DEPTH, dtype, a))
        if "persample" in subjects and persample_bytes(shape) <= PERSAMPLE_MAX_BYTES:
            plan += [(shape, "persample", "vmap-grad", d, dtype, a) for d in DEPTHS]
    if "mlp" in subjects:
        plan += [(shape, "mlp", "forward+backward", None, dtype, act)
                 for shape, dtype, act in itertools.product(mlp_shapes, dtypes, mlp_activations)]
    return plan


def persample_bytes(shape):
    """float32 bytes of one batch's per-sample gradients: N copies of the parameters."""
    n, d_in, h = parse_shape(shape)
    return 4 * n * ((d_in + 1) * h + (h + 1) * h + (h + 1) * D_OUT)


def _dims(subject, shape):
    a, b, c = parse_shape(shape)
    if subject == "layer":
        return {"batch": a, "in_features": b, "out_features": c}
    if subject == "mlp":
        return {"tokens": a, "d_model": b, "hidden": c}
    return {"N": a, "D_in": b, "H": c, "D_out": D_OUT}


def _row(subject, phase, shape, depth, dtype, activation, impl, **fields):
    row = {"subject": subject, "phase": phase, "shape": shape, "dims": _dims(subject, shape), "depth": depth,
           "dtype": dtype, "activation": activation, "impl": impl, "median_ms": None, "p20_ms": None, "p80_ms": None,
           "ratio_vs_stock": None, "ratio_vs_seed": None, "reps": None, "iters_per_rep": None, "samples_ms": None, "memory_bytes": None,
           "gemm_flops": None, "gflops": None, "peak_fraction": None}
    row.update(fields)
    return row


def gemm_flops(subject, phase, shape, depth):
    """Multiply-add FLOPs (2 per MAC) of the GEMMs in one timed iteration of a row, the same for
    every implementation (what stock's autograd computes): layer forward 1 GEMM, backward 2
    (grad_x and grad_weight: x requires grad), network forward+backward without grad_x (the
    seed's x needs none); train-step rows average depths 0-3; the transformer MLP's two layers
    (tokens x d_model x hidden each) 2 GEMMs forward, 4 backward. None for memory rows."""
    a, b, c = parse_shape(shape)
    if subject == "layer":
        return 2 * a * b * c * {"forward": 1, "backward": 2, "forward+backward": 3}[phase]
    if subject == "mlp":
        return 2 * 2 * a * b * c * {"forward": 1, "backward": 2, "forward+backward": 3}[phase]
    if subject == "memory":
        return None

    def net(d):  # N x D_in x H, D_OUT outputs, hidden layer used d times
        forward = a * (b * c + d * c * c + c * D_OUT)
        chain = a * (D_OUT * c + d * c * c)  # grad_out -> G_d -> ... -> G_0
        weights = a * (c * b + d * c * c + D_OUT * c)
        return 2 * (forward + chain + weights)

    if subject == "net":
        return net(depth)
    return sum(net(d) for d in DEPTHS) / len(DEPTHS)


def _with_rate(row, peaks):
    """Adds the row's GEMM rate and its fraction of the peak of the dtype its GEMMs run in
    (`peaks`: {"float32": ..., "bfloat16": ..., "float16": ...}, GFLOP/s)."""
    flops = gemm_flops(row["subject"], row["phase"], row["shape"], row["depth"])
    if flops is None or row["median_ms"] is None:
        return row
    rate = flops / (row["median_ms"] * 1e-3) / 1e9
    peak = (peaks or {}).get(compute_dtype(row["dtype"]))
    row.update(gemm_flops=flops, gflops=rate, peak_fraction=rate / peak if peak else None)
    return row


def _time_rows(runners, key, device, reps, warmup_s, target_s, peaks=None):
    """Rows of `runners` ({impl: Runner}, or {(phase, impl): Runner} where one measurement
    serves several phases: the step's optimizers), measured together. ratio_vs_stock is against
    stock in the same phase; step rows' ratio_vs_seed against the seed's step (stock, train-step)."""
    subject, phase, shape, depth, dtype, activation = key
    samples, iters = measure(runners, device, reps, warmup_s, target_s)
    samples = {name if isinstance(name, tuple) else (phase, name): ms for name, ms in samples.items()}
    medians = {name: statistics.median(ms) for name, ms in samples.items()}
    seed = medians[(STEP_PHASES[SEED_OPTIMIZER], "stock")] if subject == "step" else None
    rows = []
    for (row_phase, impl), ms in samples.items():
        med, p20, p80 = summarize(ms)
        rows.append(_with_rate(_row(subject, row_phase, shape, depth, dtype, activation, impl, median_ms=med,
                                    p20_ms=p20, p80_ms=p80, ratio_vs_stock=medians[(row_phase, "stock")] / med,
                                    ratio_vs_seed=seed / med if seed else None,
                                    reps=len(ms), iters_per_rep=iters, samples_ms=ms), peaks))
    return rows


def _calibration_engines(device, a, b, bias):
    """{engine: fn} of the float32 GEMMs that can run here, each computing a @ b.T."""
    engines = {"torch.mm": lambda: torch.mm(a, b.t())}
    if device == "cpu":
        if torch.backends.mkldnn.is_available():
            engines["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        from .ops import _C
        if _C is not None:
            for isa in _C.cpu_gemm_isas():
                if isa != "aten":
                    engines[f"dynnet-{isa}"] = _on_isa(isa, lambda: torch.ops.dynnet.linear_relu(a, b, None, "none"))
    elif torch.cuda.is_available():
        engines["dynnet"] = lambda: torch.ops.dynnet.linear_relu(a, b, bias, "none")
    return engines


def _on_isa(isa, fn):
    from .ops import _C

    def run():
        previous = _C.set_cpu_gemm_isa(isa)
        try:
            return fn()
        finally:
            _C.set_cpu_gemm_isa(previous)

    return run


def calibrate(device, quick):
    """The machine's measured GEMM peak: each engine's float32 GFLOP/s at CALIBRATION_SHAPE on
    all threads (interleaved, median), and the best of them."""
    M, K, N = CALIBRATION_SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(M, K, generator=gen).to(device)
    b = torch.randn(N, K, generator=gen).to(device)
    engines = _calibration_engines(device, a, b, torch.zeros(N, device=device))
    reps, warmup_s, target_ms = CALIBRATION_SETTINGS["quick" if quick else "full"]
    samples, _ = measure({name: Runner(fn) for name, fn in engines.items()}, device, reps, warmup_s, target_ms / 1e3)
    flops = 2 * M * K * N
    gflops = {name: flops / (statistics.median(ms) * 1e-3) / 1e9 for name, ms in samples.items()}
    best = max(gflops, key=gflops.get)
    # The hardware's side: a register-only FMA loop (no memory, no GEMM) per instruction set,
    # on all threads at once, and vdpbf16ps's where the CPU has it. A GEMM can approach it, never
    # pass it.
    fma = {}
    peaks = {"float32": gflops[best]}
    if device == "cpu":
        from .ops import _C
        if _C is not None:
            seconds = 0.05 if quick else 0.2
            for isa in _C.cpu_gemm_isas():
                if isa != "aten":
                    fma[isa] = _C.cpu_fma_peak_gflops(isa, torch.get_num_threads(), seconds)
            if _C.cpu_gemm_kernels("bfloat16") == "avx512_bf16":
                fma["avx512_bf16"] = _C.cpu_fma_peak_gflops("avx512_bf16", torch.get_num_threads(), seconds)
            # The half types' ceilings: bfloat16 on vdpbf16ps where the engine runs it, else (and
            # float16 always) converted to float32 on the FMA units.
            engine_fma = {k: v for k, v in fma.items() if k != "avx512_bf16"}
            if engine_fma:
                fp32 = fma.get(_C.cpu_gemm_isa(), max(engine_fma.values()))
                peaks["bfloat16"] = fma.get("avx512_bf16", fp32)
                peaks["float16"] = fp32
    return {"shape": "x".join(map(str, CALIBRATION_SHAPE)), "gflops": gflops, "peak_gflops": gflops[best],
            "best_engine": best, "fma_loop_gflops": fma, "dtype_peak_gflops": peaks}


def _memory_rows(case, key, device):
    subject, _, shape, depth, dtype, activation = key
    for impl in case.models:  # compile, Adam state, lazy init happen here, not in the numbers
        for _ in range(2):
            case.step(impl, depth)
    metrics = [("saved-tensors", case.saved_tensor_bytes)]
    if device == "cuda":
        metrics.append(("peak-allocated", case.cuda_peak_step_bytes))
    rows = []
    for phase, fn in metrics:
        values = {impl: fn(impl, depth) for impl in case.models}
        for impl, value in values.items():
            ratio = values["stock"] / value if value else None
            rows.append(_row(subject, phase, shape, depth, dtype, activation, impl, memory_bytes=value,
                             ratio_vs_stock=ratio, reps=1))
    return rows


def _progress(row):
    text = f"{row['impl']} "
    if row["memory_bytes"] is not None:
        text += f"{row['phase']} {row['memory_bytes'] / 1024:.1f} KiB"
    else:
        if row["subject"] == "step":
            text += f"{row['phase']} "
        text += f"{row['median_ms']:.3f} ms"
        if row.get("gflops") is not None:
            text += f" {row['gflops']:.0f} GFLOP/s"
    ratios = [f"{row['ratio_vs_stock']:.2f}x"] if row["impl"] != "stock" and row["ratio_vs_stock"] is not None else []
    if row["ratio_vs_seed"] is not None and row["phase"] != STEP_PHASES[SEED_OPTIMIZER]:
        ratios.append(f"{row['ratio_vs_seed']:.2f}x vs seed")
    return text + (f" ({', '.join(ratios)})" if ratios else "")


def run(args):
    """Run the benchmark described by parsed `args` (see add_arguments); return the exit code."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("dynnet_ext bench: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    default_reps, warmup_s, target_ms = SETTINGS[mode]
    reps = args.reps or default_reps
    shapes = args.shapes or ([SEED_SHAPE] if args.quick else list(FULL_SHAPES))
    layer_shapes = getattr(args, "layer_shapes", None)
    if layer_shapes is None:
        layer_shapes = [] if args.shapes or args.quick else list(TRANSFORMER_SHAPES)
    layer_shapes = [s for s in layer_shapes if s not in shapes]
    if not set(args.subjects) - {"mlp"}:  # the mlp has its own shapes
        shapes, layer_shapes = [], []
    mlp_shapes = (getattr(args, "mlp_shapes", None) or list(MLP_QUICK_SHAPES if args.quick else MLP_SHAPES)
                  if "mlp" in args.subjects else [])
    mlp_activations = list(getattr(args, "mlp_activations", None) or DEFAULT_MLP_ACTIVATIONS) if mlp_shapes else []
    dtypes = list(getattr(args, "dtypes", None) or ["float32"])
    impls = [i for i in IMPLS if i in (args.impls or DEFAULT_IMPLS[device]) or i == "stock"]
    subjects = list(args.subjects)
    try:  # the seed's Adam, and the fused one where asked for (by default: where torch runs it)
        optimizers = list(dict.fromkeys([SEED_OPTIMIZER, *(choose_optimizer(o, device) for o in args.optimizers)]
                                        if args.optimizers else [SEED_OPTIMIZER, choose_optimizer(None, device)]))
    except ValueError as exc:
        print(f"dynnet_ext bench: --optimizers: {exc}", file=sys.stderr)
        return 2

    old_threads = torch.get_num_threads()
    threads = args.threads or old_threads
    torch.set_num_threads(threads)
    try:
        from . import has_kernels

        if {"fused", "fused-all"} & set(impls) and not has_kernels(device):
            print(f"dynnet_ext bench: WARNING: no {device} kernels compiled; 'fused' runs the stock PyTorch "
                  "fallback, so its numbers say nothing about the kernels", file=sys.stderr)
        machine = machine_info(device)
        config = {"device": device, "dtypes": dtypes, "quick": args.quick, "subjects": subjects, "impls": impls,
                  "optimizers": optimizers, "shapes": shapes, "layer_shapes": layer_shapes,
                  "mlp_shapes": mlp_shapes, "mlp_activations": mlp_activations, "threads": threads,
                  "reps": reps, "warmup_s": warmup_s,
                  "target_rep_ms": target_ms, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        print(f"dynnet_ext bench: {device} ({machine['gpu'] or machine['cpu_model']}), {threads} threads, "
              f"torch {torch.__version__}, commit {(machine['git_commit'] or 'unknown')[:10]}"
              f"{' (dirty)' if machine['git_dirty'] else ''}; impls {','.join(impls)}; step optimizers "
              f"{','.join(optimizers)}", file=sys.stderr)
        too_big = [s for s in shapes if persample_bytes(s) > PERSAMPLE_MAX_BYTES] if "persample" in subjects else []
        if too_big:
            print(f"dynnet_ext bench: persample skips {','.join(too_big)} (per-sample gradients over "
                  f"{PERSAMPLE_MAX_BYTES // 2**20} MiB)", file=sys.stderr)
        t_start = time.perf_counter()
        calibration = calibrate(device, args.quick)
        print(f"calibration GEMM {calibration['shape']}: " + ", ".join(
            f"{k} {v:.0f}" for k, v in calibration["gflops"].items()) + f" GFLOP/s; peak {calibration['peak_gflops']:.0f}",
            file=sys.stderr)
        plan = _plan(subjects, shapes, dtypes, layer_shapes, mlp_shapes, mlp_activations)
        rows, errors = _run_plan(plan, impls, device, reps, warmup_s,
                                 target_ms / 1e3, calibration["dtype_peak_gflops"], optimizers)
        config["duration_s"] = round(time.perf_counter() - t_start, 1)
    finally:
        torch.set_num_threads(old_threads)
        if any(i.startswith("compile") for i in impls):
            torch.compiler.reset()

    results = {"schema": SCHEMA, "machine": machine, "config": config, "calibration": calibration,
               "rows": _sorted(rows, [*shapes, *layer_shapes, *mlp_shapes], dtypes), "errors": errors}
    print(format_calibration(calibration))
    print(format_table(results["rows"]))
    print(f"done in {config['duration_s']} s" + (f", {len(errors)} rows FAILED (see above)" if errors else ""),
          file=sys.stderr)
    if args.out is not None:
        write_outputs(results, args.out, plot=not args.no_plot)
    return 1 if errors else 0


def _run_plan(plan, impls, device, reps, warmup_s, target_s, peaks=None, optimizers=(SEED_OPTIMIZER,)):
    """Measure every planned row. A row whose measurement raises is reported and recorded in
    `errors`, and the run goes on: one failing compile mode must not lose a long GPU run."""
    rows, errors, case, case_key = [], [], None, None
    width = len(str(len(plan)))
    for n, (shape, subject, phase, depth, dtype, activation) in enumerate(plan, 1):
        label = (f"{subject}{f' {activation}' if subject == 'mlp' else ''} {phase} {shape} {dtype}"
                 + ("" if depth is None else f" depth {depth}"))
        print(f"[{n:>{width}}/{len(plan)}] {label} ...", end="", file=sys.stderr, flush=True)
        key = (subject, phase, shape, depth, dtype, activation)
        try:
            kind = {"layer": LayerCase, "mlp": MlpCase}.get(subject, NetCase)
            if case_key != (kind, shape, dtype, activation):
                case = case_key = None  # free the previous shape's models first
                if any(i.startswith("compile") for i in impls):
                    torch.compiler.reset()  # fresh compile caches: each shape gets static graphs
                case_args = (parse_shape(shape), impls, device, dtype) + ((activation,) if kind is MlpCase else ())
                case, case_key = kind(*case_args), (kind, shape, dtype, activation)
            if subject == "memory":
                new = _memory_rows(case, key, device)
            else:
                runners = (case.runners(phase) if subject in ("layer", "mlp") else
                           case.net_runners(depth) if subject == "net" else
                           case.persample_runners(depth) if subject == "persample" else
                           case.step_runners(optimizers))
                new = _time_rows(runners, key, device, reps, warmup_s, target_s, peaks)
        except Exception as exc:  # noqa: BLE001 - recorded in results.json and the exit code
            message = f"{type(exc).__name__}: {exc}"
            print(f" FAILED: {message}", file=sys.stderr, flush=True)
            errors.append({"subject": subject, "phase": phase, "shape": shape, "depth": depth, "dtype": dtype,
                           "activation": activation, "error": message})
            continue
        rows += new
        print(" " + "  ".join(_progress(r) for r in new), file=sys.stderr, flush=True)
    return rows, errors


def _sorted(rows, shapes, dtypes=DTYPES):
    """Subject-major order: subject, phase, dtype, activation, depth, shape (as given),
    implementation."""
    phases = [*LAYER_PHASES, *STEP_PHASES.values(), "saved-tensors", "peak-allocated", "vmap-grad"]
    activations = list(MLP_ACTIVATIONS)  # SEED_ACTIVATION among them
    return sorted(rows, key=lambda r: (SUBJECTS.index(r["subject"]), phases.index(r["phase"]),
                                       list(dtypes).index(r["dtype"]), activations.index(r["activation"]),
                                       str(r["depth"]), shapes.index(r["shape"]), IMPLS.index(r["impl"])))


# ----------------------------------------------------------------------------- outputs

TABLE_COLUMNS = ("subject", "phase", "depth", "shape", "dtype", "impl", "vs stock", "vs seed", "median", "p20-p80",
                 "GFLOP/s", "of peak", "iters x reps")


def _ratio_cell(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def _cells(row):
    ratio, vs_seed = _ratio_cell(row["ratio_vs_stock"]), _ratio_cell(row.get("ratio_vs_seed"))  # schema < 3: none
    if row["memory_bytes"] is not None:
        value, spread, count = f"{row['memory_bytes'] / 1024:.1f} KiB", "", ""
    else:
        value = f"{row['median_ms']:.4f} ms"
        spread = f"{row['p20_ms']:.4f}-{row['p80_ms']:.4f}"
        count = f"{row['iters_per_rep']} x {row['reps']}"
    depth = "-" if row["depth"] is None else str(row["depth"])
    rate = "" if row.get("gflops") is None else f"{row['gflops']:.1f}"
    share = "" if row.get("peak_fraction") is None else f"{100 * row['peak_fraction']:.0f}%"
    # The activation is a dimension of the mlp rows only (the other subjects' models are ReLU's).
    subject = f"mlp ({row['activation']})" if row["subject"] == "mlp" else row["subject"]
    return (subject, row["phase"], depth, row["shape"], row.get("dtype", "float32"), row["impl"], ratio,
            vs_seed, value, spread, rate, share, count)


def format_table(rows):
    """Plain-text table, the ratio to stock right after the implementation (>1: faster or
    smaller than stock), then, in step rows, the ratio to the seed's step; a blank line between
    groups of one subject and phase."""
    cells = [TABLE_COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
    right = set(range(6, len(TABLE_COLUMNS)))
    lines, prev = [], None
    for i, c in enumerate(cells):
        group = c[:2]
        if i > 1 and group != prev:
            lines.append("")
        prev = group
        padded = (v.rjust(w) if j in right else v.ljust(w) for j, (v, w) in enumerate(zip(c, widths)))
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def format_calibration(calibration):
    """One line: the calibration GEMM's rate per engine, the register-only ceilings, and the peak
    each dtype's rows are measured against."""
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in calibration["gflops"].items())
    fma = ", ".join(f"{isa} {rate:.0f}" for isa, rate in calibration.get("fma_loop_gflops", {}).items())
    half = {k: v for k, v in calibration.get("dtype_peak_gflops", {}).items() if k != "float32"}
    bf16_note = ("" if "avx512_bf16" in calibration.get("fma_loop_gflops", {}) else
                 " (no vdpbf16ps on this CPU: bfloat16 runs converted to float32, at the FMA loop's ceiling)")
    return (f"Machine peak: {calibration['peak_gflops']:.0f} GFLOP/s ({calibration['best_engine']}, float32 GEMM "
            f"{calibration['shape']} on all threads; engines: {rates} GFLOP/s" +
            (f"; register-only loops: {fma} GFLOP/s" if fma else "") + "). " +
            ("Half-type ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in half.items()) + " GFLOP/s"
             + (bf16_note if "bfloat16" in half else "") + ". " if half else "") +
            "GFLOP/s columns count the GEMMs' multiply-adds only; % of peak is against the GEMM peak for float32 "
            "rows and against the dtype's ceiling for the others (autocast-bfloat16: bfloat16's).")


def format_markdown(rows):
    """The same table in Markdown (for benchmarks/results/README.md)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * 6 + "--:|" * (len(TABLE_COLUMNS) - 6)]
    lines += ["| " + " | ".join(c or " " for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(results, out, plot=True):
    """OUT/results.json, then render() the table and the plot beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    render(results, out, plot)


def render(results, out, plot=True):
    """OUT/results.md (the Markdown table) and, with plot=True and matplotlib installed,
    OUT/speedup.png, from a results dict (also used by benchmarks/plot.py on a saved run)."""
    out = Path(out)
    head = format_calibration(results["calibration"]) + "\n\n" if results.get("calibration") else ""
    (out / "results.md").write_text(head + format_markdown(results["rows"]) + "\n")
    written = [out / "results.md"]
    if plot:
        try:
            plot_speedup(results, out / "speedup.png")
            written.append(out / "speedup.png")
        except ImportError:
            print("dynnet_ext bench: matplotlib is not installed, no plot (pip install matplotlib; "
                  "or later: python benchmarks/plot.py OUT)", file=sys.stderr)
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)


def _panel_title(subject, phase, depth, activation=SEED_ACTIVATION):
    if subject == "layer":
        return f"layer {phase}"
    if subject == "mlp":
        return f"MLP Linear -> {activation} -> Linear {phase}"
    if subject == "net":
        return f"net forward+backward, depth {depth}"
    if subject == "step":
        optimizer = "Adam(fused=True)" if phase == STEP_PHASES["adam-fused"] else "Adam as the seed builds it"
        return f"training step (depths 0-3 cycled), {optimizer}"
    if subject == "persample":
        return f"per-sample gradients vmap(grad), depth {depth}"
    return f"memory: {phase} (stock / impl), depth {depth}"


_RATIO_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20, 50, 100)


def plot_speedup(results, path):
    """One panel per subject/phase/depth: ratio to stock (step panels: to the seed's step, so
    that stock with the fused optimizer shows what the optimizer buys) vs shape, one line per
    implementation, bars from the implementation's p80 to its p20."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import NullLocator

    rows = results["rows"]
    layer_shapes = [*results["config"]["shapes"], *results["config"].get("layer_shapes", [])]
    shapes_of = {"layer": layer_shapes, "mlp": results["config"].get("mlp_shapes", [])}

    def panel(r):  # schema < 4: no dtype (float32); < 5: no activation (the seed's ReLU)
        return r["subject"], r["phase"], r["depth"], r.get("dtype", "float32"), r.get("activation", SEED_ACTIVATION)

    panels = list(dict.fromkeys(panel(r) for r in rows))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (subject, phase, depth, dtype, activation) in zip(axes, panels):
        shapes = shapes_of.get(subject, results["config"]["shapes"])
        vs_seed = subject == "step" and any(r.get("ratio_vs_seed") for r in rows)  # schema < 3: none
        ratio = "ratio_vs_seed" if vs_seed else "ratio_vs_stock"
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="the seed's step" if vs_seed else "stock")
        for impl in IMPLS:
            if impl == "stock" and not (vs_seed and phase != STEP_PHASES[SEED_OPTIMIZER]):
                continue  # the baseline itself
            points = {r["shape"]: r for r in rows
                      if (*panel(r), r["impl"]) == (subject, phase, depth, dtype, activation, impl)
                      and r.get(ratio) is not None}
            if not points:
                continue
            xs = [i for i, s in enumerate(shapes) if s in points]
            ys = [points[shapes[i]][ratio] for i in xs]
            color = f"C{IMPLS.index(impl)}"  # one colour per implementation in every panel
            if subject == "memory":
                ax.plot(xs, ys, marker="o", label=impl, color=color)
            else:  # bars: the stock median over this implementation's p80 and p20
                lo = [y - y * points[shapes[i]]["median_ms"] / points[shapes[i]]["p80_ms"] for i, y in zip(xs, ys)]
                hi = [y * points[shapes[i]]["median_ms"] / points[shapes[i]]["p20_ms"] - y for i, y in zip(xs, ys)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=impl, color=color)
        ax.set_title(_panel_title(subject, phase, depth, activation) + ("" if dtype == "float32" else f", {dtype}"),
                     fontsize=10)
        ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")  # ratios: 2x faster and 2x slower lie equally far from 1
        low, high = ax.get_ylim()
        ticks = [t for t in _RATIO_TICKS if low <= t <= high]
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_ylabel(f"x vs {'the seed' if vs_seed else 'stock'} (>1 better, log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    m, c = results["machine"], results["config"]
    fig.suptitle(f"dynnet_ext vs stock PyTorch on {c['device']} ({m['gpu'] or m['cpu_model']}, "
                 f"{c['threads']} threads), "
                 f"torch {m['torch_version']}, commit {(m['git_commit'] or 'unknown')[:10]}; "
                 "shapes: layer batch x in x out, net N x D_in x H, mlp tokens x d_model x hidden", fontsize=10)
    fig.savefig(path, dpi=110)
