"""dynnet_ext.fuse(model): put the fused layers into an existing model.

Each nn.Linear whose output feeds only an activation becomes one fused layer, and the
activation goes; with linear=True every other nn.Linear becomes a FusedLinear. The activations:

    ReLU       -> FusedLinearReLU    nn.ReLU, F.relu, torch.relu, .relu(), their in-place forms
    GELU       -> FusedLinearGELU    nn.GELU(), F.gelu(x) (torch.nn.functional.gelu)
    GELU-tanh  -> FusedLinearGELU(approximate="tanh")
                                     nn.GELU(approximate="tanh"), F.gelu(x, approximate="tanh")
    SiLU       -> FusedLinearSiLU    nn.SiLU, F.silu (torch.nn.functional.silu), in place or not

and the activation modules of other libraries, known by their class's qualified name (no import
of the library): transformers.activations' GELUActivation (GELU), NewGELUActivation,
PytorchGELUTanh / GELUTanh (GELU-tanh) and SiLUActivation (SiLU); timm's models use nn.GELU and
nn.SiLU. More with register_activation(cls_or_qualified_name, activation), e.g.
`dynnet_ext.fuse.register_activation("mylib.layers.Swish", "silu")`: only for a class whose
forward computes what stock's op for that activation computes (the fused layer replaces it).
Activation modules match by exact class, not subclasses.

Two ways to see what feeds what:

- nn.Sequential: directly. A Linear at position i followed by an activation module at i + 1
  becomes the fused layer at i and nn.Identity at i + 1: the positions, and so the state_dict
  keys, stay.
- any other module that calls Linear layers: its forward is traced with torch.fx (every
  submodule a leaf: each module is fused on its own), the activation after each fusable call is
  removed from the graph, and the module is replaced by a torch.fx.GraphModule that runs the
  rewritten graph on the module's own submodules, parameters and buffers (same names: the
  state_dict keys stay too). A GraphModule is not the original class: forward is the traced
  graph, other methods and attributes of the class are not kept.

What is left alone, with the reason in the report: a Linear whose output is also used by
anything but the activation (an in-place activation on a tensor used elsewhere included), a
Linear called several times where not every call feeds the same activation, modules (Linear,
activation or the traced one) with hooks, module objects that appear at two places in the model, and modules whose forward torch.fx
cannot capture as one static graph: tracing fails (data-dependent control flow), forward takes
optional or variadic arguments, or the graph differs between traces (control flow on random
draws, like the seed's random depth, or on self.training: fuse traces TRACES_PER_MODE times in
train and in eval mode). Modules of torch.nn other than the containers, and dynnet_ext's own, are
not entered. A module that cannot be traced is reported by where its Linears' outputs might go:
"skipped" (a warning) when an activation is in sight - a known activation module beside the
Linears, or forward's source naming relu, gelu or silu - else "untraced" (information only: an
attention block's projections, say, whose forward takes an optional mask).

In-place activations: nn.ReLU(inplace=True), F.relu(x, inplace=True), x.relu_(),
nn.SiLU(inplace=True), F.silu(x, inplace=True) right after a Linear whose output nothing else
uses are fused like out-of-place ones: on a fresh tensor with no other reader, in place and out
of place give the same values and gradients.

The report (FuseReport, logged, and returned with report=True) names each fused pair, how the
model applied the activation and which fused layer it became ("fc1 + F.gelu (Linear+GELU)").

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
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .models import DynamicNet
from .nn import FusedLinear, FusedLinearGELU, FusedLinearReLU, FusedLinearSiLU

log = logging.getLogger(__name__)

TRACES_PER_MODE = 8  # a random depth 0-3 gives 16 equal traces with probability 4 * 4**-16
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# The name each fused activation has in the report, and the fused layer it becomes.
LABELS = {"relu": "ReLU", "gelu": "GELU", "gelu_tanh": "GELU-tanh", "silu": "SiLU"}
_FUSED = {
    "relu": FusedLinearReLU.from_linear,
    "gelu": FusedLinearGELU.from_linear,
    "gelu_tanh": lambda linear: FusedLinearGELU.from_linear(linear, approximate="tanh"),
    "silu": FusedLinearSiLU.from_linear,
}
# Activation modules of other libraries, by qualified class name (module.QualName), so that fuse
# knows them without importing the library. Each computes what stock's op for its activation
# computes (transformers.activations; timm uses nn.GELU / nn.SiLU). register_activation adds more.
_REGISTRY = {
    "transformers.activations.GELUActivation": "gelu",  # F.gelu (or the same erf formula in Python)
    "transformers.activations.NewGELUActivation": "gelu_tanh",  # the tanh formula, written out
    "transformers.activations.PytorchGELUTanh": "gelu_tanh",  # F.gelu(approximate="tanh")
    "transformers.activations.GELUTanh": "gelu_tanh",  # PytorchGELUTanh's newer name
    "transformers.activations.SiLUActivation": "silu",  # x * sigmoid(x), or F.silu
}


def register_activation(cls_or_qualified_name, activation):
    """Make fuse treat modules of a class as `activation` ("relu", "gelu", "gelu_tanh" or
    "silu"): a Linear whose output feeds only such a module becomes the matching fused layer
    and the module goes. The class, or its qualified name "package.module.ClassName" (which
    needs no import of its library). Only exactly that class matches, not its subclasses; the
    module's forward must compute what stock's op for `activation` computes (F.relu, F.gelu,
    F.gelu(approximate="tanh"), F.silu), since the fused layer replaces it."""
    if isinstance(cls_or_qualified_name, type):
        name = _qualified_name(cls_or_qualified_name)
    elif isinstance(cls_or_qualified_name, str) and "." in cls_or_qualified_name:
        name = cls_or_qualified_name
    else:
        raise TypeError(f"register_activation expects a class or a qualified name 'module.ClassName', "
                        f"got {cls_or_qualified_name!r}")
    if activation not in _FUSED:
        raise ValueError(f"activation must be one of {tuple(_FUSED)}, got {activation!r}")
    _REGISTRY[name] = activation


def _qualified_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class FuseReport:
    """What fuse did, by the Linear layers' qualified names.

    fused: (linear, activation form) pairs now one fused layer (FusedLinearReLU, FusedLinearGELU
    or FusedLinearSiLU), the form saying how the model applied the activation ("nn.ReLU 'act'",
    "F.gelu", ".relu()", ...); linear: layers now FusedLinear (linear=True); kept: Linear layers
    not followed by an activation, left as they were (or made FusedLinear); skipped: (linear,
    reason) for the layers followed by an activation that could not be fused safely; untraced:
    (linear, reason) for the layers of a module fuse could not trace, with no activation in sight
    (the module docstring says what that means); traced:
    modules replaced by a torch.fx.GraphModule of their rewritten forward; activations:
    {linear: its activation ("relu", "gelu", "gelu_tanh", "silu")} for each fused pair.
    """

    fused: list = field(default_factory=list)
    linear: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    untraced: list = field(default_factory=list)
    traced: list = field(default_factory=list)
    activations: dict = field(default_factory=dict)

    def __str__(self):
        counts = [sum(self.activations.get(lin, "relu") == act for lin, _ in self.fused) for act in LABELS]
        # Linear+ReLU always, the others when there are any.
        pairs = [f"{n} Linear+{LABELS[act]} fused" for act, n in zip(LABELS, counts) if n or act == "relu"]
        untraced = f", {len(self.untraced)} in modules not traced" if self.untraced else ""
        lines = [f"dynnet_ext.fuse: {', '.join(pairs)}, {len(self.linear)} Linear -> FusedLinear, "
                 f"{len(self.skipped)} left alone{untraced}"]
        lines += [f"  fused    {lin} + {form} (Linear+{LABELS[self.activations.get(lin, 'relu')]})"
                  for lin, form in self.fused]
        lines += [f"  linear   {lin}" for lin in self.linear]
        lines += [f"  skipped  {lin}: {reason}" for lin, reason in self.skipped]
        lines += [f"  untraced {lin}: {reason}" for lin, reason in self.untraced]
        lines += [f"  traced   {name or '(model)'} is now a torch.fx.GraphModule" for name in self.traced]
        return "\n".join(lines)


def fuse(model, inplace=False, linear=False, report=False):
    """Return `model` with each nn.Linear whose output feeds only a ReLU, GELU or SiLU replaced
    by a FusedLinearReLU, FusedLinearGELU or FusedLinearSiLU (the activation removed), and with
    linear=True every other nn.Linear by a FusedLinear. See the module docstring for what is
    fused (and register_activation for other libraries' activation modules), what is left alone
    and why.

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


fuse.register_activation = register_activation  # dynnet_ext.fuse is this function


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


def _module_activation(module):
    """The activation an activation module computes ("relu", "gelu", ...), or None. Exact
    classes only: a subclass may compute something else."""
    cls = type(module)
    if cls is nn.ReLU:
        return "relu"
    if cls is nn.GELU:
        return _GELU_APPROXIMATE.get(module.approximate)
    if cls is nn.SiLU:
        return "silu"
    return _REGISTRY.get(_qualified_name(cls))


_ACTIVATION_WORDS = re.compile(r"\b(relu_?|gelu|silu)\b")


def _called_modules(module, prefix=""):
    """(path relative to module, submodule) for each module that module's own forward calls: its
    children and those inside ModuleList/ModuleDict children (a Sequential child is fused on its
    own)."""
    for name, child in module._modules.items():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield from _called_modules(child, _join(prefix, name))
        elif child is not None:
            yield _join(prefix, name), child


def _activation_in_sight(module):
    """Whether an untraceable module may apply an activation to its Linears' outputs: a known
    activation module among the modules its forward calls, or its forward's source naming relu,
    gelu or silu (or not readable)."""
    if any(_module_activation(m) for _, m in _called_modules(module)):
        return True
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return bool(_ACTIVATION_WORDS.search(source))


def _module_form(module, name):
    cls = type(module)
    return f"{'nn.' if cls.__module__.startswith('torch.nn') else ''}{cls.__name__} {name!r}"


def _activation(node, root):
    """(form, activation) if `node` applies an activation to its first argument (form: how, for
    the report), else None."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        activation = _module_activation(module)
        return None if activation is None else (_module_form(module, node.target), activation)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return f"{node.target.__module__.replace('torch.nn.functional', 'F')}.{node.target.__name__}", "relu"
    if node.op == "call_function" and node.target is F.gelu:  # F.gelu(x, approximate=...)
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        activation = _GELU_APPROXIMATE.get(approximate) if isinstance(approximate, str) else None
        if activation is None or len(node.args) > 2 or set(node.kwargs) - {"approximate"}:
            return None
        return ("F.gelu" if approximate == "none" else f"F.gelu(approximate={approximate!r})"), activation
    if node.op == "call_function" and node.target is F.silu:  # F.silu(x, inplace=...)
        return "F.silu", "silu"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return f".{node.target}()", "relu"
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
            activation = _module_activation(act)
            if activation is None:
                self.report.kept.append(qual)
                continue
            reason = next((r for r in (self.why_not(lin, "the Linear"), self.why_not(act, f"the {LABELS[activation]}"))
                           if r), None)
            if reason:
                self.report.skipped.append((qual, reason))
                continue
            seq._modules[a] = _FUSED[activation](lin)
            seq._modules[b] = nn.Identity()
            self.report.fused.append((qual, _module_form(act, _join(path, b))))
            self.report.activations[qual] = activation
        if names and type(seq._modules[names[-1]]) is nn.Linear:
            self.report.kept.append(_join(path, names[-1]))

    def why_not(self, module, what):
        if _hooks(module):
            return f"{what} has hooks, which a fused layer would not run"
        shared = self.shared(module)
        return f"{what}: {shared}" if shared else None

    def direct_linears(self, module):
        """{path relative to module: nn.Linear} that module's own forward calls (_called_modules)."""
        return {name: m for name, m in _called_modules(module) if type(m) is nn.Linear}

    def fuse_traced(self, module, path):
        linears = self.direct_linears(module)
        try:
            graph, constants = _static_graph(module)
        except _Untraceable as exc:
            left = [(_join(path, name), str(exc)) for name in linears]
            if _activation_in_sight(module):
                self.report.skipped += left
            else:
                self.report.untraced += left
            return module
        calls = defaultdict(list)
        for node in graph.nodes:
            if node.op == "call_module" and node.target in linears:
                calls[node.target].append(node)
        acts = {}  # linear name -> [(activation node, form, activation)] for each of its calls
        for name, lin in linears.items():
            qual = _join(path, name)
            if not calls[name]:
                self.report.kept.append(qual)  # not called by forward (maybe through its weight)
                continue
            # The activations among its calls' users (for the reasons below).
            seen = [a for n in calls[name] for u in n.users if (a := _activation(u, module))]
            label = LABELS[seen[0][1]] if seen else "ReLU"
            found, reason = [], None
            for node in calls[name]:
                users = list(node.users)
                act = _activation(users[0], module) if len(users) == 1 else None
                if act is None or users[0].args[:1] != (node,):
                    uses = ", ".join(u.name for u in users) or "nothing"
                    reason = f"its output is used by {uses}, not only by a {label}"
                    break
                found.append((users[0], *act))
            if reason is None and len({a for _, _, a in found}) > 1:
                kinds = ", ".join(sorted({LABELS[a] for _, _, a in found}))
                reason = f"its calls feed different activations ({kinds}), which one fused layer cannot apply"
            if reason is None:
                reason = self.why_not(lin, "the Linear")
            if reason is None:
                hooked = [n.target for n, _, _ in found if n.op == "call_module" and _hooks(module.get_submodule(n.target))]
                reason = f"the {label} {hooked[0]!r} has hooks, which fusing would skip" if hooked else None
            if reason is not None:
                if seen:
                    self.report.skipped.append((qual, reason))
                else:
                    self.report.kept.append(qual)
                continue
            acts[name] = found
        if not acts:
            for name in constants:
                delattr(module, name)
            return module
        if _hooks(module) or module._state_dict_hooks or module._load_state_dict_pre_hooks:
            reason = "its module has hooks, which the torch.fx graph module replacing it would not run"
            self.report.skipped += [(_join(path, name), reason) for name in acts]
            return module
        for name, found in acts.items():
            activation = found[0][2]
            _set_submodule(module, name, _FUSED[activation](linears[name]))
            for node, _, _ in found:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            self.report.fused.append((_join(path, name), found[0][1]))
            self.report.activations[_join(path, name)] = activation
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
