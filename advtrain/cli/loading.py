"""A model and its dataset as the command line names them: a run directory, or a model file
(``--model-file path.py:factory``) or built-in architecture (``--model``) with ``--weights``;
and the checks on output paths made before any work."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdvtrainError

if TYPE_CHECKING:
    from torch import nn

    from ..data import Dataset, TableEncoding
    from ..threat import ThreatModel


def table_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--data`` (passed as ``table``: a table or images), ``--schema`` and ``--image-size``,
    for ``evaluate`` and ``attack``."""
    import click

    command = click.option(
        "--image-size",
        metavar="H[xW]",
        help="Resize the images of a --data folder to H x W pixels (default: the run's, else "
        "their own size, which must then be the same for all).",
    )(command)
    command = click.option(
        "--schema",
        type=click.Path(dir_okay=False),
        help="The table's TOML schema: label, column types, bounds, mutability, directions, rules.",
    )(command)
    return click.option(
        "--data",
        "table",
        type=click.Path(),
        help="Your own table (.csv or .parquet), with --schema; with a table RUN_DIR: a new "
        "file of the same columns, encoded as in training. Or your own images: a folder of "
        "class folders (or of train/, test/ folders of them), an .npz, or a CIFAR folder.",
    )(command)


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--normalize`` and ``--num-classes``, for ``evaluate`` and ``attack``."""
    import click

    command = click.option(
        "--num-classes",
        type=int,
        help="Outputs of the model's head when it has more than the data has classes "
        "(default: the data's count).",
    )(command)
    return click.option(
        "--normalize",
        help="The mean/std normalisation the model was trained with: imagenet, cifar10 or "
        "MEAN,STD (m1/m2/m3,s1/s2/s3); it becomes the model's first layer, the data stay in "
        "[0, 1] (default: the run's, else none).",
    )(command)


def with_model_classes(data: Dataset, num_classes: int | None) -> Dataset:
    """``data`` for a model with ``num_classes`` outputs (``--num-classes``): more than the data's
    classes adds unnamed ones; fewer, or labels beyond the head, is a one-line error."""
    import dataclasses

    n = data.info.n_classes
    if num_classes is None or num_classes == n:
        return data
    if type(num_classes) is not int or num_classes < 2:
        raise AdvtrainError(f"--num-classes must be an integer >= 2, got {num_classes!r}")
    top = max(int(split.y.max()) for split in (data.train, data.val, data.test) if len(split.y))
    if num_classes < n or top >= num_classes:
        raise AdvtrainError(
            f"--num-classes {num_classes} is too few for {data.info.name}: it has {n} classes "
            f"(labels up to {top}); the model's head needs at least {max(n, top + 1)} outputs"
        )
    extra = tuple(f"class {i}" for i in range(n, num_classes))
    info = dataclasses.replace(data.info, classes=data.info.classes + extra)
    return dataclasses.replace(data, info=info)


def check_output_paths(paths: dict[str, Path]) -> None:
    """Before any work: every output goes to an existing directory, and no two to one file."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path.is_dir():
            raise AdvtrainError(f"{flag} {path} is a directory")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise AdvtrainError(f"{flag} {path}: directory {parent} does not exist")
        key = path.resolve()
        if key in seen:
            raise AdvtrainError(f"{seen[key]} and {flag} name the same file {path}")
        seen[key] = flag


def parse_classes(text: str | None, classes: tuple[str, ...]) -> list[int] | None:
    """``--attack-classes``: comma-separated class names or indices, as class indices."""
    if text is None:
        return None
    chosen = []
    for part in (p.strip() for p in text.split(",")):
        if part in classes:
            chosen.append(classes.index(part))
        elif part.isdigit() and int(part) < len(classes):
            chosen.append(int(part))
        else:
            raise AdvtrainError(
                f"--attack-classes: {part!r} is not a class; the classes are "
                + ", ".join(f"{i}={name}" for i, name in enumerate(classes))
            )
    return sorted(set(chosen))


@dataclass
class Loaded:
    """A model and its dataset, as named on the command line (``evaluate`` and ``attack``)."""

    model: nn.Module
    data: Dataset
    run: dict[str, Any]  # what the run directory says (empty without one)
    dataset: str
    seed: int
    source: str  # where the model came from, for the record

    def threat_model(self, norm: str | None, eps: float | None) -> ThreatModel:
        """The dataset's threat model (bounds, immutable features) with the given norm and eps,
        else the run's, else linf and the dataset's default eps."""
        return self.data.info.threat_model(
            norm=norm or self.run.get("norm", "linf"),
            eps=eps if eps is not None else self.run.get("eps"),
        )


def load_model_and_data(
    run_dir: str | None,
    model_file: str | None,
    model_name: str | None,
    weights: str | None,
    dataset: str | None,
    data_dir: str | None,
    seed: int | None,
    table: str | None = None,
    schema: str | None = None,
    *,
    normalize: str | None = None,
    num_classes: int | None = None,
    image_size: str | None = None,
) -> Loaded:
    """Exactly one of RUN_DIR, ``--model-file`` or ``--model`` (the last two with ``--weights``
    and ``--dataset`` or ``--data``/``--schema``): the model with its weights loaded, and the
    dataset split with ``seed`` (default: the run's, else 0).

    A run trained on a table reads the same table again (its encoding, saved in the run, must
    come out the same); ``--data NEW.csv`` with a table run evaluates the whole new file,
    encoded with the run's saved encoding (its categories, bounds and constraints).

    ``normalize`` and ``num_classes`` (``--normalize``, ``--num-classes``) go with ``--model`` and
    ``--model-file``; a run directory rebuilds the model with its own."""
    from ..models import build_model, load_user_model, logits_model, with_normalization
    from ..models.weights import load_adapted_weights

    sources = [s for s in (run_dir, model_file, model_name) if s]
    if len(sources) != 1:
        raise AdvtrainError("give exactly one of RUN_DIR, --model-file or --model")
    run: dict[str, Any] = {}
    if run_dir:
        run = _read_run(run_dir, weights)
        weights = str(run["weights"])
    elif weights is None and not (model_file and _is_tree_file(model_file)):
        raise AdvtrainError("--weights is required with --model-file or --model")
    seed = run.get("seed", 0) if seed is None else seed
    if not 0 <= seed < 2**32:
        raise AdvtrainError(f"--seed must be in [0, 2**32), got {seed}")
    data, dataset = load_data(
        dataset,
        table,
        schema,
        data_dir=data_dir,
        seed=seed,
        run=run,
        run_dir=run_dir,
        image_size=image_size,
    )
    normalize, num_classes = _run_model_options(run, normalize, num_classes)
    data = with_model_classes(data, num_classes)
    if model_file and _is_tree_file(model_file):
        if normalize is not None:
            raise AdvtrainError("--normalize applies to neural networks, not tree ensembles")
        model = _load_trees(model_file, data)
        source = model_file
    elif model_file:
        # a tuple, dict or output object is reduced to its logits (else a one-line error)
        model = logits_model(load_user_model(model_file, weights))
        if normalize is not None:
            model = with_normalization(model, *_normalization(normalize, data))
        source = f"{model_file} with {weights}"
    else:
        name = run.get("model", model_name)
        model = build_model(
            str(name),
            in_shape=data.info.shape,
            n_classes=data.info.n_classes,
            normalize=normalize,
        )
        assert weights is not None  # required above for every model but a tree ensemble
        load_adapted_weights(model, weights)
        source = f"{name} with {weights}"
    return Loaded(model, data, run, str(dataset), int(seed), source)


def _run_model_options(
    run: dict[str, Any], normalize: str | None, num_classes: int | None
) -> tuple[str | None, int | None]:
    """``--normalize`` and ``--num-classes``, or a run's own (the flags may only repeat them)."""
    if not run:
        return normalize, num_classes
    for flag, given, key in (
        ("--normalize", normalize, "normalize"),
        ("--num-classes", num_classes, "num_classes"),
    ):
        if given is not None and given != run.get(key):
            raise AdvtrainError(
                f"{flag} {given} differs from the run's ({run.get(key)}): a run directory "
                "rebuilds its model as it was trained"
            )
    return run.get("normalize"), run.get("num_classes")


def _normalization(normalize: str, data: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--normalize`` as ``(mean, std)``, with as many means as the images have channels."""
    from ..models.adapters import parse_normalization

    mean, std = parse_normalization(normalize)
    shape = data.info.shape
    if data.info.kind != "image" or len(mean) not in (1, shape[0]):
        raise AdvtrainError(
            f"normalisation {normalize} has {len(mean)} means; inputs of shape {shape} need one "
            "per channel of (C, H, W) images, or one for all"
        )
    return mean, std


def load_data(
    dataset: str | None,
    table: str | None,
    schema: str | None,
    *,
    data_dir: str | None,
    seed: int,
    run: dict[str, Any] | None = None,
    run_dir: str | None = None,
    image_size: str | None = None,
) -> tuple[Dataset, str]:
    """The dataset the flags (or the run) name, and its name for the record: a built-in set
    (``--dataset``), a table (``--data FILE --schema FILE.toml``) or images (``--data PATH``,
    :func:`advtrain.data.load_images`, resized by ``--image-size`` or as the run was)."""
    from ..data import load_dataset, load_table

    run = run or {}
    if dataset and table:
        raise AdvtrainError("give --dataset or --data, not both")
    images = _load_image_data(dataset, table, schema, image_size, seed=seed, run=run)
    if images is not None:
        return images
    if schema and not table:
        raise AdvtrainError("--schema goes with --data FILE.csv|FILE.parquet")
    fractions = {
        "val_fraction": run.get("val_fraction", 0.1),
        "test_fraction": run.get("test_fraction", 0.2),
    }
    if table is None and not dataset and run.get("data"):
        table, schema = str(run["data"]), run.get("schema")
        data = load_table(table, schema, seed=seed, **fractions)
        _check_same_encoding(data, run_dir)
        return data, f"table {table}"
    if table is not None:
        if run_dir and run.get("data"):
            return load_table(table, None, encoding=_saved_encoding(run_dir)), f"table {table}"
        if schema is None:
            raise AdvtrainError("--data needs --schema FILE.toml (the label, types and rules)")
        return load_table(table, schema, seed=seed, **fractions), f"table {table}"
    dataset = dataset or run.get("dataset")
    if dataset is None:
        raise AdvtrainError(
            "--dataset (or --data FILE --schema FILE.toml) is required with --model-file or --model"
        )
    data = load_dataset(dataset, data_dir=data_dir or run.get("data_dir"), seed=seed, **fractions)
    return data, str(dataset)


def _load_image_data(
    dataset: str | None,
    path: str | None,
    schema: str | None,
    image_size: str | None,
    *,
    seed: int,
    run: dict[str, Any],
) -> tuple[Dataset, str] | None:
    """The images ``--data`` names (or, without ``--data`` or ``--dataset``, those of an image
    run: ``data`` without a ``schema``); None when the data are not images."""
    from ..data.image_folder import parse_image_size
    from ..data.images import is_image_source, load_images

    run_images = bool(run.get("data")) and run.get("schema") is None
    if path is None and not dataset and run_images:
        path = str(run["data"])
    if path is None or not (is_image_source(path) or (run_images and path == run.get("data"))):
        if image_size is not None:
            raise AdvtrainError("--image-size goes with --data of images (a folder, .npz, CIFAR)")
        return None
    if schema is not None:
        raise AdvtrainError(f"--schema is for tables; '{path}' is image data (leave --schema out)")
    size = parse_image_size(image_size) if image_size is not None else run.get("image_size")
    data = load_images(
        path,
        image_size=size,
        seed=seed,
        val_fraction=run.get("val_fraction", 0.1),
        test_fraction=run.get("test_fraction", 0.2),
    )
    return data, f"images {path}"


def _saved_encoding(run_dir: str) -> TableEncoding:
    from ..data import TABLE_ENCODING_FILE, TableEncoding

    return TableEncoding.from_json(_read_json(Path(run_dir) / TABLE_ENCODING_FILE))


def _check_same_encoding(data: Dataset, run_dir: str | None) -> None:
    """The table read again must encode as it did in training (same categories and bounds)."""
    from ..data import TABLE_ENCODING_FILE

    if run_dir is None or data.info.encoding is None:
        return
    path = Path(run_dir) / TABLE_ENCODING_FILE
    if not path.is_file():
        return
    if _read_json(path) != json.loads(json.dumps(data.info.encoding.to_json())):
        raise AdvtrainError(
            f"the table {data.table.path if data.table else ''} no longer encodes as it did in "
            f"training ({path} differs): evaluate a new file with --data NEW.csv"
        )


def _is_tree_file(model_file: str) -> bool:
    """A tree ensemble's file (or a pickle, which the tree loader refuses with the safe formats)
    rather than ``file.py:factory``."""
    from ..models.trees import (
        LIGHTGBM_SUFFIXES,
        PICKLE_SUFFIXES,
        SKOPS_SUFFIXES,
        XGBOOST_SUFFIXES,
    )

    suffixes = (*XGBOOST_SUFFIXES, *LIGHTGBM_SUFFIXES, *SKOPS_SUFFIXES, *PICKLE_SUFFIXES)
    return Path(model_file).suffix.lower() in suffixes


def _load_trees(model_file: str, data: Dataset) -> nn.Module:
    """A tree ensemble scoring the table's rows in raw units (its training layout: numeric
    columns as they are in the file, categories one-hot)."""
    from ..models.trees import load_tree_model

    constraints = data.info.constraints
    if data.info.kind != "tabular":
        raise AdvtrainError(f"{model_file}: tree ensembles take tables, not {data.info.name}")
    return load_tree_model(
        model_file,
        offset=None if constraints is None else constraints.offset,
        scale=None if constraints is None else constraints.scale,
        n_classes=data.info.n_classes,
    )


def _read_run(run_dir: str, weights: str | None) -> dict[str, Any]:
    """What a run directory says: its config, with the model, norm and eps of its checkpoint."""
    from ..checkpoint import load_checkpoint

    path = Path(run_dir)
    if not path.is_dir():
        raise AdvtrainError(f"run directory '{run_dir}' does not exist")
    weights_path = Path(weights) if weights else path / "model.safetensors"
    _, meta = load_checkpoint(weights_path)
    if "model" not in meta:
        raise AdvtrainError(f"'{weights_path}' has no advtrain sidecar naming its model")
    config = _read_json(path / "config.json")
    return {
        **config,
        "weights": str(weights_path),
        **{k: meta[k] for k in ("model", "norm", "eps") if k in meta},
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdvtrainError(f"'{path}' is missing: not an advtrain run directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdvtrainError(f"'{path}' is not valid JSON") from None
    if not isinstance(data, dict):
        raise AdvtrainError(f"'{path}' does not hold a JSON object")
    return data
