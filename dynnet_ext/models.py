"""DynamicNet on fused layers: the seed's model (a ReLU MLP that reuses its hidden layer a
random 0-3 times per forward), with the seed's attribute names, so a checkpoint of the stock
model (dynnet_ext.reference.DynamicNet, or the seed's own class) loads unchanged."""

from torch import nn

from .nn import FusedLinear, FusedLinearReLU
from .reference import check_depth


class DynamicNet(nn.Module):
    """x: (*, D_in) -> (*, D_out). forward(x, depth=None): depth None draws 0-3 with Python's
    `random` (as the seed does); an int uses that many hidden-layer passes."""

    def __init__(self, D_in, H, D_out, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.input_layer = FusedLinearReLU(D_in, H, **kw)
        self.hidden_layer = FusedLinearReLU(H, H, **kw)
        self.output_layer = FusedLinear(H, D_out, **kw)

    def forward(self, x, depth=None):
        h = self.input_layer(x)
        for _ in range(check_depth(depth)):
            h = self.hidden_layer(h)
        return self.output_layer(h)
