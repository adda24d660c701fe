""":func:`load_images`: a user's own images, from a class-per-folder tree, an ``.npz`` file
(``x``/``y`` or MedMNIST's layout) or CIFAR-10/100's distributed files on local disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import DataError
from .arrays import load_npz
from .base import Dataset
from .cifar import find_cifar, load_cifar
from .image_folder import check_image_size, load_image_folder
from .splits import check_fractions


def is_image_source(path: str | Path) -> bool:
    """Whether ``path`` names images rather than a table: a directory, an ``.npz`` file, or a
    path that does not exist and has no table suffix (a folder, misspelt or missing)."""
    from .table import TABLE_SUFFIXES

    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".npz":
        return True
    return not path.exists() and path.suffix.lower() not in TABLE_SUFFIXES


def load_images(
    path: str | Path,
    *,
    image_size: Sequence[int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Images of one's own as a :class:`Dataset` of pixels in [0, 1], ``(C, H, W)``.

    ``path`` is one of:

    - a CIFAR-10/100 folder (``cifar-10-batches-py``, ``cifar-100-python``,
      ``cifar-10-batches-bin``, ``cifar-100-binary``) or a folder holding one
      (:mod:`advtrain.data.cifar`; its own test split, ``val_fraction`` of its training set for
      validation);
    - an ``.npz`` file (:mod:`advtrain.data.arrays`);
    - a folder of class folders, or of ``train/``, ``test/`` (and ``val/``) folders of class
      folders (:mod:`advtrain.data.image_folder`).

    Image files are read when indexed (:class:`~advtrain.data.lazy.LazyInputs`), never all at
    once. ``image_size`` ``(H, W)`` resizes folder images (bilinear); arrays and CIFAR keep their
    size. The splits are stratified and seeded where they are carved (same seed, same splits).
    The dataset's default eps is 8/255 (linf), its name ``images <path>``.

    Raises:
        DataError: the path holds no images advtrain can read, a file is corrupt, a class
            folder is empty, pixel values are out of range, labels are multi-label.
    """
    check_fractions(val_fraction, test_fraction)
    size = None if image_size is None else check_image_size(image_size)
    root = Path(path)
    if not root.exists():
        raise DataError(f"image data '{root}' does not exist")
    if root.is_dir() and find_cifar(root) is not None:
        _no_resize(size, root, "CIFAR")
        return load_cifar(root, seed=seed, val_fraction=val_fraction)
    if root.is_file():
        if root.suffix.lower() != ".npz":
            raise DataError(
                f"'{root}' is not an image set: give a folder of class folders, an .npz file "
                "or a CIFAR folder"
            )
        _no_resize(size, root, ".npz")
        return load_npz(root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    return load_image_folder(
        root, image_size=size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )


def _no_resize(size: tuple[int, int] | None, path: Path, what: str) -> None:
    if size is not None:
        raise DataError(
            f"image_size resizes image folders; '{path}' is {what} data, used at its own size"
        )
