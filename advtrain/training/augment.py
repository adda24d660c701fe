"""Data augmentation for training: small pure functions ``(x, generator, info) -> x``.

Every random draw comes from ``generator``, a CPU :class:`torch.Generator` (the trainer's, the one
that also shuffles the batches, so a checkpoint that saves it makes augmented runs resumable);
the numbers are drawn on the CPU and moved to ``x``'s device. The output always lies inside the
dataset's bounds and never changes an immutable feature.

- ``crop``: random crop after padding every side with the lower bound (black): 2 pixels for
  images of at most 8x8 (scikit-learn's digits), 4 otherwise (the usual CIFAR/MNIST setting).
  Images only.
- ``flip``: horizontal flip with probability 1/2. Images only, and refused for datasets whose
  classes are not mirror-symmetric (a mirrored 2, 3, 4, 5, 7 or 9 is no longer that digit).
- ``noise``: Gaussian noise of standard deviation ``std`` on the features that may change,
  clamped back into the bounds. Any dataset (for tabular data the usual choice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AdvtrainError

if TYPE_CHECKING:
    from ..data.base import DatasetInfo

AUGMENTATIONS = ("crop", "flip", "noise")

#: Datasets a horizontal flip would corrupt, with the reason given in the error.
NOT_MIRROR_SYMMETRIC = {
    "digits": "handwritten digits are not mirror-symmetric (a flipped 2, 3, 5 or 7 is not a digit)",
    "mnist": "handwritten digits are not mirror-symmetric (a flipped 2, 3, 5 or 7 is not a digit)",
}

Augment = Callable[[Tensor, torch.Generator], Tensor]


def crop_padding(info: DatasetInfo) -> int:
    """2 pixels for images of at most 8x8, else 4."""
    height, width = info.shape[-2:]
    return 2 if max(height, width) <= 8 else 4


def _bound(value: float | Tensor, x: Tensor) -> float | Tensor:
    return value.to(device=x.device, dtype=x.dtype) if isinstance(value, Tensor) else float(value)


def _clamp(x: Tensor, info: DatasetInfo) -> Tensor:
    lower, upper = _bound(info.lower, x), _bound(info.upper, x)
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        lower_t = torch.as_tensor(lower, device=x.device, dtype=x.dtype)
        upper_t = torch.as_tensor(upper, device=x.device, dtype=x.dtype)
        return torch.maximum(torch.minimum(x, upper_t), lower_t)
    return x.clamp(lower, upper)


def random_crop(
    x: Tensor, generator: torch.Generator, info: DatasetInfo, padding: int | None = None
) -> Tensor:
    """Pad a batch of images ``(N, C, H, W)`` and cut a random ``H x W`` window from each."""
    if x.dim() != 4:
        raise AdvtrainError(
            f"crop needs a batch of images (N, C, H, W), got shape {tuple(x.shape)}"
        )
    pad = crop_padding(info) if padding is None else padding
    if pad == 0:
        return x
    n, _, height, width = x.shape
    lower = info.lower
    fill = float(lower.min()) if isinstance(lower, Tensor) else float(lower)
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(height, device=x.device)  # (N, H)
    cols = dx[:, None] + torch.arange(width, device=x.device)  # (N, W)
    samples = torch.arange(n, device=x.device)[:, None, None]
    # index (N, H+2p, W+2p, C) with (N, H, W) -> (N, H, W, C)
    windows = padded.permute(0, 2, 3, 1)[samples, rows[:, :, None], cols[:, None, :]]
    return _clamp(windows.permute(0, 3, 1, 2).contiguous(), info)


def random_flip(x: Tensor, generator: torch.Generator, info: DatasetInfo) -> Tensor:
    """Mirror each image of ``(N, C, H, W)`` left-right with probability 1/2."""
    del info
    if x.dim() != 4:
        raise AdvtrainError(
            f"flip needs a batch of images (N, C, H, W), got shape {tuple(x.shape)}"
        )
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gaussian_noise(
    x: Tensor, generator: torch.Generator, info: DatasetInfo, std: float = 0.05
) -> Tensor:
    """``x + std * N(0, 1)`` on the mutable features, clamped into the bounds."""
    noise = torch.randn(x.shape, generator=generator).to(device=x.device, dtype=x.dtype) * std
    if info.mutable is not None:
        noise = noise * info.mutable.to(device=x.device, dtype=x.dtype)
    noisy = _clamp(x + noise, info)
    if info.mutable is not None:  # exactly unchanged where the adversary may not act either
        noisy = torch.where(info.mutable.to(x.device), noisy, x)
    return noisy


def check_augment(names: Iterable[str], info: DatasetInfo) -> None:
    """A one-line error if an augmentation does not suit the dataset."""
    for name in names:
        if name not in AUGMENTATIONS:
            raise AdvtrainError(
                f"unknown augmentation {name!r}; choose from: {', '.join(AUGMENTATIONS)}"
            )
        if name in ("crop", "flip") and (info.kind != "image" or len(info.shape) != 3):
            raise AdvtrainError(
                f"augment {name!r} is for images; dataset {info.name!r} is "
                f"{info.kind} with inputs of shape {tuple(info.shape)}"
            )
        if name == "flip" and info.name in NOT_MIRROR_SYMMETRIC:
            raise AdvtrainError(
                f"augment 'flip' refused for {info.name!r}: {NOT_MIRROR_SYMMETRIC[info.name]}"
            )


def make_augment(
    names: Iterable[str], info: DatasetInfo, noise_std: float = 0.05
) -> Augment | None:
    """The augmentations ``names`` for ``info``'s data as one function ``(x, generator) -> x``
    (None when there are none), applied in the order crop, flip, noise (noise last, so that the
    bounds hold at the end)."""
    chosen = list(names)
    check_augment(chosen, info)
    steps: list[Callable[[Tensor, torch.Generator, DatasetInfo], Tensor]] = []
    if "crop" in chosen:
        steps.append(random_crop)
    if "flip" in chosen:
        steps.append(random_flip)
    if "noise" in chosen and noise_std > 0:
        steps.append(partial(gaussian_noise, std=noise_std))
    if not steps:
        return None

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        for step in steps:
            x = step(x, generator, info)
        return x

    return augment
