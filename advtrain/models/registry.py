"""The model registry: architecture name -> builder ``(in_shape, n_classes) -> nn.Module``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import AdvtrainError, unknown
from ._shapes import as_shape
from .mnist import mnist_large, mnist_small
from .preact_resnet import preact_resnet18
from .small import digits_cnn, digits_cnn_bn, mlp

Builder = Callable[[tuple[int, ...], int], nn.Module]

BUILDERS: dict[str, Builder] = {
    "digits-cnn": digits_cnn,
    "digits-cnn-bn": digits_cnn_bn,
    "mlp": mlp,
    "mnist-large": mnist_large,
    "mnist-small": mnist_small,
    "preact-resnet18": preact_resnet18,
}
MODELS: tuple[str, ...] = tuple(sorted(BUILDERS))


def build_model(name: str, *, in_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised ``name`` model for inputs of shape ``in_shape`` (no batch dimension)
    that returns ``n_classes`` logits per input."""
    try:
        builder = BUILDERS[name]
    except (KeyError, TypeError):
        raise unknown("model", name, MODELS) from None
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        raise AdvtrainError(f"model {name!r}: n_classes must be an integer >= 2, got {n_classes!r}")
    return builder(as_shape(name, in_shape), n_classes)
