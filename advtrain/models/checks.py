"""Does a model fit a dataset? One forward pass tells, with a one-line error instead of a crash
deep inside an attack."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..util import one_line


def check_model_output(
    model: nn.Module, x: Tensor, n_classes: int, device: torch.device | None = None
) -> None:
    """One forward pass on ``x[:1]`` (moved to ``device`` when given, without gradients): the
    model must take the dataset's inputs and return one logit per class, shape
    ``(1, n_classes)``. Nothing is checked for an empty ``x``."""
    if len(x) == 0:
        return
    sample = x[:1] if device is None else x[:1].to(device)
    try:
        with torch.no_grad():
            logits = model(sample)
    except Exception as exc:  # any failure of a user's model is bad input, not a crash
        raise AdvtrainError(
            f"the model fails on inputs of shape {tuple(x.shape[1:])}: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(logits, Tensor) or logits.shape != (1, n_classes):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise AdvtrainError(
            f"the model returns {shape} for one input; expected {n_classes} logits, one per class"
        )
