"""The model registry: architecture name -> builder ``(in_shape, n_classes) -> nn.Module``;
``torchvision:NAME`` and ``timm:NAME`` build those libraries' networks (:mod:`.hub`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..errors import AdvtrainError, unknown
from ._shapes import as_shape
from .adapters import parse_normalization, with_normalization
from .hub import build_hub_model, is_hub_name
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
Normalization = str | tuple[Sequence[float], Sequence[float]]


def build_model(
    name: str,
    *,
    in_shape: tuple[int, ...],
    n_classes: int,
    normalize: Normalization | None = None,
) -> nn.Module:
    """A freshly initialised ``name`` model for inputs of shape ``in_shape`` (no batch dimension)
    that returns ``n_classes`` logits per input.

    ``name`` is a built-in architecture (:data:`MODELS`), ``torchvision:NAME`` or ``timm:NAME``
    (:mod:`advtrain.models.hub`; the optional ``vision`` extra). ``normalize`` (``"imagenet"``,
    ``"cifar10"``, ``"MEAN,STD"`` or a ``(mean, std)`` pair) becomes the model's first layer
    (:func:`~advtrain.models.adapters.with_normalization`): the model then takes [0, 1] pixels.
    """
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        raise AdvtrainError(f"model {name!r}: n_classes must be an integer >= 2, got {n_classes!r}")
    if is_hub_name(name):
        shape = as_shape(name, in_shape)
        mean_std = _normalization(normalize, shape)
        model = build_hub_model(name, shape, n_classes)
    else:
        try:
            builder = BUILDERS[name]
        except (KeyError, TypeError):
            raise unknown("model", name, (*MODELS, "torchvision:NAME", "timm:NAME")) from None
        shape = as_shape(name, in_shape)
        mean_std = _normalization(normalize, shape)
        model = builder(shape, n_classes)
    return model if mean_std is None else with_normalization(model, *mean_std)


def _normalization(
    normalize: Normalization | None, shape: tuple[int, ...]
) -> tuple[Sequence[float], Sequence[float]] | None:
    """``normalize`` as ``(mean, std)``, checked against the inputs' channels (dimension 0)."""
    if normalize is None:
        return None
    mean, std = parse_normalization(normalize) if isinstance(normalize, str) else normalize
    if len(shape) != 3 or len(mean) not in (1, shape[0]):
        given = normalize if isinstance(normalize, str) else "(mean, std)"
        raise AdvtrainError(
            f"normalisation {given} has {len(mean)} means; inputs of shape {shape} need one per "
            "channel of (C, H, W) images, or one for all"
        )
    return mean, std
