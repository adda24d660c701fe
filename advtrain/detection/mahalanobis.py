"""Mahalanobis distance in feature space.

Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution samples and
adversarial attacks" (NeurIPS 2018). On the classifier's penultimate features ``f(x)``: one
Gaussian per class with the class mean ``mu_c`` and a covariance ``Sigma`` shared by all classes
(tied), fitted on clean training data; the score is the smallest squared Mahalanobis distance
``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` (the paper's confidence score, negated, so that higher
is more suspicious).

Kept: the tied class-conditional Gaussians on the last hidden layer and the minimum distance.
Left out: the input preprocessing (a small FGSM-like step towards the closest class, tuned on
adversarial data) and the logistic-regression ensemble over several layers, both of which the
paper tunes on the attack it then detects. A ridge of ``1e-6`` times the mean variance keeps
``Sigma`` invertible. The score is differentiable in ``x``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..models.features import logits_and_features, readout_name
from .base import Detector

RIDGE = 1e-6


class MahalanobisDetector(Detector):
    """Lee et al. (2018): the minimum class-conditional Mahalanobis distance of the features.

    Args:
        model: the classifier (its readout is the last ``nn.Linear`` it calls).
        readout: the readout module's name (found by :meth:`fit` when None).
        n_classes, dim: the shapes of the saved statistics (set by :meth:`fit`).
    """

    kind = "mahalanobis"

    def __init__(
        self, model: nn.Module, *, readout: str | None = None, n_classes: int = 0, dim: int = 0
    ) -> None:
        super().__init__(model)
        self.readout = readout
        self.register_buffer("means", torch.zeros(n_classes, dim))
        self.register_buffer("precision", torch.zeros(dim, dim))

    means: Tensor
    precision: Tensor

    def config(self) -> dict[str, Any]:
        return {
            "readout": self.readout,
            "n_classes": int(self.means.shape[0]),
            "dim": int(self.means.shape[1]),
        }

    def fit(self, x: Tensor, y: Tensor, *, batch_size: int = 1000, **_: Any) -> Detector:
        """Class means and the tied covariance of the clean training features."""
        if self.readout is None:
            self.readout = readout_name(self.classifier, x[:1].to(self._device()))
        features = self._features(x, batch_size)
        classes = int(y.max()) + 1 if len(y) else 0
        means = torch.zeros(classes, features.shape[1], dtype=torch.float64)
        centred = torch.empty_like(features)
        for c in range(classes):
            rows = y == c
            if not bool(rows.any()):
                raise AdvtrainError(f"mahalanobis: no training input of class {c}")
            means[c] = features[rows].mean(dim=0)
            centred[rows] = features[rows] - means[c]
        covariance = centred.T @ centred / max(len(features), 1)
        ridge = RIDGE * float(covariance.diagonal().mean().clamp_min(1e-12))
        covariance += ridge * torch.eye(len(covariance), dtype=torch.float64)
        self.means = means.float()
        self.precision = torch.linalg.pinv(covariance, hermitian=True).float()
        return self

    def _device(self) -> torch.device:
        for p in self.classifier.parameters():
            return p.device
        return torch.device("cpu")

    def _features(self, x: Tensor, batch_size: int) -> Tensor:
        assert self.readout is not None
        out = []
        device = self._device()
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                _, f = logits_and_features(
                    self.classifier, self.readout, x[i : i + batch_size].to(device)
                )
                out.append(f.double().cpu())
        return torch.cat(out)

    def distances(self, features: Tensor) -> Tensor:
        """Squared Mahalanobis distance of each feature row to each class mean, ``(n, classes)``."""
        if self.means.numel() == 0:
            raise AdvtrainError("the mahalanobis detector is not fitted")
        diff = features[:, None, :] - self.means[None].to(features.dtype)
        return ((diff @ self.precision.to(features.dtype)) * diff).sum(dim=2)

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.readout is None:
            raise AdvtrainError("the mahalanobis detector is not fitted")
        logits, features = logits_and_features(self.classifier, self.readout, x)
        if features.shape[1] != self.means.shape[1]:
            raise AdvtrainError(
                f"mahalanobis: the model's features have {features.shape[1]} values, the "
                f"detector was fitted on {self.means.shape[1]}"
            )
        return logits, self.distances(features).amin(dim=1)

    def score(self, x: Tensor) -> Tensor:
        return self.logits_and_score(x)[1]
