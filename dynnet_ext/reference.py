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

__all__ = ["ACTIVATIONS", "DynamicNet", "activation", "dynamic_net", "dynamic_net_backward", "linear_act",
           "linear_act_backward"]


def linear_act_backward(grad_y, x, weight, bias=None, activation="relu"):
    """(grad_x, grad_weight, grad_bias) of linear_act by stock autograd."""
    leaves = [t.detach().requires_grad_() for t in (x, weight)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_())
    y = linear_act(*leaves[:2], leaves[2] if bias is not None else None, activation)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return grads[0], grads[1], grads[2] if bias is not None else None


class _SavedReLU(torch.autograd.Function):
    """A ReLU as the fused backward sees it: its output is the given saved activation h (what the
    fused forward computed), its backward ReLU's own, threshold_backward(grad, h, 0), into z."""

    @staticmethod
    def forward(z, h):
        return h.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, h, 0), None


def dynamic_net_backward(grad_out, x, w_in, b_in, w_h, b_h, w_out, b_out, acts, depth):
    """Every gradient of dynamic_net (x, w_in, b_in, w_h, b_h, w_out, b_out: zeros for an unused
    hidden layer, None for an absent w_h / b_h) by stock autograd in the inputs' dtype from the given
    activations acts = [h_0; ..; h_depth] (rows stacked, as the op returns them): each layer's
    output is its h_k, each ReLU's backward masks with it - what dynnet::dynamic_net_backward
    computes from them. Activations recomputed by stock's forward would test something else:
    where two correct forwards round a pre-activation near 0 to opposite sides (another order of
    additions: a GPU kernel against cuBLAS, in bfloat16 a few of the seed's 6400 units), that unit
    takes the other branch of ReLU and the gradients move by O(1), not by a rounding."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w_in, b_in, w_h, b_h, w_out, b_out)]
    x, w_in, b_in, w_h, b_h, w_out, b_out = leaves
    hs = acts.reshape(depth + 1, *x.shape[:-1], w_in.shape[0])
    h = _SavedReLU.apply(linear_act(x, w_in, b_in, "none"), hs[0])
    for k in range(1, depth + 1):
        h = _SavedReLU.apply(linear_act(h, w_h, b_h, "none"), hs[k])
    out = linear_act(h, w_out, b_out, "none")
    present = [p for p in leaves if p is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out, allow_unused=True, materialize_grads=True))
    return [None if p is None else next(grads) for p in leaves]


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
