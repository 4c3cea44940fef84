"""The performance model of the CUDA paths on the H200: predicted times per kernel and path, the
predicted ratios against stock PyTorch, and the dispatch table's default thresholds derived from
them (csrc/cuda/paths.h).

    python scripts/gpu_model.py                         # the prediction tables and ratios
    python scripts/gpu_model.py --thresholds FILE       # the thresholds the model predicts, as JSON
    python scripts/gpu_model.py --write-headers         # the MODEL blocks of the kernel headers
    python scripts/gpu_model.py --check                 # exit 1 unless the headers' MODEL blocks are the model's
    python scripts/apply_cuda_thresholds.py --check FILE  # exit 1 unless paths.h's defaults are FILE's thresholds
    python scripts/apply_cuda_thresholds.py FILE        # a thresholds file made the source's defaults

A source-checkout tool (it reads and rewrites csrc/), not part of the installed package.

Everything here is a prediction from first principles (bytes over bandwidth, FLOPs over rate, plus
launch and latency terms), not a measurement: scripts/gpu_check.sh measures the same rows on the
GPU, and its crossover sweep fits measured thresholds with the same `fit` (scripts/cuda_sweep.py).

Model, per kernel launch (GPU side):
    t = t_launch + max(waves * t_block, FLOPs / (rate * eff), HBM bytes / HBM bandwidth)
    t_block = max(rounds * t_round, block FLOPs / (SM rate * eff / resident), block bytes / L2-to-SM)
rounds: the serial chain of slice loads a block waits for (each ~t_round, a dependent trip to L2
plus a barrier). cuBLAS: t_launch + max(setup, FLOPs / (rate * eff * fill), HBM), fill = the share
of SMs its (split-K) tiles occupy. Host side: each launch through our launchers costs host_launch,
each ATen call from C++ host_aten; an op called from Python adds its dispatch and autograd cost. A
call's observed time in a stream of calls is max(host, GPU): launches are asynchronous.
"""

import argparse
import json
import math
import os
import re
import sys

# ---- the machine (H200 SXM; measured where the device notes have a reading, datasheet otherwise) --
SMS = 132
CLOCK_HZ = 1.98e9                  # SM clock under load
HBM_BW = 4.3e12                    # device-to-device copy, bytes read + written (measured)
L2_SM_BW = 64 * CLOCK_HZ           # one SM's L2 read bandwidth, ~127 GB/s
FP32_RATE = 67e12                  # FP32 FMA FLOP/s, all SMs (datasheet)
FP64_RATE = 34e12                  # FP64 FMA, non-tensor (datasheet)
TENSOR_RATE = {"bfloat16": 790e12, "float16": 790e12,  # dense, measured for bf16 8192^3
               "tf32": 395e12, "float64": 67e12, "float32": FP32_RATE}
VENDOR_EFF = {"float32": 0.75, "float64": 0.8, "tf32": 0.7, "bfloat16": 0.85, "float16": 0.85}
ESIZE = {"float64": 8, "float32": 4, "tf32": 4, "float16": 2, "bfloat16": 2}

T_LAUNCH = 2.0e-6                  # a kernel's start-to-end floor on the GPU
T_ROUND = 0.4e-6                   # one slice round: load issue to data in shared memory, barrier
T_VENDOR_MIN = 2.5e-6              # cuBLAS(Lt) on a small GEMM beyond the launch (split-K, setup)
HOST_LAUNCH = 2.5e-6               # our launcher: arguments, cudaLaunchKernel
HOST_ATEN = 5.0e-6                 # an ATen GEMM call from C++: dispatcher, cuBLASLt descriptors, launch
HOST_ATEN_EW = 3.5e-6              # an ATen elementwise call from C++ (relu_)
FUSED_FWD_HOST = 8.0e-6            # a fused op from Python: autograd.Function, checks, dispatcher
FUSED_BWD_HOST = 5.0e-6            # its backward node, run by the autograd engine
STOCK_FWD_HOST = 7.0e-6            # an eager op from a Python module: dispatcher, autograd node, launch
STOCK_BWD_HOST = 4.0e-6            # a backward op run by the autograd engine, launch included

TILES = {"wide": (64, 64, 32, 1, 0.6), "split": (16, 16, 32, 8, 0.45)}  # BM, BN, BK, groups, FMA efficiency
WIDE_TILE_MIN_TILES = 132
NET_ROWS, NET_SLICE, NET_EFF = 8, 32, 0.3  # one-launch kernels: rows per block, slice, FMA efficiency
NET_MAX_WIDTH = 256

SEED = (64, 1000, 100, 10)         # M, D_in, H, D_out
BIG = (4096, 1024, 1024)           # M, K, N
PRECISIONS = ("float64", "float32", "tf32", "float16", "bfloat16")

# The crossover sweep's shapes: the model fits its thresholds on them, and the GPU check measures
# them (scripts/cuda_sweep.py), from the seed's layers to 4096^3. Layers (M, K, N); networks
# (M, D_in, H, D_out, depth).
LAYER_SWEEP = [(64, 100, 10), (64, 100, 100), (64, 1000, 100), (256, 1000, 256), (1024, 1024, 256),
               (1024, 1024, 1024), (4096, 1024, 1024), (4096, 4096, 4096)]
NET_SWEEP = [(64, 1000, 100, 10, d) for d in range(4)] + [(256, 1000, 256, 10, 3), (1024, 1024, 256, 256, 3),
                                                          (4096, 1024, 256, 256, 3), (4096, 1024, 1024, 1024, 1)]


def _sm_rate(precision):
    return (FP64_RATE if precision == "float64" else FP32_RATE) / SMS


class Cost:
    """A call's predicted cost: GPU seconds, host seconds, launches, and what sets the GPU time
    (FLOPs, HBM bytes, blocks of the largest launch, serial rounds of the longest block chain,
    the bound). observed = max(GPU, host)."""

    def __init__(self, gpu=0.0, host=0.0, launches=0, flops=0.0, hbm=0.0, blocks=0, rounds=0, bound="", note=""):
        self.gpu, self.host, self.launches, self.flops, self.hbm = gpu, host, launches, flops, hbm
        self.blocks, self.rounds, self.bound, self.note = blocks, rounds, bound, note

    def __add__(self, other):
        bounds = [b for c in (self, other) for b in c.bound.split(" + ") if b]
        return Cost(self.gpu + other.gpu, self.host + other.host, self.launches + other.launches,
                    self.flops + other.flops, self.hbm + other.hbm, max(self.blocks, other.blocks),
                    self.rounds + other.rounds, " + ".join(dict.fromkeys(bounds)),
                    "; ".join(n for n in (self.note, other.note) if n))

    @property
    def observed(self):
        return max(self.gpu, self.host)

    @property
    def limit(self):
        """What the observed time is set by: the host, or the GPU's bound."""
        return "host" if self.host > self.gpu else self.bound


def _launch(terms):
    """(seconds, bound) of one launch: the floor plus the largest of the named terms."""
    name, t = max(terms.items(), key=lambda kv: kv[1])
    return T_LAUNCH + t, (name if t > T_LAUNCH else "launch")


# ---- custom kernels (gemm.cuh) -------------------------------------------------------------------

def custom_group(problems, precision, colsums=()):
    """One gemm_group_kernel launch. problems: (rows, cols, red, masked); colsums: (red, cols, masked)."""
    e = ESIZE[precision]
    wide_tiles = sum(math.ceil(r / 64) * math.ceil(c / 64) for r, c, _, _ in problems)
    name = "wide" if wide_tiles >= WIDE_TILE_MIN_TILES else "split"
    bm, bn, bk, groups, eff = TILES[name]
    blocks, flops, hbm, t_block, rounds = 0, 0.0, 0.0, 0.0, 0
    resident_rate = _sm_rate(precision) * eff
    for rows, cols, red, masked in problems:
        slices = math.ceil(math.ceil(red / bk) / groups)
        blocks += math.ceil(rows / bm) * math.ceil(cols / bn)
        flops += 2.0 * rows * cols * red
        hbm += e * (rows * red * (2 if masked else 1) + cols * red + rows * cols)
        block_bytes = e * (bm * (2 if masked else 1) + bn) * red
        t_block = max(t_block, slices * T_ROUND, 2.0 * bm * bn * red / resident_rate, block_bytes / L2_SM_BW)
        rounds = max(rounds, slices)
    for red, cols, masked in colsums:
        chain = math.ceil(red / 8 / 4)  # 8 warps, 4 loads in flight per thread
        blocks += math.ceil(cols / 32)
        hbm += e * red * cols * (2 if masked else 1)
        t_block = max(t_block, chain * T_ROUND, e * red * 32 * (2 if masked else 1) / L2_SM_BW)
        rounds = max(rounds, chain)
    resident = min(2, max(1, math.ceil(blocks / SMS)))
    waves = math.ceil(blocks / (2 * SMS))
    t_chain = waves * t_block * resident / 2 if resident > 1 else waves * t_block
    gpu, bound = _launch({"block chain": t_chain, "FMA rate": flops / (SMS * resident_rate), "HBM": hbm / HBM_BW})
    return Cost(gpu, HOST_LAUNCH, 1, flops, hbm, blocks, rounds, bound, f"{blocks} {name}")


def custom_forward(M, K, N, precision):
    return custom_group([(M, N, K, False)], precision)


def custom_backward(M, K, N, precision, relu=True):
    return custom_group([(M, K, N, relu), (N, K, M, relu)], precision, colsums=[(M, N, relu)])


# ---- vendor path (vendor.cuh) ----------------------------------------------------------------------

def vendor_gemm(M, K, N, precision, host=HOST_ATEN):
    """cuBLAS(Lt): small outputs get small tiles and split-K (64 x 64 tiles, up to 8 K-splits of
    >= 256), so `fill` of the SMs work, each at the precision's rate and efficiency."""
    rate = TENSOR_RATE[precision] * VENDOR_EFF[precision]
    tiles = math.ceil(M / 64) * math.ceil(N / 64) * min(8, max(1, K // 256))
    e = ESIZE[precision]
    flops, hbm = 2.0 * M * K * N, e * (M * K + K * N + M * N)
    unit = "FMA rate" if precision in ("float32", "float64") else "tensor cores"
    gpu, bound = _launch({"setup": T_VENDOR_MIN, unit: flops / (rate * min(1.0, tiles / SMS)), "HBM": hbm / HBM_BW})
    return Cost(gpu, host, 1, flops, hbm, tiles, 0, bound)


def pass_cost(nbytes, host=HOST_LAUNCH):
    gpu, bound = _launch({"HBM": nbytes / HBM_BW})
    return Cost(gpu, host, 1, 0.0, nbytes, 0, 0, bound)


def vendor_forward(M, K, N, precision, relu=True):
    c = vendor_gemm(M, K, N, precision)  # bias in cuBLASLt's epilogue; the ReLU after it (unproven epilogue)
    return c + pass_cost(2 * ESIZE[precision] * M * N, HOST_ATEN_EW) if relu else c


def vendor_backward(M, K, N, precision, relu=True):
    e = ESIZE[precision]
    return pass_cost((3 if relu else 1) * e * M * N) + vendor_gemm(M, N, K, precision) + vendor_gemm(N, M, K, precision)


def layer(M, K, N, precision, path, backward=False, relu=True):
    if path == "custom":
        return custom_backward(M, K, N, precision, relu) if backward else custom_forward(M, K, N, precision)
    return vendor_backward(M, K, N, precision, relu) if backward else vendor_forward(M, K, N, precision, relu)


# ---- stock PyTorch (nn.Linear + nn.ReLU, eager) ------------------------------------------------------

def stock_forward(M, K, N, precision, relu=True):
    c = vendor_gemm(M, K, N, precision, host=STOCK_FWD_HOST)  # addmm, cuBLASLt bias epilogue
    return c + pass_cost(2 * ESIZE[precision] * M * N, STOCK_FWD_HOST) if relu else c


def stock_backward(M, K, N, precision, relu=True):
    e = ESIZE[precision]
    c = pass_cost(3 * e * M * N, STOCK_BWD_HOST) if relu else Cost()  # threshold_backward
    return (c + vendor_gemm(M, N, K, precision, STOCK_BWD_HOST) + vendor_gemm(N, M, K, precision, STOCK_BWD_HOST)
            + pass_cost(e * M * N, STOCK_BWD_HOST))  # grad_bias: a column sum


# ---- the network (dynamic_net.cuh) -------------------------------------------------------------------

def _net_layer_rounds(K, N, rows, precision, global_in, prefetch=True):
    e = ESIZE[precision]
    rounds = math.ceil(K / NET_SLICE)
    round_bytes = e * (N + (rows if global_in else 0)) * NET_SLICE
    round_compute = 2.0 * rows * N * NET_SLICE / (_sm_rate(precision) * NET_EFF)
    per = max(T_ROUND, round_compute, round_bytes / L2_SM_BW) if prefetch else T_ROUND + round_compute
    return rounds * per, rounds


def one_launch_forward(M, D_in, H, D_out, depth, precision):
    e = ESIZE[precision]
    blocks = math.ceil(M / NET_ROWS)
    parts = [_net_layer_rounds(D_in, H, NET_ROWS, precision, True)] + \
        [_net_layer_rounds(H, H, NET_ROWS, precision, False)] * depth + [_net_layer_rounds(H, D_out, NET_ROWS, precision, False)]
    t_block, rounds = sum(t for t, _ in parts), sum(r for _, r in parts)
    flops = 2.0 * M * (D_in * H + depth * H * H + H * D_out)
    hbm = e * (M * D_in + H * D_in + H * H + D_out * H + (depth + 1) * M * H + M * D_out)
    gpu, bound = _launch({"block chain": math.ceil(blocks / SMS) * t_block, "HBM": hbm / HBM_BW})
    return Cost(gpu, HOST_LAUNCH, 1, flops, hbm, blocks, rounds, bound, f"{blocks} blocks")


def one_launch_backward(M, D_in, H, D_out, depth, precision, grad_x=False):
    e = ESIZE[precision]
    blocks = math.ceil(M / NET_ROWS)
    parts = [_net_layer_rounds(D_out, H, NET_ROWS, precision, False, prefetch=False)] + \
        [_net_layer_rounds(H, H, NET_ROWS, precision, False, prefetch=False)] * depth + \
        ([_net_layer_rounds(H, D_in, NET_ROWS, precision, False, prefetch=False)] if grad_x else [])
    t_block, rounds = sum(t for t, _ in parts), sum(r for _, r in parts)
    flops = 2.0 * M * (D_out * H + depth * H * H + (D_in * H if grad_x else 0))
    hbm = e * (M * D_out + (depth + 1) * M * H * 2 + H * D_out + H * H)
    gpu, bound = _launch({"block chain": math.ceil(blocks / SMS) * t_block, "HBM": hbm / HBM_BW})
    chain = Cost(gpu, HOST_LAUNCH, 1, flops, hbm, blocks, rounds, bound, f"{blocks} blocks")
    weights = custom_group([(H, D_in, M, False), (H, H, depth * M, False), (D_out, H, M, False)], precision,
                           colsums=[(M, H, False), (depth * M, H, False), (M, D_out, False)])
    return chain + weights


def auto_layer(M, K, N, precision, table, backward=False, relu=True):
    key = "layer_backward_custom_max_flops" if backward else "layer_forward_custom_max_flops"
    path = "custom" if 2.0 * M * K * N <= table[key][precision] else "vendor"
    return layer(M, K, N, precision, path, backward, relu)


def chain_forward(M, D_in, H, D_out, depth, precision, table):
    c = auto_layer(M, D_in, H, precision, table)
    for _ in range(depth):
        c = c + auto_layer(M, H, H, precision, table)
    return c + auto_layer(M, H, D_out, precision, table, relu=False)


def chain_backward(M, D_in, H, D_out, depth, precision, table):
    c = auto_layer(M, H, D_out, precision, table, True, relu=False)
    for _ in range(depth):  # each use's weight and bias gradients added to the sums: two ATen adds
        c = c + auto_layer(M, H, H, precision, table, True) + pass_cost(3 * ESIZE[precision] * (H * H + H), 2 * HOST_ATEN_EW)
    return c + auto_layer(M, D_in, H, precision, table, True)


def net_fits(M, D_in, H, D_out):
    return min(M, D_in, H, D_out) > 0 and H <= NET_MAX_WIDTH and D_out <= NET_MAX_WIDTH


def net_path(shape, precision, table):
    M, D_in, H, D_out, depth = shape
    flops = 2.0 * M * (D_in * H + depth * H * H + H * D_out)
    ok = net_fits(M, D_in, H, D_out) and flops <= table["net_one_launch_max_flops"][precision]
    return "one-launch" if ok else "chain"


def net_fused(shape, precision, table, path=None):
    """(forward, backward) of the fused network op on `path` (default: the table's choice), host
    cost of the Python-side calls included."""
    path = path or net_path(shape, precision, table)
    if path == "one-launch":
        f, b = one_launch_forward(*shape, precision), one_launch_backward(*shape, precision)
    else:
        f, b = chain_forward(*shape, precision, table), chain_backward(*shape, precision, table)
    return Cost(host=FUSED_FWD_HOST) + f, Cost(host=FUSED_BWD_HOST) + b


def net_stock(shape, precision):
    M, D_in, H, D_out, depth = shape
    f = stock_forward(M, D_in, H, precision)
    b = stock_backward(M, D_in, H, precision)
    for _ in range(depth):
        f, b = f + stock_forward(M, H, H, precision), b + stock_backward(M, H, H, precision)
        b = b + pass_cost(3 * ESIZE[precision] * (H * H + H), 2 * STOCK_BWD_HOST)  # AccumulateGrad of the reuse
    return f + stock_forward(M, H, D_out, precision, relu=False), b + stock_backward(M, H, D_out, precision, relu=False)


def layer_fused(M, K, N, precision, table):
    return (Cost(host=FUSED_FWD_HOST) + auto_layer(M, K, N, precision, table),
            Cost(host=FUSED_BWD_HOST) + auto_layer(M, K, N, precision, table, True))


# ---- thresholds ------------------------------------------------------------------------------------

def fit(rows):
    """The FLOP threshold (custom / one-launch at or below it) that loses least against the faster
    path, summed over rows (flops, t_custom, t_other) as log(chosen / best); the smallest such
    threshold. Measured rows (the GPU sweep) fit the same way. None without rows."""
    rows = [(f, c, v) for f, c, v in rows if c > 0 and v > 0]
    if not rows:
        return None
    candidates = sorted({0.0} | {f for f, _, _ in rows})
    best = min(candidates, key=lambda t: sum(math.log((c if f <= t else v) / min(c, v)) for f, c, v in rows))
    if not best:
        return 0.0
    # Rounded up to 2 significant digits where that routes no row differently.
    scale = 10.0 ** (math.floor(math.log10(best)) - 1)
    rounded = float(f"{math.ceil(best / scale - 1e-9) * scale:.2g}")
    return rounded if rounded < min([f for f, _, _ in rows if f > best], default=math.inf) else best


def thresholds():
    table = {"layer_forward_custom_max_flops": {}, "layer_backward_custom_max_flops": {}, "net_one_launch_max_flops": {}}
    for p in PRECISIONS:
        table["layer_forward_custom_max_flops"][p] = fit(
            [(2.0 * m * k * n, custom_forward(m, k, n, p).observed, vendor_forward(m, k, n, p).observed)
             for m, k, n in LAYER_SWEEP])
        table["layer_backward_custom_max_flops"][p] = fit(
            [(2.0 * m * k * n, custom_backward(m, k, n, p).observed, vendor_backward(m, k, n, p).observed)
             for m, k, n in LAYER_SWEEP])
    for p in PRECISIONS:
        rows = []
        for s in NET_SWEEP:
            if net_fits(*s[:4]):
                one = sum((c.observed for c in net_fused(s, p, table, "one-launch")))
                chain = sum((c.observed for c in net_fused(s, p, table, "chain")))
                rows.append((2.0 * s[0] * (s[1] * s[2] + s[4] * s[2] ** 2 + s[2] * s[3]), one, chain))
        table["net_one_launch_max_flops"][p] = fit(rows)
    table["wide_tile_min_tiles"] = float(WIDE_TILE_MIN_TILES)
    return {"source": "model", "table": table}


# ---- tables: the kernel headers' MODEL blocks and the report -------------------------------------------

def _row(label, c):
    blocks = f"{c.blocks} {c.note.split()[-1]}" if c.note and c.launches == 1 else str(c.launches) + " launches"
    return (f"{label:34s} {blocks:>13s} {c.rounds:6d} {c.flops / 1e6:9.1f} {c.hbm / 1e6:7.2f} {c.gpu * 1e6:7.1f} "
            f"{c.host * 1e6:6.1f}  {c.limit}")


HEAD = f"{'call':34s} {'blocks':>13s} {'rounds':>6s} {'MFLOP':>9s} {'HBM MB':>7s} {'GPU us':>7s} {'host':>6s}  bound"


def _layer_shapes():
    M, D_in, H, D_out = SEED
    return [(M, D_in, H), (M, H, H), (M, H, D_out), BIG]


def gemm_block():
    lines = [HEAD]
    for p in ("float32", "bfloat16"):
        for m, k, n in _layer_shapes():
            for bwd in (False, True):
                c = layer(m, k, n, p, "custom", bwd)
                lines.append(_row(f"{m}x{k}->{n} {p} {'backward' if bwd else 'forward'}", c))
    return lines


def vendor_block():
    lines = [HEAD.replace("blocks", "launches")]
    for p in ("float32", "tf32", "bfloat16"):
        for m, k, n in _layer_shapes():
            for bwd in (False, True):
                c = layer(m, k, n, p, "vendor", bwd)
                lines.append(_row(f"{m}x{k}->{n} {p} {'backward' if bwd else 'forward'}", c).replace(" launches", ""))
    return lines


def net_block():
    table = thresholds()["table"]
    lines = [HEAD]
    M, D_in, H, D_out = SEED
    for p in ("float32", "bfloat16"):
        for d in range(4):
            s = (M, D_in, H, D_out, d)
            lines.append(_row(f"{M}x{D_in}x{H}x{D_out} d{d} {p} forward", one_launch_forward(*s, p)))
            lines.append(_row(f"{M}x{D_in}x{H}x{D_out} d{d} {p} backward", one_launch_backward(*s, p)))
    big = (BIG[0], BIG[1], BIG[2], BIG[2], 1)
    for p in ("float32", "bfloat16"):
        f, b = chain_forward(*big, p, table), chain_backward(*big, p, table)
        lines.append(_row(f"{'x'.join(map(str, big[:4]))} d1 {p} fwd (chain)", f))
        lines.append(_row(f"{'x'.join(map(str, big[:4]))} d1 {p} bwd (chain)", b))
    return lines


def ratios():
    """(label, stock us, fused us, predicted ratio) at the issue's shapes, on the paths the model's
    own thresholds choose. Op time only: the loss, the optimizer and the engine's fixed cost, which
    both pay, are left out."""
    table = thresholds()["table"]
    out = []
    for p in ("float32", "bfloat16"):
        for m, k, n in _layer_shapes():
            fused = sum(c.observed for c in layer_fused(m, k, n, p, table))
            stock = stock_forward(m, k, n, p).observed + stock_backward(m, k, n, p).observed
            out.append((f"layer {m}x{k}->{n} {p} fwd+bwd", stock, fused))
        for d in range(4):
            s = (*SEED, d)
            fused = sum(c.observed for c in net_fused(s, p, table))
            stock = sum(c.observed for c in net_stock(s, p))
            out.append((f"network {'x'.join(map(str, SEED))} depth {d} {p} fwd+bwd ({net_path(s, p, table)})",
                        stock, fused))
    return [(label, s * 1e6, f * 1e6, s / f) for label, s, f in out]


def report():
    lines = ["Predicted (not measured) H200 times. rounds: the longest serial chain of slice loads of one",
             "block; host: the launching side; bound: what sets the observed time.", "",
             "custom path (gemm.cuh):"] + ["  " + x for x in gemm_block()]
    lines += ["", "vendor path (vendor.cuh):"] + ["  " + x for x in vendor_block()]
    lines += ["", "network (dynamic_net.cuh):"] + ["  " + x for x in net_block()]
    lines += ["", "Predicted ratios, stock eager / fused (op time; predictions, not run on a GPU):"]
    lines += [f"  {label:58s} stock {s:7.1f} us  fused {f:7.1f} us  {r:5.2f}x" for label, s, f, r in ratios()]
    t = thresholds()["table"]
    lines += ["", "Default thresholds (FLOPs; custom / one-launch at or below):"]
    for key in ("layer_forward_custom_max_flops", "layer_backward_custom_max_flops", "net_one_launch_max_flops"):
        lines.append(f"  {key:34s} " + "  ".join(f"{p} {v:.2g}" for p, v in t[key].items()))
    return "\n".join(lines)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = {"csrc/cuda/gemm.cuh": gemm_block, "csrc/cuda/vendor.cuh": vendor_block,
           "csrc/cuda/dynamic_net.cuh": net_block}
MODEL_BLOCK = re.compile(r"// MODEL BEGIN[^\n]*\n(?://[^\n]*\n)*?// MODEL END\n")


def header_text(path, text):
    block = "// MODEL BEGIN (python scripts/gpu_model.py --write-headers; predictions, not measurements)\n"
    block += "".join(f"//   {line}".rstrip() + "\n" for line in HEADERS[path]()) + "// MODEL END\n"
    if not MODEL_BLOCK.search(text):
        raise SystemExit(f"{path}: no // MODEL BEGIN ... // MODEL END block")
    return MODEL_BLOCK.sub(lambda _: block, text, count=1)


def check(root=ROOT):
    """The problems: kernel headers whose MODEL block is not the model's. (Whether paths.h's
    defaults are the model's thresholds is scripts/apply_cuda_thresholds.py --check's question.)"""
    problems = []
    for rel in HEADERS:
        with open(os.path.join(root, rel)) as f:
            text = f.read()
        if header_text(rel, text) != text:
            problems.append(f"{rel}: its MODEL block differs from the model (python scripts/gpu_model.py --write-headers)")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--thresholds", metavar="FILE", help="write the predicted thresholds as JSON")
    parser.add_argument("--write-headers", action="store_true", help="rewrite the kernel headers' MODEL blocks")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the headers' MODEL blocks are the model's")
    args = parser.parse_args(argv)
    if args.thresholds:
        with open(args.thresholds, "w") as f:
            json.dump(thresholds(), f, indent=1)
            f.write("\n")
        print(f"wrote {args.thresholds}")
    elif args.write_headers:
        for rel in HEADERS:
            path = os.path.join(ROOT, rel)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(header_text(rel, text))
            print(f"{rel}: MODEL block written")
    elif args.check:
        problems = check()
        print("\n".join(problems) or "kernel headers agree with the model")
        return 1 if problems else 0
    else:
        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
