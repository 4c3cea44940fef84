"""Stock PyTorch versions of everything dynnet_ext fuses: what every test and benchmark
compares against. No dynnet_ext code is used here."""

import random

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu", "none")


def linear_act(x, weight, bias=None, activation="relu"):
    """act(x @ weight.T + bias) with stock ops. x: (*, in), weight: (out, in), bias: (out,)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    y = F.linear(x, weight, bias)
    return F.relu(y) if activation == "relu" else y


def linear_act_backward(grad_y, x, weight, bias=None, activation="relu"):
    """(grad_x, grad_weight, grad_bias) of linear_act by stock autograd."""
    leaves = [t.detach().requires_grad_() for t in (x, weight)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    y = linear_act(*leaves[:2], leaves[2] if bias is not None else None, activation)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return grads[0], grads[1], grads[2] if bias is not None else None


def dynamic_net(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    """DynamicNet's forward as a function of its parameters, with stock ops (w_h, b_h may be None
    at depth 0). x: (*, D_in) -> (*, D_out)."""
    h = F.relu(F.linear(x, w_in, b_in))
    for _ in range(depth):
        h = F.relu(F.linear(h, w_h, b_h))
    return F.linear(h, w_out, b_out)


def draw_depth():
    """How many times the hidden layer is reused: 0 to 3, drawn with Python's `random`, as the seed does."""
    return random.randint(0, 3)


def check_depth(depth):
    if depth is None:
        return draw_depth()
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int or None (draw 0-3), got {depth!r}")
    return depth


class DynamicNet(nn.Module):
    """The seed's model: a ReLU MLP whose hidden layer is reused 0-3 times per forward.

    Same structure and attribute names as the original; `forward(x, depth)` also takes the
    depth, so fused and stock models can be compared at the same depth.
    """

    def __init__(self, D_in, H, D_out, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.input_layer = nn.Linear(D_in, H, **kw)
        self.hidden_layer = nn.Linear(H, H, **kw)
        self.output_layer = nn.Linear(H, D_out, **kw)
        self.relu = nn.ReLU()

    def forward(self, x, depth=None):
        t_relu = self.relu(self.input_layer(x))
        for _ in range(check_depth(depth)):
            t_relu = self.relu(self.hidden_layer(t_relu))
        return self.output_layer(t_relu)
