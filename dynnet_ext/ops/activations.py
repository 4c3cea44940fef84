"""The activations a fused layer applies, and each one's stock formula, stated once.

    relu       F.relu                          in the kernels' store (torch.ops.dynnet.linear_relu)
    gelu       F.gelu (exact, erf)             stock's op after the fused linear ('none')
    gelu_tanh  F.gelu(approximate="tanh")      stock's op after the fused linear ('none')
    silu       F.silu                          stock's op after the fused linear ('none')
    none       the identity                    the kernels (no activation)

KERNEL_ACTIVATIONS are the ones torch.ops.dynnet.linear_relu takes. The others run as the fused
linear followed by stock's own activation op: bit for bit stock's activation and derivative, and
the saved tensors are stock's (x and W by the linear, the pre-activation z by the activation)."""

import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "none")
KERNEL_ACTIVATIONS = ("relu", "none")


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
