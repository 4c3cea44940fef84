"""Tensor parallelism with the fused layers, and the DTensor sharding rules of dynnet's ops.

    from torch.distributed.tensor.parallel import parallelize_module
    from dynnet_ext.parallel import ColwiseParallel, RowwiseParallel
    parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})

ColwiseParallel and RowwiseParallel are torch's (torch.distributed.tensor.parallel), same
constructor arguments and behaviour, extended to FusedLinear and FusedLinearReLU / GELU / SiLU
(torch's accept only nn.Linear and nn.Embedding, by isinstance; the fused layers deliberately do
not subclass nn.Linear). They shard the parameters as torch does for nn.Linear - column-parallel:
weight and bias split by output features (Shard(0)); row-parallel: weight split by input features
(Shard(1)), bias replicated - and convert inputs and outputs the same way.

The sharding rules (register_sharding) tell DTensor how each op runs on local shards, so a
DTensor reaching an op computes there with dynnet's kernel and no communication:

    linear_relu        x              weight     bias       -> y
      replicated       Replicate      Replicate  Replicate     Replicate
      column-parallel  Replicate      Shard(0)   Shard(0)      Shard(-1)   ReLU is elementwise
      row-parallel     Shard(-1)      Shard(1)   Partial       Partial     activation 'none' only
      batch-parallel   Shard(0)       Replicate  Replicate     Shard(0)
    linear_act         as linear_relu for its activations (GELU, SiLU: elementwise), y and z alike
    dynamic_net        replicated, or batch-parallel (x Shard(0), weights replicated)

and the matching backward rules. Row-parallel sums partial products after the op, so the op
cannot apply a ReLU (relu(a) + relu(b) != relu(a + b)); its bias is Partial, i.e. DTensor splits
the replicated bias into shares that sum to it, so the bias is added once. Placements without a
rule (a row-parallel ReLU layer; a tensor-parallel DynamicNet, whose hidden layer feeds itself)
are redistributed by DTensor to a rule's placements, as for any op: RowwiseParallel refuses
FusedLinearReLU for that reason, and DynamicNet(fusion="network") given tensor-parallel
parameters says to use fusion="layer".

The rules are registered when this module is imported: by `import dynnet_ext` when DTensor
(torch.distributed.tensor) is already loaded then, else as soon as DTensor is imported.
"""

from functools import partial

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import style

from .nn import FusedLinear
from .ops import _C

__all__ = ["ColwiseParallel", "RowwiseParallel"]


def _fused_apply(parallel_style, module, device_mesh):
    """What torch's style does to an nn.Linear, done to a fused layer (same attributes): its own
    partition and input/output functions (torch internals, so tests/test_tensor_parallel.py
    checks the shards, placements and collectives they give)."""
    return distribute_module(
        module,
        device_mesh,
        parallel_style._partition_linear_fn,
        partial(parallel_style._prepare_input_fn, parallel_style.input_layouts, parallel_style.desired_input_layouts),
        partial(parallel_style._prepare_output_fn, parallel_style.output_layouts, parallel_style.use_local_output),
    )


class ColwiseParallel(style.ColwiseParallel):
    """torch.distributed.tensor.parallel.ColwiseParallel that also takes FusedLinear and
    FusedLinearReLU / GELU / SiLU: weight and bias sharded by output features, the input
    replicated, the output sharded on its last dimension (Shard(-1)) by default (the activations
    are elementwise). Same arguments (input_layouts, output_layouts, use_local_output)."""

    def _apply(self, module, device_mesh):
        if isinstance(module, FusedLinear):
            return _fused_apply(self, module, device_mesh)
        return super()._apply(module, device_mesh)


class RowwiseParallel(style.RowwiseParallel):
    """torch.distributed.tensor.parallel.RowwiseParallel that also takes FusedLinear: weight
    sharded by input features, bias replicated, the input sharded on its last dimension
    (Shard(-1)) by default, the partial outputs summed into a replicated output by default.
    Same arguments (input_layouts, output_layouts, use_local_output).

    FusedLinearReLU (and FusedLinearGELU, FusedLinearSiLU) is refused: a row-parallel layer's
    output is a sum over all ranks, and the activation cannot be applied to the parts before
    that sum."""

    def _apply(self, module, device_mesh):
        if isinstance(module, FusedLinear) and module.activation != "none":
            name, act = type(module).__name__, type(module).__name__.removeprefix("FusedLinear")
            raise ValueError(
                f"RowwiseParallel cannot shard a {name}: a row-parallel layer sums its output "
                f"over ranks and the {act} must come after that sum. Use ColwiseParallel for it (a "
                f"Megatron MLP is {name} column-parallel, then FusedLinear row-parallel), or "
                f"a FusedLinear row-parallel followed by the {act}.")
        if isinstance(module, FusedLinear):
            self.desired_input_layouts = (Shard(-1),)  # what torch's style sets for nn.Linear
            return _fused_apply(self, module, device_mesh)
        return super()._apply(module, device_mesh)


# Sharding rules: each returns [(output placements, input placements), ...] for one mesh
# dimension, one placement per op argument (None for non-tensor arguments and absent tensors).

R, P = Replicate(), Partial()


def _given(t, placement):
    return None if t is None else placement


def _computed(output_mask, *placements):
    """A backward op's output placements: a gradient output_mask leaves out is an empty (0,)
    tensor, given Replicate."""
    return [p if need else R for p, need in zip(placements, output_mask)]


def _linear_relu_rules(x, weight, bias, activation="relu"):
    last = x.ndim - 1
    rules = [
        ([R], [R, R, _given(bias, R), None]),
        ([Shard(last)], [R, Shard(0), _given(bias, Shard(0)), None]),
        ([Shard(0)], [Shard(0), R, _given(bias, R), None]),
    ]
    if activation == "none":
        rules.append(([P], [Shard(last), Shard(1), _given(bias, P), None]))
    return rules


def _linear_act_rules(x, weight, bias, activation):
    # y and z, placed alike: linear_relu's rules for an elementwise, non-linear activation.
    return [([out, out], args) for [out], args in _linear_relu_rules(x, weight, bias, activation)]


def _linear_relu_backward_rules(grad_y, x, weight, y, activation, output_mask):
    # Outputs (grad_x, grad_weight, grad_bias).
    out = partial(_computed, output_mask)
    last = x.ndim - 1
    rules = [
        (out(R, R, R), [R, R, R, _given(y, R), None, None]),
        # column-parallel: grad_x = g @ weight sums over the output features each rank holds a part of
        (out(P, Shard(0), Shard(0)), [Shard(last), R, Shard(0), _given(y, Shard(last)), None, None]),
        # batch-parallel: the weight gradients sum over the rows each rank holds a part of
        (out(Shard(0), P, P), [Shard(0), Shard(0), R, _given(y, Shard(0)), None, None]),
    ]
    if activation == "none":
        # row-parallel: the output was a partial sum, its gradient is replicated; every rank
        # computes the whole bias gradient
        rules.append((out(Shard(last), Shard(1), R), [R, Shard(last), Shard(1), None, None, None]))
    return rules


def _dynamic_net_rules(x, w_in, b_in, w_h, b_h, w_out, b_out, depth):
    # acts, the stacked activations (depth + 1 blocks of rows), is the op's state for its
    # backward: batch-parallel, each rank's acts holds its own rows of every block, labelled
    # Shard(0) so that it reaches the backward rule as it left the forward.
    def weights(p):
        return [p, p, _given(w_h, p), _given(b_h, p), p, p]

    return [
        ([R, R], [R, *weights(R), None]),
        ([Shard(0), Shard(0)], [Shard(0), *weights(R), None]),
    ]


def _dynamic_net_backward_rules(grad_out, x, w_in, w_h, w_out, acts, depth, output_mask):
    out = partial(_computed, output_mask)
    return [
        (out(*[R] * 7), [R, R, R, _given(w_h, R), R, R, None, None]),
        (out(Shard(0), *[P] * 6), [Shard(0), Shard(0), R, _given(w_h, R), R, Shard(0), None, None]),
    ]


def register_sharding_rules():
    """Registers the rules above with DTensor (import does it; calling again is harmless)."""
    if _C is None:  # no compiled ops: the functional forms compute with stock ops, which DTensor knows
        return
    ops = torch.ops.dynnet
    # (op, rules, index of the first non-tensor argument). DTensor caches the rules' answer per
    # op, keyed by the tensor arguments' placements and the arguments from a "static" index on;
    # register_sharding makes that the first int argument, which would leave activation and
    # output_mask out of the key - and a row-parallel 'none' answer (Partial) would then be
    # reused for 'relu'. Every non-tensor argument picks rules here, so all are in the key.
    for op, rules, static in ((ops.linear_relu.default, _linear_relu_rules, 3),
                              (ops.linear_act.default, _linear_act_rules, 3),
                              (ops.linear_relu_backward.default, _linear_relu_backward_rules, 4),
                              (ops.dynamic_net.default, _dynamic_net_rules, 7),
                              (ops.dynamic_net_backward.default, _dynamic_net_backward_rules, 6)):
        register_sharding(op)(rules)
        DTensor._op_dispatcher.sharding_propagator.op_to_schema_info[op] = RuntimeSchemaInfo(static, needs_pytree=True)


register_sharding_rules()
