"""Reading and writing model weights safely.

Our own checkpoints are a safetensors file plus a JSON sidecar (``model.safetensors`` +
``model.json``) that records the file's SHA-256 and free-form metadata. Foreign checkpoints
(``.pth``, ``.pt``, ``.bin``, ...) are pickles: they are only ever opened with
``torch.load(..., weights_only=True)``, so they cannot run code, and only plain state dicts are
accepted. Every file is written through a temporary file and ``os.replace``, so a crash never
leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .errors import CheckpointError
from .util import atomic_write_bytes, atomic_write_text, json_text, one_line

__all__ = [
    "FORMAT",
    "VERSION",
    "load_checkpoint",
    "load_state_dict",
    "load_state_into",
    "load_weights_into",
    "save_checkpoint",
    "sidecar_path",
]

FORMAT = "advtrain-checkpoint"
VERSION = 1
SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
MAX_LISTED = 4  # keys named in a mismatch message


# --------------------------------------------------------------------------- our checkpoints


def sidecar_path(weights_path: str | Path) -> Path:
    """The JSON sidecar of a weights file: ``model.safetensors`` -> ``model.json``."""
    return Path(weights_path).with_suffix(".json")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cpu_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors; a tensor whose storage is already used is cloned
    (safetensors refuses tensors that share memory, e.g. tied weights)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(
                f"cannot save entry {key!r}: a state dict maps str to Tensor, "
                f"got {type(key).__name__} -> {type(value).__name__}"
            )
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def save_checkpoint(
    path: str | Path, state_dict: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Save ``state_dict`` to ``path`` (a ``.safetensors`` file) and ``meta`` to its JSON sidecar.

    The sidecar holds ``{"format": "advtrain-checkpoint", "version": 1, "sha256": ..., **meta}``;
    those three keys always describe the file written, whatever ``meta`` says. Both files are
    written atomically, and nothing is written if the tensors or ``meta`` cannot be serialised.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise CheckpointError(f"checkpoint path {path} must end in {SUFFIX}")
    try:
        data = st_save(_cpu_tensors(state_dict), metadata={"format": "pt"})
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors' own error type for odd tensors
        raise CheckpointError(f"cannot save checkpoint {path}: {one_line(exc)}") from None
    sidecar = {**meta, "format": FORMAT, "version": VERSION, "sha256": _sha256(data)}
    text = json_text(sidecar, f"the metadata of {path}")
    atomic_write_bytes(path, data)
    atomic_write_text(sidecar_path(path), text)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {path} not found")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")


def _read_bytes(path: Path, what: str) -> bytes:
    _check_file(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {one_line(exc)}") from None


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        return {}
    raw = _read_bytes(side, "checkpoint sidecar")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint sidecar {side} is not valid JSON ({one_line(exc)})"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint sidecar {side} must hold a JSON object, not {type(meta).__name__}"
        )
    fmt = meta.get("format", FORMAT)
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint sidecar {side} has format {fmt!r}, expected {FORMAT!r}")
    version = meta.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"checkpoint sidecar {side} has version {version!r}; this advtrain reads {VERSION}"
        )
    return meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict, sidecar)``.

    The file's SHA-256 is checked against the sidecar's. A missing sidecar is allowed (the
    metadata is then ``{}``); a corrupt, truncated or mismatched file is a :class:`CheckpointError`.
    """
    path = Path(path)
    meta = _read_sidecar(path)
    data = _read_bytes(path, "checkpoint")
    expected = meta.get("sha256")
    if expected is not None:
        actual = _sha256(data)
        if actual != expected:
            raise CheckpointError(
                f"corrupt checkpoint {path}: its SHA-256 {actual[:16]}... differs from "
                f"{str(expected)[:16]}... in {sidecar_path(path).name}"
            )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others on odd input)
        raise CheckpointError(
            f"corrupt checkpoint {path}: not a valid safetensors file ({one_line(exc)})"
        ) from None
    return dict(tensors), meta


# --------------------------------------------------------------------------- any state dict


def _refusal(exc: BaseException) -> str:
    """The short reason inside torch's long weights_only refusal."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return f"it pickles {found.group(1)}, which weights_only loading refuses"
    if "TorchScript" in text:
        return "a TorchScript archive"
    return one_line(text.splitlines()[0] if text else type(exc).__name__, 120)


def _non_tensor(obj: Mapping[Any, Any]) -> str | None:
    """Why ``obj`` is not a str -> Tensor mapping, or None when it is one."""
    for key, value in obj.items():
        if not isinstance(key, str):
            return f"key {key!r} is of type {type(key).__name__}, not str"
        if not isinstance(value, Tensor):
            return f"value of {key!r} is of type {type(value).__name__}, not Tensor"
    return None


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} is not a plain state dict (it holds a {type(obj).__name__}, "
            "not a mapping of tensors)"
        )
    problem = _non_tensor(obj)
    if problem is None:
        return dict(obj)
    wrapped = [
        k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _non_tensor(obj[k]) is None
    ]
    if len(wrapped) == 1:
        return dict(obj[wrapped[0]])
    if len(wrapped) > 1:
        raise CheckpointError(
            f"{path} is not a plain state dict (it holds several: {', '.join(wrapped)})"
        )
    raise CheckpointError(f"{path} is not a plain state dict ({one_line(problem, 120)})")


def _strip_prefix(state: dict[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path``, on the CPU.

    ``.safetensors`` files are read with :func:`load_checkpoint`; anything else with
    ``torch.load(weights_only=True)``. A mapping of str -> Tensor is accepted, or a dict holding
    exactly one such mapping under ``state_dict``, ``model`` or ``model_state_dict`` (other
    entries such as ``epoch`` are ignored). A ``module.`` prefix on every key (DataParallel) is
    stripped. Pickled modules, arbitrary objects and unreadable files are a
    :class:`CheckpointError`.
    """
    path = Path(path)
    if path.suffix == SUFFIX:
        return _strip_prefix(load_checkpoint(path)[0])
    _check_file(path, "checkpoint")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} is not a plain state dict ({_refusal(exc)})") from None
    except RuntimeError as exc:
        if "TorchScript" in str(exc):
            raise CheckpointError(
                f"{path} is not a plain state dict (a TorchScript archive)"
            ) from None
        first = str(exc).split(". ")[0]  # torch appends paragraphs of advice
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({one_line(first, 120)})"
        ) from None
    except Exception as exc:  # garbage bytes surface as KeyError, EOFError, ValueError, ...
        reason = one_line(exc, 120) or "empty or truncated file"
        raise CheckpointError(
            f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    return _strip_prefix(_as_state_dict(obj, path))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def load_weights_into(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` and return the model.

    Keys the model lacks or the file lacks (when ``strict``) and tensors of the wrong shape
    (always) are a :class:`CheckpointError` that names a few of them.
    """
    return load_state_into(model, load_state_dict(path), path, strict)


def load_state_into(
    model: nn.Module, state: Mapping[str, Tensor], source: str | Path, strict: bool = True
) -> nn.Module:
    """:func:`load_weights_into` for a state dict already read from ``source`` (named in the
    errors)."""
    path = source
    own = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatch (file vs model) {_listed(shapes)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {one_line(exc)}"
        ) from None
    return model
