"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009, "Learning multiple layers of features from tiny
images") from the files torchvision and the dataset's authors distribute, on local disk only
(nothing is downloaded).

Layouts, found under a root folder or named directly:

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta`` (``label_names``);
- ``cifar-100-python/``: ``train``, ``test``, ``meta`` (``fine_label_names``; the 100 fine
  labels are used);
- ``cifar-10-batches-bin/``: ``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``
  (records of 1 label byte and 3072 pixel bytes), ``batches.meta.txt``;
- ``cifar-100-binary/``: ``train.bin``, ``test.bin`` (records of a coarse and a fine label byte
  and 3072 pixel bytes), ``fine_label_names.txt``.

The "python version" files are Python pickles, and unpickling runs whatever callable a file
names. They are therefore never unpickled plainly: :class:`DataOnlyUnpickler` resolves only
numpy's array and scalar reconstruction functions (``numpy.core``/``numpy._core``
``multiarray._reconstruct``, ``multiarray.scalar`` and ``numeric._frombuffer``) and the
classes ``numpy.ndarray`` and ``numpy.dtype``, which build arrays from bytes and call nothing
else (plus ``_codecs.encode`` replaced by a latin-1-only stand-in: how protocol 2 writes a
``bytes`` object), and refuses any other name with a :class:`~advtrain.errors.DataError`
naming the file.
A file is thus read as data only: dicts, lists, strings, numbers and numpy arrays.

The splits: the official test set, and the official training set less a stratified, seeded
validation split of ``val_fraction`` of it. Pixels are divided by 255 into [0, 1], as float32
``(3, 32, 32)``, held in memory as uint8 and converted per index
(:class:`~advtrain.data.lazy.LazyInputs`).
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..util import one_line
from .base import Dataset
from .image_base import ArrayReader, carve, image_info, lazy_split

#: Folder name -> (format, number of classes).
CIFAR_FOLDERS: dict[str, tuple[str, int]] = {
    "cifar-10-batches-py": ("python", 10),
    "cifar-100-python": ("python", 100),
    "cifar-10-batches-bin": ("binary", 10),
    "cifar-100-binary": ("binary", 100),
}
PIXELS = 3 * 32 * 32

#: (module, name) a CIFAR pickle may name: numpy's array and scalar reconstruction only.
ALLOWED_GLOBALS = frozenset(
    {
        (module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{package}.multiarray", "_reconstruct"),
            (f"{package}.multiarray", "scalar"),
            (f"{package}.numeric", "_frombuffer"),
        )
    }
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and refuses every other
    global (see the module docstring); ``path`` is named in its errors."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the original files were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(
                f"'{self.path}' is not a plain CIFAR data file: it names {module}.{name}, "
                "which is refused (only numpy arrays are read from these pickles)"
            )
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            return _latin1_bytes
        package = "numpy._core" if _has_module("numpy._core") else "numpy.core"
        return getattr(importlib.import_module(package + "." + module.rsplit(".", 1)[1]), name)


def _latin1_bytes(text: str, encoding: str = "utf-8") -> bytes:
    """What ``_codecs.encode`` does in a protocol-2 pickle of ``bytes`` (``text`` encoded as
    latin-1), and nothing else: any other codec or argument is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with the codec {encoding!r}")
    return text.encode("latin-1")


def read_pickle(path: Path) -> Any:
    """The data in the CIFAR pickle ``path``, read with :class:`DataOnlyUnpickler`."""
    try:
        with path.open("rb") as file:
            return DataOnlyUnpickler(file, path).load()
    except DataError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"cannot read CIFAR file '{path}': {one_line(exc)}") from None


def find_cifar(path: str | Path) -> Path | None:
    """The CIFAR folder ``path`` is or holds (None if neither); a root holding several is an
    error asking for one."""
    root = Path(path)
    if root.name in CIFAR_FOLDERS and root.is_dir():
        return root
    if not root.is_dir():
        return None
    found = [root / name for name in CIFAR_FOLDERS if (root / name).is_dir()]
    if len(found) > 1:
        raise DataError(
            f"'{root}' holds several CIFAR sets ({', '.join(p.name for p in found)}): name one"
        )
    return found[0] if found else None


def load_cifar(path: str | Path, *, seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the folder ``path`` is or holds (see the module docstring)."""
    folder = find_cifar(path)
    if folder is None:
        raise DataError(f"'{path}' holds none of {', '.join(CIFAR_FOLDERS)}")
    kind, n_classes = CIFAR_FOLDERS[folder.name]
    if kind == "python":
        train, test, classes = _read_python(folder, n_classes)
    else:
        train, test, classes = _read_binary(folder, n_classes)
    if len(classes) != n_classes:
        raise DataError(f"'{folder}': {len(classes)} class names, expected {n_classes}")
    for (_, labels), part in ((train, "training"), (test, "test")):
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataError(f"'{folder}': {part} labels outside 0..{n_classes - 1}")
    info = image_info(f"images {folder}", classes, (3, 32, 32))
    source = f"CIFAR folder '{folder}'"
    (x_train, y_train), (x_test, y_test) = train, test
    kept, held = carve(y_train, classes, val_fraction, seed, source, "val")
    train_reader, test_reader = ArrayReader(x_train, 1 / 255), ArrayReader(x_test, 1 / 255)
    return Dataset(
        info,
        lazy_split(train_reader, info.shape, y_train, kept),
        lazy_split(train_reader, info.shape, y_train, held),
        lazy_split(test_reader, info.shape, y_test, np.arange(len(y_test))),
    )


Part = tuple[np.ndarray, np.ndarray]  # images (N, 3, 32, 32) uint8, labels (N,) int64


def _read_python(folder: Path, n_classes: int) -> tuple[Part, Part, list[str]]:
    if n_classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, label_key, names_key = (
            folder / "test_batch",
            folder / "batches.meta",
            "labels",
            "label_names",
        )
    else:
        train_files = [folder / "train"]
        test_file, meta_file, label_key, names_key = (
            folder / "test",
            folder / "meta",
            "fine_labels",
            "fine_label_names",
        )
    _require([*train_files, test_file, meta_file])
    train = _join([_python_batch(f, label_key) for f in train_files])
    test = _python_batch(test_file, label_key)
    names = _entry(read_pickle(meta_file), names_key, meta_file)
    if not isinstance(names, list):
        raise DataError(f"'{meta_file}': {names_key} is not a list of names")
    classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    return train, test, classes


def _python_batch(path: Path, label_key: str) -> Part:
    batch = read_pickle(path)
    data = _entry(batch, "data", path)
    labels = np.asarray(_entry(batch, label_key, path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"'{path}': data is not a uint8 array of rows of {PIXELS} pixels")
    if data.shape[1] != PIXELS or labels.shape != (len(data),):
        raise DataError(
            f"'{path}': data {data.shape} and {label_key} {labels.shape} do not match "
            f"(expected (N, {PIXELS}) and (N,))"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': {label_key} are not integers")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_binary(folder: Path, n_classes: int) -> tuple[Part, Part, list[str]]:
    if n_classes == 10:
        train_files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
        test_file, names_file, label_bytes = folder / "test_batch.bin", "batches.meta.txt", 1
    else:
        train_files = [folder / "train.bin"]
        test_file, names_file, label_bytes = folder / "test.bin", "fine_label_names.txt", 2
    _require([*train_files, test_file, folder / names_file])
    train = _join([_binary_batch(f, label_bytes) for f in train_files])
    test = _binary_batch(test_file, label_bytes)
    text = (folder / names_file).read_text(encoding="utf-8", errors="replace")
    classes = [line.strip() for line in text.splitlines() if line.strip()]
    return train, test, classes


def _binary_batch(path: Path, label_bytes: int) -> Part:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"'{path}' is {raw.size} bytes, not a whole number of {record}-byte CIFAR records"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label
    return np.ascontiguousarray(rows[:, label_bytes:]).reshape(-1, 3, 32, 32), labels


def _join(parts: list[Part]) -> Part:
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _entry(batch: Any, key: str, path: Path) -> Any:
    """``batch[key]`` with the key as text or bytes (Python 2 and 3 pickles differ)."""
    if isinstance(batch, dict):
        for candidate in (key, key.encode()):
            if candidate in batch:
                return batch[candidate]
    raise DataError(f"'{path}' has no {key!r} entry (not a CIFAR batch file)")


def _require(files: list[Path]) -> None:
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"'{files[0].parent}' lacks {', '.join(missing)}")


def _has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True
