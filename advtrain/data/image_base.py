"""What the image loaders (folders, ``.npz`` arrays, CIFAR) share: the dataset description, a
reader over an array held in memory, and seeded stratified splits of the positions.

Every image set is described with pixel values in [0, 1], channels first ``(C, H, W)``, no
positive class, and a default linf radius of 8/255 (:data:`IMAGE_EPS`), the radius of the
CIFAR-10 linf benchmarks (Madry et al. 2018, "Towards deep learning models resistant to
adversarial attacks"; Croce & Hein 2020, AutoAttack; RobustBench).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..util import one_line
from .base import Dataset, DatasetInfo, Split
from .lazy import LazyInputs, Reader
from .splits import check_fractions, holdout, three_way

#: Default linf radius of an image set of one's own (the CIFAR-10 benchmark radius).
IMAGE_EPS = 8 / 255


def image_info(name: str, classes: Sequence[str], shape: Sequence[int]) -> DatasetInfo:
    """An image set's description: pixels in [0, 1], ``shape`` ``(C, H, W)``, eps 8/255."""
    if len(classes) < 2:
        raise DataError(f"{name}: at least 2 classes are needed, found {len(classes)}")
    return DatasetInfo(
        name=name,
        kind="image",
        classes=tuple(str(c) for c in classes),
        shape=tuple(int(d) for d in shape),
        lower=0.0,
        upper=1.0,
        mutable=None,
        default_eps=IMAGE_EPS,
        positive_class=None,
    )


class ArrayReader:
    """Samples of an array ``(N, C, H, W)`` held in memory, as float32 times ``scale`` (1/255
    for uint8 pixels): one sample per ``reader[i]``, several at once per :meth:`read_batch`.

    The array stays in its own dtype (a uint8 set takes a quarter of its float32 size); each
    read converts only the samples asked for.
    """

    def __init__(self, array: np.ndarray, scale: float) -> None:
        if array.ndim != 4:
            raise DataError(f"expected images of shape (N, C, H, W), got {array.shape}")
        self.array = array
        self.scale = scale

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.read_batch(np.asarray([i]))[0]

    def read_batch(self, positions: np.ndarray) -> Tensor:
        """The samples at ``positions``, stacked, as float32."""
        part = np.ascontiguousarray(self.array[positions])
        out = torch.from_numpy(part).to(torch.float32)
        return out.mul_(self.scale) if self.scale != 1 else out


def lazy_split(
    reader: Reader,
    sample_shape: Sequence[int],
    labels: np.ndarray,
    positions: np.ndarray,
) -> Split:
    """The split of ``reader``'s samples at ``positions``, read on demand."""
    x = LazyInputs(reader, sample_shape, labels=labels, positions=positions)
    y = torch.as_tensor(labels[positions], dtype=torch.int64)
    return Split(x, y)


def split_all(
    y: np.ndarray,
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified, seeded ``(train, val, test)`` positions of all of ``y``'s samples."""
    check_fractions(val_fraction, test_fraction)
    _enough(y, classes, 3, source, "train/val/test")
    try:
        return three_way(y, val_fraction, test_fraction, seed)
    except ValueError as exc:
        raise DataError(f"{source}: cannot split by class: {one_line(exc)}") from None


def carve(
    y: np.ndarray, classes: Sequence[str], fraction: float, seed: int, source: str, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded ``(kept, held_out)`` positions with ``fraction`` of ``y`` held out
    (the validation split carved from a training folder, say)."""
    if not 0 < fraction < 1:
        raise DataError(f"{what} fraction must be between 0 and 1, got {fraction!r}")
    _enough(y, classes, 2, source, f"train/{what}")
    try:
        return holdout(y, fraction, seed)
    except ValueError as exc:
        raise DataError(
            f"{source}: cannot carve a {what} split by class: {one_line(exc)}"
        ) from None


def _enough(y: np.ndarray, classes: Sequence[str], needed: int, source: str, parts: str) -> None:
    counts = np.bincount(y, minlength=len(classes))
    scarce = [f"{classes[i]!r} ({int(n)})" for i, n in enumerate(counts) if n < needed]
    if scarce:
        raise DataError(
            f"{source}: too few images of class {', '.join(scarce)} for a stratified "
            f"{parts} split (at least {needed} each)"
        )


def dataset_from_parts(
    info: DatasetInfo,
    reader: Reader,
    labels: np.ndarray,
    parts: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> Dataset:
    """A :class:`Dataset` of ``reader``'s samples split at ``parts`` (train, val, test)."""
    train, val, test = (lazy_split(reader, info.shape, labels, p) for p in parts)
    return Dataset(info, train, val, test)
