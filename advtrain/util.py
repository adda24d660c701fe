"""The floor every other layer may stand on: one-line messages, atomic writes, devices, validators.

Nothing here imports another advtrain module but :mod:`advtrain.errors`; every room of the
package (attacks, training, evaluation, the CLI) takes these from here instead of borrowing
them from each other.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import AdvtrainError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_finite",
    "check_positive_int",
    "json_text",
    "one_line",
    "parse_key_values",
    "parse_option_value",
    "resolve_device",
]


def one_line(text: object, limit: int = 200) -> str:
    """``text`` (or an exception's message) on one line, whitespace collapsed, at most ``limit``
    characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# ---------------------------------------------------------------------- atomic writes


def _new_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give a new file (0o666 less umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` at once: readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory, which is flushed, fsynced and then
    renamed over ``path``; on any failure the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else _new_file_mode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise AdvtrainError(f"cannot write {path}: {one_line(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise AdvtrainError(f"cannot write {path}: {one_line(exc)}") from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise AdvtrainError(f"cannot write {what} as JSON: {one_line(exc)}") from None


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 2, sorted keys, trailing newline) to ``path`` atomically."""
    atomic_write_text(path, json_text(obj, str(path)))


# ---------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; an unusable device is an AdvtrainError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise AdvtrainError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdvtrainError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdvtrainError(
                f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif device.type != "cpu":
        raise AdvtrainError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------------- validators


def check_positive_int(name: str, value: object) -> int:
    """``value`` when it is an integer >= 1 (not a bool), else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdvtrainError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_finite(name: str, value: object, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float; a one-line error unless it is a finite number >= (or >) ``minimum``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        if value > minimum if strict else value >= minimum:
            return float(value)
    sign = ">" if strict else ">="
    raise AdvtrainError(f"{name} must be a finite number {sign} {minimum:g}, got {value!r}")


# ---------------------------------------------------------------------- key=value options


def parse_option_value(text: str) -> bool | int | float | str:
    """``true``/``false`` as booleans, then an integer, then a finite float, else the text."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def parse_key_values(items: Iterable[str], flag: str, example: str) -> dict[str, Any]:
    """``key=value`` items of a repeatable command-line ``flag`` as a dict: ``step-size`` is
    ``step_size``, values typed by :func:`parse_option_value`; a malformed or repeated key is a
    one-line error naming ``flag`` (``example`` shows the form)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise AdvtrainError(f"{flag} {item!r} must look like key=value, e.g. {example}")
        if key in options:
            raise AdvtrainError(f"{flag} {key} is given twice")
        options[key] = parse_option_value(text)
    return options


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode under no_grad; each submodule's own mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
