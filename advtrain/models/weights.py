"""Weights into a model behind its adapters, whichever layer the file was saved from.

A model built with ``normalize`` or from ``torchvision:``/``timm:`` is the network behind
adapters: ``Sequential(Normalize, LogitsModel(net))``. A run of advtrain saves the model it
trained, adapters included (keys ``1.model.conv1.weight``, ``0.mean``, ...); a file from
elsewhere holds the bare network (``conv1.weight``, as torchvision and timm name them).
:func:`load_adapted_weights` takes either: it loads the file into the layer whose keys it
holds. A file saved with normalisation inside must declare the same mean and std as the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from ..checkpoint import load_state_dict, load_state_into
from ..errors import CheckpointError
from .adapters import LogitsModel, Normalize


def adapter_layers(model: nn.Module) -> Iterator[nn.Module]:
    """``model``, then each network inside its adapters, outermost first."""
    while True:
        yield model
        if isinstance(model, LogitsModel):
            model = model.model
        elif is_normalized(model):
            model = cast("nn.Sequential", model)[1]
        else:
            return


def is_normalized(model: nn.Module) -> bool:
    """Whether ``model`` is a network behind a :class:`Normalize` (``with_normalization``)."""
    return isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize)


def load_adapted_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` or the network inside its adapters (the
    layer whose keys the file holds exactly) and return ``model``. A mismatch is a one-line
    :class:`~advtrain.errors.CheckpointError` naming a few keys, against the closest layer."""
    state = load_state_dict(path)
    layers = list(adapter_layers(model))
    for layer in layers:
        if set(layer.state_dict()) == set(state):
            _check_normalization(layer, state, path)
            load_state_into(layer, state, path)
            return model
    saved = _saved_normalization(state)
    if saved is not None and not is_normalized(model):
        mean, std = ("/".join(f"{v:.4g}" for v in t.flatten().tolist()) for t in saved)
        raise CheckpointError(
            f"{path} holds a model with normalisation inside (mean {mean}, std {std}): "
            f"give --normalize {mean},{std}"
        )
    closest = max(layers, key=lambda layer: len(set(layer.state_dict()) & set(state)))
    load_state_into(closest, state, path)  # raises, naming the keys that differ
    return model


def _saved_normalization(state: Mapping[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    if "0.mean" in state and "0.std" in state:
        return state["0.mean"], state["0.std"]
    return None


def _check_normalization(layer: nn.Module, state: Mapping[str, Tensor], path: str | Path) -> None:
    """A file saved behind a :class:`Normalize` must carry the model's mean and std."""
    saved = _saved_normalization(state)
    if saved is None or not is_normalized(layer):
        return
    norm = cast("Normalize", cast("nn.Sequential", layer)[0])
    for name, value, own in (("mean", saved[0], norm.mean), ("std", saved[1], norm.std)):
        if value.shape != own.shape or not torch.allclose(value.float(), own, atol=1e-6):
            values = "/".join(f"{v:.4g}" for v in value.flatten().tolist())
            mine = "/".join(f"{v:.4g}" for v in own.flatten().tolist())
            raise CheckpointError(
                f"{path} was saved with normalisation {name} {values}, but the model declares "
                f"{mine}: give the --normalize the model was trained with"
            )
