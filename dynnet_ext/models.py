"""DynamicNet on fused layers: the seed's model (a ReLU MLP that reuses its hidden layer a
random 0-3 times per forward), with the seed's attribute names, so a checkpoint of the stock
model (dynnet_ext.reference.DynamicNet, or the seed's own class) loads unchanged.

The depth rule (check_depth, draw_depth) lives here, with the model; dynnet_ext.reference's stock
model imports it from here, never the other way round."""

import random
import sys

from torch import nn

from . import functional
from .nn import FusedLinear, FusedLinearReLU

FUSIONS = ("network", "layer")


def draw_depth():
    """How many times the hidden layer is reused: 0 to 3, drawn with Python's `random`, as the seed does."""
    return random.randint(0, 3)


def check_depth(depth):
    """The depth a forward runs at: `depth` itself (a non-negative int), or a draw when None."""
    if depth is None:
        return draw_depth()
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int or None (draw 0-3), got {depth!r}")
    return depth


class DynamicNet(nn.Module):
    """x: (*, D_in) -> (*, D_out). forward(x, depth=None): depth None draws 0-3 with Python's
    `random` (as the seed does); an int uses that many hidden-layer passes.

    fusion="network" (default): the whole forward is one fused op and the whole backward one
    more (dynnet_ext.functional.dynamic_net), with the shared hidden layer's gradients summed
    inside it. fusion="layer": one fused Linear+ReLU op per layer, as the submodules compute
    when called. Both give stock PyTorch's results. The submodules (input_layer, hidden_layer,
    output_layer) hold the parameters either way; with fusion="network" their forward hooks
    are not called, since the network does not call them - except FSDP2's (fully_shard), which
    the network runs itself (see _fsdp_forward).
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
        modules = self._modules  # nn.Module.__getattr__ costs ~0.7 us an attribute: read the dicts
        inp, hid, out = modules["input_layer"], modules["hidden_layer"], modules["output_layer"]
        # At depth 0 the hidden layer is left out of the graph, as in the stock model: its
        # gradients stay None and DDP's find_unused_parameters sees it unused.
        if not depth:
            hid = None
        # FSDP2's module class (torch >= 2.6); no layer is sharded unless FSDP was imported.
        fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
        if fsdp_module is not None and (isinstance(inp, fsdp_module) or isinstance(hid, fsdp_module)
                                        or isinstance(out, fsdp_module)):
            sharded = [layer for layer in (inp, hid, out) if isinstance(layer, fsdp_module)]
            return _fsdp_forward(sharded, _network, x, inp, hid, out, depth)
        return _network(x, inp, hid, out, depth)

    def __setstate__(self, state):
        state.setdefault("fusion", "network")  # a model pickled before the flag existed
        super().__setstate__(state)

    def extra_repr(self):
        return f"fusion={self.fusion!r}"


def _param(layer, name):
    """layer.<name>: from the module's parameter dict when it holds it (a dict lookup instead of
    nn.Module.__getattr__'s ~0.7 us: a third of the op's Python overhead at 6 parameters), else
    through the attribute (a parametrized layer's weight is a property, not in the dict)."""
    params = layer._parameters
    return params[name] if name in params else getattr(layer, name)


def _network(x, inp, hid, out, depth):
    """The whole network in one op, with the layers' parameters as they are now (hid None: depth 0)."""
    w_h, b_h = (_param(hid, "weight"), _param(hid, "bias")) if hid is not None else (None, None)
    params = (_param(inp, "weight"), _param(inp, "bias"), w_h, b_h, _param(out, "weight"), _param(out, "bias"))
    try:
        return functional.dynamic_net(x, *params, depth)
    except RuntimeError as exc:
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor and not isinstance(x, dtensor.DTensor) and any(isinstance(p, dtensor.DTensor) for p in params):
            raise RuntimeError(
                "DynamicNet(fusion='network') got DTensor parameters (tensor-parallel, e.g. from "
                "parallelize_module) and a plain input: the whole network runs as one op, which has no "
                "tensor-parallel form (the hidden layer feeds itself, so every layer would need the whole "
                "activation). Use DynamicNet(..., fusion='layer') with dynnet_ext.parallel.ColwiseParallel / "
                "RowwiseParallel, or FSDP (fully_shard), which gathers the parameters for the op.") from exc
        raise


# FSDP2 and fusion="network": the op never calls the layers, so FSDP's forward hooks (gather, reshard, re-gather
# and reduce-scatter around the backward) would not run; running each sharded layer's own hooks around the one
# op lets FSDP do all of it as for a layer called normally (the alternatives weighed: README, "Scaling out").
# The hooks are FSDP's private _pre_forward/_post_forward: tests/test_fsdp.py checks the behaviour on every run.


def _fsdp_forward(layers, fn, x, *args):
    """fn(x, *args) between the FSDP pre- and post-forward hooks of each of `layers`
    (FSDPModules), which see x as the layer's input."""
    states = [(layer, layer._get_fsdp_state()) for layer in layers]
    for layer, state in states:
        (x,), _ = state._pre_forward(layer, (x,), {})  # gather; cast x; tie the post-backward reduce-scatter to x
    y = fn(x, *args)
    for layer, state in states:
        y = state._post_forward(layer, (x,), y)  # reshard; register the re-gather before backward
    return y
