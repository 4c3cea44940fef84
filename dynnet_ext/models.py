"""DynamicNet on fused layers: the seed's model (a ReLU MLP that reuses its hidden layer a
random 0-3 times per forward), with the seed's attribute names, so a checkpoint of the stock
model (dynnet_ext.reference.DynamicNet, or the seed's own class) loads unchanged."""

from torch import nn

from . import functional
from .nn import FusedLinear, FusedLinearReLU
from .reference import check_depth

FUSIONS = ("network", "layer")


class DynamicNet(nn.Module):
    """x: (*, D_in) -> (*, D_out). forward(x, depth=None): depth None draws 0-3 with Python's
    `random` (as the seed does); an int uses that many hidden-layer passes.

    fusion="network" (default): the whole forward is one fused op and the whole backward one
    more (dynnet_ext.functional.dynamic_net), with the shared hidden layer's gradients summed
    inside it. fusion="layer": one fused Linear+ReLU op per layer, as the submodules compute
    when called. Both give stock PyTorch's results. The submodules (input_layer, hidden_layer,
    output_layer) hold the parameters either way; with fusion="network" their forward hooks
    are not called, since the network does not call them.
    """

    def __init__(self, D_in, H, D_out, device=None, dtype=None, fusion="network"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        kw = {"device": device, "dtype": dtype}
        self.input_layer = FusedLinearReLU(D_in, H, **kw)
        self.hidden_layer = FusedLinearReLU(H, H, **kw)
        self.output_layer = FusedLinear(H, D_out, **kw)

    def forward(self, x, depth=None):
        depth = check_depth(depth)
        if self.fusion == "layer":
            h = self.input_layer(x)
            for _ in range(depth):
                h = self.hidden_layer(h)
            return self.output_layer(h)
        inp, hid, out = self.input_layer, self.hidden_layer, self.output_layer
        # At depth 0 the hidden layer is left out of the graph, as in the stock model: its
        # gradients stay None and DDP's find_unused_parameters sees it unused.
        w_h, b_h = (hid.weight, hid.bias) if depth else (None, None)
        return functional.dynamic_net(x, inp.weight, inp.bias, w_h, b_h, out.weight, out.bias, depth)

    def __setstate__(self, state):
        state.setdefault("fusion", "network")  # a model pickled before the flag existed
        super().__setstate__(state)

    def extra_repr(self):
        return f"fusion={self.fusion!r}"
