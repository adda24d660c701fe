"""An evaluation's saved state, so that a killed evaluation resumes where it stopped.

Every piece of an evaluation's work is a *unit* with a name: one attack of one cascade on one
chunk of points (``"cascade|apgd-ce|3"``), the diagnostics, and so on. A unit's outcome depends
only on the state before it and on its own seed (:mod:`.shards` seeds every chunk of every attack
from their names), never on what ran in the same process before it. So a unit's outcome is saved
as it finishes (the rows it changed, the counts it added) and a resumed evaluation *replays*
saved units instead of running them: every later unit then starts from the same state and
draws the same random numbers, and the report comes out bit for bit as an uninterrupted run's
(its wall-clock times aside).

On disk, ``DIR/state.json`` holds the settings the state belongs to (the model's weights, the
points and labels, the threat model, the suite and every option that changes a result, as
SHA-256 digests and values); a resumed run with other settings is refused, naming what differs.
Each unit is one safetensors file ``DIR/units/<sha256 of its name>.safetensors`` (tensors, and
JSON in its metadata), written to a temporary file and renamed, so a kill leaves a unit either
whole or absent; no file is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..util import atomic_write_bytes, atomic_write_json

STATE_FILE = "state.json"
UNITS = "units"
#: The version of the unit format; a state of another version is refused.
FORMAT = 1


@dataclass
class Unit:
    """One saved piece of work: its tensors and its JSON-ready facts."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


class Journal:
    """The saved units of one evaluation in ``directory``, for the settings ``fingerprint``."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.units_dir = self.directory / UNITS
        self.replayed = 0
        self.written = 0
        self._seen: set[str] = set()
        state = self.directory / STATE_FILE
        # as JSON writes it back: tuples become lists, so a resumed run compares like with like
        fingerprint = json.loads(json.dumps({"format": FORMAT, **fingerprint}))
        if self.directory.exists() and not self.directory.is_dir():
            raise AdvtrainError(f"resume state {self.directory} is a file, not a directory")
        if state.is_file():
            saved = _read_state(state)
            keys = sorted(set(saved) | set(fingerprint))
            differ = [k for k in keys if saved.get(k) != fingerprint.get(k)]
            if differ:
                raise AdvtrainError(
                    f"the evaluation state in {self.directory} was saved with other settings "
                    f"({', '.join(differ)} differ): resume with the same settings, or give "
                    "another directory"
                )
        else:
            try:
                self.units_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AdvtrainError(f"cannot create resume state {self.directory}: {exc}") from None
            atomic_write_json(state, fingerprint)
        self.units_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.units_dir / (hashlib.sha256(key.encode("utf-8")).hexdigest() + ".safetensors")

    def get(self, key: str) -> Unit | None:
        """The saved unit ``key``, or None when it has not run yet."""
        self._claim(key)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            blob = path.read_bytes()
            tensors = st_load(blob)
            facts = json.loads(_metadata(blob).get("facts", "{}"))
        except (OSError, SafetensorError, ValueError) as exc:
            raise AdvtrainError(f"resume state unit {path} is unreadable: {exc}") from None
        if facts.get("key") != key:
            raise AdvtrainError(f"resume state unit {path} belongs to another piece of work")
        self.replayed += 1
        return Unit(tensors, facts)

    def put(self, key: str, unit: Unit) -> None:
        """Save ``unit`` as ``key``, atomically."""
        facts = json.dumps({**unit.facts, "key": key}, allow_nan=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in unit.tensors.items()}
        atomic_write_bytes(self._path(key), st_save(tensors, metadata={"facts": facts}))
        self.written += 1

    def _claim(self, key: str) -> None:
        """Each unit runs once per evaluation: a second use of a name is a bug, not a replay."""
        if key in self._seen:
            raise AdvtrainError(f"internal: the evaluation unit {key!r} ran twice")
        self._seen.add(key)


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def tensor_digest(value: Tensor) -> str:
    """SHA-256 of a tensor's bytes."""
    return hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdvtrainError(f"resume state {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise AdvtrainError(f"resume state {path} does not hold a JSON object")
    return data


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    meta = header.get("__metadata__", {})
    return meta if isinstance(meta, dict) else {}
