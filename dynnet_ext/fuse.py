"""dynnet_ext.fuse(model): put the fused layers into an existing model.

Each nn.Linear whose output feeds only a ReLU (nn.ReLU, F.relu, torch.relu, .relu(), their
in-place forms) becomes one FusedLinearReLU, and the ReLU goes; with linear=True every other
nn.Linear becomes a FusedLinear. Two ways to see what feeds what:

- nn.Sequential: directly. A Linear at position i followed by an nn.ReLU at i + 1 becomes
  FusedLinearReLU at i and nn.Identity at i + 1: the positions, and so the state_dict keys, stay.
- any other module that calls Linear layers: its forward is traced with torch.fx (every
  submodule a leaf: each module is fused on its own), the ReLU after each fusable call is
  removed from the graph, and the module is replaced by a torch.fx.GraphModule that runs the
  rewritten graph on the module's own submodules, parameters and buffers (same names: the
  state_dict keys stay too). A GraphModule is not the original class: forward is the traced
  graph, other methods and attributes of the class are not kept.

What is left alone, with the reason in the report: a Linear whose output is also used by
anything but the ReLU (an in-place ReLU on a tensor used elsewhere included), a Linear called
several times where not every call feeds a ReLU, modules (Linear, ReLU or the traced one) with
hooks, module objects that appear at two places in the model, and modules whose forward torch.fx
cannot capture as one static graph: tracing fails (data-dependent control flow), forward takes
optional or variadic arguments, or the graph differs between traces (control flow on random
draws, like the seed's random depth, or on self.training: fuse traces TRACES_PER_MODE times in
train and in eval mode). Modules of torch.nn other than the containers, and dynnet_ext's own, are
not entered.

In-place ReLU: nn.ReLU(inplace=True), F.relu(x, inplace=True), x.relu_() right after a Linear
whose output nothing else uses are fused like out-of-place ones: on a fresh tensor with no
other reader, in place and out of place give the same values and gradients.

Parameters are moved, never copied: the fused layers hold the original Parameter objects, so an
optimizer built on model.parameters() trains the fused model, and no state_dict key changes.
With inplace=False (default) the module tree is copied and the original left as it was, sharing
its parameters and buffers with the result; with inplace=True the model's submodules are
replaced where they are (a top-level module that becomes a GraphModule is returned, use the
returned model). Tracing runs forward on torch.fx proxies; Python's and torch's random number
generators are restored afterwards, so fusing does not change the random stream.
"""

import copy
import inspect
import logging
import random
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .models import DynamicNet
from .nn import FusedLinear, FusedLinearReLU

log = logging.getLogger(__name__)

TRACES_PER_MODE = 8  # a random depth 0-3 gives 16 equal traces with probability 4 * 4**-16
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class FuseReport:
    """What fuse did, by the Linear layers' qualified names.

    fused: (linear, relu) pairs now one FusedLinearReLU; linear: layers now FusedLinear
    (linear=True); kept: Linear layers not followed by a ReLU, left as they were (or made
    FusedLinear); skipped: (linear, reason) for the layers followed by a ReLU that could not be
    fused safely; traced: modules replaced by a torch.fx.GraphModule of their rewritten forward.
    """

    fused: list = field(default_factory=list)
    linear: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    traced: list = field(default_factory=list)

    def __str__(self):
        lines = [f"dynnet_ext.fuse: {len(self.fused)} Linear+ReLU fused, {len(self.linear)} Linear -> FusedLinear, "
                 f"{len(self.skipped)} left alone"]
        lines += [f"  fused    {lin} + {relu}" for lin, relu in self.fused]
        lines += [f"  linear   {lin}" for lin in self.linear]
        lines += [f"  skipped  {lin}: {reason}" for lin, reason in self.skipped]
        lines += [f"  traced   {name or '(model)'} is now a torch.fx.GraphModule" for name in self.traced]
        return "\n".join(lines)


def fuse(model, inplace=False, linear=False, report=False):
    """Return `model` with each nn.Linear whose output feeds only a ReLU replaced by a
    FusedLinearReLU (the ReLU removed), and with linear=True every other nn.Linear by a
    FusedLinear. See the module docstring for what is fused, what is left alone and why.

    Logs the report (logger "dynnet_ext.fuse": INFO, WARNING when something was left alone);
    report=True returns (model, FuseReport) instead of the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        # A new module tree on the same Parameter and buffer objects.
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
        model = copy.deepcopy(model, memo)
    ctx = _Context(model)
    model = ctx.fuse(model, "")
    if linear:
        model = ctx.fuse_remaining_linears(model)
    result = ctx.report
    log.log(logging.WARNING if result.skipped else logging.INFO, "%s", result)
    return (model, result) if report else model


class _Untraceable(Exception):
    pass


class _LeafTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a leaf (fused on its own)."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


def _join(path, name):
    return f"{path}.{name}" if path else name


def _hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _is_builtin(module):
    """torch.nn's own modules (other than the containers) and dynnet_ext's fused ones: not entered."""
    if isinstance(module, (FusedLinear, DynamicNet)):
        return True
    return not isinstance(module, (*_CONTAINERS, torch.fx.GraphModule)) and type(module).__module__.startswith("torch.")


def _relu_name(node, root):
    """How `node` applies a ReLU to its first argument, or None if it does not."""
    if node.op == "call_module" and type(root.get_submodule(node.target)) is nn.ReLU:
        return f"nn.ReLU {node.target!r}"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return f"{node.target.__module__.replace('torch.nn.functional', 'F')}.{node.target.__name__}"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return f".{node.target}()"
    return None


class _Context:
    def __init__(self, model):
        self.report = FuseReport()
        self.paths = defaultdict(list)  # id(module) -> every qualified name it has
        for name, m in model.named_modules(remove_duplicate=False):
            self.paths[id(m)].append(name)

    def shared(self, module):
        paths = self.paths[id(module)]
        return f"the same module object is also at {', '.join(repr(p) for p in paths[1:])}" if len(paths) > 1 else None

    def fuse(self, module, path):
        """Fuse `module`'s subtree; return what replaces it."""
        if _is_builtin(module):
            return module
        for name, child in list(module._modules.items()):
            if child is not None:
                new = self.fuse(child, _join(path, name))
                if new is not child:
                    module._modules[name] = new
        if isinstance(module, nn.Sequential):
            self.fuse_sequential(module, path)
            return module
        if isinstance(module, _CONTAINERS) or not self.direct_linears(module):
            return module
        return self.fuse_traced(module, path)

    def fuse_sequential(self, seq, path):
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            lin, act = seq._modules[a], seq._modules[b]
            if type(lin) is not nn.Linear:
                continue
            qual = _join(path, a)
            if type(act) is not nn.ReLU:
                self.report.kept.append(qual)
                continue
            reason = next((r for r in (self.why_not(lin, "the Linear"), self.why_not(act, "the ReLU")) if r), None)
            if reason:
                self.report.skipped.append((qual, reason))
                continue
            seq._modules[a] = FusedLinearReLU.from_linear(lin)
            seq._modules[b] = nn.Identity()
            self.report.fused.append((qual, f"nn.ReLU {_join(path, b)!r}"))
        if names and type(seq._modules[names[-1]]) is nn.Linear:
            self.report.kept.append(_join(path, names[-1]))

    def why_not(self, module, what):
        if _hooks(module):
            return f"{what} has hooks, which a fused layer would not run"
        shared = self.shared(module)
        return f"{what}: {shared}" if shared else None

    def direct_linears(self, module):
        """{path relative to module: nn.Linear} that module's own forward calls: its children and
        those inside ModuleList/ModuleDict children (a Sequential child is fused on its own)."""
        found = {}

        def walk(m, prefix):
            for name, child in m._modules.items():
                if type(child) is nn.Linear:
                    found[_join(prefix, name)] = child
                elif isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    walk(child, _join(prefix, name))

        walk(module, "")
        return found

    def fuse_traced(self, module, path):
        linears = self.direct_linears(module)
        try:
            graph, constants = _static_graph(module)
        except _Untraceable as exc:
            self.report.skipped += [(_join(path, name), str(exc)) for name in linears]
            return module
        calls = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_module" and node.target in linears:
                calls[node.target].append(node)
        relus = {}  # linear name -> the ReLU node after each of its calls
        for name, lin in linears.items():
            qual = _join(path, name)
            if not calls[name]:
                self.report.kept.append(qual)  # not called by forward (maybe through its weight)
                continue
            found, reason = [], None
            for node in calls[name]:
                users = list(node.users)
                relu = _relu_name(users[0], module) if len(users) == 1 else None
                if relu is None or users[0].args[:1] != (node,):
                    uses = ", ".join(u.name for u in users) or "nothing"
                    reason = f"its output is used by {uses}, not only by a ReLU"
                    break
                found.append((users[0], relu))
            if reason is None:
                reason = self.why_not(lin, "the Linear")
            if reason is None:
                hooked = [n.target for n, _ in found if n.op == "call_module" and _hooks(module.get_submodule(n.target))]
                reason = f"the ReLU {hooked[0]!r} has hooks, which fusing would skip" if hooked else None
            if reason is not None:
                if any(_relu_name(u, module) for n in calls[name] for u in n.users):
                    self.report.skipped.append((qual, reason))
                else:
                    self.report.kept.append(qual)
                continue
            relus[name] = found
        if not relus:
            for name in constants:
                delattr(module, name)
            return module
        if _hooks(module) or module._state_dict_hooks or module._load_state_dict_pre_hooks:
            reason = "its module has hooks, which the torch.fx graph module replacing it would not run"
            self.report.skipped += [(_join(path, name), reason) for name in relus]
            return module
        for name, found in relus.items():
            _set_submodule(module, name, FusedLinearReLU.from_linear(linears[name]))
            for node, relu in found:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            self.report.fused.append((_join(path, name), relu))
        graph.lint()
        self.report.traced.append(path)
        gm = _graph_module(module, graph)
        for name in constants:  # now the graph module's
            delattr(module, name)
        return gm

    def fuse_remaining_linears(self, model):
        """linear=True: every nn.Linear left in a module fuse enters becomes a FusedLinear (a
        drop-in: same computation, so no analysis is needed)."""
        if type(model) is nn.Linear:
            self.report.linear.append("")
            return FusedLinear.from_linear(model)
        done = {}
        for parent in list(model.modules()):
            if _is_builtin(parent):
                continue
            for name, child in list(parent._modules.items()):
                if type(child) is not nn.Linear or _hooks(child):
                    continue
                if id(child) not in done:
                    done[id(child)] = FusedLinear.from_linear(child)
                    self.report.linear += self.paths.get(id(child), [name])[:1]
                parent._modules[name] = done[id(child)]
        kept = {lin for lin in self.report.linear}
        self.report.kept = [k for k in self.report.kept if k not in kept]
        return model


def _set_submodule(root, target, module):
    parent, _, name = target.rpartition(".")
    (root.get_submodule(parent) if parent else root)._modules[name] = module


def _rng_state():
    state = [random.getstate(), torch.get_rng_state()]
    state.append(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    return state


def _set_rng_state(state):
    random.setstate(state[0])
    torch.set_rng_state(state[1])
    if state[2] is not None:
        torch.cuda.set_rng_state_all(state[2])


def _static_graph(module):
    """module's forward as one torch.fx graph and the names of the tensor constants the tracer
    stored on the module for it; or _Untraceable with the reason."""
    params = list(inspect.signature(module.forward).parameters.values())
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in plain or p.default is not inspect.Parameter.empty for p in params):
        raise _Untraceable("its forward takes optional or variadic arguments, which a traced graph would fix")
    modes = {m: m.training for m in module.modules()}
    attrs = set(vars(module))
    rng = _rng_state()

    def trace():
        try:
            return _LeafTracer().trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: leave it alone
            text = str(exc).strip()
            first = text.splitlines()[0] if text else ""
            raise _Untraceable(f"torch.fx cannot trace its forward ({type(exc).__name__}: {first})") from exc

    def drop_constants():
        for name in set(vars(module)) - attrs:
            delattr(module, name)

    try:
        codes = set()
        for training in (True, False):
            module.train(training)
            for _ in range(TRACES_PER_MODE):
                codes.add(trace().python_code("self").src)
                drop_constants()
        if len(codes) > 1:
            raise _Untraceable("its forward traces to different graphs from call to call or in train and eval "
                               "mode (control flow on random draws or on self.training), which one graph cannot "
                               "capture")
        for m, training in modes.items():
            m.training = training
        graph = trace()
    except _Untraceable:
        drop_constants()
        raise
    finally:
        for m, training in modes.items():
            m.training = training
        _set_rng_state(rng)
    return graph, set(vars(module)) - attrs


def _graph_module(module, graph):
    """A GraphModule running `graph` on module's own submodules, parameters and buffers, kept
    under the same names and in the same order (the graph alone would only keep what it uses),
    so state_dict keys and parameters() stay those of `module`."""
    gm = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    gm._modules = OrderedDict(module._modules)
    gm._parameters = OrderedDict(module._parameters)
    gm._buffers = OrderedDict(module._buffers)
    gm._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return gm.train(module.training)
