"""Swaps dlfast layers into an existing model, and back."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F

from dlfast.nn.attention import CausalSelfAttention, MultiheadAttention, SDPACausalSelfAttention
from dlfast.nn.conv import Conv2dReLU, Conv2dThenReLU
from dlfast.nn.layer_norm import LayerNorm

# torch.nn class -> its dlfast drop-in. Each drop-in subclasses the torch class and adds no
# state, so swapping an instance's class keeps its parameters, buffers, hooks and device.
_DROP_INS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
}

# What revert() turns each dlfast layer into: its torch.nn original, or a plain-PyTorch twin with
# the same state_dict keys where the dlfast layer fuses several torch.nn layers.
_REVERSALS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    **{drop_in: original for original, drop_in in _DROP_INS.items()},
    Conv2dReLU: Conv2dThenReLU,
    CausalSelfAttention: SDPACausalSelfAttention,
}

# The ways a traced forward applies a ReLU to a tensor.
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Puts dlfast layers into `model`, in place, and returns it.

    - Every layer dlfast has a drop-in for (LayerNorm, MultiheadAttention) becomes it.
    - Every torch.nn.Conv2d followed by a torch.nn.ReLU inside an nn.Sequential becomes a
      Conv2dReLU (sharing the conv's parameters) and the ReLU an nn.Identity: the state_dict
      keys stay the same.
    - Where Conv2d layers are left, the model's forward is traced with torch.fx (once in
      training and once in eval mode) and each Conv2d whose only use is a ReLU (nn.ReLU,
      F.relu, torch.relu, .relu(), in place or not) is fused the same way. The model then runs
      the traced code without those ReLUs: its class becomes a subclass of its own class with
      that forward, so its parameters, buffers, other submodules, methods and state_dict keys
      stay as they were, it still pickles, and revert() gives back the original class. A model
      that cannot be traced, or whose traced code would not hold for every call (its forward
      tests whether an argument is None), keeps its forward, with a warning saying why.

    Only exact instances are converted: a user subclass of a torch.nn layer may override
    forward, so it is left as it is; so are a conv and a ReLU with hooks (a hook on the conv
    would see the ReLU's output in a fused layer).
    """
    for module in model.modules():
        drop_in = _DROP_INS.get(type(module))
        if drop_in is not None:
            module.__class__ = drop_in
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            _fuse_sequential(module)
    if any(type(m) is torch.nn.Conv2d for m in model.modules()):
        _fuse_traced(model)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes convert(), in place: a model whose forward convert() traced gets its own class
    (and forward) back with plain torch.nn.Conv2d layers where the trace fused them; every other
    dlfast layer becomes its torch.nn original or plain-PyTorch twin with the same keys (a
    Conv2dReLU becomes Conv2dThenReLU: torch.nn.Conv2d then F.relu; a CausalSelfAttention
    becomes SDPACausalSelfAttention)."""
    for module in model.modules():
        if "_dlfast_traced" in type(module).__dict__:
            _untrace(module)
    for module in model.modules():
        original = _REVERSALS.get(type(module))
        if original is not None:
            module.__class__ = original
    return model


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks
    )  # fmt: skip


def _fusable_conv(conv: torch.nn.Module) -> bool:
    return type(conv) is torch.nn.Conv2d and not _has_hooks(conv)


def _fuse_sequential(seq: torch.nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:], strict=False):
        conv, relu = seq._modules[first], seq._modules[second]
        if _fusable_conv(conv) and type(relu) is torch.nn.ReLU and not _has_hooks(relu):
            seq._modules[first] = Conv2dReLU.from_modules(conv, relu)
            seq._modules[second] = torch.nn.Identity()


class _Tracer(torch.fx.Tracer):
    """Keeps torch.nn and dlfast.nn layers as single calls (dlfast's own layers run custom ops
    and input checks that symbolic tracing cannot look inside). Buffers are read when the code
    runs, as parameters are: fx's default would compute `self.stat.view(...)` once, at trace
    time, and keep that tensor, blind to later updates of the buffer."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("dlfast.nn") or super().is_leaf_module(m, qualname)


class _CannotTrace(Exception):
    """Why a model's forward is kept as it is."""


def _trace(model: torch.nn.Module, training: bool, concrete_args: dict | None = None) -> torch.fx.Graph:
    """model's forward traced with every module in the given mode (`if self.training:` branches
    are fixed at trace time); the modes are restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(training)
        return _Tracer().trace(model, concrete_args=concrete_args)
    except Exception as exc:  # any tracing failure leaves the model as it is
        raise _CannotTrace(f"torch.fx cannot trace it ({type(exc).__name__}: {exc})") from exc
    finally:
        for m, mode in modes:
            m.training = mode


def _check_none_arguments(model: torch.nn.Module, graph: torch.fx.Graph, training: bool) -> None:
    """A traced argument is a proxy, never None, so `if mask is None:` is traced as False for
    every call. Tracing again with every None-default argument fixed at None tells whether the
    forward depends on that: if the computation differs, the trace holds only for some calls."""
    params = inspect.signature(type(model).forward).parameters.values()
    defaults_none = {p.name: None for p in params if p.default is None}
    if defaults_none and _computation(_trace(model, training, defaults_none)) != _computation(graph):
        raise _CannotTrace(
            f"its forward computes differently when {sorted(defaults_none)} are None, which a trace "
            "cannot follow"
        )


def _computation(graph: torch.fx.Graph) -> list[tuple[str, object]]:
    """The graph's operations, without its inputs and the checks fx adds for fixed arguments."""
    # Tensors the forward creates are lifted to attributes numbered per trace: their names differ.
    return [
        (node.op, None if node.op == "get_attr" else node.target)
        for node in graph.nodes
        if node.op != "placeholder" and node.target is not torch.fx._symbolic_trace._assert_is_none
    ]


def _is_relu_of(node: torch.fx.Node, arg: torch.fx.Node, root: torch.nn.Module) -> bool:
    if not node.args or node.args[0] is not arg:
        return False
    if node.op == "call_module":
        relu = root.get_submodule(node.target)
        return type(relu) is torch.nn.ReLU and not _has_hooks(relu)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _conv_relu_pairs(model: torch.nn.Module, graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    """{conv target: the ReLU node after each of its calls} for the fusable convs: a conv
    called from several places is fused only if every call feeds only a ReLU."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs = {}
    for target, nodes in calls.items():
        if not _fusable_conv(model.get_submodule(target)):
            continue
        relus = [next(iter(node.users)) if len(node.users) == 1 else None for node in nodes]
        if all(r is not None and _is_relu_of(r, node, model) for r, node in zip(relus, nodes, strict=True)):
            pairs[target] = relus
    return pairs


def _fuse_traced(model: torch.nn.Module) -> None:
    try:
        graphs = {training: _trace(model, training) for training in (True, False)}
        _check_none_arguments(model, graphs[model.training], model.training)
    except _CannotTrace as why:
        warnings.warn(
            f"dlfast.nn.convert: {type(model).__name__} keeps its forward: {why}; any Conv2d -> ReLU "
            "pairs in its forward code are left unfused",
            stacklevel=3,
        )
        return
    pairs = {training: _conv_relu_pairs(model, graph) for training, graph in graphs.items()}
    fused = sorted(pairs[True].keys() & pairs[False].keys())  # fused in both modes or in neither
    if not fused:
        return
    forwards = {}
    for training, graph in graphs.items():
        for target in fused:
            for relu in pairs[training][target]:
                relu.replace_all_uses_with(relu.args[0])
                graph.erase_node(relu)
        # A GraphModule compiles the graph to Python; its forward runs on `model` as well,
        # whose attributes have the same names. Constants the trace lifted out of the forward
        # code (tensors it creates) live on the GraphModule and are copied over.
        code = torch.fx.GraphModule(model, graph)
        for node in graph.nodes:
            if node.op == "get_attr" and not _has_attribute(model, node.target):
                _set_attribute(model, node.target, getattr(code, node.target))
        forwards[training] = type(code).forward
    for target in fused:
        _set_attribute(model, target, Conv2dReLU.from_modules(model.get_submodule(target), torch.nn.ReLU()))
    model.__class__ = _traced_class(type(model), forwards, tuple(fused))


def _traced_class(cls: type, forwards: dict[bool, Callable], fused: tuple[str, ...]) -> type:
    """A subclass of cls whose forward runs the traced code of the module's current mode."""
    train_forward, eval_forward = forwards[True], forwards[False]

    @functools.wraps(train_forward)
    def forward(self, *args, **kwargs):
        return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

    return type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce_ex__": _reduce_traced,
            "_dlfast_traced": (cls, fused),
        },
    )


def _untrace(module: torch.nn.Module) -> None:
    """Gives a traced module its class back, with plain Conv2d layers where the trace fused."""
    cls, fused = type(module)._dlfast_traced
    for target in fused:
        module.get_submodule(target).__class__ = torch.nn.Conv2d
    module.__class__ = cls


def _reduce_traced(self: torch.nn.Module, protocol: int):
    """Pickles (and deep-copies) a traced model as its original class, converted again on load:
    the traced class is made at run time, so pickle could not find it by name."""
    cls, fused = type(self)._dlfast_traced
    original = cls.__new__(cls)
    original.__dict__ = self.__dict__
    return _convert_after_load, (original, fused)


def _convert_after_load(model: torch.nn.Module, fused: tuple[str, ...]) -> torch.nn.Module:
    for target in fused:
        model.get_submodule(target).__class__ = torch.nn.Conv2d
    return convert(model)


def _has_attribute(root: torch.nn.Module, target: str) -> bool:
    parent_name, _, name = target.rpartition(".")
    try:
        return hasattr(root.get_submodule(parent_name), name)
    except AttributeError:
        return False


def _set_attribute(root: torch.nn.Module, target: str, value) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, value)
