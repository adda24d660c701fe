"""A folder of images, one subfolder per class, read lazily with Pillow.

Layouts (class folders hold ``.png``, ``.jpg``/``.jpeg``, ``.bmp``, ``.gif``, ``.tif``/``.tiff``
or ``.webp`` files, searched recursively, hidden files and folders skipped):

- ``PATH/train/<class>/...`` with ``PATH/test/<class>/...`` and optionally ``PATH/val/<class>/...``:
  those splits; a missing ``val`` (or ``test``) is carved from ``train``, stratified and seeded,
  ``val_fraction`` (``test_fraction``) of the training images;
- ``PATH/<class>/...``: one pool, split stratified and seeded into train/val/test with the
  fractions taken of all images.

The classes are the training class folders' names, sorted. Every file's header is opened once
up front (:func:`PIL.Image.open` reads the header, not the pixels): it decides grey or RGB (all
grey: 1 channel; any colour: every image converted to RGB) and the size, and an unreadable
header is a one-line :class:`~advtrain.errors.DataError` naming the file before any work.
Pixels are decoded only when an index asks for the image (:class:`~advtrain.data.lazy.LazyInputs`),
and a file that fails then (truncated data) is an error naming it too.

``image_size=(H, W)`` resizes every image with Pillow's bilinear filter; without it all images
must share one size (the first of another size is named). Pixels are divided by 255 (by 65535
for 16-bit grey images) into [0, 1], as float32 ``(C, H, W)``. Transparency is dropped, pixels
are used as stored (no EXIF rotation), an animated file gives its first frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..util import one_line
from .base import Dataset
from .image_base import carve, dataset_from_parts, image_info, split_all

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Split folder names, in the order of a :class:`~advtrain.data.base.Dataset`.
SPLIT_FOLDERS = ("train", "val", "test")
#: Pillow modes read as grey (one channel); 16-bit modes are scaled by 1/65535.
GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I;16N")
#: Pillow modes refused: their value range is not known.
UNSCALED_MODES = ("I", "F")

#: Errors Pillow raises on a file it cannot read (SyntaxError from some older plugins).
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


@dataclass(frozen=True)
class ImageFiles:
    """A reader of image files: ``reader[i]`` opens and decodes ``paths[i]`` as float32
    ``(channels, *size)`` in [0, 1], resized when ``resize`` (else the size must match)."""

    paths: tuple[Path, ...]
    channels: int
    size: tuple[int, int]  # (H, W)
    resize: bool

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as image:
                pixels = _pixels(image, self.channels, self.size, self.resize, path)
        except DataError:
            raise
        except (*_READ_ERRORS, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image '{path}': {one_line(exc)}") from None
        return torch.from_numpy(pixels)


def load_image_folder(
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """The image folder at ``path`` (see the module docstring) as a :class:`Dataset` whose
    splits' inputs are :class:`~advtrain.data.lazy.LazyInputs` over the files."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a directory")
    split_dirs = {name: root / name for name in SPLIT_FOLDERS if (root / name).is_dir()}
    source = f"image folder '{root}'"
    if "train" in split_dirs:
        classes = _class_names(split_dirs["train"])
        files: dict[str, list[tuple[Path, int]]] = {
            name: _files(folder, classes, name == "train") for name, folder in split_dirs.items()
        }
    else:
        if split_dirs:
            raise DataError(f"{source} has {', '.join(sorted(split_dirs))}/ but no train/ folder")
        classes = _class_names(root)
        files = {"all": _files(root, classes, True)}
    every = [item for part in files.values() for item in part]
    paths = tuple(p for p, _ in every)
    labels = np.asarray([label for _, label in every], dtype=np.int64)
    channels, size, resize = _survey(paths, image_size)
    reader = ImageFiles(paths, channels, size, resize)
    parts = _parts(files, labels, classes, val_fraction, test_fraction, seed, source)
    info = image_info(f"images {root}", classes, (channels, *size))
    return dataset_from_parts(info, reader, labels, parts)


def _parts(
    files: dict[str, list[tuple[Path, int]]],
    labels: np.ndarray,
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    source: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (train, val, test) positions among all files (in the order of ``files``)."""
    if "all" in files:
        return split_all(labels, classes, val_fraction, test_fraction, seed, source)
    start, ranges = 0, {}
    for name, part in files.items():
        ranges[name] = np.arange(start, start + len(part), dtype=np.int64)
        start += len(part)
    train = ranges["train"]
    if "test" not in ranges:
        kept, held = carve(labels[train], classes, test_fraction, seed, source, "test")
        train, ranges["test"] = train[kept], train[held]
    if "val" not in ranges:
        kept, held = carve(labels[train], classes, val_fraction, seed, source, "val")
        train, ranges["val"] = train[kept], train[held]
    return train, ranges["val"], ranges["test"]


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(
            f"'{folder}' has no class folders: put each class's images in "
            f"'{folder}/<class name>/' (or use train/ and test/ folders of those)"
        )
    return names


def _files(folder: Path, classes: Sequence[str], required: bool) -> list[tuple[Path, int]]:
    """``(file, class index)`` of every image under ``folder/<class>/``, sorted; a class folder
    without images is an error (a missing one too when ``required``)."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    extra = [name for name in found if name not in classes]
    if extra:
        raise DataError(
            f"'{folder}' has class folder(s) {', '.join(map(repr, extra))} that train/ lacks"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            if required:
                raise DataError(f"class folder '{class_dir}' is missing")
            continue
        images = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
        )
        if not images:
            raise DataError(
                f"class folder '{class_dir}' has no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        files.extend((p, label) for p in images)
    return files


def _survey(
    paths: Sequence[Path], image_size: tuple[int, int] | None
) -> tuple[int, tuple[int, int], bool]:
    """From every file's header (no pixels decoded): the channels (1 if all are grey, else 3),
    the size ``(H, W)`` and whether to resize."""
    from PIL import Image

    colour, first_size, first_path = False, None, None
    for path in paths:
        try:
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
        except (*_READ_ERRORS, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image '{path}': {one_line(exc)}") from None
        if mode in UNSCALED_MODES:
            raise DataError(
                f"image '{path}' has Pillow mode {mode!r} (32-bit integer or float pixels) "
                "whose range is unknown: save it as 8-bit (or 16-bit grey)"
            )
        colour = colour or mode not in GREY_MODES
        if first_size is None:
            first_size, first_path = (height, width), path
        elif image_size is None and (height, width) != first_size:
            raise DataError(
                f"image '{path}' is {height}x{width} but '{first_path}' is "
                f"{first_size[0]}x{first_size[1]}: give image_size (--image-size H[xW]) "
                "to resize them all"
            )
    if image_size is not None:
        return (3 if colour else 1), check_image_size(image_size), True
    assert first_size is not None  # every class folder has an image
    return (3 if colour else 1), first_size, False


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of positive ints, else a one-line error."""
    size = tuple(image_size)
    if len(size) != 2 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in size
    ):
        raise DataError(f"image_size must be (height, width) of positive integers, got {size}")
    return int(size[0]), int(size[1])


def parse_image_size(text: str) -> tuple[int, int]:
    """``"32"`` -> ``(32, 32)``; ``"32x48"`` -> ``(32, 48)`` (height x width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        raise DataError(f"image size must be H or HxW in pixels (e.g. 32 or 32x48), got {text!r}")
    return numbers[0], numbers[1]


def _pixels(
    image: object, channels: int, size: tuple[int, int], resize: bool, path: Path
) -> np.ndarray:
    """A Pillow image as float32 ``(channels, H, W)`` in [0, 1]."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    height, width = size
    if image.mode.startswith("I;16"):  # 16-bit grey: to float in [0, 1] first
        grey = np.asarray(image, dtype=np.float32) / 65535.0
        converted = Image.fromarray(grey)  # mode "F"
        scale = 1.0
    else:
        converted = image.convert("L" if channels == 1 else "RGB")
        scale = 1.0 / 255.0
    if (converted.height, converted.width) != size:
        if not resize:
            raise DataError(
                f"image '{path}' is {converted.height}x{converted.width}, expected "
                f"{height}x{width}: give image_size (--image-size H[xW]) to resize"
            )
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(converted, dtype=np.float32) * np.float32(scale)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:  # 16-bit grey among colour images
        array = np.repeat(array, channels, axis=2)
    return np.ascontiguousarray(np.clip(array, 0.0, 1.0).transpose(2, 0, 1))
