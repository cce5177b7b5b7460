"""Swaps dlfast layers into an existing model, and back."""

from __future__ import annotations

import warnings

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
    """Puts dlfast layers into `model`; returns the converted model (use the returned object).

    - Every layer dlfast has a drop-in for (LayerNorm, MultiheadAttention) becomes it, in place.
    - Every torch.nn.Conv2d followed by a torch.nn.ReLU inside an nn.Sequential becomes a
      Conv2dReLU (sharing the conv's parameters) and the ReLU an nn.Identity, in place: the
      state_dict keys stay the same.
    - Where Conv2d layers are left, the model is traced with torch.fx and each Conv2d whose
      only use is a ReLU (nn.ReLU, F.relu, torch.relu, .relu(), in place or not) is fused the
      same way; the result is then a torch.fx.GraphModule with the same parameters and keys.
      A model that cannot be traced is returned as converted so far, with a warning saying why.

    Only exact instances are converted: a user subclass of a torch.nn layer may override
    forward, so it is left as it is.
    """
    for module in model.modules():
        drop_in = _DROP_INS.get(type(module))
        if drop_in is not None:
            module.__class__ = drop_in
    for module in model.modules():
        if isinstance(module, torch.nn.Sequential):
            _fuse_sequential(module)
    if any(type(m) is torch.nn.Conv2d for m in model.modules()):
        model = _fuse_traced(model)
    return model


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes convert(), in place: every dlfast layer in `model` becomes its torch.nn original
    or plain-PyTorch twin with the same keys (a Conv2dReLU becomes Conv2dThenReLU: torch.nn.Conv2d
    then F.relu; a CausalSelfAttention becomes SDPACausalSelfAttention)."""
    for module in model.modules():
        original = _REVERSALS.get(type(module))
        if original is not None:
            module.__class__ = original
    return model


def _fuse_sequential(seq: torch.nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:], strict=False):
        conv, relu = seq._modules[first], seq._modules[second]
        if type(conv) is torch.nn.Conv2d and isinstance(relu, torch.nn.ReLU):
            seq._modules[first] = Conv2dReLU.from_modules(conv, relu)
            seq._modules[second] = torch.nn.Identity()


class _Tracer(torch.fx.Tracer):
    """Keeps torch.nn and dlfast.nn layers as single calls (dlfast's own layers run custom ops
    and input checks that symbolic tracing cannot look inside)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("dlfast.nn") or super().is_leaf_module(m, qualname)


def _is_relu_of(node: torch.fx.Node, arg: torch.fx.Node, root: torch.nn.Module) -> bool:
    if not node.args or node.args[0] is not arg:
        return False
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), torch.nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _fuse_traced(model: torch.nn.Module) -> torch.nn.Module:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # any tracing failure leaves the model as it is
        warnings.warn(
            f"dlfast.nn.convert: {type(model).__name__} cannot be traced by torch.fx "
            f"({type(exc).__name__}: {exc}); Conv2d -> ReLU pairs in its forward code are left unfused",
            stacklevel=3,
        )
        return model
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    fused: dict[str, Conv2dReLU] = {}
    for target, nodes in calls.items():
        conv = model.get_submodule(target)
        # A conv called from several places is fused only if every call feeds only a ReLU.
        if type(conv) is not torch.nn.Conv2d:
            continue
        relus = [next(iter(node.users)) if len(node.users) == 1 else None for node in nodes]
        if not all(
            r is not None and _is_relu_of(r, node, model) for r, node in zip(relus, nodes, strict=True)
        ):
            continue
        for relu, node in zip(relus, nodes, strict=True):
            relu.replace_all_uses_with(node)
            graph.erase_node(relu)
        fused[target] = Conv2dReLU.from_modules(conv, torch.nn.ReLU())
    if not fused:
        return model
    # The GraphModule gets its own module tree holding the original's layers, so swapping the
    # fused layers in here leaves `model` itself as it was.
    module = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    for target, layer in fused.items():
        _set_submodule(module, target, layer)
    module.delete_all_unused_submodules()
    return module


def _set_submodule(root: torch.nn.Module, target: str, module: torch.nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)
