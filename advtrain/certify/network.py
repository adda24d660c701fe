"""A model read into a :class:`~advtrain.certify.operations.Network`.

:func:`parse` reads a (nested) ``nn.Sequential`` as a chain of its layers. A model with its own
``forward`` (residual blocks) is traced by ``torch.fx`` (:func:`trace_network`), which records
the calls ``forward`` makes; every call must be one bound propagation knows: a supported layer
(:func:`~advtrain.certify.operations.leaf_op`), ``relu`` (``F.relu``, ``torch.relu``,
``x.relu()``), the sum of two tensors (``a + b``, ``torch.add``), ``torch.flatten(x, 1)`` /
``x.flatten(1)`` and ``F.adaptive_avg_pool2d(x, 1)``. Anything else, or a ``forward`` that
``torch.fx`` cannot trace (control flow on tensor values), is refused by a one-line error
naming the call.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AdvtrainError
from ..models.adapters import LogitsModel, Normalize
from .operations import AddOp, FlattenOp, MeanPoolOp, Network, Op, ReLUOp, leaf_op, unsupported

__all__ = ["parse", "trace_network"]


def parse(model: nn.Module) -> Network:
    """``model`` as a :class:`Network`; a one-line :class:`AdvtrainError` names the first layer
    that bound propagation does not support (or that is in training mode where that matters).

    A (nested) ``nn.Sequential`` is read as a chain; any other model is traced with
    ``torch.fx`` (:func:`trace_network`), which also reads residual additions."""
    model = _unwrap(model)
    ops: list[Op] = []
    try:
        _collect(model, "", ops)
    except NeedsTrace:  # a model with its own forward: its graph decides
        return trace_network(model)
    if not ops:
        raise AdvtrainError("the model has no layers to propagate bounds through")
    return Network.chain(tuple(ops))


class NeedsTrace(Exception):
    """A module with its own ``forward``: the model is read by tracing instead."""


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, LogitsModel):
            model = model.model
        else:
            return model


def _collect(module: nn.Module, path: str, ops: list[Op]) -> None:
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        for child_name, child in module.named_children():
            _collect(_unwrap(child), f"{path}.{child_name}" if path else child_name, ops)
        return
    if not _is_torch_layer(module):
        raise NeedsTrace
    op = leaf_op(module, path or "<model>")
    if op is not None:
        ops.append(op)


def _is_torch_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn") or isinstance(module, Normalize)


_RELU = (F.relu, torch.relu)
_ADD = (operator.add, torch.add)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with advtrain's input normalisation kept whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, module_qualified_name)


def trace_network(model: nn.Module) -> Network:
    """``model`` as a :class:`Network` (see the module docstring)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # torch.fx raises many kinds; the message says what it met
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdvtrainError(
            f"{type(model).__name__} cannot be read for bound propagation (torch.fx: {first})"
        ) from None
    ops: list[Op] = []
    sources: list[tuple[int, ...]] = []
    where: dict[fx.Node, int] = {}  # fx node -> our node
    output: int | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if where:
                raise AdvtrainError("bound propagation needs a model with a single input")
            where[node] = 0
        elif node.op == "output":
            output = _source(node.args[0], where, "the model's output")
        else:
            op, inputs = _node_op(model, node, where)
            if op is None:  # passes its input on
                where[node] = inputs[0]
                continue
            ops.append(op)
            sources.append(inputs)
            where[node] = len(ops)
    if not ops or output != len(ops):
        raise AdvtrainError("bound propagation needs a model whose output is its last layer's")
    return Network(tuple(ops), tuple(sources))


def _node_op(
    model: nn.Module, node: fx.Node, where: dict[fx.Node, int]
) -> tuple[Op | None, tuple[int, ...]]:
    """The operation of one traced call and the nodes it reads."""
    name = str(node.target) if node.op == "call_module" else node.name
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        _only(node, name, 1, tensors)
        return leaf_op(module, name), (_source(tensors[0], where, name),)
    target: Any = node.target
    label = getattr(target, "__name__", str(target))
    if _calls(node, _RELU, "relu"):
        _only(node, name, 1, tensors)
        return ReLUOp(name), (_source(tensors[0], where, name),)
    if _calls(node, _ADD, "add"):
        _only(node, name, 2, tensors)
        return AddOp(name), tuple(_source(t, where, name) for t in tensors)
    if node.op in ("call_function", "call_method") and label == "flatten":
        rest = list(node.args[1:]) + list(node.kwargs.values())
        if rest not in ([1], [1, -1]):
            raise AdvtrainError(
                f"call {name!r} (flatten): bound propagation supports flatten(x, 1)"
            )
        return FlattenOp(name), (_source(tensors[0], where, name),)
    if node.op == "call_function" and target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size in (1, (1, 1), [1, 1]):
            return MeanPoolOp(name), (_source(tensors[0], where, name),)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:  # a call inside a module's own forward: name the innermost module too
        path, kind = list(stack.values())[-1]
        kind_name = getattr(kind, "__name__", str(kind))
        label = f"{label} inside module {path!r} ({kind_name})"
    raise unsupported(name, label)


def _calls(node: fx.Node, functions: tuple[Any, ...], method: str) -> bool:
    """Whether ``node`` calls one of ``functions`` or the tensor method ``method``."""
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def _only(node: fx.Node, name: str, count: int, tensors: list[fx.Node]) -> None:
    """A one-line error unless the call reads exactly ``count`` tensors and nothing else."""
    others = [a for a in node.args if not isinstance(a, fx.Node)]
    options = {k: v for k, v in node.kwargs.items() if not (k == "inplace" and v in (True, False))}
    if len(tensors) != count or (node.op != "call_module" and (others or options)):
        label = getattr(node.target, "__name__", str(node.target))
        raise AdvtrainError(
            f"call {name!r} ({label}) has arguments bound propagation does not support"
        )


def _source(arg: object, where: dict[fx.Node, int], name: str) -> int:
    if not isinstance(arg, fx.Node) or arg not in where:
        raise AdvtrainError(f"{name} reads something other than a tensor of the network")
    return where[arg]
