"""``advtrain backdoor``: every backdoor attack against every defence, as a JSON table and an HTML
page (:func:`advtrain.poisoning.run_matrix`); ``advtrain scan``: the training-set defences on a
user's own data with a run's model, listing the suspect rows ranked
(:func:`advtrain.poisoning.scan`). The commands parse and write; the library computes."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import AdvtrainError
from .loading import load_data, load_model_and_data
from .processes import echo

#: The architecture trained when --model is not given, by dataset kind and name.
DEFAULT_MODELS = {"mnist": "mnist-small", "digits": "digits-cnn"}


def _default_model(name: str, kind: str) -> str:
    if kind == "tabular":
        return "mlp"
    if name in DEFAULT_MODELS:
        return DEFAULT_MODELS[name]
    raise AdvtrainError(f"--model is required for {name} (an architecture for its images)")


@click.command(name="backdoor")
@click.option("--dataset", help="A built-in dataset (digits, mnist, transactions, ...).")
@click.option("--data", "table", type=click.Path(), help="Your own table or images instead.")
@click.option("--schema", type=click.Path(dir_okay=False), help="The table's TOML schema.")
@click.option("--data-dir", help="Directory of data files (MNIST's IDX files).")
@click.option(
    "--model",
    "model_name",
    help="Architecture trained for every cell (default: mnist-small on MNIST, digits-cnn on "
    "digits, mlp on tables).",
)
@click.option(
    "--attacks",
    default="badnets,blended,clean-label",
    show_default=True,
    help="Comma-separated: badnets, blended, clean-label (images), feature-trigger (tables).",
)
@click.option(
    "--defences",
    default="none,spectral,ac,strip",
    show_default=True,
    help="Comma-separated: none, spectral, ac, strip (images only).",
)
@click.option(
    "--rate", type=float, default=0.01, show_default=True, help="Share of training rows poisoned."
)
@click.option(
    "--target", type=int, default=0, show_default=True, help="The attacker's target class."
)
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--strip-samples",
    type=int,
    default=100,
    show_default=True,
    help="Clean images STRIP superimposes on each input (Gao et al.: 100).",
)
@click.option(
    "--strip-inputs",
    type=int,
    default=1000,
    show_default=True,
    help="Clean and triggered test inputs STRIP is measured on (each).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Directory for matrix.json, matrix.html and the trained weights (weights/).",
)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def backdoor(
    dataset: str | None,
    table: str | None,
    schema: str | None,
    data_dir: str | None,
    model_name: str | None,
    attacks: str,
    defences: str,
    rate: float,
    target: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    strip_samples: int,
    strip_inputs: int,
    out: str,
    quiet: bool,
) -> None:
    """Train every backdoor attack against every defence and write the matrix."""
    from ..poisoning import MatrixSettings, run_matrix
    from ..util import atomic_write_json, atomic_write_text

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise AdvtrainError(f"--out {out} is a file, not a directory")
    if not dataset and not table:
        raise AdvtrainError("give --dataset NAME or --data PATH")
    settings = MatrixSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        strip_samples=strip_samples,
        strip_inputs=strip_inputs,
    )
    data, _ = load_data(dataset, table, schema, data_dir=data_dir, seed=seed)
    name = model_name or _default_model(data.info.name, data.info.kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = run_matrix(
        data,
        name,
        attacks,
        defences,
        rate=rate,
        target=target,
        settings=settings,
        weights_dir=out_dir / "weights",
        log=None if quiet else echo,
    )
    atomic_write_json(out_dir / "matrix.json", matrix.to_dict())
    atomic_write_text(out_dir / "matrix.html", matrix.to_html())
    echo(f"wrote {out_dir / 'matrix.json'} and {out_dir / 'matrix.html'}")


@click.command(name="scan")
@click.option(
    "--model",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="The run directory of the model trained on the data (advtrain train --out).",
)
@click.option("--data", "table", type=click.Path(), help="Your training table or images.")
@click.option("--schema", type=click.Path(dir_okay=False), help="The table's TOML schema.")
@click.option("--dataset", help="A built-in dataset instead of --data (default: the run's).")
@click.option("--data-dir", help="Directory of data files.")
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    help="Which split of the data to scan (default: train; a new table given to a table run is "
    "read whole, as its test split, and scanned whole).",
)
@click.option("--defences", default="spectral,ac", show_default=True, help="spectral, ac.")
@click.option(
    "--rate",
    type=float,
    default=0.01,
    show_default=True,
    help="The share of poisoned rows you fear (spectral removes 1.5x this from each class).",
)
@click.option(
    "--top", type=int, default=20, show_default=True, help="Suspects printed per defence."
)
@click.option("--seed", type=int, help="Seed of the split (default: the run's).")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Write every suspect as JSON."
)
def scan(
    run_dir: str,
    table: str | None,
    schema: str | None,
    dataset: str | None,
    data_dir: str | None,
    split: str | None,
    defences: str,
    rate: float,
    top: int,
    seed: int | None,
    json_path: str | None,
) -> None:
    """List the rows spectral signatures and activation clustering suspect, most suspect first."""
    from ..poisoning import scan as run_scan
    from ..util import atomic_write_text
    from .loading import check_output_paths

    if top < 0:
        raise AdvtrainError(f"--top must be >= 0, got {top}")
    if json_path:
        check_output_paths({"--json": Path(json_path)})
    names = tuple(d.strip() for d in defences.split(",") if d.strip())
    loaded = load_model_and_data(run_dir, None, None, None, dataset, data_dir, seed, table, schema)
    if split is None:
        read_whole = table is not None and bool(loaded.run.get("data")) and loaded.run.get("schema")
        split = "test" if read_whole else "train"
    rows = getattr(loaded.data, split)
    result = run_scan(loaded.model, rows, defences=names, expected_rate=rate, seed=loaded.seed)
    for name, suspects in result.suspects.items():
        echo(f"{name}: {len(suspects.indices)} of {result.n} {split} rows suspect")
        for rank, (index, score) in enumerate(suspects.ranked()[:top], start=1):
            row = result.row_of(index)
            where = f"index {index}" + ("" if row is None else f" (file row {row})")
            echo(f"  {rank:>4}. {where}  score {score:.4g}")
    if json_path:
        atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
        echo(f"wrote {json_path}")
