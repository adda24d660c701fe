"""What :func:`advtrain.evaluate` checks and prepares before any work: the points (a tensor, or a
dataset read on demand), the model's logits, the labels, and the resume state's settings."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from ..attacks.base import frozen
from ..errors import AdvtrainError
from ..models.adapters import logits_model
from ..threat import ThreatModel
from .context import EvalContext
from .journal import Journal, model_digest, tensor_digest
from .points import Points, StreamedPoints, TensorPoints, dataset_labels
from .shards import seeded


def as_points(
    x: Tensor | Iterable[Any], y: Tensor | None, threat: ThreatModel, device: torch.device
) -> tuple[Points, Tensor]:
    """The points to evaluate and their labels on ``device``: a tensor as given (checked against
    the threat model now), a dataset read on demand (each read checked), or the batches of
    another iterable read whole."""
    if isinstance(x, Tensor):
        if y is None:
            raise AdvtrainError("evaluate needs labels y with a tensor x")
        if not isinstance(y, Tensor) or y.shape != (len(x),):
            raise AdvtrainError(f"y must be a tensor of shape ({len(x)},)")
        threat.validate(x)
        return TensorPoints(x.detach().to(device)), y.to(device)
    if y is not None:
        raise AdvtrainError("pass either x and y tensors or one dataset or DataLoader")
    source = x.dataset if isinstance(x, DataLoader) else x
    if (isinstance(source, TorchDataset) and not isinstance(source, IterableDataset)) or hasattr(
        source, "labels"
    ):
        labels = dataset_labels(source)
        if not len(labels):
            raise AdvtrainError("the dataset to evaluate is empty")
        points = StreamedPoints(source, device, check=threat.validate)
        points[torch.arange(min(len(labels), 2))]  # the first rows checked before any work
        return points, labels.to(device)
    xs, ys = [], []
    try:
        for batch in x:
            bx, by = batch[0], batch[1]
            xs.append(bx)
            ys.append(by)
    except (TypeError, IndexError):
        raise AdvtrainError(
            "evaluate needs x, y tensors, a dataset of (x, y) items or an iterable of (x, y) "
            "batches"
        ) from None
    if not xs:
        raise AdvtrainError("the data loader gave no batches")
    return as_points(torch.cat(xs), torch.cat(ys), threat, device)


def logits_only(model: nn.Module, points: Points, seed: int) -> nn.Module:
    """``model``, or its logits adapter (:func:`advtrain.models.logits_model`) where it returns a
    tuple, a dict or an output object; any other output is an error that names it."""
    if not len(points):
        return model
    with seeded(seed, points.device), torch.no_grad(), frozen(model):
        out = model(points[0:1])
    if isinstance(out, Tensor):
        return model
    adapted = logits_model(model)
    with seeded(seed, points.device), torch.no_grad(), frozen(adapted):
        adapted(points[0:1])  # a one-line error for an output with no logits in it
    return adapted


def check_labels(y: Tensor, n_classes: int) -> None:
    """Labels must be class indices of the model: integers in ``0..n_classes-1``."""
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise AdvtrainError(f"labels must be integer class indices, got {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        bad = int(y.max()) if int(y.max()) >= n_classes else int(y.min())
        raise AdvtrainError(
            f"label {bad} is outside 0..{n_classes - 1}: the model has {n_classes} classes "
            "(pass n_classes, or check the labels)"
        )


def resume_journal(directory: str | Path, ctx: EvalContext, model: nn.Module) -> Journal:
    """The resume state for this evaluation: its settings as digests and values."""
    settings = asdict(ctx.settings)
    threat = ctx.threat
    return Journal(
        directory,
        {
            "model": model_digest(model),
            "points": ctx.x.fingerprint(ctx.batch_size),
            "labels": tensor_digest(ctx.y),
            "threat": {
                "norm": threat.norm,
                "eps": threat.eps,
                "lower": _digest_or_value(threat.lower),
                "upper": _digest_or_value(threat.upper),
                "mask": None if threat.mask is None else tensor_digest(threat.mask),
                "constraints": None
                if threat.constraints is None
                else json.loads(json.dumps(threat.constraints.describe(), default=str)),
            },
            "settings": json.loads(json.dumps(settings, default=str)),
            "n_classes": ctx.n_classes,
            "processes": ctx.shards.world,
        },
    )


def _digest_or_value(value: float | Tensor) -> float | str:
    return tensor_digest(value) if isinstance(value, Tensor) else float(value)
