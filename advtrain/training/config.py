"""The configuration of a training run: defaults, overridden by a TOML file, overridden by flags."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AdvtrainError
from ..util import parse_key_values
from .augment import AUGMENTATIONS
from .schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found]  # a dependency on Python 3.10 only


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; the run directory keeps it as ``config.json``.

    ``eps=None`` takes the dataset's default radius. ``attack_steps``/``attack_step_size`` set the
    PGD used inside training (default step ``2.5 * eps / steps``, the rule of Madry et al.'s
    group that lets PGD cross the ball from any start); ``eval_steps`` the cheaper PGD run on the
    validation split after each epoch.

    Beyond the method: ``method_options`` go to the method's factory (``beta``, ``temperature``,
    ``replays``, ...); ``adv_ratio`` blends the method's loss with clean cross-entropy (``r * method
    + (1 - r) * clean``, 1 = the method alone); ``schedule`` shapes the learning rate per batch (see
    :mod:`advtrain.training.schedules`); ``warmup_epochs`` ramps eps linearly from 0 over the first
    epochs, per batch (``None``: a tenth of the epochs, rounded down, for FGSM-type methods, which
    without it often overfit catastrophically at a large eps; none for the others; see
    :attr:`eps_warmup_epochs`); ``ema_decay`` validates, keeps and saves an exponential moving
    average of the weights instead of the weights themselves (``None``: 0.995 for FGSM-type methods,
    off for the others; 0: off; see :attr:`weight_averaging_decay` and
    :mod:`advtrain.training.averaging`); ``augment`` lists ``crop``, ``flip``, ``noise``
    (``noise_std``); ``early_stop`` is a patience in epochs without a better validation figure;
    ``catastrophic`` watches for catastrophic overfitting (``auto``: ``stop`` for FGSM-type methods,
    else ``off``; or ``stop``, ``warn``, ``off``) with ``co_threshold``; ``checkpoint_every`` also
    saves a resumable checkpoint every so many batches (0: at the end of each epoch only); ``amp``
    is ``auto`` (bf16, else fp16, autocast on CUDA; off on the CPU), ``off``, ``bf16`` or ``fp16``;
    ``channels_last`` is ``auto`` (on CUDA for images), ``on`` or ``off``; ``compile`` is ``off`` or
    a ``torch.compile`` backend (``inductor``, ...) for the model inside the training loss;
    ``sync_batchnorm`` computes BatchNorm statistics over the global batch when several processes
    train (torchrun).

    A user's own table: ``data`` (a ``.csv`` or ``.parquet`` file) with ``schema`` (its TOML
    schema, :func:`advtrain.data.load_table`) instead of ``dataset``. A user's own images:
    ``data`` alone (a folder of class folders, an ``.npz`` or a CIFAR folder,
    :func:`advtrain.data.load_images`), with ``image_size`` ``(H, W)`` to resize a folder's
    images (also given as ``"H"`` or ``"HxW"``).

    A network people already have: ``model`` ``torchvision:NAME`` or ``timm:NAME``;
    ``normalize`` (``imagenet``, ``cifar10`` or ``MEAN,STD``) becomes the model's first layer, so
    the data and the attacks stay in [0, 1]; ``num_classes`` sets the model's head when it has
    more outputs than the dataset has classes (default: the dataset's count).

    For imbalanced data: ``class_weight`` ``"balanced"`` draws each epoch's batches so that every
    class fills an equal share of them (see :mod:`advtrain.training.sampling`; ``None``: a plain
    shuffle); ``select_by`` names the validation figure that keeps the best epoch and drives
    ``early_stop``: ``robust-accuracy``, ``robust-recall`` (the positive class's recall under the
    validation PGD) or ``pr-auc`` (its average precision under that PGD); ``auto`` is
    ``pr-auc`` on a dataset with a positive class and ``robust-accuracy`` otherwise (see
    :meth:`selection`).
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
    method_options: dict[str, Any] = field(default_factory=dict)
    adv_ratio: float = 1.0
    schedule: str = "constant"
    warmup_epochs: int | None = None
    ema_decay: float | None = None
    augment: tuple[str, ...] = ()
    noise_std: float = 0.05
    early_stop: int | None = None
    catastrophic: str = "auto"
    co_threshold: float = 0.5
    checkpoint_every: int = 0
    tensorboard: bool = False
    amp: str = "auto"
    channels_last: str = "auto"
    compile: str = "off"
    sync_batchnorm: bool = False
    class_weight: str | None = None
    select_by: str = "auto"
    data: str | None = None
    schema: str | None = None
    image_size: tuple[int, int] | None = None
    normalize: str | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "attack_steps", "eval_steps", "eval_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdvtrainError(f"{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.seed, int)
            or isinstance(self.seed, bool)
            or not 0 <= self.seed < 2**32
        ):
            raise AdvtrainError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("dataset", "model", "method", "norm", "optimizer", "out", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AdvtrainError(
                    f"{name} must be a non-empty string, got {getattr(self, name)!r}"
                )
        self._check_paths()
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
        self._check_training_options()

    def _check_paths(self) -> None:
        """``data_dir``, ``data`` and ``schema`` are strings; a schema needs its table
        (``data``), ``image_size`` images (``data`` without a schema)."""
        for name in ("data_dir", "data", "schema"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise AdvtrainError(f"{name} must be a string, got {value!r}")
        if self.schema is not None and self.data is None:
            raise AdvtrainError("a schema needs its table: data (the .csv/.parquet file)")
        if self.image_size is not None:
            from ..data.image_folder import check_image_size, parse_image_size

            size = self.image_size
            if self.data is None or self.schema is not None:
                raise AdvtrainError("image_size goes with image data (data without a schema)")
            if isinstance(size, str):
                size = parse_image_size(size)
            elif not isinstance(size, (list, tuple)):
                raise AdvtrainError(f"image_size must be [H, W] or 'HxW', got {size!r}")
            object.__setattr__(self, "image_size", check_image_size(size))

    @property
    def eps_warmup_epochs(self) -> int:
        """The epochs over which eps ramps up: ``warmup_epochs``, or when it is ``None``,
        ``epochs // 10`` for FGSM-type methods and 0 for the others.

        Wong et al.'s MNIST recipe (``fgsm-rs``, eps 0.3, 10 epochs) starts at full eps; in this
        trainer that often overfits catastrophically, and a short ramp avoids it (the README
        gives the measurements).
        """
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return self.epochs // 10 if self.method in FGSM_TYPE else 0

    @property
    def weight_averaging_decay(self) -> float:
        """The decay of the weight average the run keeps (0: none): ``ema_decay``, or when it is
        ``None``, :data:`FGSM_EMA_DECAY` for FGSM-type methods and 0 for the others.

        On Wong et al.'s MNIST recipe (``fgsm-rs``, eps 0.3, 10 epochs, one epoch of eps ramp)
        the average raised the kept epoch's robust accuracy, and 0.995 did better than 0.999
        (the README gives the measurements).
        """
        if self.ema_decay is not None:
            return self.ema_decay
        return FGSM_EMA_DECAY if self.method in FGSM_TYPE else 0.0

    def selection(self, positive_class: int | None, dataset: str = "the dataset") -> str:
        """The figure that keeps the best epoch: ``select_by`` with ``auto`` resolved
        (:data:`AUTO_POSITIVE_FIGURE` when ``positive_class`` is set, else ``robust-accuracy``); a
        one-line error when a positive-class figure is asked of ``dataset`` without a positive
        class."""
        if self.select_by == "auto":
            return "robust-accuracy" if positive_class is None else AUTO_POSITIVE_FIGURE
        if self.select_by in POSITIVE_FIGURES and positive_class is None:
            raise AdvtrainError(
                f"select_by {self.select_by!r} needs a dataset with a positive class; "
                f"{dataset} has none (use robust-accuracy)"
            )
        return self.select_by

    def _check_training_options(self) -> None:
        object.__setattr__(self, "method_options", _method_options(self.method_options))
        object.__setattr__(self, "augment", _augment_names(self.augment))
        if not _finite_nonnegative(self.adv_ratio) or self.adv_ratio > 1:
            raise AdvtrainError(f"adv_ratio must be a number in [0, 1], got {self.adv_ratio!r}")
        for name, choices in (
            ("schedule", tuple(SCHEDULES)),
            ("catastrophic", CATASTROPHIC),
            ("amp", AMP),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise AdvtrainError(
                    f"unknown {name} {value!r}; choose one of: {', '.join(choices)}"
                )
        for name in ("warmup_epochs", "checkpoint_every"):
            value = getattr(self, name)
            if name == "warmup_epochs" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AdvtrainError(f"{name} must be an integer >= 0, got {value!r}")
        if self.warmup_epochs is not None and self.warmup_epochs > self.epochs:
            raise AdvtrainError(
                f"warmup_epochs ({self.warmup_epochs}) must not exceed epochs "
                f"({self.epochs}): eps would never reach its full value"
            )
        if self.ema_decay is not None and (
            not _finite_nonnegative(self.ema_decay) or self.ema_decay >= 1
        ):
            raise AdvtrainError(
                f"ema_decay must be a number in [0, 1) (0: no weight average), "
                f"got {self.ema_decay!r}"
            )
        if self.early_stop is not None and (
            not isinstance(self.early_stop, int)
            or isinstance(self.early_stop, bool)
            or self.early_stop < 1
        ):
            raise AdvtrainError(
                "early_stop must be a positive number of epochs (or unset), "
                f"got {self.early_stop!r}"
            )
        if not _finite_nonnegative(self.noise_std):
            raise AdvtrainError(f"noise_std must be finite and >= 0, got {self.noise_std!r}")
        if not _finite_nonnegative(self.co_threshold) or not 0 < self.co_threshold <= 1:
            raise AdvtrainError(
                f"co_threshold must be a number in (0, 1], got {self.co_threshold!r}"
            )
        self._check_imbalance_options()
        self._check_runtime_options()
        self._check_model_options()

    def _check_model_options(self) -> None:
        """``normalize`` is a name or MEAN,STD; ``num_classes`` an integer >= 2 (or unset)."""
        from ..models.adapters import parse_normalization

        if self.normalize is not None:
            if not isinstance(self.normalize, str):
                raise AdvtrainError(f"normalize must be a string, got {self.normalize!r}")
            parse_normalization(self.normalize)
        count = self.num_classes
        if count is not None and (type(count) is not int or count < 2):
            raise AdvtrainError(f"num_classes must be an integer >= 2, got {count!r}")

    def _check_imbalance_options(self) -> None:
        weight = self.class_weight
        if isinstance(weight, str) and weight.strip().lower() == "none":
            weight = None
        if weight is not None and weight not in CLASS_WEIGHTS:
            raise AdvtrainError(
                f"unknown class_weight {self.class_weight!r}; choose {', '.join(CLASS_WEIGHTS)} "
                "(or leave it unset for a plain shuffle)"
            )
        object.__setattr__(self, "class_weight", weight)
        if self.select_by not in SELECT_BY:
            raise AdvtrainError(
                f"unknown select_by {self.select_by!r}; choose one of: {', '.join(SELECT_BY)}"
            )

    def _check_runtime_options(self) -> None:
        if not isinstance(self.tensorboard, bool):
            raise AdvtrainError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        channels_last = self.channels_last
        if isinstance(channels_last, bool):
            channels_last = "on" if channels_last else "off"
        if channels_last not in CHANNELS_LAST:
            raise AdvtrainError(
                f"channels_last must be one of {', '.join(CHANNELS_LAST)} (or "
                f"true/false), got {self.channels_last!r}"
            )
        object.__setattr__(self, "channels_last", channels_last)
        if self.compile not in COMPILE:
            raise AdvtrainError(
                f"unknown compile {self.compile!r}; choose one of: {', '.join(COMPILE)}"
            )
        if not isinstance(self.sync_batchnorm, bool):
            raise AdvtrainError(
                f"sync_batchnorm must be true or false, got {self.sync_batchnorm!r}"
            )

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


OPTIMIZERS = ("adam", "sgd")
#: Single-step methods: watched for catastrophic overfitting, given an eps warm-up and a weight
#: average by default.
FGSM_TYPE = ("fgsm-rs",)
#: The weight-average decay FGSM-type methods get by default (measured against 0.999, see
#: :attr:`TrainConfig.weight_averaging_decay`).
FGSM_EMA_DECAY = 0.995
CATASTROPHIC = ("auto", "stop", "warn", "off")
AMP = ("auto", "off", "bf16", "fp16")
#: ``off`` or a ``torch.compile`` backend.
COMPILE = ("off", "inductor", "aot_eager", "eager")
CHANNELS_LAST = ("auto", "on", "off")
#: ``class_weight`` values (``None``: none).
CLASS_WEIGHTS = ("balanced",)
#: ``select_by`` values: the validation figure that keeps the best epoch.
SELECT_BY = ("auto", "robust-accuracy", "robust-recall", "pr-auc")
#: The ``select_by`` figures that need a positive class.
POSITIVE_FIGURES = ("robust-recall", "pr-auc")
#: What ``select_by = "auto"`` keeps epochs by on a dataset with a positive class. PR-AUC, not
#: recall: recall alone is highest for a model that flags every row (an early epoch of balanced
#: training often does), the mirror image of the accuracy of a model that flags none; PR-AUC
#: ranks without a threshold and a model that flags everything scores the positive share.
AUTO_POSITIVE_FIGURE = "pr-auc"
#: Options of the attack inside training, which have their own configuration keys.
_RESERVED_OPTIONS = {"steps": "attack_steps", "step_size": "attack_step_size", "threat": "eps/norm"}


def _method_options(value: object) -> dict[str, Any]:
    """A checked copy of ``method_options``: names to numbers, booleans or strings."""
    if not isinstance(value, dict):
        raise AdvtrainError(
            f"method_options must be a table of name = value, got {type(value).__name__}"
        )
    options: dict[str, Any] = {}
    for key, item in value.items():
        name = str(key).replace("-", "_")
        if not name.isidentifier():
            raise AdvtrainError(f"method option name {key!r} is not a valid name")
        if name in _RESERVED_OPTIONS:
            raise AdvtrainError(f"method option {name!r}: set {_RESERVED_OPTIONS[name]} instead")
        if isinstance(item, float) and not math.isfinite(item):
            raise AdvtrainError(f"method option {name} must be finite, got {item!r}")
        if not isinstance(item, (bool, int, float, str)):
            raise AdvtrainError(
                f"method option {name} must be a number, true/false or text, "
                f"got {type(item).__name__}"
            )
        if name in options:
            raise AdvtrainError(f"method option {name} is given twice")
        options[name] = item
    return options


def _augment_names(value: object) -> tuple[str, ...]:
    """``augment`` as a tuple of known names, from a list or a comma-separated string."""
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise AdvtrainError(
            f"augment must be a list of names or a comma-separated string, got {value!r}"
        )
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise AdvtrainError(f"augment must list names, got {item!r}")
        name = item.strip().lower()
        if name in ("", "none"):
            continue
        if name not in AUGMENTATIONS:
            raise AdvtrainError(
                f"unknown augmentation {name!r}; choose from: {', '.join(AUGMENTATIONS)}"
            )
        if name in names:
            raise AdvtrainError(f"augmentation {name!r} is listed twice")
        names.append(name)
    return tuple(names)


def parse_method_options(items: Iterable[str]) -> dict[str, Any]:
    """``["beta=6", "temperature=100"]`` (from ``--method-option``) as a dict of parsed values."""
    return parse_key_values(items, "--method-option", "beta=6")


def _finite_nonnegative(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def config_keys() -> tuple[str, ...]:
    return tuple(f.name for f in fields(TrainConfig))


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` that are not None.

    A TOML file may hold the keys at its top level or under a ``[train]`` table; dashes in keys
    are read as underscores. ``method_options`` merge: an override replaces the file's value of
    each option it names and keeps the others.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_toml(Path(path)))
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(values.get("method_options"), dict) and isinstance(
        given.get("method_options"), dict
    ):
        given["method_options"] = {**values["method_options"], **given["method_options"]}
    values.update(given)
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise AdvtrainError(
            f"unknown configuration key(s): {', '.join(unknown)}; known: {', '.join(config_keys())}"
        )
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise AdvtrainError(f"bad configuration: {exc}") from None


def load_run_config(run_dir: str | Path, **given: Any) -> TrainConfig:
    """The configuration in ``run_dir/config.json``, to resume that run (``out`` is ``run_dir``).

    Every override in ``given`` that is not None must equal the run's own value (resuming with
    other settings would not continue the same run): a one-line error names the first that
    differs.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise AdvtrainError(f"cannot resume: run directory '{run_dir}' does not exist")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdvtrainError(
            f"cannot resume: '{path}' is missing (not an advtrain run directory)"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise AdvtrainError(f"cannot resume: '{path}' is not valid JSON") from None
    if not isinstance(saved, dict):
        raise AdvtrainError(f"cannot resume: '{path}' does not hold a JSON object")
    config = load_config(None, **saved).replace(out=str(run_dir))
    for key, value in given.items():
        if value is None:
            continue
        flag = "--method-option" if key == "method_options" else "--" + key.replace("_", "-")
        if key == "out":
            same = Path(value).resolve() == run_dir.resolve()
        else:
            if key not in config_keys():
                raise AdvtrainError(f"unknown configuration key {key!r}")
            same = getattr(config.replace(**{key: value}), key) == getattr(config, key)
        if not same:
            theirs = str(run_dir) if key == "out" else getattr(config, key)
            raise AdvtrainError(
                f"--resume continues '{run_dir}' with the settings of its config.json: {flag} "
                f"{value!r} differs from the run's {theirs!r} (leave the flag out)"
            )
    return config


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
