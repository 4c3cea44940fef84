"""Where the time goes in the calls the first H200 run found below stock (scripts/gpu_check.sh's
profile step): each case's forward + backward, fused and stock, under torch.profiler, printing
per case the wall time per iteration (host clock around a synchronized loop), the device time and
the kernels (name, launches, total device time) of each implementation, and the host-side ATen
ops that took the most time - what tells a device-bound gap (a slower or extra kernel) from a
host-bound one (more or slower calls between the kernels).

    python scripts/gpu_profile.py [--device cuda] [--iters 20]

Cases: the transformer MLP with GELU (768 -> 3072 -> 768) at 2048 tokens in bfloat16 and 512
tokens in float32 (0.84x and 0.91x stock on the H200), and the layer 64 x 1000 -> 100 float32
(1.71x: a case the fused op wins, for comparison). Without a GPU (--device cpu) it runs the same
steps on the CPU at a tenth of the tokens: a rehearsal of the script, not a measurement.
"""

import argparse
import sys
import time

import torch
from torch import nn

import dynnet_ext


def mlp(d_model, hidden, dtype, device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model)).to(device, dtype)


def layer(d_in, d_out, dtype, device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU()).to(device, dtype)


def cases(device):
    scale = 1 if device == "cuda" else 10
    return [
        ("mlp gelu 2048x768x3072 bfloat16", mlp(768, 3072, torch.bfloat16, device), 2048 // scale, 768),
        ("mlp gelu 512x768x3072 float32", mlp(768, 3072, torch.float32, device), 512 // scale, 768),
        ("layer relu 64x1000x100 float32", layer(1000, 100, torch.float32, device), 64, 1000),
    ]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def step(model, x):
    model(x).sum().backward()


def wall_ms(model, x, iters, device):
    for _ in range(3):
        step(model, x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(model, x)
    sync(device)
    return (time.perf_counter() - t0) / iters * 1e3


def profile(model, x, iters, device):
    """(device-kernel rows, top host-op rows) of `iters` steps: (name, calls, total us)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step(model, x)
        sync(device)
    kernels, host = [], []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        if device == "cuda" and device_us > 0 and e.cpu_time_total == 0:
            kernels.append((e.key, e.count, device_us))
        elif e.self_cpu_time_total > 0:
            host.append((e.key, e.count, e.self_cpu_time_total))
    return sorted(kernels, key=lambda r: -r[2]), sorted(host, key=lambda r: -r[2])[:12]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"gpu_profile: {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else " (rehearsal: not a measurement)")
          + f", torch {torch.__version__}, dynnet_ext kernels {dynnet_ext.has_kernels(args.device)}, {args.iters} iterations")
    for name, stock, tokens, d_in in cases(args.device):
        fused = dynnet_ext.fuse(stock)
        x = torch.randn(tokens, d_in, device=args.device, dtype=next(stock.parameters()).dtype)
        print(f"== {name}")
        for impl, model in (("fused", fused), ("stock", stock)):
            ms = wall_ms(model, x, args.iters, args.device)
            kernels, host = profile(model, x, args.iters, args.device)
            device_ms = sum(r[2] for r in kernels) / args.iters / 1e3
            print(f"  {impl}: wall {ms:.3f} ms/iter, device {device_ms:.3f} ms/iter, "
                  f"{sum(r[1] for r in kernels) / args.iters:.1f} kernels/iter")
            for key, count, us in kernels:
                print(f"    kernel {us / args.iters:9.1f} us/iter  x{count / args.iters:4.1f}  {key[:110]}")
            for key, count, us in host:
                print(f"    host   {us / args.iters:9.1f} us/iter  x{count / args.iters:4.1f}  {key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
