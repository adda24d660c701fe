"""The configuration of a training run: defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; the run directory keeps it as ``config.json``.

    ``eps=None`` takes the dataset's default radius. ``attack_steps``/``attack_step_size`` set the
    PGD used inside training (default step ``2.5 * eps / steps``, the rule of Madry et al.'s
    group that lets PGD cross the ball from any start); ``eval_steps`` the cheaper PGD run on the
    validation split after each epoch.
    """

    dataset: str = "digits"
    model: str = "digits-cnn"
    method: str = "pgd"
    norm: str = "linf"
    eps: float | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    attack_steps: int = 10
    attack_step_size: float | None = None
    eval_steps: int = 10
    eval_batch_size: int = 500
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    data_dir: str | None = None
    out: str = "runs/latest"
    device: str = "auto"

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "attack_steps", "eval_steps", "eval_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdvtrainError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise AdvtrainError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("dataset", "model", "method", "norm", "optimizer", "out", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AdvtrainError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise AdvtrainError(f"data_dir must be a string, got {self.data_dir!r}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not _finite_nonnegative(value) or not 0 < value < 1:
                raise AdvtrainError(f"{name} must be between 0 and 1, got {value!r}")
        for name in ("eps", "attack_step_size"):
            value = getattr(self, name)
            if value is not None and not _finite_nonnegative(value):
                raise AdvtrainError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            if not _finite_nonnegative(getattr(self, name)):
                raise AdvtrainError(f"{name} must be finite and >= 0, got {getattr(self, name)!r}")
        if self.lr == 0:
            raise AdvtrainError("lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise AdvtrainError(
                f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}"
            )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZERS = ("adam", "sgd")


def _finite_nonnegative(value: object) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        and math.isfinite(value) and value >= 0
    )


def config_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig))


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` that are not None.

    A TOML file may hold the keys at its top level or under a ``[train]`` table; dashes in keys
    are read as underscores.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise AdvtrainError(
            f"unknown configuration key(s): {', '.join(unknown)}; known: {', '.join(config_keys())}"
        )
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise AdvtrainError(f"bad configuration: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdvtrainError(f"config file '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AdvtrainError(f"config file '{path}' is not valid TOML: {exc}") from None
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise AdvtrainError(f"config file '{path}': [train] must be a table")
    if "train" in data and len(data) > 1:
        others = ", ".join(sorted(k for k in data if k != "train"))
        raise AdvtrainError(
            f"config file '{path}': put every key in the [train] table (found outside it: {others})"
        )
    return {key.replace("-", "_"): value for key, value in table.items()}
