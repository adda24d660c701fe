"""STRIP (Gao, Xu, Wang, Chen, Ranasinghe & Nepal 2019, "STRIP: a defence against trojan attacks
on deep neural networks", ACSAC): at inference, superimpose the input on ``n`` clean images
and measure the entropy of the model's predictions; a triggered input keeps predicting the
target whatever is laid over it, so its entropy is low.

As the paper: the superimposition is the pixel sum, saturated at the input bounds (their
``cv2.addWeighted(background, 1, overlay, 1, 0)``), the score the mean Shannon entropy over the
``n`` copies, and the threshold set on clean held-out inputs at a chosen false rejection
rate (the paper's FRR, 1% by default). Gao et al. take ``n = 100``; ART's STRIP takes 20 and
blends at 0.5 rather than summing, and fits a normal to the clean entropies where this uses
their empirical quantile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attacks import frozen
from ..attacks.base import model_device
from ..errors import AdvtrainError

#: Gao et al.'s number of superimposed clean images, and their false rejection rate.
STRIP_SAMPLES = 100
STRIP_FRR = 0.01


@dataclass(frozen=True, eq=False)
class Strip:
    """STRIP fitted to a model: ``clean`` images to superimpose, ``lower``/``upper`` bounds,
    ``samples`` per input, and the entropy ``threshold`` below which an input is flagged."""

    model: nn.Module
    clean: Tensor
    lower: float
    upper: float
    samples: int = STRIP_SAMPLES
    seed: int = 0
    threshold: float = float("nan")
    batch_size: int = 2048

    def entropy(self, x: Tensor) -> Tensor:
        """The mean prediction entropy (nats) of each input of ``x`` over ``samples``
        superimpositions, ``(N,)``; the overlays are drawn from ``seed``."""
        if len(self.clean) == 0:
            raise AdvtrainError("STRIP needs clean images to superimpose")
        device = model_device(self.model, default=x.device)
        generator = torch.Generator().manual_seed(self.seed)
        out = torch.empty(len(x))
        per_batch = max(1, self.batch_size // self.samples)
        with frozen(self.model), torch.no_grad():
            for i in range(0, len(x), per_batch):
                xb = x[i : i + per_batch]
                pick = torch.randint(len(self.clean), (len(xb), self.samples), generator=generator)
                overlay = self.clean[pick.reshape(-1)].to(device)
                base = xb.to(device).repeat_interleave(self.samples, dim=0)
                mixed = (base + overlay).clamp(self.lower, self.upper)
                p = torch.softmax(self.model(mixed).float(), dim=1)
                h = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
                out[i : i + len(xb)] = h.reshape(len(xb), self.samples).mean(dim=1).cpu()
        return out

    def flags(self, x: Tensor) -> Tensor:
        """Bool ``(N,)``: True where the input looks triggered (entropy below the threshold)."""
        if math.isnan(self.threshold):
            raise AdvtrainError("STRIP has no threshold: build it with fit_strip")
        return self.entropy(x) < self.threshold


def fit_strip(
    model: nn.Module,
    clean: Tensor,
    held_out: Tensor,
    *,
    lower: float = 0.0,
    upper: float = 1.0,
    samples: int = STRIP_SAMPLES,
    frr: float = STRIP_FRR,
    seed: int = 0,
) -> Strip:
    """STRIP for ``model``: overlays drawn from ``clean``, the threshold at the ``frr``
    quantile of the entropies of the clean ``held_out`` inputs (so about ``frr`` of clean
    inputs are rejected)."""
    if not 0 < frr < 1:
        raise AdvtrainError(f"STRIP's false rejection rate must be in (0, 1), got {frr}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise AdvtrainError(f"STRIP samples must be a positive integer, got {samples!r}")
    strip = Strip(model, clean, float(lower), float(upper), samples, seed)
    entropies = strip.entropy(held_out)
    threshold = float(torch.quantile(entropies.double(), frr))
    return Strip(model, clean, float(lower), float(upper), samples, seed, threshold)
