"""MNIST from the original gzip-compressed IDX files: locating, downloading, verifying, loading.

Every file is checked against the SHA-256 of its *uncompressed* content (archives re-compressed
by a mirror differ byte-wise but decode to the same content) after a download and whenever it
is read from disk. Decoded arrays are cached per process, keyed by the resolved path, size and
modification time of the file, so a changed file is read and verified again.
"""

from __future__ import annotations

import functools
import http.client
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Dataset, DatasetInfo, LoadRequest, make_split
from .idx import read_idx_gz
from .splits import holdout

log = logging.getLogger(__name__)

#: Default linf radius for ``mnist``.
MNIST_EPS = 0.3
DATA_ENV = "ADVTRAIN_DATA"
MIRROR_ENV = "ADVTRAIN_MNIST_MIRROR"
DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOAD_TIMEOUT_S = 30.0

#: File name -> (SHA-256 of the uncompressed content, number of IDX dimensions).
MNIST_FILES: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte.gz": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        3,
    ),
    "train-labels-idx1-ubyte.gz": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        1,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        3,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        1,
    ),
}


def default_data_dir() -> Path:
    """The cache directory used when neither ``data_dir`` nor ``$ADVTRAIN_DATA`` is given."""
    return Path.home() / ".cache" / "advtrain"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir``, else ``$ADVTRAIN_DATA``, else :func:`default_data_dir`.

    An explicitly named directory (argument or variable) must exist; the default one need not yet.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or None
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"data directory '{path}' does not exist")
    if not path.is_dir():
        raise DataError(f"data directory '{path}' is not a directory")
    return path


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` or ``directory/mnist/name``, whichever exists first, else None."""
    for candidate in (directory / name, directory / "mnist" / name):
        if candidate.is_file():
            return candidate
    return None


def resolve_mirror(mirror: str | None) -> str:
    """The base URL to fetch from: ``mirror``, else ``$ADVTRAIN_MNIST_MIRROR``, else the default."""
    base = mirror or os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    return base.rstrip("/") + "/"


def _fetch(url: str, target: Path) -> None:
    """Download ``url`` to a temporary file beside ``target``, verify it, then rename it into place.

    Nothing is left at ``target`` (or beside it) unless the download was complete and verified.
    """
    sha256, ndim = MNIST_FILES[target.name]
    log.info("downloading %s", url)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part", dir=target.parent
        )
    except OSError as exc:
        raise DataError(f"cannot write to '{target.parent}' ({_one_line(exc)})") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, out)
            except urllib.error.HTTPError as exc:
                raise DataError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                raise DataError(f"download of {url} failed: {_one_line(exc.reason)}") from None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise DataError(f"download of {url} failed: {_one_line(exc)}") from None
        read_idx_gz(tmp, sha256, ndim, source=f"download of {url}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _one_line(reason: object) -> str:
    text = " ".join(str(reason).split())
    return text or type(reason).__name__


def _download_missing(directory: Path, mirror: str | None) -> None:
    base = resolve_mirror(mirror)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory '{directory}' ({_one_line(exc)})") from None
    for name in MNIST_FILES:
        if find_file(directory, name) is None:
            _fetch(base + name, directory / name)


def download_mnist(data_dir: str | Path | None = None, mirror: str | None = None) -> Path:
    """Download whichever of the four MNIST files ``data_dir`` lacks; return the directory.

    ``data_dir`` is created if needed (None: ``$ADVTRAIN_DATA`` or the default cache directory).
    ``mirror`` is a base URL (default ``$ADVTRAIN_MNIST_MIRROR``, else :data:`DEFAULT_MIRROR`).
    Files already present are verified when they are loaded.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or default_data_dir()
    directory = Path(data_dir).expanduser()
    _download_missing(directory, mirror)
    return directory


@functools.lru_cache(maxsize=8)
def _decoded(path: str, size: int, mtime_ns: int, name: str) -> np.ndarray:
    """One verified file, read-only: float32 images (N, 1, 28, 28) in [0, 1] or int64 labels."""
    sha256, ndim = MNIST_FILES[name]
    raw = read_idx_gz(Path(path), sha256, ndim)
    if ndim == 3:
        array = (raw.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    else:
        array = raw.astype(np.int64)
    array.flags.writeable = False
    return array


def _load_file(directory: Path, name: str) -> np.ndarray:
    path = find_file(directory, name)
    if path is None:  # removed since we looked
        raise DataError(f"MNIST file '{name}' not found in '{directory}'")
    resolved = path.resolve()
    stat = resolved.stat()
    return _decoded(str(resolved), stat.st_size, stat.st_mtime_ns, name)


def load_mnist_arrays(
    data_dir: str | Path | None = None, *, download: bool = True, mirror: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The verified official ``(x_train, y_train, x_test, y_test)`` arrays (read-only)."""
    directory = resolve_data_dir(data_dir)
    missing = [name for name in MNIST_FILES if find_file(directory, name) is None]
    if missing:
        if not download:
            raise DataError(
                f"MNIST file(s) {', '.join(missing)} not found in '{directory}' or "
                f"'{directory / 'mnist'}'; put the four IDX .gz files there or allow download "
                "(download=True)"
            )
        _download_missing(directory, mirror)
    x_train, y_train, x_test, y_test = (_load_file(directory, name) for name in MNIST_FILES)
    for images, labels, split in ((x_train, y_train, "training"), (x_test, y_test, "test")):
        if len(images) != len(labels):
            raise DataError(
                f"MNIST {split} files disagree: {len(images)} images but {len(labels)} labels"
            )
    return x_train, y_train, x_test, y_test


def load_mnist_dataset(request: LoadRequest) -> Dataset:
    """MNIST: ``test`` is the official test set, ``val`` a stratified part of the training set."""
    x_train, y_train, x_test, y_test = load_mnist_arrays(
        request.data_dir, download=request.download, mirror=request.mirror
    )
    train, val = holdout(y_train, request.val_fraction, request.seed)
    info = DatasetInfo(
        name="mnist",
        kind="image",
        classes=tuple(str(digit) for digit in range(10)),
        shape=(1, 28, 28),
        lower=0.0,
        upper=1.0,
        mutable=None,
        default_eps=MNIST_EPS,
        positive_class=None,
    )
    return Dataset(
        info=info,
        train=make_split(x_train[train], y_train[train]),
        val=make_split(x_train[val], y_train[val]),
        test=make_split(x_test, y_test),
    )
