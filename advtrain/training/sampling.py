"""The order in which an epoch visits the training rows: a shuffle, or a class-balanced draw.

``class_weight = "balanced"`` trains for a minority class by *sampling*: each epoch draws as
many rows as the training split holds, an equal share from every class present (the first
``n mod K`` classes one row more), then shuffles them. Within a class the draw cycles through
random permutations of its rows, so each row of a class is drawn ``floor`` or ``ceil`` of the
same number of times: a minority class is repeated, a majority class is subsampled afresh each
epoch. In expectation this gives every class the total weight scikit-learn's
``class_weight="balanced"`` gives it (``n / (K * n_c)`` per row); unlike a per-row weighted draw
(PyTorch's ``WeightedRandomSampler``) the class shares are exact in every epoch.

Why sampling rather than weighting the loss: every training method computes its own loss
(PGD's cross-entropy, TRADES' KL term, MART's boosted loss, ...), several of them not as a mean
of per-row terms a weight could enter; a balanced batch changes what each method sees without
touching any of them, and its attack inside the loss then also works mostly on minority rows.

The draw uses the trainer's batch generator only, so it is seeded by the run's seed, identical
on every rank of a distributed run (each takes its rows of every batch), and restored exactly
on resume (the generator's state and the epoch's order are in the resume checkpoint). With
``class_weight`` unset the order is ``torch.randperm(n)`` as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import AdvtrainError


def epoch_order(labels: Tensor, class_weight: str | None, generator: torch.Generator) -> Tensor:
    """The indices of the training rows one epoch visits, in order (int64, ``len(labels)`` of
    them): a permutation when ``class_weight`` is None, :func:`balanced_order` for
    ``"balanced"``."""
    if class_weight is None:
        return torch.randperm(len(labels), generator=generator)
    if class_weight == "balanced":
        return balanced_order(labels, generator)
    raise AdvtrainError(f"unknown class_weight {class_weight!r}")


def balanced_order(labels: Tensor, generator: torch.Generator) -> Tensor:
    """``len(labels)`` row indices with an equal share per class present, shuffled (see the
    module docstring); drawn from ``generator`` only."""
    labels = labels.cpu()
    n = len(labels)
    classes = torch.unique(labels)  # sorted
    if n == 0 or len(classes) == 0:
        return torch.empty(0, dtype=torch.int64)
    share, extra = divmod(n, len(classes))
    drawn: list[Tensor] = []
    for position, label in enumerate(classes.tolist()):
        members = (labels == label).nonzero().squeeze(1)
        drawn.append(_cycled(members, share + (position < extra), generator))
    rows = torch.cat(drawn)
    return rows[torch.randperm(n, generator=generator)]


def _cycled(members: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` of ``members``: whole random permutations of them, then part of one more."""
    rounds = [
        members[torch.randperm(len(members), generator=generator)]
        for _ in range(-(-count // len(members)))
    ]
    return torch.cat(rounds)[:count] if rounds else members[:0]
