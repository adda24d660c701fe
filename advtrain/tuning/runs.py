"""A run directory's data and model, built from its ``config.json`` and kept weights.

The sweep trains each trial as an ordinary run (:class:`~advtrain.training.Trainer` writing to
its own directory) and reads the kept model back to evaluate it on the test split; ``advtrain
check`` does the same with a run it is given. Only what a run directory holds is used: the
configuration, ``model.safetensors`` and its sidecar (no pickles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..data import Dataset
from ..errors import AdvtrainError
from ..models import build_model
from ..models.weights import load_adapted_weights
from ..training.config import TrainConfig, load_run_config
from ..training.config_data import load_config_data


def load_data(config: TrainConfig) -> Dataset:
    """The data a configuration names (a built-in set, a table with its schema, or images),
    split by its seed and fractions, as ``advtrain train`` reads them."""
    if config.num_classes is not None:
        raise AdvtrainError("num_classes is not supported in a sweep; leave it unset")
    return load_config_data(config)


def fresh_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The configuration's architecture with new weights (seeded with its seed)."""
    torch.manual_seed(config.seed)
    return build_model(
        model_name(config, data),
        in_shape=data.info.shape,
        n_classes=data.info.n_classes,
        normalize=config.normalize,
    )


def model_name(config: TrainConfig, data: Dataset) -> str:
    """The configuration's model; for a table left at the image default, ``mlp`` (as ``advtrain
    train`` does)."""
    if data.info.kind == "tabular" and config.model == "digits-cnn":
        return "mlp"
    return config.model


@dataclass
class LoadedRun:
    """A run directory's configuration, data, kept model and the checkpoint's sidecar."""

    config: TrainConfig
    data: Dataset
    model: nn.Module
    meta: dict[str, Any]

    @property
    def eps(self) -> float:
        return float(self.meta.get("eps", self.config.eps or 0.0))

    @property
    def norm(self) -> str:
        return str(self.meta.get("norm", self.config.norm))


def load_run(run_dir: str | Path) -> LoadedRun:
    """The kept model of ``run_dir`` (``model.safetensors``) with the data it was trained on."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    weights = run_dir / "model.safetensors"
    _, meta = load_checkpoint(weights)
    if "model" not in meta:
        raise AdvtrainError(f"'{weights}' has no advtrain sidecar naming its model")
    data = load_data(config)
    model = build_model(
        str(meta["model"]),
        in_shape=data.info.shape,
        n_classes=data.info.n_classes,
        normalize=config.normalize,
    )
    load_adapted_weights(model, weights)
    model.eval()
    return LoadedRun(config, data, model, meta)
