"""Images stored as arrays in one ``.npz`` file: ``x``/``y``, or MedMNIST's own layout.

- ``x`` (N, H, W) or (N, H, W, C) with C 1 or 3, and ``y`` (N,) or (N, 1): one pool, split
  stratified and seeded into train/val/test with the fractions taken of all images;
- MedMNIST (Yang et al. 2023, "MedMNIST v2"): ``train_images``, ``train_labels``,
  ``test_images``, ``test_labels`` and optionally ``val_images``, ``val_labels`` (carved from
  train, stratified and seeded, when absent), labels of shape (N, 1). Multi-label sets
  (labels (N, K), K > 1, as chestmnist) are refused: advtrain trains and attacks single-label
  classifiers.

Pixels: uint8 (or any integers in 0..255) are divided by 255; floats must lie in [0, 1] (a
0-255 float array is refused, not guessed). An optional ``classes`` array of strings names the
classes, else they are ``0 .. max label``. The file is read with ``allow_pickle=False``.

The arrays are held in memory in their own dtype (one file, decompressed once; uint8 takes a
quarter of its float32 size) behind :class:`~advtrain.data.lazy.LazyInputs`: each index
converts only the images it asks for to float32 ``(C, H, W)``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..util import one_line
from .base import Dataset, Split
from .image_base import ArrayReader, carve, dataset_from_parts, image_info, lazy_split, split_all

#: MedMNIST's keys: (images, labels) per split; val may be absent.
MEDMNIST_SPLITS = ("train", "val", "test")


def load_npz(
    path: str | Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """The ``.npz`` image set at ``path`` (see the module docstring) as a :class:`Dataset`."""
    path = Path(path)
    source = f"'{path}'"
    arrays = _read(path)
    names = f"images {path}"
    medmnist = any(k.split("_")[0] in MEDMNIST_SPLITS for k in arrays)
    if "x" in arrays or "y" in arrays or not medmnist:
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise DataError(
                f"{source} lacks {' and '.join(missing)}: an image .npz holds x (N, H, W[, C]) "
                "and y (N,), or MedMNIST's train_images, train_labels, test_images, "
                f"test_labels (found: {', '.join(sorted(arrays)) or 'nothing'})"
            )
        reader = _images(arrays["x"], "x", source)
        labels = _labels(arrays["y"], "y", len(reader), source)
        classes = _classes(arrays, labels, source)
        parts = split_all(labels, classes, val_fraction, test_fraction, seed, source)
        info = image_info(names, classes, reader.array.shape[1:])
        return dataset_from_parts(info, reader, labels, parts)
    return _medmnist(arrays, names, source, seed, val_fraction)


def _medmnist(
    arrays: dict[str, np.ndarray], name: str, source: str, seed: int, val_fraction: float
) -> Dataset:
    required = [f"{s}_{k}" for s in ("train", "test") for k in ("images", "labels")]
    if ("val_images" in arrays) != ("val_labels" in arrays):
        required += ["val_images", "val_labels"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(
            f"{source} lacks {', '.join(missing)} of MedMNIST's layout (found: "
            f"{', '.join(sorted(arrays))})"
        )
    parts: dict[str, tuple[ArrayReader, np.ndarray]] = {}
    for split in MEDMNIST_SPLITS:
        if f"{split}_images" in arrays:
            reader = _images(arrays[f"{split}_images"], f"{split}_images", source)
            labels = _labels(arrays[f"{split}_labels"], f"{split}_labels", len(reader), source)
            parts[split] = (reader, labels)
    shapes = {s: r.array.shape[1:] for s, (r, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{source}: the splits' images differ in shape: {shapes}")
    classes = _classes(arrays, np.concatenate([lab for _, lab in parts.values()]), source)
    info = image_info(name, classes, shapes["train"])
    splits: dict[str, Split] = {}
    if "val" not in parts:
        reader, labels = parts["train"]
        kept, held = carve(labels, classes, val_fraction, seed, source, "val")
        splits["train"] = lazy_split(reader, info.shape, labels, kept)
        splits["val"] = lazy_split(reader, info.shape, labels, held)
    for split, (reader, labels) in parts.items():
        splits[split] = lazy_split(reader, info.shape, labels, np.arange(len(reader)))
    return Dataset(info, splits["train"], splits["val"], splits["test"])


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"image array file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read '{path}' as .npz arrays: {one_line(exc)}") from None


def _images(array: np.ndarray, key: str, source: str) -> ArrayReader:
    """``array`` (N, H, W[, C]) as a reader of (C, H, W) float32 images in [0, 1]."""
    if array.ndim == 3:
        array = array[:, None, :, :]
    elif array.ndim == 4 and array.shape[-1] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{source}: {key} has shape {array.shape}; expected (N, H, W) or (N, H, W, C) with "
            "C 1 or 3 (channels last)"
        )
    if array.dtype == np.uint8:
        return ArrayReader(array, 1.0 / 255.0)
    if np.issubdtype(array.dtype, np.integer):
        first, last = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if first < 0 or last > 255:
            raise DataError(
                f"{source}: {key} holds integers from {first} to {last}; expected pixels 0-255"
            )
        return ArrayReader(array.astype(np.uint8), 1.0 / 255.0)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not np.isfinite(array).all():
            raise DataError(f"{source}: {key} holds NaN or infinite values")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < 0 or high > 1:
            raise DataError(
                f"{source}: {key} holds floats outside [0, 1] (from {low:g} to {high:g}): "
                "scale them to [0, 1], or store uint8 pixels 0-255"
            )
        return ArrayReader(array.astype(np.float32, copy=False), 1.0)
    raise DataError(
        f"{source}: {key} has dtype {array.dtype}; expected uint8 pixels or floats in [0, 1]"
    )


def _labels(array: np.ndarray, key: str, n: int, source: str) -> np.ndarray:
    """Class indices (N,) from ``array`` (N,) or (N, 1); (N, K > 1) is refused as multi-label."""
    if array.ndim == 2 and array.shape[1] > 1:
        raise DataError(
            f"{source}: {key} has shape {array.shape}: multi-label sets (one 0/1 column per "
            "finding, as MedMNIST's chestmnist) are not supported; advtrain takes one class "
            "per image"
        )
    if array.ndim == 2:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{source}: {key} has shape {array.shape}; expected (N,) or (N, 1)")
    if len(array) != n:
        raise DataError(f"{source}: {key} has {len(array)} labels for {n} images")
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all():
        if not (array == np.round(array)).all():
            raise DataError(f"{source}: {key} holds non-integer labels")
    elif not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{source}: {key} has dtype {array.dtype}; expected integer class labels")
    labels = array.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise DataError(f"{source}: {key} holds a negative label ({int(labels.min())})")
    return labels


def _classes(arrays: dict[str, np.ndarray], labels: np.ndarray, source: str) -> list[str]:
    """The ``classes`` array's names, else ``0 .. max label``."""
    count = int(labels.max()) + 1 if len(labels) else 0
    if "classes" not in arrays:
        return [str(i) for i in range(count)]
    names = arrays["classes"]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(f"{source}: classes must be a 1-D array of names, got {names.dtype}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if len(classes) < count:
        raise DataError(f"{source}: labels go up to {count - 1} but classes names {len(classes)}")
    return classes
