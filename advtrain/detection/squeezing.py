"""Feature squeezing.

Xu, Evans & Qi, "Feature squeezing: detecting adversarial examples in deep neural networks"
(NDSS 2018). The classifier's softmax on the input is compared with its softmax on "squeezed"
copies of the input; the score is the largest L1 distance between them. The paper's MNIST
squeezers are the default: bit-depth reduction to 1 bit and a 2x2 median filter (its CIFAR-10
setting is 5 bits, a 2x2 median and non-local means, which is left out here).

Both squeezers are made differentiable so that an adaptive attack can descend the score, as
Athalye et al. (2018) do with BPDA: the bit-depth reduction passes the gradient straight through
(its forward pass rounds), and the median filter takes the gradient of the element it selects
(the median is differentiable almost everywhere). The median window follows
``scipy.ndimage.median_filter`` (the paper's implementation): for an even size the window reaches
one pixel further up and left than down and right, the edges are repeated, and of an even count
the upper median is taken.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AdvtrainError
from .base import Detector


def reduce_bit_depth(x: Tensor, bits: int, lower: float = 0.0, upper: float = 1.0) -> Tensor:
    """``x`` rounded to ``2**bits`` levels over ``[lower, upper]``; straight-through gradient."""
    levels = 2**bits - 1
    unit = (x - lower) / (upper - lower)
    squeezed = torch.round(unit * levels) / levels * (upper - lower) + lower
    return x + (squeezed - x).detach()


def median_filter(x: Tensor, size: int) -> Tensor:
    """A ``size`` x ``size`` median filter of ``(N, C, H, W)`` images, as scipy's (see the module
    docstring), differentiable through the selected elements."""
    top = size // 2
    padded = F.pad(x, (top, size - 1 - top, top, size - 1 - top), mode="replicate")
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # N, C, H, W, size, size
    flat = windows.reshape(*windows.shape[:4], size * size)
    return flat.sort(dim=-1).values[..., (size * size) // 2]


class FeatureSqueezingDetector(Detector):
    """Xu et al. (2018): the largest L1 distance between the softmax on the input and on its
    squeezed copies.

    Args:
        model: the classifier.
        bits: bit depth of the first squeezer (default 1, the paper's MNIST setting; 0: none).
        median: size of the median filter (default 2, the paper's; 0: none; images only).
        lower, upper: the input range the bit depth is reduced over (default [0, 1]).
    """

    kind = "squeezing"

    def __init__(
        self,
        model: nn.Module,
        *,
        bits: int = 1,
        median: int = 2,
        lower: float = 0.0,
        upper: float = 1.0,
    ) -> None:
        super().__init__(model)
        if not (isinstance(bits, int) and 0 <= bits <= 16):
            raise AdvtrainError(f"squeezing: bits must be an integer in 0..16, got {bits!r}")
        if not (isinstance(median, int) and 0 <= median <= 8):
            raise AdvtrainError(f"squeezing: median must be an integer in 0..8, got {median!r}")
        if bits == 0 and median == 0:
            raise AdvtrainError("squeezing needs a squeezer: bits or median above 0")
        if not float(lower) < float(upper):
            raise AdvtrainError(f"squeezing: lower {lower} must be below upper {upper}")
        self.bits, self.median = bits, median
        self.lower, self.upper = float(lower), float(upper)

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "median": self.median, "lower": self.lower, "upper": self.upper}

    def squeezed(self, x: Tensor) -> list[Tensor]:
        """The squeezed copies of ``x``."""
        copies = []
        if self.bits:
            copies.append(reduce_bit_depth(x, self.bits, self.lower, self.upper))
        if self.median:
            if x.dim() != 4:
                raise AdvtrainError(
                    f"squeezing: the median filter takes (C, H, W) images, got inputs of shape "
                    f"{tuple(x.shape[1:])}; use median=0 for other inputs"
                )
            copies.append(median_filter(x, self.median))
        return copies

    def attack_surrogates(self) -> list[nn.Module]:
        """The classifier on each squeezed copy, and on the input and its copies at once (the
        mean of their log-probabilities): examples that fool a squeezed branch are where the
        branches can be made to agree on a wrong class."""
        copies = int(self.bits > 0) + int(self.median > 0)
        branches: list[nn.Module] = [SqueezedBranch(self, i) for i in range(copies)]
        return [*branches, SqueezedEnsemble(self)]

    def logits_and_score(self, x: Tensor) -> tuple[Tensor, Tensor]:
        copies = self.squeezed(x)
        logits = self.classifier(torch.cat([x, *copies]))
        probabilities = logits.softmax(dim=1).reshape(len(copies) + 1, len(x), -1)
        distances = (probabilities[1:] - probabilities[0]).abs().sum(dim=2)
        return logits[: len(x)], distances.amax(dim=0)

    def score(self, x: Tensor) -> Tensor:
        return self.logits_and_score(x)[1]


class SqueezedEnsemble(nn.Module):
    """The mean log-probabilities of the classifier on ``x`` and on its squeezed copies."""

    def __init__(self, detector: FeatureSqueezingDetector) -> None:
        super().__init__()
        self.classifier = detector.classifier
        object.__setattr__(self, "detector", detector)

    detector: FeatureSqueezingDetector

    def forward(self, x: Tensor) -> Tensor:
        copies = [x, *self.detector.squeezed(x)]
        logits = self.classifier(torch.cat(copies))
        return logits.log_softmax(dim=1).reshape(len(copies), len(x), -1).mean(dim=0)


class SqueezedBranch(nn.Module):
    """The classifier on the ``index``-th squeezed copy of ``x``."""

    def __init__(self, detector: FeatureSqueezingDetector, index: int) -> None:
        super().__init__()
        self.classifier = detector.classifier
        self.index = index
        object.__setattr__(self, "detector", detector)

    detector: FeatureSqueezingDetector

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.detector.squeezed(x)[self.index])
