"""A model read as the operations bound propagation knows.

:func:`advtrain.certify.network.parse` flattens a (nested) ``nn.Sequential`` into a chain of
:class:`Op` objects: affine operations (``Linear``, ``Conv2d``, ``BatchNorm1d/2d`` with running
statistics, ``AvgPool2d``, ``AdaptiveAvgPool2d(1)``, ``Flatten``, advtrain's input
``Normalize``) and ``ReLU``; ``Identity`` and ``Dropout`` in eval mode drop out. A model with
its own ``forward`` (residual blocks, such as advtrain's ``preact-resnet18``) is traced by
``torch.fx`` into the same operations plus :class:`AddOp`, the sum of two nodes.
Every affine operation knows four things about itself, which is all IBP and CROWN need:

- ``apply(x)``: the layer itself;
- ``abs_linear(r)``: its linear part with every weight replaced by its absolute value (the
  radius of an interval, Gowal et al. 2018, eq. 6);
- ``transpose(a, in_shape)``: rows of linear coefficients over its output taken back to its
  input (``a W``: the backward step of CROWN, Zhang et al. 2018);
- ``bias_term(a)``: the constant those rows pick up (``a b``).

Anything else (another layer type, a BatchNorm or Dropout still in training mode, an unusual
convolution padding) is refused before any work, by a one-line error naming the layer's path
and type. The operations hold the model's own parameters, so bounds computed through them are
differentiable with respect to the weights (certified training backpropagates through them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..models.adapters import Normalize

__all__ = ["AddOp", "AffineOp", "Network", "Op", "ReLUOp", "leaf_op", "unsupported"]

SUPPORTED = (
    "Sequential, Linear, Conv2d, ReLU, Flatten, BatchNorm1d/2d (eval), AvgPool2d, "
    "AdaptiveAvgPool2d(1), Identity, Dropout (eval), Normalize, residual additions"
)


class Op:
    """One operation of the chain, with the path of its module inside the model."""

    def __init__(self, path: str) -> None:
        self.path = path


class ReLUOp(Op):
    """``max(x, 0)``."""


class AffineOp(Op, ABC):
    """``x -> W x + b`` for some linear ``W`` (see the module docstring)."""

    @abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """The operation on a batch."""

    @abstractmethod
    def abs_linear(self, radius: Tensor) -> Tensor:
        """``|W| r`` on a batch of non-negative radii."""

    @abstractmethod
    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        """Rows ``a`` (``(R, *out_shape)``) as coefficients over the input: ``(R, *in_shape)``."""

    @abstractmethod
    def bias_term(self, a: Tensor) -> Tensor:
        """``a b`` per row: ``(R,)``."""

    def interval(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        """The image of the box ``[lower, upper]`` (IBP: centre through ``W``, radius through
        ``|W|``)."""
        mid, radius = (upper + lower) / 2, (upper - lower) / 2
        centre, spread = self.apply(mid), self.abs_linear(radius)
        return centre - spread, centre + spread


class LinearOp(AffineOp):
    def __init__(self, path: str, module: nn.Linear) -> None:
        super().__init__(path)
        self.weight, self.bias = module.weight, module.bias

    def apply(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def abs_linear(self, radius: Tensor) -> Tensor:
        return F.linear(radius, self.weight.abs())

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return a @ self.weight

    def bias_term(self, a: Tensor) -> Tensor:
        if self.bias is None:
            return a.new_zeros(a.shape[0])
        return a.reshape(a.shape[0], -1, self.bias.shape[0]).sum(1) @ self.bias

    def row_norms(self, mask: Tensor) -> Tensor:
        """``||W_j * mask||_2`` for every output unit ``j`` (``mask``: one sample's shape)."""
        return F.linear(mask, self.weight.square()).clamp_min(0).sqrt()


class Conv2dOp(AffineOp):
    def __init__(self, path: str, module: nn.Conv2d) -> None:
        super().__init__(path)
        if module.padding_mode != "zeros":
            raise AdvtrainError(
                f"layer {path!r} (Conv2d) pads with {module.padding_mode!r}; bound propagation "
                "supports zero padding only"
            )
        self.weight, self.bias = module.weight, module.bias
        self.stride = _pair(module.stride)
        self.dilation = _pair(module.dilation)
        self.groups = module.groups
        self.padding = _conv_padding(path, module)

    def apply(self, x: Tensor) -> Tensor:
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )

    def abs_linear(self, radius: Tensor) -> Tensor:
        return F.conv2d(
            radius, self.weight.abs(), None, self.stride, self.padding, self.dilation, self.groups
        )

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        extra = _output_padding(
            a.shape[-2:], in_shape[-2:], self.weight.shape[-2:], self.stride, self.padding,
            self.dilation,
        )  # fmt: skip
        return F.conv_transpose2d(
            a, self.weight, None, self.stride, self.padding, extra, self.groups, self.dilation
        )

    def bias_term(self, a: Tensor) -> Tensor:
        if self.bias is None:
            return a.new_zeros(a.shape[0])
        return a.sum((2, 3)) @ self.bias

    def row_norms(self, mask: Tensor) -> Tensor:
        """``||W_j * mask||_2`` for every output unit ``j`` (``mask``: one sample's shape)."""
        return F.conv2d(
            mask.unsqueeze(0), self.weight.square(), None, self.stride, self.padding,
            self.dilation, self.groups,
        ).clamp_min(0).sqrt()  # fmt: skip


class ChannelAffineOp(AffineOp):
    """``x * scale + shift`` per channel (dimension 1): BatchNorm in eval mode, ``Normalize``."""

    def __init__(self, path: str, scale: Tensor, shift: Tensor) -> None:
        super().__init__(path)
        self.scale, self.shift = scale, shift

    def _like(self, t: Tensor, ndim: int) -> Tensor:
        return t.reshape((-1,) + (1,) * (ndim - 2))

    def apply(self, x: Tensor) -> Tensor:
        return x * self._like(self.scale, x.dim()) + self._like(self.shift, x.dim())

    def abs_linear(self, radius: Tensor) -> Tensor:
        return radius * self._like(self.scale.abs(), radius.dim())

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return a * self._like(self.scale, a.dim())

    def bias_term(self, a: Tensor) -> Tensor:
        shift = self._like(self.shift, a.dim())
        return (a * shift).reshape(a.shape[0], -1).sum(1)


class AvgPoolOp(AffineOp):
    def __init__(self, path: str, module: nn.AvgPool2d) -> None:
        super().__init__(path)
        self.kernel = _pair(module.kernel_size)
        self.stride = _pair(module.stride if module.stride is not None else module.kernel_size)
        self.padding = _pair(module.padding)
        if (
            module.ceil_mode
            or module.divisor_override is not None
            or (any(self.padding) and not module.count_include_pad)
        ):
            raise AdvtrainError(
                f"layer {path!r} (AvgPool2d): bound propagation supports ceil_mode=False, no "
                "divisor_override, and count_include_pad=True when padded"
            )

    def apply(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding)

    def abs_linear(self, radius: Tensor) -> Tensor:
        return self.apply(radius)

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        channels = a.shape[1]
        weight = a.new_full((channels, 1, *self.kernel), 1.0 / (self.kernel[0] * self.kernel[1]))
        extra = _output_padding(
            a.shape[-2:], in_shape[-2:], self.kernel, self.stride, self.padding, (1, 1)
        )
        return F.conv_transpose2d(a, weight, None, self.stride, self.padding, extra, channels)

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[0])


class FlattenOp(AffineOp):
    def apply(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def abs_linear(self, radius: Tensor) -> Tensor:
        return radius.flatten(1)

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return a.reshape(a.shape[0], *in_shape)

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[0])


class MeanPoolOp(AffineOp):
    """The mean over the spatial dimensions, kept as ``(C, 1, 1)`` (``AdaptiveAvgPool2d(1)``)."""

    def apply(self, x: Tensor) -> Tensor:
        return x.mean((2, 3), keepdim=True)

    def abs_linear(self, radius: Tensor) -> Tensor:
        return self.apply(radius)

    def transpose(self, a: Tensor, in_shape: tuple[int, ...]) -> Tensor:
        return (a / (in_shape[-1] * in_shape[-2])).expand(a.shape[0], *in_shape)

    def bias_term(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[0])


class AddOp(Op):
    """The sum of two nodes (a residual connection)."""


@dataclass(frozen=True)
class Network:
    """A model as operations in an order where every input comes first (see
    :func:`advtrain.certify.network.parse`).

    Node 0 is the model's input and node ``i + 1`` the output of ``ops[i]``; ``sources[i]``
    names the nodes ``ops[i]`` reads (one, or two for :class:`AddOp`). A chain (a Sequential)
    has ``sources[i] == (i,)``; the model's output is the last node.
    """

    ops: tuple[Op, ...]
    sources: tuple[tuple[int, ...], ...]

    @classmethod
    def chain(cls, ops: tuple[Op, ...]) -> Network:
        """Operations applied one after the other."""
        return cls(ops, tuple((i,) for i in range(len(ops))))

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def forward(self, x: Tensor) -> Tensor:
        """The model's output through the parsed operations (the same as the model's)."""
        values = [x]
        for op, sources in zip(self.ops, self.sources):
            first = values[sources[0]]
            if isinstance(op, ReLUOp):
                values.append(first.clamp_min(0))
            elif isinstance(op, AddOp):
                values.append(first + values[sources[1]])
            else:
                values.append(_affine(op).apply(first))
        return values[-1]

    def tail_start(self) -> int:
        """The node where the last chain of affine operations (after the last ReLU or sum)
        starts: everything from there to the output is one affine map of that node."""
        start = len(self.ops)
        while (
            start > 0
            and isinstance(self.ops[start - 1], AffineOp)
            and self.sources[start - 1] == (start - 1,)
        ):
            start -= 1
        return start

    def feeds_relu(self, node: int) -> bool:
        """Whether a ReLU reads ``node``."""
        return any(
            isinstance(op, ReLUOp) and node in sources
            for op, sources in zip(self.ops, self.sources)
        )


def _affine(op: Op) -> AffineOp:
    assert isinstance(op, AffineOp)
    return op


def leaf_op(module: nn.Module, name: str) -> Op | None:
    """The operation of one layer (``None`` for a layer that passes its input on)."""
    kind = type(module).__name__
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)) and module.training:
        raise AdvtrainError(
            f"layer {name!r} ({kind}) is in training mode; bounds need it in eval mode "
            "(call model.eval())"
        )
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return None
    if isinstance(module, nn.ReLU):
        return ReLUOp(name)
    if isinstance(module, nn.Linear):
        return LinearOp(name, module)
    if isinstance(module, nn.Conv2d):
        return Conv2dOp(name, module)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batchnorm(name, module)
    if isinstance(module, nn.AvgPool2d):
        return AvgPoolOp(name, module)
    if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
        return MeanPoolOp(name)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise AdvtrainError(
                f"layer {name!r} (Flatten) flattens dims {module.start_dim}..{module.end_dim}; "
                "bound propagation supports Flatten(1, -1) only"
            )
        return FlattenOp(name)
    if isinstance(module, Normalize):
        std = module.std.flatten()
        return ChannelAffineOp(name, 1 / std, -module.mean.flatten() / std)
    raise unsupported(name, kind)


def unsupported(name: str, kind: str) -> AdvtrainError:
    """The error for a layer bound propagation does not know."""
    return AdvtrainError(
        f"layer {name!r} ({kind}) is not supported by bound propagation; supported: {SUPPORTED}"
    )


def _batchnorm(path: str, module: nn.BatchNorm1d | nn.BatchNorm2d) -> ChannelAffineOp:
    mean, var = module.running_mean, module.running_var
    if mean is None or var is None:
        raise AdvtrainError(
            f"layer {path!r} ({type(module).__name__}) keeps no running statistics; bound "
            "propagation needs them"
        )
    inv = torch.rsqrt(var + module.eps)
    scale = inv if module.weight is None else module.weight * inv
    shift = -mean * scale if module.bias is None else module.bias - mean * scale
    return ChannelAffineOp(path, scale, shift)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[-1]))


def _conv_padding(path: str, module: nn.Conv2d) -> tuple[int, int]:
    padding = module.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(_pair(module.dilation), _pair(module.kernel_size))]
        if any(t % 2 for t in total):
            raise AdvtrainError(
                f"layer {path!r} (Conv2d) pads 'same' unevenly; bound propagation supports "
                "symmetric padding only"
            )
        return (total[0] // 2, total[1] // 2)
    assert not isinstance(padding, str)
    return _pair(padding)


def _output_padding(
    out_hw: tuple[int, ...] | torch.Size,
    in_hw: tuple[int, ...],
    kernel: tuple[int, ...] | torch.Size,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """The ``output_padding`` that makes a transposed convolution give back ``in_hw``."""
    extra = tuple(
        i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, k, s, p, d in zip(in_hw, out_hw, kernel, stride, padding, dilation)
    )
    return (int(extra[0]), int(extra[1]))
