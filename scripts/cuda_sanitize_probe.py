"""A few CUDA op calls that reach every kernel of the CUDA paths, for compute-sanitizer
(scripts/gpu_check.sh runs it under memcheck, racecheck, synccheck and initcheck):

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/cuda_sanitize_probe.py

Each forced path (custom, vendor) and the automatic rule; float32 and bfloat16; the layer ops at
tile edges with ReLU and a smooth activation (forward, backward with every gradient) and the network ops on their one-launch
kernels (an H past 256 takes the chain of layer calls). Results are checked against
dynnet_ext.reference (the layers in float64, the network in its own dtype, as the tests do), with
float32's and bfloat16's tolerances, so a kernel that runs clean but computes wrong fails too. Small on purpose: every CUDA call is slow under the tools.
Exit 0 when every result matched, 1 otherwise (the tools' own errors exit 9).
`--rehearse` runs the same calls on the CPU ops (no path switch): the script's own logic, checked
without a GPU."""

import sys

import torch

import dynnet_ext
from dynnet_ext import ops, reference

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=3e-2)}
# M, K, N: partial tiles in every dimension; each shape with ReLU and with a smooth activation
# (the epilogue that writes z beside y, the derivative applied as grad_y is loaded).
LAYERS = [(130, 97, 100, "gelu"), (66, 40, 65, "silu")]
NETS = [(37, 45, 251, 7, 2), (9, 13, 5, 3, 3), (11, 6, 257, 3, 1)]  # N, D_in, H, D_out, depth


def close(name, got, want, dtype, failures):
    if not torch.allclose(got.double().cpu(), want.double().cpu(), **TOL[dtype], equal_nan=True):
        failures.append(f"{name}: max |diff| {(got.double().cpu() - want.double().cpu()).abs().max():.3g}")


def probe(path, dtype, failures, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)
    for M, K, N, smooth in LAYERS:
        x, w, b, gy = rand(M, K), rand(N, K) / K**0.5, rand(N), rand(M, N)
        up = [t.double() for t in (x, w, b)]
        for act in ("relu", smooth):
            if act == "relu":
                y = saved = torch.ops.dynnet.linear_relu(x, w, b, act)
            else:
                y, saved = torch.ops.dynnet.linear_act(x, w, b, act)
                close(f"{path} {dtype} linear_act z {M}x{K}x{N}", saved, reference.linear_act(*up, "none"), dtype,
                      failures)
            grads = torch.ops.dynnet.linear_relu_backward(gy, x, w, saved, act, [True, True, True])
            close(f"{path} {dtype} {act} {M}x{K}x{N}", y, reference.linear_act(*up, act), dtype, failures)
            for name, got, want in zip(("grad_x", "grad_w", "grad_b"), grads,
                                       reference.linear_act_backward(gy.double(), *up, act)):
                close(f"{path} {dtype} {act} {name} {M}x{K}x{N}", got, want, dtype, failures)
    for n, d_in, h, d_out, depth in NETS:
        params = [rand(h, d_in) / d_in**0.5, rand(h), rand(h, h) / h**0.5, rand(h), rand(d_out, h) / h**0.5,
                  rand(d_out)]
        x = rand(n, d_in)
        out, acts = torch.ops.dynnet.dynamic_net(x, *params, depth)
        gout = rand(*out.shape)
        grads = torch.ops.dynnet.dynamic_net_backward(gout, x, params[0], params[2], params[4], acts, depth, [True] * 7)
        # Stock in the same dtype (it rounds each layer's output to the dtype, as the kernels do);
        # the gradients from the op's own activations (reference.dynamic_net_backward says why).
        close(f"{path} {dtype} dynamic_net {n}x{d_in}x{h}x{d_out} d{depth}", out,
              reference.dynamic_net(x, *params, depth), dtype, failures)
        for i, (got, exp) in enumerate(zip(grads, reference.dynamic_net_backward(gout, x, *params, acts, depth))):
            close(f"{path} {dtype} dynamic_net grad {i} {n}x{d_in}x{h}x{d_out} d{depth}", got, exp, dtype, failures)


def main():
    if "--rehearse" in sys.argv[1:]:
        failures = []
        for dtype in (torch.float32, torch.bfloat16):
            probe("cpu", dtype, failures, device="cpu")
        print("\n".join(failures) or "cuda_sanitize_probe --rehearse: every CPU result matches the reference")
        return 1 if failures else 0
    if not (torch.cuda.is_available() and dynnet_ext.BUILD_INFO.get("cuda_kernels")):
        print("cuda_sanitize_probe: no CUDA GPU visible or no CUDA kernels built: nothing to probe")
        return 0
    failures = []
    for path in ("custom", "vendor", "auto"):
        previous = ops.set_cuda_path(path)
        try:
            for dtype in (torch.float32, torch.bfloat16):
                probe(path, dtype, failures)
        finally:
            ops.set_cuda_path(previous)
    torch.cuda.synchronize()
    print("\n".join(failures) or "cuda_sanitize_probe: every result matches the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
