"""Models as people have them: outputs that are not a logits tensor, and normalisation inside.

Hugging Face and timm models often return a tuple, a dict or an output object instead of a
tensor of logits (torchattacks #193, ART #1280). :func:`logits_model` wraps such a model so it
returns the logits: a tuple's (or list's) first element, a dict's ``"logits"``, an object's
``.logits``; anything else is a one-line error naming what came back.

Networks trained with mean/std normalisation expect normalised inputs, while the threat model
and every attack work in [0, 1] pixel space, the convention of the published robustness figures
(AutoAttack #13/#46/#53). :func:`with_normalization` puts the normalisation inside the model as
its first layer, so the attacks never see it; :data:`NORMALIZATIONS` names the usual ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError

#: Per-channel means and standard deviations by name.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}


def extract_logits(output: Any) -> Tensor:
    """The logits in a model's output: the tensor itself, a tuple's or list's first element, a
    mapping's ``"logits"``, an object's ``.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Sequence) and not isinstance(output, str) and output:
        first = output[0]
        if isinstance(first, Tensor):
            return first
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), Tensor):
            return output["logits"]
        keys = ", ".join(map(str, output))
        raise AdvtrainError(f"the model returns a dict without a 'logits' tensor (keys: {keys})")
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise AdvtrainError(
        f"the model returns {type(output).__name__}, not logits: expected a tensor, a tuple whose "
        "first element is one, a dict with 'logits' or an object with .logits"
    )


class LogitsModel(nn.Module):
    """``model`` with its output reduced to the logits (:func:`extract_logits`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return extract_logits(self.model(x))


def logits_model(model: nn.Module) -> nn.Module:
    """``model`` wrapped in :class:`LogitsModel` (once: an adapted model is returned as it is).
    A model that already returns a tensor passes through the wrapper unchanged."""
    return model if isinstance(model, LogitsModel) else LogitsModel(model)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dimension 1), as the first layer of a model; one mean
    and one std apply to every channel."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise AdvtrainError(
                f"normalisation needs one mean and one std per channel, got {len(mean)} means "
                f"and {len(std)} stds"
            )
        if any(not s > 0 for s in std):
            raise AdvtrainError(f"every std must be > 0, got {tuple(std)}")
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: Tensor) -> Tensor:
        channels = self.mean.shape[1]
        if x.dim() != 4 or (channels > 1 and x.shape[1] != channels):
            raise AdvtrainError(
                f"normalisation for {channels} channels got inputs of shape {tuple(x.shape)}"
            )
        return (x - self.mean) / self.std


def parse_normalization(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``imagenet``, ``cifar10`` or ``MEAN,STD`` (one value each for all channels, or
    ``m1/m2/m3,s1/s2/s3`` per channel) as ``(mean, std)``."""
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = (tuple(float(v) for v in part.split("/")) for part in parts)
    except ValueError:
        raise AdvtrainError(
            f"unknown normalisation {text!r}: give {', '.join(NORMALIZATIONS)} or MEAN,STD "
            "(per channel: m1/m2/m3,s1/s2/s3)"
        ) from None
    if len(mean) != len(std):
        raise AdvtrainError(f"normalisation {text!r} has {len(mean)} means and {len(std)} stds")
    return mean, std


def with_normalization(
    model: nn.Module, mean: Sequence[float], std: Sequence[float]
) -> nn.Sequential:
    """``model`` behind a :class:`Normalize` layer: it takes [0, 1] pixels from then on."""
    return nn.Sequential(Normalize(mean, std), model)
