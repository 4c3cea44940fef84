"""The helpers every op's torch.func rules share: whether a transform is active, whether a result
will be differentiated, and the vmap plumbing (batch dimension first, a loop over ensemble members).

Eager calls with no transform active go through the C++ autograd node on the Autograd key
(csrc/autograd.cpp; ~2 us a call cheaper). The ops' autograd.Functions are the documented wrappers
and the path under the torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and
torch.autograd.forward_ad, which refuse a C++ autograd node: functorch runs an autograd.Function
that has setup_context and, for vmap, a `vmap` staticmethod; forward mode needs a `jvp`
staticmethod. The vmap rules are written by hand (generate_vmap_rule=True would vmap `forward`,
i.e. the kernels, which have no batching rule): when only the input is batched, the vmapped
dimension becomes one more leading dimension of x and every sample's rows go through ONE fused
call; batched weights (model ensembles) loop over the members, one fused call each (see
per_member for why).

Each op's backward is a Function too (LinearReLUBackwardFunction, DynamicNetBackwardFunction):
torch.func.grad records every backward (it differentiates with create_graph=True), so a backward
cannot tell whether its result will be differentiated again. As a Function whose forward is the
fused backward kernel and whose own backward / jvp / vmap rules carry the higher derivatives (in
stock ops), it leaves that to autograd and functorch: the fused kernel computes the gradients
under every transform, and double backward, hessian and the rest stay exact."""

import torch
import torch.autograd.forward_ad as _fwad

_functorch_active = torch._C._are_functorch_transforms_active
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_gradtracking = torch._C._functorch.is_gradtrackingtensor
_unwrap = torch._C._functorch.get_unwrapped
_level = torch._C._functorch.maybe_get_level


def transforms_active():
    """True under a torch.func transform or inside a torch.autograd.forward_ad dual level: where
    the C++ autograd node cannot serve and the Functions must. One C call and one attribute read:
    ~0.3 us added to an eager call (measured A/B, ~2% of a 16-wide layer's forward, nothing
    measurable at the seed's shape)."""
    return _fwad._current_level >= 0 or _functorch_active()


def tracked(*tensors, own_level=None):
    """Whether something outside the running rule may differentiate a result computed from
    `tensors`: a torch.func grad or jvp level they are wrapped by (other than `own_level`), or
    autograd (grad mode on and a tensor that requires grad). Rules that compute from the saved
    activations (which carry no derivative) recompute them instead when this is true."""
    for t in tensors:
        if t is None:
            continue
        while _is_wrapped(t):
            if _is_gradtracking(t) and _level(t) != own_level:
                return True
            t = _unwrap(t)
        if t.requires_grad and torch.is_grad_enabled():
            return True
    return False


def jvp_level():
    """The functorch level whose tangent a jvp rule is computing (None under
    torch.autograd.forward_ad): its own wrappers do not make the tangent differentiated."""
    top = torch._C._functorch.peek_interpreter_stack()
    return top.level() if top is not None and top.key() == torch._C._functorch.TransformType.Jvp else None


def rows(t):
    """t as a matrix of rows: (*, n) -> (prod(*), n)."""
    return t.reshape(-1, t.shape[-1])


def add(a, b):
    """a + b where None is zero."""
    return b if a is None else a if b is None else a + b


def batched_first(t, dim, size):
    """t with its vmapped dimension first; an unbatched t expanded to `size` (a view)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def per_member(fn, size, in_dims, args, out_dim):
    """vmap of `fn` as a loop: fn on each member's slice of the batched arguments, outputs
    stacked along `out_dim` (an int, or one per output; None outputs stay None).

    The rule for batched weights (ensembles of models from torch.func.stack_module_state): each
    member is one fused call, forward and backward, with the results of running the members one
    by one. A stock batched matmul (bmm + bias + ReLU) would be one call for all members, but it
    is not fused (three ops and passes where the kernel does one) and would take the kernels out
    of the path; ensembles are a handful of models, so the loop's cost is a few fused calls.
    """
    results = [fn(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, in_dims)))
               for i in range(size)]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results, out_dim), out_dim
    dims = out_dim if isinstance(out_dim, tuple) else (out_dim,) * len(results[0])
    outs = tuple(None if first is None else torch.stack([r[j] for r in results], dims[j])
                 for j, first in enumerate(results[0]))
    return outs, tuple(None if o is None else d for o, d in zip(outs, dims))
