"""A binary detector trained on adversarial examples of our own attacks.

Metzen, Genewein, Fischer & Bischoff, "On detecting adversarial perturbations" (ICLR 2017): a
small "detector subnetwork" attached to a hidden layer of the frozen classifier is trained to
tell clean inputs from adversarial examples of a given attack. Here the subnetwork is an MLP head
(one hidden layer of 64 ReLU units) on the classifier's penultimate features, the one hidden
layer every model with a linear readout has; Metzen et al. attach a convolutional head to an
earlier layer of a ResNet. Its training examples are PGD's (Madry et al. 2018; 10 steps, random
start, every point perturbed) in the threat model, on the training inputs; the clean inputs are
the negatives. The paper's "dynamic adversary" training (examples crafted against the detector
as it learns) is left out. The score is the head's logit, differentiable in the input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import PGD
from ..errors import AdvtrainError
from ..models.features import logits_and_features, readout_name
from ..threat import ThreatModel
from ..util import check_positive_int
from .base import Detector


class BinaryDetector(Detector):
    """Metzen et al. (2017): a head on the penultimate features, trained on PGD examples.

    Args:
        model: the classifier (frozen; only the head learns).
        readout: the classifier's readout module (found by :meth:`fit` when None).
        dim: the features' width; hidden: the head's hidden units (default 64).
    """

    kind = "binary"

    def __init__(
        self, model: nn.Module, *, readout: str | None = None, dim: int = 0, hidden: int = 64
    ) -> None:
        super().__init__(model)
        check_positive_int("hidden", hidden)
        self.readout = readout
        self.dim, self.hidden = dim, hidden
        self.head = self._head(dim) if dim else nn.Sequential()  # built by fit() when unknown

    def _head(self, dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def config(self) -> dict[str, Any]:
        return {"readout": self.readout, "dim": self.dim, "hidden": self.hidden}

    def fit(
        self,
        x: Tensor,
        y: Tensor,
        *,
        threat: ThreatModel | None = None,
        seed: int = 0,
        epochs: int = 20,
        attack_steps: int = 10,
        batch_size: int = 1000,
        x_adv: Tensor | None = None,
        **_: Any,
    ) -> Detector:
        """Train the head on ``x`` (clean, label 0) and PGD examples of ``x`` (label 1; or the
        given ``x_adv``, one per row of ``x``, e.g. to train a peer on the same examples)."""
        if threat is None:
            raise AdvtrainError("the binary detector needs the threat model its examples come from")
        check_positive_int("epochs", epochs)
        device = next(iter(self.classifier.parameters()), torch.zeros(0)).device
        if self.readout is None:
            self.readout = readout_name(self.classifier, x[:1].to(device))
        if x_adv is None:
            x_adv = self.examples(x, y, threat, seed, attack_steps, batch_size)
        elif x_adv.shape != x.shape:
            raise AdvtrainError("x_adv must hold one adversarial example per training input")
        clean, adversarial = self._features(x, batch_size), self._features(x_adv, batch_size)
        if self.dim != clean.shape[1] or not len(self.head):
            self.dim = clean.shape[1]
            self.head = self._head(self.dim)
        self.head.to(device)
        features = torch.cat([clean, adversarial]).to(device)
        labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(adversarial))]).to(device)
        self._train_head(features, labels, seed, epochs)
        return self

    def examples(
        self,
        x: Tensor,
        y: Tensor,
        threat: ThreatModel,
        seed: int = 0,
        steps: int = 10,
        batch_size: int = 1000,
    ) -> Tensor:
        """The adversarial training examples: PGD (``steps``, random start, every point
        perturbed, the last iterate) against the classifier."""
        attack = PGD(threat, steps=steps, early_stop=False, seed=seed, batch_size=batch_size)
        return attack(self.classifier, x, y)

    def _features(self, x: Tensor, batch_size: int) -> Tensor:
        assert self.readout is not None
        device = next(iter(self.classifier.parameters()), torch.zeros(0)).device
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                _, f = logits_and_features(
                    self.classifier, self.readout, x[i : i + batch_size].to(device)
                )
                out.append(f.detach())
        return torch.cat(out)

    def _train_head(self, features: Tensor, labels: Tensor, seed: int, epochs: int) -> None:
        """Adam (lr 1e-3), batches of 128, binary cross-entropy on the head's logit."""
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        optimizer = torch.optim.Adam(self.head.parameters(), lr=1e-3)
        self.head.train()
        with torch.enable_grad():
            for _ in range(epochs):
                for index in torch.randperm(len(features), generator=generator).split(128):
                    index = index.to(features.device)
                    logit = self.head(features[index]).squeeze(1)
                    loss = F.binary_cross_entropy_with_logits(logit, labels[index])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        self.head.eval()

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.readout is None:
            raise AdvtrainError("the binary detector is not fitted")
        logits, features = logits_and_features(self.classifier, self.readout, x)
        if features.shape[1] != self.dim:
            raise AdvtrainError(
                f"binary: the model's features have {features.shape[1]} values, the detector's "
                f"head takes {self.dim}"
            )
        return logits, self.head(features).squeeze(1)

    def score(self, x: Tensor) -> Tensor:
        return self.logits_and_score(x)[1]
