"""The crossover sweep of the CUDA paths: each path forced, float32 / tf32 / bfloat16 / float16,
layer and network, from the seed's shapes to 4096^3 (scripts/gpu_model.py's LAYER_SWEEP and
NET_SWEEP), timed on the GPU; the thresholds fitted from the measurements (gpu_model.fit, as the
model's are) go to one JSON file that scripts/apply_cuda_thresholds.py reads:

    python scripts/cuda_sweep.py --out DIR [--budget SECONDS]   # on a GPU: DIR/thresholds.json
    python scripts/cuda_sweep.py --out DIR --dry-run            # no GPU: the model's predictions
                                                                # stand in for the timings
    python scripts/apply_cuda_thresholds.py DIR/thresholds.json # measured defaults in the source

thresholds.json: {"source", "table" (the entries measured; a precision not measured is null and
keeps its default), "rows" (every timing: kind, shape, precision, path, phase, microseconds),
"probes" (numerics of vendor epilogues the paths do not use yet: cuBLASLt's GELU against stock's
exact and tanh GELU, lt_gelu_agreement; empty in a dry run)}.
A timing is the mean per call of a stream of back-to-back calls (CUDA events around the stream,
median of 5 streams after warm-up): host and GPU overlap as in training, so a host-bound call is
measured as such. The budget stops the sweep early (largest shapes last); what was measured is
still fitted and written. float64 is not swept: its defaults stay the model's.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: gpu_model

import gpu_model  # noqa: E402
from dynnet_ext import ops  # noqa: E402

SWEPT = ("float32", "tf32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _set_tf32(on):
    """TF32 for float32 GEMMs the way current torch spells it (the legacy flag where there is no other)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on


def time_stream(fn, calls=5, streams=5):
    """Mean microseconds per call of `calls` back-to-back calls, median over `streams`."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(streams):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def _layer_calls(M, K, N, dtype):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", dtype=dtype)
    y = torch.ops.dynnet.linear_relu(x, w, b, "relu")
    gy = torch.randn_like(y)
    return (lambda: torch.ops.dynnet.linear_relu(x, w, b, "relu"),
            lambda: torch.ops.dynnet.linear_relu_backward(gy, x, w, y, "relu", [True, True, True]))


def _net_call(shape, dtype):
    M, D_in, H, D_out, depth = shape
    x = torch.randn(M, D_in, device="cuda", dtype=dtype)
    p = [torch.randn(H, D_in), torch.randn(H), torch.randn(H, H), torch.randn(H), torch.randn(D_out, H), torch.randn(D_out)]
    w_in, b_in, w_h, b_h, w_out, b_out = [(t / t.shape[-1] ** 0.5).to("cuda", dtype) for t in p]
    if depth == 0:  # the op takes no hidden layer then
        w_h = b_h = None

    def step():
        out, acts = torch.ops.dynnet.dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth)
        torch.ops.dynnet.dynamic_net_backward(out, x, w_in, w_h, w_out, acts, depth, [False] + [True] * 6)
    return step


class Sweep:
    """Collects timings (GPU or model), then fits and writes the thresholds."""

    def __init__(self, dry_run, budget):
        self.dry_run, self.deadline = dry_run, time.time() + budget
        self.rows, self.skipped = [], 0

    def out_of_time(self):
        return time.time() > self.deadline

    def add(self, kind, shape, precision, path, phase, us):
        self.rows.append({"kind": kind, "shape": list(shape), "precision": precision, "path": path, "phase": phase,
                          "us": round(us, 3)})

    # ---- measuring ----
    def layers(self, precision):
        for shape in gpu_model.LAYER_SWEEP:
            if self.out_of_time():
                self.skipped += 1
                continue
            for path in ("custom", "vendor"):
                if self.dry_run:
                    fwd = gpu_model.layer(*shape, precision, path).observed * 1e6
                    bwd = gpu_model.layer(*shape, precision, path, backward=True).observed * 1e6
                else:
                    ops.set_cuda_path(path)
                    f, b = _layer_calls(*shape, DTYPES[precision])
                    fwd, bwd = time_stream(f), time_stream(b)
                self.add("layer", shape, precision, path, "forward", fwd)
                self.add("layer", shape, precision, path, "backward", bwd)

    def networks(self, precision, layer_table):
        for shape in gpu_model.NET_SWEEP:
            if self.out_of_time():
                self.skipped += 1
                continue
            paths = ("one-launch", "chain") if gpu_model.net_fits(*shape[:4]) else ("chain",)
            for path in paths:
                if self.dry_run:
                    us = sum(c.observed for c in gpu_model.net_fused(shape, precision, layer_table, path)) * 1e6
                else:
                    # one-launch: forced custom (the one-launch kernels wherever they fit); chain: the
                    # rule with the one-launch threshold at 0, its layers on the measured layer rule.
                    ops.set_cuda_path("custom" if path == "one-launch" else "auto")
                    ops.set_cuda_dispatch_table({**{k: v for k, v in layer_table.items() if k.startswith("layer_")},
                                                 "net_one_launch_max_flops": {precision: 0.0}})
                    us = time_stream(_net_call(shape, DTYPES[precision]))
                self.add("network", shape, precision, path, "forward+backward", us)

    # ---- fitting ----
    def fit_layers(self, precision, phase):
        by_shape = {}
        for r in self.rows:
            if r["kind"] == "layer" and r["precision"] == precision and r["phase"] == phase:
                by_shape.setdefault(tuple(r["shape"]), {})[r["path"]] = r["us"]
        return gpu_model.fit([(2.0 * m * k * n, t["custom"], t["vendor"]) for (m, k, n), t in by_shape.items()
                              if "custom" in t and "vendor" in t])

    def fit_networks(self, precision):
        by_shape = {}
        for r in self.rows:
            if r["kind"] == "network" and r["precision"] == precision:
                by_shape.setdefault(tuple(r["shape"]), {})[r["path"]] = r["us"]
        return gpu_model.fit([(2.0 * s[0] * (s[1] * s[2] + s[4] * s[2] ** 2 + s[2] * s[3]), t["one-launch"], t["chain"])
                              for s, t in by_shape.items() if "one-launch" in t and "chain" in t])

    def run(self, precisions=SWEPT):
        table = {"layer_forward_custom_max_flops": {}, "layer_backward_custom_max_flops": {},
                 "net_one_launch_max_flops": {}}
        live = ops.cuda_dispatch_table() if not self.dry_run else gpu_model.thresholds()["table"]
        for p in precisions:
            if not self.dry_run:
                _set_tf32(p == "tf32")
            self.layers(p)
            for phase, key in (("forward", "layer_forward_custom_max_flops"), ("backward", "layer_backward_custom_max_flops")):
                table[key][p] = self.fit_layers(p, phase)
            # The networks' chain runs its layers on the thresholds just measured (else the defaults).
            layer_table = {k: {**live[k], **{q: v for q, v in table[k].items() if v is not None}}
                           for k in ("layer_forward_custom_max_flops", "layer_backward_custom_max_flops")}
            layer_table["net_one_launch_max_flops"] = live["net_one_launch_max_flops"]
            self.networks(p, layer_table)
            table["net_one_launch_max_flops"][p] = self.fit_networks(p)
        if not self.dry_run:
            _set_tf32(False)
            ops.set_cuda_path("auto")
            ops.reset_cuda_dispatch_table()
            table["lt_relu_keeps_nan"] = lt_relu_keeps_nan()
        return table


def lt_relu_keeps_nan():
    """Whether cuBLASLt's RELU_BIAS epilogue (ATen's _addmm_activation) keeps NaN in every swept
    dtype, as torch.relu does: only then may the vendor forward use it."""
    keeps = True
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(64, 128, device="cuda", dtype=dtype)
        a[3, 5] = float("nan")
        b, bias = torch.randn(128, 96, device="cuda", dtype=dtype), torch.randn(96, device="cuda", dtype=dtype)
        got, want = torch._addmm_activation(bias, a, b), torch.relu(torch.addmm(bias, a, b))
        keeps = keeps and bool(torch.equal(got.isnan(), want.isnan()))
    return keeps


def lt_gelu_agreement(device="cuda"):
    """How cuBLASLt's GELU_BIAS epilogue (ATen's _addmm_activation(use_gelu=True) on CUDA: GELU in
    the GEMM's store) compares with stock's addmm + F.gelu, exact and tanh-approximated, per swept
    dtype - what a vendor forward would have to match before it could use the epilogue for
    'gelu' or 'gelu_tanh' (until a GPU has shown that, the fused layers keep torch's activation
    after the GEMM). The pre-activations are a sweep of [-10, 10] and NaN, +-inf, made exact by
    the product (x times 1 plus 0 times 0, bias 0). Returns {dtype: {"gelu" | "gelu_tanh":
    {"max_ulp": largest difference in units of the dtype's spacing at stock's value, "max_abs":
    largest absolute difference, "nan_inf_as_stock": whether NaN and +-inf land where stock's
    do}}}. device="cpu" rehearses the code: ATen's CPU _addmm_activation is addmm then the exact
    gelu, so its "gelu" entries are 0."""
    import torch.nn.functional as F

    report = {}
    for name in ("float32", "bfloat16", "float16"):
        dtype = DTYPES[name]
        x = torch.cat([torch.linspace(-10, 10, 20001), torch.tensor([float("nan"), float("inf"), float("-inf")])])
        a = torch.stack([x, torch.zeros_like(x)], 1).to(device=device, dtype=dtype)
        b = torch.zeros(2, 8, device=device, dtype=dtype)
        b[0] = 1
        bias = torch.zeros(8, device=device, dtype=dtype)
        got = torch._addmm_activation(bias, a, b, use_gelu=True).double()
        z = torch.addmm(bias, a, b)
        tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
        report[name] = {}
        for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
            want = F.gelu(z, approximate=approximate).double()
            finite = want.isfinite() & got.isfinite()
            diff = (got - want).abs()[finite]
            spacing = torch.exp2(torch.floor(torch.log2(want.abs()[finite].clamp_min(tiny)))) * eps
            infinite = want.isinf() | got.isinf()
            report[name][act] = {
                "max_ulp": float((diff / spacing).max()),
                "max_abs": float(diff.max()),
                "nan_inf_as_stock": bool(torch.equal(got.isnan(), want.isnan()) and torch.equal(got[infinite], want[infinite])),
            }
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for thresholds.json")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of sweeping (default 90)")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the model's predictions stand in for timings")
    parser.add_argument("--precisions", default=",".join(SWEPT), help=f"subset of {','.join(SWEPT)}")
    args = parser.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [p for p in precisions if p not in SWEPT]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {SWEPT}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible: run on the GPU, or rehearse with --dry-run")
    if not args.dry_run and not ops.has_kernels("cuda"):
        parser.error("dynnet_ext has no CUDA kernels in this build: build it with CUDA first")
    start = time.time()
    sweep = Sweep(args.dry_run, args.budget)
    table = sweep.run(precisions)
    if args.dry_run:
        source = "dry run: the performance model's predictions in place of timings (not measured)"
    else:
        source = (f"measured on {torch.cuda.get_device_name(0)} by scripts/cuda_sweep.py, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, commit {os.environ.get('GPU_CHECK_COMMIT', '?')}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "thresholds.json")
    # Numerics of vendor epilogues the paths do not use yet, for the record (not a table entry).
    probes = {} if args.dry_run else {"lt_gelu": lt_gelu_agreement()}
    with open(path, "w") as f:
        json.dump({"source": source, "table": table, "rows": sweep.rows, "probes": probes,
                   "skipped_shapes": sweep.skipped, "seconds": round(time.time() - start, 1)}, f, indent=1)
        f.write("\n")
    print(f"cuda_sweep: {len(sweep.rows)} timings, {sweep.skipped} shapes left out by the budget, "
          f"{time.time() - start:.0f} s; wrote {path}")
    for key in ("layer_forward_custom_max_flops", "layer_backward_custom_max_flops", "net_one_launch_max_flops"):
        print(f"  {key:34s} " + "  ".join(f"{p} {v if v is None else f'{v:.2g}'}" for p, v in table[key].items()))
    for name, agreement in probes.items():
        print(f"  probe {name}: {json.dumps(agreement)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
