"""Training for randomized smoothing: Gaussian noise augmentation (Cohen et al. 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..threat import ThreatModel
from ..util import check_finite, check_positive_int
from .method import Method
from .methods import method

__all__ = ["GaussianNoise"]


@method("gaussian")
class GaussianNoise(Method):
    """Gaussian data augmentation for randomized smoothing: Cohen, Rosenfeld & Kolter,
    "Certified adversarial robustness via randomized smoothing" (ICML 2019).

    Each batch is trained on with cross-entropy at ``x + N(0, sigma^2 I)``, one fresh draw per
    input and step, so that the base model classifies well under the noise the smoothed
    classifier (:class:`advtrain.certify.Smoothed`) adds. Train and certify at the same
    ``sigma`` (the paper's models are trained and smoothed at one noise level each, 0.12 to 1.0
    on CIFAR-10, 0.25 to 1.0 on ImageNet); ``sigma`` defaults to 0.25, in input units (pixels
    in [0, 1]). As in the authors' ``train.py``, the noisy input is NOT clipped to the input box.
    Unlike ``--augment noise`` (a small perturbation added to any method's batch), the noise
    here is the whole method. No attack runs inside, so the threat model's eps, ``steps`` and
    ``step_size`` are accepted and ignored. The logits returned are those of the noisy inputs.
    """

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 10,
        step_size: float | None = None,
        sigma: float = 0.25,
    ) -> None:
        super().__init__(threat)
        check_positive_int("steps", steps)
        if step_size is not None:
            check_finite("step_size", step_size)
        self.sigma = check_finite("sigma", sigma, strict=True)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        noisy = x.detach() + self.sigma * torch.randn_like(x)
        logits = model(noisy)
        return F.cross_entropy(logits, y), logits
