"""Stock PyTorch versions of everything dynnet_ext fuses: what every test and benchmark
compares against - the seed's stock model and the stock formulas.

Dependency direction: this module imports from production - the stock formulas from the op modules
(dynnet_ext.ops.activations, .linear_relu, .dynamic_net), the depth rule from models.py - and production never imports it."""

import torch
from torch import nn

from .models import check_depth
from .ops.dynamic_net import stock_dynamic_net as dynamic_net
from .ops.activations import ACTIVATIONS
from .ops.activations import stock_activation as activation
from .ops.linear_relu import stock_linear_act as linear_act

__all__ = ["ACTIVATIONS", "DynamicNet", "activation", "dynamic_net", "linear_act", "linear_act_backward"]


def linear_act_backward(grad_y, x, weight, bias=None, activation="relu"):
    """(grad_x, grad_weight, grad_bias) of linear_act by stock autograd."""
    leaves = [t.detach().requires_grad_() for t in (x, weight)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    y = linear_act(*leaves[:2], leaves[2] if bias is not None else None, activation)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return grads[0], grads[1], grads[2] if bias is not None else None


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
