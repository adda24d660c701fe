"""Which classes a targeted attack (APGD-T, FAB-T) aims at, and in which order.

- ``"logits"``: the most likely classes other than the true one, by logit (AutoAttack's rule,
  Croce & Hein 2020).
- ``"malt"``: MALT's rule (Melamed, Yehudai & Shamir, "MALT powers up adversarial attacks",
  NeurIPS 2024): among the ``MALT_CANDIDATES`` (the paper's ``a = 100``) most likely other
  classes, the nearest by the linearised distance to their decision boundary at the clean point,
  ``|z_y - z_t| / ||grad_x (z_y - z_t)||_*`` (``||.||_*`` the dual norm of the threat's norm:
  l1 for linf, l2 for l2, linf for l1), as one DeepFool step would measure it. A class with a
  small logit gap but a steep boundary can be further away than one with a larger gap. It costs
  one forward pass and one backward pass per candidate class on each point.

Where the gradients carry no information (zero or not finite) the distances tie or are
unusable, and the order falls back to the logit order.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..losses import other_classes
from .deepfool import boundary_gradients, dual_norm

#: The orders :func:`ranked_targets` knows.
TARGET_ORDERS = ("logits", "malt")
#: Candidate classes MALT ranks by distance (the paper's ``a``).
MALT_CANDIDATES = 100
#: The most gradient values (points x classes x input features) held at once by MALT's ranking.
GRADIENT_BUDGET = 1 << 25


def check_target_order(order: str) -> str:
    """``order`` if it is one of :data:`TARGET_ORDERS`, else a one-line AdvtrainError."""
    if order not in TARGET_ORDERS:
        raise AdvtrainError(
            f"target_order must be one of {', '.join(map(repr, TARGET_ORDERS))}, got {order!r}"
        )
    return order


def ranked_targets(
    model: nn.Module, x: Tensor, y: Tensor, n_targets: int | None, order: str, norm: str
) -> Tensor:
    """Per point, ``min(n_targets, n_classes - 1)`` classes other than ``y`` (every other class
    when ``n_targets`` is None) in the order a targeted attack tries them, shape (n, count): by
    logit (``"logits"``) or by MALT's linearised distance (``"malt"``)."""
    with torch.no_grad():
        logits = model(x)
    n_classes = logits.shape[1]
    count = max(min(n_targets or n_classes - 1, n_classes - 1), 0)
    if order == "logits" or n_classes <= 2:
        return other_classes(logits, y, count)
    pool = other_classes(logits, y, max(min(MALT_CANDIDATES, n_classes - 1), count))
    distance = linearised_distance(model, x, y, pool, norm)
    # stable: equal (or unusable, made inf) distances keep the logit order
    nearest = distance.sort(dim=1, stable=True).indices[:, :count]
    return pool.gather(1, nearest)


def linearised_distance(
    model: nn.Module, x: Tensor, y: Tensor, classes: Tensor, norm: str
) -> Tensor:
    """``|z_y - z_t| / ||grad (z_y - z_t)||_*`` at ``x`` for the classes ``classes`` (n, K),
    shape (n, K); ``inf`` where it is not finite. The classes go through the model in groups
    small enough that the gradients held stay under :data:`GRADIENT_BUDGET` values."""
    n, k = classes.shape
    features = max(x[:1].numel(), 1)
    group = max(GRADIENT_BUDGET // max(n * features, 1), 1)
    parts = []
    for start in range(0, k, group):
        _, diff, grads = boundary_gradients(model, x, classes[:, start : start + group], y)
        parts.append(diff.abs() / dual_norm(grads, norm))
    distance = torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, device=x.device)
    return torch.where(torch.isfinite(distance), distance, torch.full_like(distance, float("inf")))
