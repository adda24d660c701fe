"""Models that users bring as ``path/to/file.py:factory``."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..checkpoint import load_weights_into
from ..errors import AdvtrainError
from ..util import one_line

_counter = itertools.count()


def _import_file(path: Path) -> ModuleType:
    """Run ``path`` as a fresh module under a unique name (its folder is importable meanwhile)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"advtrain_user_model_{digest}_{next(_counter)}"
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:  # pragma: no cover - only for paths importlib cannot name at all
        raise AdvtrainError(f"cannot import model file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise AdvtrainError(
            f"importing model file {path} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def load_user_model(
    spec: str, weights: str | Path | None = None, **factory_kwargs: Any
) -> nn.Module:
    """Build a model from ``spec`` = ``path/to/file.py:factory`` and optionally load ``weights``.

    The file is imported under a unique module name and ``factory(**factory_kwargs)`` must return
    an ``nn.Module``; ``weights`` (safetensors or a plain PyTorch state dict) are loaded strictly
    with :func:`advtrain.checkpoint.load_weights_into`. Every failure is a one-line
    :class:`AdvtrainError`.
    """
    file, sep, attr = str(spec).rpartition(":")
    if not sep or not file or not attr:
        raise AdvtrainError(f"model spec {spec!r} must look like path/to/file.py:factory")
    path = Path(file).expanduser().resolve()
    if not path.exists():
        raise AdvtrainError(f"model file {file} not found")
    if not path.is_file():
        raise AdvtrainError(f"model file {file} is not a file")
    module = _import_file(path)
    if not hasattr(module, attr):
        raise AdvtrainError(f"model file {file} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise AdvtrainError(f"{file}:{attr} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory(**factory_kwargs)
    except Exception as exc:
        raise AdvtrainError(
            f"calling {file}:{attr} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise AdvtrainError(
            f"{file}:{attr} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        load_weights_into(model, weights)
    return model
