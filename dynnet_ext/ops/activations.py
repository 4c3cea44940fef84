"""The activations a fused layer applies, and each one's stock formula, stated once.

    relu       F.relu                          in the GEMM's store
    gelu       F.gelu (exact, erf)             the CPU engine's own pass after its GEMM; stock's
    gelu_tanh  F.gelu(approximate="tanh")        op after ATen's GEMM (large products, float64,
    silu       F.silu                            no AVX2); CUDA: the custom kernels' store in
                                                 stock's CUDA formulas, stock's op after cuBLAS;
                                                 the backward saves z
    none       the identity                    the kernels (no activation)

torch.ops.dynnet.linear_relu takes all five. Its backward needs y for ReLU (the mask) and the
pre-activation z for the smooth ones (SMOOTH_ACTIVATIONS), which torch.ops.dynnet.linear_act
returns beside y; the saved tensors are then stock's nn.Linear + activation's (x and W, and z).
The CPU kernels compute GELU and SiLU in float32 with relative accuracy in the tails, where
stock's float32 formulas 0.5 z (1 + erf(z / sqrt 2)) and 0.5 z (1 + tanh(u)) cancel: results
within a few float32 ulp of the exact value, not stock's bits (csrc/cpu/activation_kernel.h;
tests/test_activations.py measures both against float64).
Under a torch.func transform or forward AD the smooth ones run as the fused 'none' op followed by
stock's activation op (the Python Functions state formulas for 'relu' and 'none' only:
FUNCTION_ACTIVATIONS)."""

import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "none")
SMOOTH_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
FUNCTION_ACTIVATIONS = ("relu", "none")


def check_activation(activation):
    """ValueError unless `activation` is one of ACTIVATIONS."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def stock_activation(z, activation):
    """act(z) with stock's op. z: any shape -> the same shape."""
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "none":
        return z
    check_activation(activation)  # raises: not an activation
