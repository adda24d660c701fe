"""``advtrain attack``: one attack on a test split, saved as ``.npz`` (and a ``.png`` of some
examples), measured by :func:`advtrain.evaluation.attack_run.run_attack`."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import AdvtrainError
from .attack_options import build_attack, check_attack_options, parse_attack_options
from .loading import (
    check_output_paths,
    load_model_and_data,
    model_options,
    parse_classes,
    table_options,
)
from .processes import echo

if TYPE_CHECKING:
    from ..evaluation.attack_run import AttackRun


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model-file", help="Your own model as path/to/file.py:factory.")
@click.option(
    "--model",
    "model_name",
    help="An architecture, with --weights: a built-in name, torchvision:NAME or timm:NAME.",
)
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors or .pth state dict.")
@click.option("--dataset", help="Dataset whose test split is attacked (default: the run's).")
@click.option("--data-dir", help="Directory of data files.")
@table_options
@model_options
@click.option(
    "--attack",
    "attack_name",
    required=True,
    help="Attack name: fgsm, pgd, apgd-ce, apgd-dlr, apgd-t, ... (a wrong name lists all).",
)
@click.option("--norm", help="linf, l2 or l1 (default: the run's, else linf).")
@click.option("--eps", type=float, help="Radius (default: the run's, else the dataset's).")
@click.option("--n", "limit", type=int, help="Attack the first N test samples only (default: all).")
@click.option("--restarts", type=int, default=1, show_default=True)
@click.option(
    "--seed", type=int, help="Seed of the split and the attack (default: the run's, else 0)."
)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An attack hyperparameter, e.g. steps=100 (repeatable; int, float, true/false or text).",
)
@click.option(
    "--target-class",
    type=int,
    help="Targeted attack: push every point towards this class. Points already "
    "labelled with it are left unchanged and out of the success rate.",
)
@click.option(
    "--attack-classes",
    help="Attack only the rows of these true classes (comma-separated names or indices, e.g. 1 "
    "for a fraud table's fraud rows); the others are left unchanged.",
)
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .npz file of clean and adversarial inputs, labels and predictions; for a table, "
    "a .csv of the rows in your own columns (changed cells only re-written) with pred_clean, "
    "pred_adv and success.",
)
@click.option(
    "--png",
    type=click.Path(dir_okay=False),
    help="Picture of the first --rows examples (default: the --out path with .png).",
)
@click.option("--no-png", is_flag=True, help="Draw no picture.")
@click.option("--rows", type=int, default=8, show_default=True, help="Examples in the picture.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write the summary figures as JSON.",
)
@click.option("--progress", is_flag=True, help="Progress bar (for attacks that have one).")
def attack(
    run_dir: str | None,
    model_file: str | None,
    model_name: str | None,
    weights: str | None,
    dataset: str | None,
    data_dir: str | None,
    table: str | None,
    schema: str | None,
    image_size: str | None,
    normalize: str | None,
    num_classes: int | None,
    attack_name: str,
    norm: str | None,
    eps: float | None,
    limit: int | None,
    restarts: int,
    seed: int | None,
    options: tuple[str, ...],
    target_class: int | None,
    attack_classes: str | None,
    batch_size: int,
    device: str,
    out: str,
    png: str | None,
    no_png: bool,
    rows: int,
    json_path: str | None,
    progress: bool,
) -> None:
    """Run one attack on the test split of a trained run (RUN_DIR) or of a model file with
    weights, and save the adversarial examples (.npz) and a picture of some (.png).

    The summary line gives the clean and adversarial accuracy, the success rate (untargeted:
    the share of points misclassified after the attack; with --target-class C: the share of
    the points not labelled C that the model then assigns to C) and the median perturbation
    norm of the successful adversarial examples.
    """
    from ..attacks import ATTACKS
    from ..errors import unknown
    from ..evaluation.attack_run import run_attack
    from ..models import check_model_output
    from ..util import atomic_write_json, resolve_device

    for flag, value in (
        ("--n", limit),
        ("--restarts", restarts),
        ("--batch-size", batch_size),
        ("--rows", rows),
    ):
        if value is not None and value < 1:
            raise AdvtrainError(f"{flag} must be a positive integer, got {value}")
    if target_class is not None and target_class < 0:
        raise AdvtrainError(f"--target-class must be a class index >= 0, got {target_class}")
    if attack_name not in ATTACKS:
        raise unknown("attack", attack_name, list(ATTACKS))
    hyperparameters = parse_attack_options(options)
    accepted = check_attack_options(attack_name, ATTACKS[attack_name], hyperparameters)
    png_path = None if no_png else Path(png) if png else Path(out).with_suffix(".png")
    outputs = {
        "--out": Path(out),
        "--png": png_path,
        "--json": Path(json_path) if json_path else None,
    }
    check_output_paths({flag: path for flag, path in outputs.items() if path is not None})
    target_device = resolve_device(device)

    loaded = load_model_and_data(
        run_dir,
        model_file,
        model_name,
        weights,
        dataset,
        data_dir,
        seed,
        table,
        schema,
        normalize=normalize,
        num_classes=num_classes,
        image_size=image_size,
    )
    info = loaded.data.info
    threat = loaded.threat_model(norm, eps)
    if target_class is not None and target_class >= info.n_classes:
        raise AdvtrainError(
            f"--target-class {target_class} is not a class of {loaded.dataset}: "
            f"choose 0 to {info.n_classes - 1}"
        )
    extra: dict[str, Any] = {}
    if accepted is None or "batch_size" in accepted:
        extra["batch_size"] = batch_size
    if progress and accepted is not None and "progress" in accepted:
        extra["progress"] = True
    attacker = build_attack(
        attack_name, threat, restarts=restarts, seed=loaded.seed, **extra, **hyperparameters
    )

    x, y = loaded.data.test.x[:limit], loaded.data.test.y[:limit]
    model = loaded.model.to(target_device).eval()
    check_model_output(model, x, info.n_classes, target_device)
    result = run_attack(
        model,
        attacker,
        x,
        y,
        target_class,
        batch_size=batch_size,
        attack_classes=parse_classes(attack_classes, info.classes),
    )

    settings = {
        "attack": repr(attacker),
        "name": attack_name,
        "norm": threat.norm,
        "eps": _json_number(threat.eps),
        "dataset": loaded.dataset,
        "n": result.n,
        "seed": loaded.seed,
        "target_class": target_class,
    }
    meta = {**settings, "restarts": restarts, "options": hyperparameters, "model": loaded.source}
    if Path(out).suffix.lower() == ".csv":
        from ..data import write_adversarial_csv

        if loaded.data.table is None or loaded.data.test.rows is None:
            raise AdvtrainError("--out FILE.csv is for tables (--data); use --out FILE.npz")
        write_adversarial_csv(
            out,
            loaded.data,
            loaded.data.test.rows[: result.n],
            x,
            result.x_adv,
            result.pred_clean,
            result.pred_adv,
            result.success,
        )
    else:
        _write_npz(Path(out), result, meta)
    if png_path is not None:
        from ..visualize import adversarial_grid

        adversarial_grid(
            x,
            result.x_adv,
            y,
            result.pred_clean,
            result.pred_adv,
            png_path,
            rows=rows,
            class_names=info.classes,
            feature_names=info.feature_names,
        )
    if json_path:
        atomic_write_json(
            json_path,
            {
                **settings,
                **result.summary(),
                "out": str(out),
                "png": None if png_path is None else str(png_path),
            },
        )
    echo(_summary_line(attack_name, target_class, result, threat.norm, threat.eps))


def _write_npz(path: Path, result: AttackRun, meta: dict[str, Any]) -> None:
    """The run's arrays and ``meta`` (as a JSON string) in one compressed ``.npz``, atomically."""
    import numpy as np

    from ..util import atomic_write_bytes

    buffer = io.BytesIO()
    arrays: dict[str, Any] = {**result.arrays(), "meta": np.array(json.dumps(meta, sort_keys=True))}
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _summary_line(
    name: str, target_class: int | None, result: AttackRun, norm: str, eps: float
) -> str:
    towards = "" if target_class is None else f" towards class {target_class}"
    skipped = (
        ""
        if target_class is None
        else f"; {result.n - result.n_attacked} of class {target_class} not attacked"
    )
    median = result.median_perturbation_norm
    median_text = "n/a" if math.isnan(median) else f"{median:.4g}"
    return (
        f"attack {name}{towards}: clean accuracy {result.clean_accuracy:.2%}, adversarial "
        f"accuracy {result.adversarial_accuracy:.2%}, success rate {result.success_rate:.2%} on "
        f"{result.n} samples ({norm} eps={eps:g}{skipped}); median perturbation norm "
        f"{median_text}; {result.seconds:.1f} s"
    )


def _json_number(value: float) -> float | str | None:
    """A float for JSON: NaN (nothing to measure) is null, an infinite eps is "inf"."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else str(value)
