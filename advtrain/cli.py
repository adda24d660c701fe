"""The ``advtrain`` command line: a thin layer that builds API objects and hands them over.

Bad input of any kind (an unknown name, a bad number, a missing or corrupt file) ends with one
line on standard error, ``advtrain: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import torch

from .errors import AdvtrainError

EXIT_BAD_INPUT = 2
# click >= 8.2 raises this for a bare `advtrain`; older versions print the help themselves.
_NO_ARGS_IS_HELP: type[Exception] | tuple[()] = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _echo(line: str) -> None:
    click.echo(line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="advtrain", prog_name="advtrain")
def cli() -> None:
    """Attack, harden and honestly measure the adversarial robustness of PyTorch classifiers."""


# ---------------------------------------------------------------------- train
@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML file of settings.")
@click.option("--dataset", help="digits (default), mnist, breast-cancer, fraud.")
@click.option("--model", help="digits-cnn (default), mnist-small, mnist-large, mlp, preact-resnet18.")
@click.option("--method", help="standard or pgd (default).")
@click.option("--norm", help="linf (default), l2 or l1.")
@click.option("--eps", type=float, help="Perturbation radius (default: the dataset's).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--optimizer", help="adam (default) or sgd.")
@click.option("--attack-steps", type=int, help="PGD steps inside training (default 10).")
@click.option("--eval-steps", type=int, help="PGD steps for the per-epoch validation (default 10).")
@click.option("--seed", type=int)
@click.option("--data-dir", help="Directory of data files (default: $ADVTRAIN_DATA or ~/.cache/advtrain).")
@click.option("--device", help="auto (default), cpu, cuda, cuda:1, ...")
@click.option("--out", help="Run directory (default runs/latest).")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
def train(config_path: str | None, quiet: bool, **options: Any) -> None:
    """Train a model, adversarially by default; with no options, PGD training on digits."""
    from .data import load_dataset
    from .models import build_model
    from .training import Trainer, load_config

    config = load_config(config_path, **options)
    data = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed,
                        val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_shape=data.info.shape, n_classes=data.info.n_classes)
    trainer = Trainer(model, data, config, config.out, progress=not quiet,
                      log=None if quiet else _echo)
    if not quiet:
        _echo(f"training {config.model} on {config.dataset} ({len(data.train)} images) with "
              f"{config.method}, {trainer.threat.norm} eps={trainer.threat.eps:g}, "
              f"{config.epochs} epochs, device {trainer.device}")
    result = trainer.fit()
    _echo(f"best epoch {result.best_epoch}; test clean accuracy {result.test_clean_accuracy:.2%}, "
          f"robust accuracy {result.test_robust_accuracy:.2%} under PGD-40 "
          f"({trainer.threat.norm} eps={trainer.threat.eps:g}); {result.seconds:.1f}s")
    _echo(f"run directory: {config.out}")


# ---------------------------------------------------------------------- evaluate
@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model-file", help="Your own model as path/to/file.py:factory.")
@click.option("--model", "model_name", help="A built-in architecture name, with --weights.")
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors or .pth state dict.")
@click.option("--dataset", help="Dataset whose test split is evaluated (default: the run's).")
@click.option("--data-dir", help="Directory of data files.")
@click.option("--norm", help="linf, l2 or l1 (default: the run's, else linf).")
@click.option("--eps", type=float, help="Radius (default: the run's, else the dataset's).")
@click.option("--steps", type=int, default=40, show_default=True, help="PGD steps.")
@click.option("--step-size", type=float, help="PGD step (default 2.5*eps/steps).")
@click.option("--restarts", type=int, default=1, show_default=True)
@click.option("--n", "limit", type=int, help="Evaluate the first N test samples only.")
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, help="Seed of the split and the attack (default: the run's, else 0).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures as JSON.")
def evaluate(run_dir: str | None, model_file: str | None, model_name: str | None,
             weights: str | None, dataset: str | None, data_dir: str | None, norm: str | None,
             eps: float | None, steps: int, step_size: float | None, restarts: int,
             limit: int | None, batch_size: int, seed: int | None, device: str,
             json_path: str | None) -> None:
    """Clean and PGD accuracy of a trained run (RUN_DIR) or of a model file with weights."""
    from .attacks import PGD
    from .checkpoint import atomic_write_json, load_weights_into
    from .data import load_dataset
    from .evaluation import clean_and_robust_accuracy
    from .models import build_model, load_user_model
    from .training.trainer import resolve_device

    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--restarts", restarts),
                        ("--n", limit)):
        if value is not None and value < 1:
            raise AdvtrainError(f"{flag} must be a positive integer, got {value}")
    sources = [s for s in (run_dir, model_file, model_name) if s]
    if len(sources) != 1:
        raise AdvtrainError("give exactly one of RUN_DIR, --model-file or --model")
    run = _read_run(run_dir, weights) if run_dir else {}
    if not run_dir and weights is None:
        raise AdvtrainError("--weights is required with --model-file or --model")
    seed = run.get("seed", 0) if seed is None else seed
    if not 0 <= seed < 2**32:
        raise AdvtrainError(f"--seed must be in [0, 2**32), got {seed}")
    dataset = dataset or run.get("dataset")
    if dataset is None:
        raise AdvtrainError("--dataset is required with --model-file or --model")
    data = load_dataset(dataset, data_dir=data_dir or run.get("data_dir"), seed=seed,
                        val_fraction=run.get("val_fraction", 0.1),
                        test_fraction=run.get("test_fraction", 0.2))
    if model_file:
        model = load_user_model(model_file, weights)
    else:
        name = run.get("model", model_name)
        model = build_model(str(name), in_shape=data.info.shape, n_classes=data.info.n_classes)
        load_weights_into(model, run.get("weights", weights))
    threat = data.info.threat_model(norm=norm or run.get("norm", "linf"),
                                    eps=eps if eps is not None else run.get("eps"))

    attack = PGD(threat, steps=steps,
                 step_size=2.5 * threat.eps / steps if step_size is None else step_size,
                 restarts=restarts, seed=seed)
    x, y = data.test.x[:limit], data.test.y[:limit]
    target_device = resolve_device(device)
    model = model.to(target_device)
    result = clean_and_robust_accuracy(model, x.to(target_device), y.to(target_device), attack,
                                       batch_size=batch_size)
    _echo(f"clean accuracy {result.clean_accuracy:.2%}  robust accuracy {result.robust_accuracy:.2%}"
          f"  (PGD-{steps}, {restarts} restart(s), {threat.norm} eps={threat.eps:g}, "
          f"step {attack.step_size:g}, n={result.n})")
    if json_path:
        atomic_write_json(json_path, {**result.to_dict(), "attack": repr(attack), "dataset": dataset})


def _read_run(run_dir: str, weights: str | None) -> dict[str, Any]:
    """What a run directory says: its config, with the model, norm and eps of its checkpoint."""
    from .checkpoint import load_checkpoint

    path = Path(run_dir)
    if not path.is_dir():
        raise AdvtrainError(f"run directory '{run_dir}' does not exist")
    weights_path = Path(weights) if weights else path / "model.safetensors"
    _, meta = load_checkpoint(weights_path)
    if "model" not in meta:
        raise AdvtrainError(f"'{weights_path}' has no advtrain sidecar naming its model")
    config = _read_json(path / "config.json")
    return {**config, "weights": str(weights_path),
            **{k: meta[k] for k in ("model", "norm", "eps") if k in meta}}


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


# ---------------------------------------------------------------------- entry point
def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status (no ``sys.exit``), for tests and ``main``."""
    try:
        result = cli.main(args=argv, prog_name="advtrain", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _NO_ARGS_IS_HELP as exc:  # bare `advtrain`: the help, as usual
        click.echo(exc.ctx.get_help() if exc.ctx else "")
        return 0
    except click.ClickException as exc:
        return _fail(exc.format_message())
    except AdvtrainError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: '{exc.filename}'" if exc.filename else str(exc))
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("advtrain: interrupted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def _fail(message: str) -> int:
    one_line = " ".join(str(message).split())
    click.echo(f"advtrain: error: {one_line}", err=True)
    return EXIT_BAD_INPUT


def main() -> None:
    sys.exit(run())
