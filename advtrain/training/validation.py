"""What a run measures on its validation split after each epoch (and on its test split at the end).

Clean and robust accuracy as :func:`advtrain.evaluation.clean_and_robust_accuracy` measures
them, to the bit: the rows classified correctly are attacked in chunks of ``batch_size`` and a
misclassified row counts as broken. On a dataset with a positive class (fraud, malignant) the
same pass also gives that class's figures, clean and under the attack:

- recall: the share of positive rows flagged (under attack: still flagged after the attack;
  a positive row missed clean stays missed);
- PR-AUC: scikit-learn's ``average_precision_score`` of the score ``z_p - max_{c != p} z_c``
  (for two classes the log-odds of the positive class). Under attack each attacked row is
  scored at the attack's output (a positive row pushed towards the other classes, a negative
  one towards the positive class: the worst case for the ranking on both sides) and each row
  misclassified clean at its clean point, as in the evaluation suite.

An undefined figure (no positive row, or no negative one for PR-AUC) is None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks import Attack, frozen
from ..attacks.base import model_device
from ..data.lazy import Inputs
from ..evaluation.metrics import positive_class_metrics, positive_score

#: The positive-class figures an :class:`EpochFigures` may carry, in order.
POSITIVE_FIELDS = ("clean_recall", "robust_recall", "clean_pr_auc", "robust_pr_auc")


@dataclass(frozen=True)
class EpochFigures:
    """Clean and robust accuracy on a split; with a positive class, its recall and PR-AUC."""

    clean_accuracy: float
    robust_accuracy: float
    clean_recall: float | None = None
    robust_recall: float | None = None
    clean_pr_auc: float | None = None
    robust_pr_auc: float | None = None

    def as_list(self) -> list[float]:
        """Every figure as a float (None as NaN), to send to the other ranks."""
        values = [self.clean_accuracy, self.robust_accuracy]
        values += [getattr(self, name) for name in POSITIVE_FIELDS]
        return [float("nan") if v is None else float(v) for v in values]

    @classmethod
    def from_list(cls, values: list[float]) -> EpochFigures:
        """The figures :meth:`as_list` gave (NaN back to None for the positive class's)."""
        positive = [None if v != v else float(v) for v in values[2:]]  # NaN != NaN
        return cls(float(values[0]), float(values[1]), *positive)

    def positive(self) -> dict[str, float | None]:
        """The positive class's figures by name (all None without a positive class)."""
        return {name: getattr(self, name) for name in POSITIVE_FIELDS}


def logits_of(model: nn.Module, x: Inputs, batch_size: int) -> Tensor:
    """The model's logits for ``x``, in batches, in eval mode (restored), on ``x``'s device;
    their argmax is :func:`advtrain.evaluation.predict`'s labels. Inputs read on demand
    (:class:`~advtrain.data.lazy.LazyInputs`) are read one batch at a time."""
    device = model_device(model, default=x.device)
    with frozen(model), torch.no_grad():
        parts = [
            model(x[i : i + batch_size].to(device)).float().to(x.device)
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts)


def measure(
    model: nn.Module,
    x: Inputs,
    y: Tensor,
    attack: Attack,
    batch_size: int,
    positive_class: int | None = None,
) -> EpochFigures:
    """The figures of ``model`` on ``x, y`` under ``attack`` (see the module docstring).

    ``x`` may be read on demand (:class:`~advtrain.data.lazy.LazyInputs`): it is then read one
    chunk of ``batch_size`` at a time, moved to ``y``'s device, and never held whole.
    """
    if len(x) == 0:
        return EpochFigures(float("nan"), float("nan"))
    clean_logits = logits_of(model, x, batch_size).to(y.device)
    clean_pred = clean_logits.argmax(dim=1)
    correct = clean_pred == y
    robust = correct.clone()
    adv_logits = clean_logits.clone()
    index = correct.nonzero().squeeze(1)
    for start in range(0, len(index), batch_size):
        chunk = index[start : start + batch_size]
        x_adv = attack(model, x[chunk].to(y.device), y[chunk])
        chunk_logits = logits_of(model, x_adv, batch_size)
        adv_logits[chunk] = chunk_logits
        robust[chunk] = chunk_logits.argmax(dim=1) == y[chunk]
    clean_acc, robust_acc = float(correct.float().mean()), float(robust.float().mean())
    if positive_class is None:
        return EpochFigures(clean_acc, robust_acc)
    clean = positive_class_metrics(
        y, clean_pred, positive_score(clean_logits, positive_class), positive_class
    )
    attacked = positive_class_metrics(
        y, adv_logits.argmax(dim=1), positive_score(adv_logits, positive_class), positive_class
    )
    return EpochFigures(
        clean_acc,
        robust_acc,
        clean_recall=_number(clean["recall"]),
        robust_recall=_number(attacked["recall"]),
        clean_pr_auc=_number(clean["pr_auc"]),
        robust_pr_auc=_number(attacked["pr_auc"]),
    )


def _number(value: float | int | None) -> float | None:
    return None if value is None else float(value)
