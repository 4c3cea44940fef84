"""Modules: drop-in replacements for nn.Linear (FusedLinear), nn.Linear + nn.ReLU
(FusedLinearReLU), nn.Linear + nn.GELU (FusedLinearGELU) and nn.Linear + nn.SiLU
(FusedLinearSiLU). Same constructor, parameter names, shapes and initialisation as nn.Linear,
so state_dicts load both ways and the same seed gives the same weights."""

import math

import torch
from torch import nn

from . import functional

__all__ = ["FusedLinear", "FusedLinearGELU", "FusedLinearReLU", "FusedLinearSiLU"]

_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


class FusedLinear(nn.Module):
    """y = x @ weight.T + bias. x: (*, in_features) -> (*, out_features).

    Not a subclass of nn.Linear on purpose: code that finds layers by isinstance(m, nn.Linear)
    and rewrites them (quantizers, LoRA injectors) would silently drop FusedLinearReLU's ReLU.
    """

    activation = "none"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation, in the same order (same random stream, same numbers).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear):
        """The fused layer computing what `linear` (an nn.Linear) computes, plus the ReLU for
        FusedLinearReLU (the GELU, SiLU for FusedLinearGELU, FusedLinearSiLU), with `linear`'s
        parameters: the same Parameter objects, so nothing is copied, no random numbers are
        drawn, and optimizers that hold them keep working."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        else:
            layer.register_parameter("bias", None)
        return layer.train(linear.training)

    def forward(self, x):
        return functional.fused_linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class FusedLinearReLU(FusedLinear):
    """y = relu(x @ weight.T + bias) in one fused op. x: (*, in_features) -> (*, out_features)."""

    activation = "relu"

    def forward(self, x):
        return functional.fused_linear_relu(x, self.weight, self.bias)


class FusedLinearGELU(FusedLinear):
    """y = gelu(x @ weight.T + bias), the GELU as nn.GELU(approximate): "none" (exact, erf) or
    "tanh". x: (*, in_features) -> (*, out_features). One fused op, GELU included; the backward
    saves the pre-activation (dynnet_ext.functional.fused_linear_act, dynnet_ext.ops.activations)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, approximate="none"):
        _check_approximate(approximate)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.approximate = approximate

    @classmethod
    def from_linear(cls, linear, approximate="none"):
        """FusedLinear.from_linear, with the GELU's `approximate` ("none" or "tanh")."""
        _check_approximate(approximate)
        layer = super().from_linear(linear)
        layer.approximate = approximate
        return layer

    @property
    def activation(self):
        return _GELU_APPROXIMATE[self.approximate]

    def forward(self, x):
        return functional.fused_linear_act(x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


class FusedLinearSiLU(FusedLinear):
    """y = silu(x @ weight.T + bias) = z * sigmoid(z), as nn.SiLU. x: (*, in_features) ->
    (*, out_features). One fused op, SiLU included; the backward saves the pre-activation
    (dynnet_ext.functional.fused_linear_act, dynnet_ext.ops.activations)."""

    activation = "silu"

    def forward(self, x):
        return functional.fused_linear_act(x, self.weight, self.bias, "silu")


def _check_approximate(approximate):
    if approximate not in _GELU_APPROXIMATE:
        raise ValueError(f"approximate must be 'none' or 'tanh' (as nn.GELU), got {approximate!r}")
