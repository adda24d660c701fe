"""Reading gzip-compressed IDX files (the MNIST format) with a checksum of their content.

An IDX file is a big-endian header -- two zero bytes, a type code (0x08 = unsigned byte), the
number of dimensions -- followed by one 32-bit size per dimension and the raw values.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

UBYTE = 0x08


def parse_idx(data: bytes, source: str = "IDX data", ndim: int | None = None) -> np.ndarray:
    """Decode the bytes of an unsigned-byte IDX file into a read-only uint8 array.

    Args:
        data: the uncompressed file content.
        source: what to call the data in error messages (usually the file path).
        ndim: the number of dimensions expected (1 for labels, 3 for images), or None for any.
    """
    if len(data) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] != UBYTE:
        raise DataError(f"{source}: bad IDX magic number 0x{data[:4].hex()}")
    rank = data[3]
    if ndim is not None and rank != ndim:
        raise DataError(f"{source}: IDX file has {rank} dimensions, expected {ndim}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"{source}: IDX size mismatch: dimensions {dims} need {expected} bytes, "
            f"file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    array.flags.writeable = False
    return array


def read_gzip(path: Path, source: str | None = None) -> bytes:
    """The decompressed content of a gzip file; a corrupt or truncated one is a :class:`DataError`.

    ``source`` names the file in error messages (default: the path).
    """
    source = str(path) if source is None else source
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read the file ({_one_line(exc)})") from None
    try:
        return gzip.decompress(raw)
    except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
        reason = _one_line(exc)
        raise DataError(f"{source}: not a valid gzip file or truncated ({reason})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_idx_gz(
    path: Path, sha256: str, ndim: int | None = None, source: str | None = None
) -> np.ndarray:
    """Decompress ``path``, check the SHA-256 of its content, and decode it as IDX.

    ``source`` names the file in error messages (default: the path).

    Raises:
        DataError: the file is not gzip, is truncated, has the wrong checksum or is not IDX.
    """
    source = str(path) if source is None else source
    data = read_gzip(path, source)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(
            f"{source}: checksum mismatch (SHA-256 of the uncompressed content is "
            f"{digest[:16]}..., expected {sha256[:16]}...); the file is corrupt or not the "
            "original"
        )
    return parse_idx(data, source, ndim)
