"""A surrogate model for transfer attacks, trained on the target task's data.

Papernot, McDaniel & Goodfellow (2016): when the target's weights are unknown but data of its
task is at hand, adversarial examples crafted on a model trained on that data often transfer
(:class:`~advtrain.attacks.Transfer`, measured by :func:`advtrain.evaluation.transfer_rate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import model_device
from ..util import check_positive_int

__all__ = ["fit_surrogate"]


def fit_surrogate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` as a surrogate on ``(x, y)``; returns it in eval mode.

    Standard training: cross-entropy, Adam with learning rate ``lr`` (default 3e-3), ``epochs``
    passes (default 10) over the data in batches of ``batch_size`` (default 64), shuffled by a
    generator seeded with ``seed``, on the model's device.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_positive_int(name, value)
    device = model_device(model, default=x.device)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(batch_size):
            index = index.to(device)
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()
