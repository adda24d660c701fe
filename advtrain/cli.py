"""The ``advtrain`` command line: a thin layer that builds API objects and hands them over.

Bad input of any kind (an unknown name, a bad number, a missing or corrupt file) ends with one
line on standard error, ``advtrain: error: ...``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import inspect
import io
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from .errors import AdvtrainError

if TYPE_CHECKING:
    from torch import nn

    from .attacks import Attack
    from .data import Dataset
    from .threat import ThreatModel

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
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="TOML file of settings."
)
@click.option("--dataset", help="digits (default), mnist, breast-cancer, fraud.")
@click.option(
    "--model", help="digits-cnn (default), mnist-small, mnist-large, mlp, preact-resnet18."
)
@click.option(
    "--method",
    help="standard, pgd (default), fgsm-rs, free, trades, mart, distillation "
    "(a wrong name lists those installed).",
)
@click.option(
    "--method-option",
    "method_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="A method option, e.g. beta=6 or replays=8 (repeatable; int, float, true/false or text).",
)
@click.option(
    "--adv-ratio",
    type=float,
    help="Weight of the method's loss against clean "
    "cross-entropy, in [0, 1] (default 1: the method alone).",
)
@click.option("--norm", help="linf (default), l2 or l1.")
@click.option("--eps", type=float, help="Perturbation radius (default: the dataset's).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--optimizer", help="adam (default) or sgd.")
@click.option("--attack-steps", type=int, help="PGD steps inside training (default 10).")
@click.option("--eval-steps", type=int, help="PGD steps for the per-epoch validation (default 10).")
@click.option(
    "--schedule", help="Learning rate per batch: constant (default), piecewise, cosine, onecycle."
)
@click.option(
    "--warmup-epochs",
    type=int,
    help="Ramp eps linearly from 0 over this many epochs "
    "(default: a tenth of --epochs for fgsm and fgsm-rs, else 0).",
)
@click.option(
    "--ema-decay",
    type=float,
    help="Validate, keep and save an exponential moving "
    "average of the weights with this decay (default: 0.995 for fgsm and fgsm-rs, "
    "else 0 = off).",
)
@click.option("--augment", help="Comma-separated: crop, flip (images; not digits/mnist), noise.")
@click.option(
    "--noise-std", type=float, help="Standard deviation of --augment noise (default 0.05)."
)
@click.option(
    "--early-stop",
    type=int,
    metavar="PATIENCE",
    help="Stop after this many epochs without a better validation accuracy.",
)
@click.option(
    "--catastrophic",
    help="Catastrophic-overfitting watch: auto (default: stop for "
    "FGSM-type methods), stop, warn, off.",
)
@click.option(
    "--co-threshold",
    type=float,
    help="Catastrophic when robust validation accuracy "
    "falls below this fraction of the best (default 0.5).",
)
@click.option(
    "--checkpoint-every",
    type=int,
    metavar="N",
    help="Also save a resumable checkpoint every N batches (default 0: per epoch only).",
)
@click.option(
    "--tensorboard/--no-tensorboard",
    default=None,
    help="Also log to RUN_DIR/tensorboard (needs the tensorboard package).",
)
@click.option(
    "--amp",
    help="Mixed precision: auto (default: bf16/fp16 on CUDA, off on the CPU), off, bf16, fp16.",
)
@click.option("--channels-last", help="auto (default: on CUDA for images), on, off.")
@click.option(
    "--compile",
    "compile",
    help="torch.compile the model in the training loss with "
    "this backend: inductor, aot_eager, eager (default off).",
)
@click.option(
    "--sync-bn/--no-sync-bn",
    "sync_batchnorm",
    default=None,
    help="BatchNorm statistics over the global batch across processes (--nproc, torchrun).",
)
@click.option("--seed", type=int)
@click.option(
    "--data-dir", help="Directory of data files (default: $ADVTRAIN_DATA or ~/.cache/advtrain)."
)
@click.option("--device", help="auto (default), cpu, cuda, cuda:1, ...")
@click.option("--out", help="Run directory (default runs/latest).")
@click.option(
    "--resume",
    "resume",
    type=click.Path(file_okay=False),
    metavar="RUN_DIR",
    help="Continue the interrupted run in RUN_DIR from its last checkpoint, with the "
    "settings of its config.json.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="Data-parallel processes on this machine (runs torchrun; default 1).",
)
def train(
    config_path: str | None,
    quiet: bool,
    resume: str | None,
    method_option: tuple[str, ...],
    nproc: int,
    **options: Any,
) -> None:
    """Train a model, adversarially by default; with no options, PGD training on digits."""
    from .data import load_dataset
    from .distributed import env_world_size
    from .models import build_model
    from .training import Trainer, load_config
    from .training.config import load_run_config, parse_method_options

    if nproc > 1 and env_world_size() == 1:
        sys.exit(_torchrun("train", nproc))

    if method_option:
        options["method_options"] = parse_method_options(method_option)
    if resume is not None:
        if config_path is not None:
            raise AdvtrainError(
                "--resume takes the settings from RUN_DIR/config.json; leave out --config"
            )
        config = load_run_config(resume, **options)
    else:
        config = load_config(config_path, **options)
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        seed=config.seed,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
    )
    torch.manual_seed(config.seed)
    model = build_model(config.model, in_shape=data.info.shape, n_classes=data.info.n_classes)
    trainer = Trainer(
        model, data, config, config.out, progress=not quiet, log=None if quiet else _echo
    )
    say: Callable[[str], None] = _echo if trainer.rank == 0 else (lambda line: None)
    quiet = quiet or trainer.rank > 0  # rank 0 speaks for the run
    if not quiet:
        _echo(
            f"training {config.model} on {config.dataset} ({len(data.train)} images) with "
            f"{config.method}, {trainer.threat.norm} eps={trainer.threat.eps:g}, "
            f"{config.epochs} epochs, device {trainer.device}"
            + (
                f"; keeping the weight average (decay {config.weight_averaging_decay:g})"
                if config.weight_averaging_decay
                else ""
            )
        )
    result = trainer.fit(resume=resume is not None)
    if quiet:  # otherwise already said after the epoch concerned
        for line in [*result.extra["warnings"], result.extra["stop_reason"]]:
            if line:
                say(line)
    say(
        f"best epoch {result.best_epoch}; test clean accuracy "
        f"{result.test_clean_accuracy:.2%}, robust accuracy "
        f"{result.test_robust_accuracy:.2%} under PGD-40 ({trainer.threat.norm} "
        f"eps={trainer.threat.eps:g}); {result.seconds:.1f}s"
    )
    say(f"run directory: {config.out}")
    _leave_process_group()


def _leave_process_group() -> None:
    """The end of a command under torchrun: leave the group together, then exit at once. (The
    interpreter's own teardown of torch's distributed objects has been seen to abort the
    process now and then, after all the work was done and written.)"""
    from .distributed import env_world_size, shutdown

    if env_world_size() == 1:
        return
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _torchrun(command: str, nproc: int) -> int:
    """Run this ``advtrain COMMAND`` again under torchrun with ``nproc`` processes (after
    ``--``, so that torchrun's own option parser leaves ours alone: ``--n`` is ambiguous to it)."""
    args, skip = [], False
    for arg in sys.argv[2:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    line = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "--",
        "advtrain",
        command,
        *args,
    ]
    return subprocess.run(line, check=False).returncode


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
@click.option(
    "--suite",
    default="standard",
    show_default=True,
    help="quick, standard (AutoAttack's recipe + diagnostics), thorough, or pgd "
    "(PGD alone, with --steps/--step-size/--restarts).",
)
@click.option("--steps", type=int, help="PGD steps (--suite pgd; default 40).")
@click.option("--step-size", type=float, help="PGD step (--suite pgd; default 2.5*eps/steps).")
@click.option("--restarts", type=int, help="PGD restarts (--suite pgd; default 1).")
@click.option("--n", "limit", type=int, help="Evaluate the first N test samples only.")
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option(
    "--seed", type=int, help="Seed of the split and the attack (default: the run's, else 0)."
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), help="Also write the figures as JSON."
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report (not with --suite pgd).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    help="Processes on this machine sharing the points (runs torchrun; default 1). "
    "Each attacks whole chunks of --batch-size points; the report equals one "
    "process's.",
)
def evaluate(
    run_dir: str | None,
    model_file: str | None,
    model_name: str | None,
    weights: str | None,
    dataset: str | None,
    data_dir: str | None,
    norm: str | None,
    eps: float | None,
    suite: str,
    steps: int | None,
    step_size: float | None,
    restarts: int | None,
    limit: int | None,
    batch_size: int,
    seed: int | None,
    device: str,
    json_path: str | None,
    html_path: str | None,
    nproc: int,
) -> None:
    """Robustness of a trained run (RUN_DIR) or of a model file with weights.

    The default is the standard suite: a survivor cascade of APGD-CE, APGD-T, FAB-T and Square,
    gradient-masking diagnostics with automatic escalation, and every metric. Under torchrun
    (or with --nproc) the ranks share the points and rank 0 writes the report.
    """
    from .distributed import env_world_size, init_from_env, rank_device
    from .evaluation.cascade import SUITES
    from .util import resolve_device

    if suite not in (*SUITES, "pgd"):
        raise AdvtrainError(
            f"unknown suite {suite!r}; choose one of: {', '.join((*SUITES, 'pgd'))}"
        )
    for flag, value in (
        ("--steps", steps),
        ("--batch-size", batch_size),
        ("--restarts", restarts),
        ("--n", limit),
    ):
        if value is not None and value < 1:
            raise AdvtrainError(f"{flag} must be a positive integer, got {value}")
    if suite != "pgd":
        for flag, value in (
            ("--steps", steps),
            ("--step-size", step_size),
            ("--restarts", restarts),
        ):
            if value is not None:
                raise AdvtrainError(f"{flag} applies to --suite pgd only")
    elif html_path:
        raise AdvtrainError("--html needs an evaluation suite (quick, standard, thorough), not pgd")
    if suite == "pgd" and (nproc > 1 or env_world_size() > 1):
        raise AdvtrainError("--suite pgd runs in one process; leave out --nproc and torchrun")
    target_device = rank_device(resolve_device(device))
    if nproc > 1 and env_world_size() == 1:
        sys.exit(_torchrun("evaluate", nproc))
    rank, _ = init_from_env(target_device.type)
    say: Callable[[str], None] = _echo if rank == 0 else (lambda line: None)
    loaded = _load_model_and_data(run_dir, model_file, model_name, weights, dataset, data_dir, seed)
    model, data, dataset, seed = loaded.model, loaded.data, loaded.dataset, loaded.seed
    threat = loaded.threat_model(norm, eps)
    x, y = data.test.x[:limit], data.test.y[:limit]
    model = model.to(target_device)
    if suite == "pgd":
        _evaluate_pgd(
            model,
            x.to(target_device),
            y.to(target_device),
            threat,
            steps or 40,
            step_size,
            restarts or 1,
            seed,
            batch_size,
            dataset,
            json_path,
        )
        return
    from .evaluation import evaluate as run_evaluation

    chunks, world = -(-len(x) // batch_size), env_world_size()
    if world > chunks:
        say(
            f"note: {world} processes share {chunks} chunk(s) of --batch-size {batch_size}; "
            f"--batch-size {-(-len(x) // world)} or less gives each of them work"
        )
    report = run_evaluation(
        model,
        x,
        y,
        threat=threat,
        suite=suite,
        seed=seed,
        batch_size=batch_size,
        n_classes=data.info.n_classes,
        positive_class=1 if data.info.n_classes == 2 else None,
    )
    report.settings["dataset"] = dataset
    say(report.summary())
    say(
        "  after each attack: "
        + ", ".join(f"{name} {acc:.2%}" for name, acc in report.per_attack.items())
    )
    for check in report.triggered:
        say(f"  {check.severity} - {check.name}: {check.detail}")
    for step in report.escalations:
        say(
            f"  escalated ({step.reason}): {step.action}; robust accuracy "
            f"{step.robust_before:.2%} -> {step.robust_after:.2%}"
        )
    if report.robust_margin.get("median") is not None:
        radius = report.adversarial_radius
        say(
            f"  median robust margin {report.robust_margin['median']:.4g} ({threat.norm}); "
            f"adversarial radius {'-' if radius is None else format(radius, '.4g')}"
        )
    if json_path and rank == 0:
        report.to_json(json_path)
    if html_path and rank == 0:
        report.to_html(html_path)
        say(f"report: {html_path}")
    _leave_process_group()


def _evaluate_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float | None,
    restarts: int,
    seed: int,
    batch_size: int,
    dataset: str,
    json_path: str | None,
) -> None:
    """Clean and PGD accuracy alone (``--suite pgd``)."""
    from .attacks import PGD
    from .evaluation import clean_and_robust_accuracy
    from .util import atomic_write_json

    attack = PGD(
        threat,
        steps=steps,
        step_size=2.5 * threat.eps / steps if step_size is None else step_size,
        restarts=restarts,
        seed=seed,
    )
    result = clean_and_robust_accuracy(model, x, y, attack, batch_size=batch_size)
    _echo(
        f"clean accuracy {result.clean_accuracy:.2%}  robust accuracy {result.robust_accuracy:.2%}"
        f"  (PGD-{steps}, {restarts} restart(s), {threat.norm} eps={threat.eps:g}, "
        f"step {attack.step_size:g}, n={result.n})"
    )
    if json_path:
        atomic_write_json(
            json_path, {**result.to_dict(), "attack": repr(attack), "dataset": dataset}
        )


# ---------------------------------------------------------------------- attack
# Attack arguments the command line sets itself, with the flag that sets them.
_ATTACK_ARGS_FROM_FLAGS = {
    "norm": "--norm",
    "eps": "--eps",
    "restarts": "--restarts",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "progress": "--progress",
}
_ATTACK_ARGS_FROM_DATA = ("threat", "lower", "upper", "mask")


@cli.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model-file", help="Your own model as path/to/file.py:factory.")
@click.option("--model", "model_name", help="A built-in architecture name, with --weights.")
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors or .pth state dict.")
@click.option("--dataset", help="Dataset whose test split is attacked (default: the run's).")
@click.option("--data-dir", help="Directory of data files.")
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
@click.option("--batch-size", type=int, default=1000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .npz file of clean and adversarial inputs, labels and predictions.",
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
    attack_name: str,
    norm: str | None,
    eps: float | None,
    limit: int | None,
    restarts: int,
    seed: int | None,
    options: tuple[str, ...],
    target_class: int | None,
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
    import numpy as np

    from .attacks import ATTACKS
    from .errors import unknown
    from .evaluation import predict
    from .threat import lp_norm
    from .util import atomic_write_bytes, atomic_write_json, resolve_device

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
    hyperparameters = _parse_attack_options(options)
    accepted = _check_attack_options(attack_name, ATTACKS[attack_name], hyperparameters)
    png_path = None if no_png else Path(png) if png else Path(out).with_suffix(".png")
    outputs = {
        "--out": Path(out),
        "--png": png_path,
        "--json": Path(json_path) if json_path else None,
    }
    _check_output_paths({flag: path for flag, path in outputs.items() if path is not None})
    target_device = resolve_device(device)

    loaded = _load_model_and_data(run_dir, model_file, model_name, weights, dataset, data_dir, seed)
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
    attacker = _build_attack(
        attack_name, threat, restarts=restarts, seed=loaded.seed, **extra, **hyperparameters
    )

    x, y = loaded.data.test.x[:limit], loaded.data.test.y[:limit]
    model = loaded.model.to(target_device).eval()
    _check_model_output(model, x, info.n_classes, target_device)
    started = time.perf_counter()
    pred_clean = predict(model, x, batch_size)
    if target_class is None:
        attacked = torch.ones(len(y), dtype=torch.bool)
        x_adv = attacker(model, x, y)
        target = None
    else:
        attacked = y != target_class  # a point already of class C has nothing to reach
        target = torch.full_like(y, target_class)
        x_adv = x.clone()
        index = attacked.nonzero().squeeze(1)
        if len(index):
            x_adv[index] = attacker(model, x[index], y[index], target=target[index])
    pred_adv = predict(model, x_adv, batch_size)
    seconds = time.perf_counter() - started
    success = (pred_adv != y) if target is None else (pred_adv == target) & attacked
    norms = lp_norm(x_adv - x, threat.norm)

    n = len(y)
    clean_accuracy = float((pred_clean == y).float().mean()) if n else float("nan")
    adversarial_accuracy = float((pred_adv == y).float().mean()) if n else float("nan")
    eligible = int(attacked.sum())
    success_rate = float(success.sum()) / eligible if eligible else float("nan")
    successful_norms = norms[success].numpy()
    median_norm = float(np.median(successful_norms)) if len(successful_norms) else float("nan")

    meta = {
        "attack": repr(attacker),
        "name": attack_name,
        "norm": threat.norm,
        "eps": _json_number(threat.eps),
        "dataset": loaded.dataset,
        "n": n,
        "seed": loaded.seed,
        "restarts": restarts,
        "options": hyperparameters,
        "target_class": target_class,
        "model": loaded.source,
    }
    arrays = {
        "x": x.numpy(),
        "x_adv": x_adv.numpy(),
        "y": y.numpy(),
        "pred_clean": pred_clean.numpy(),
        "pred_adv": pred_adv.numpy(),
        "success": success.numpy().astype(bool),
        "perturbation_norm": norms.numpy().astype(np.float32),
    }
    if target is not None:
        arrays["target"] = target.numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write_bytes(out, buffer.getvalue())
    if png_path is not None:
        from .visualize import adversarial_grid

        adversarial_grid(
            x,
            x_adv,
            y,
            pred_clean,
            pred_adv,
            png_path,
            rows=rows,
            class_names=info.classes,
            feature_names=info.feature_names,
        )

    towards = "" if target_class is None else f" towards class {target_class}"
    skipped = (
        "" if target_class is None else f"; {n - eligible} of class {target_class} not attacked"
    )
    median_text = "n/a" if math.isnan(median_norm) else f"{median_norm:.4g}"
    if json_path:
        atomic_write_json(
            json_path,
            {
                "attack": repr(attacker),
                "name": attack_name,
                "dataset": loaded.dataset,
                "norm": threat.norm,
                "eps": _json_number(threat.eps),
                "n": n,
                "seed": loaded.seed,
                "target_class": target_class,
                "attacked": eligible,
                "successes": int(success.sum()),
                "clean_accuracy": _json_number(clean_accuracy),
                "adversarial_accuracy": _json_number(adversarial_accuracy),
                "success_rate": _json_number(success_rate),
                "median_perturbation_norm": _json_number(median_norm),
                "seconds": round(seconds, 3),
                "out": str(out),
                "png": None if png_path is None else str(png_path),
            },
        )
    _echo(
        f"attack {attack_name}{towards}: clean accuracy {clean_accuracy:.2%}, adversarial "
        f"accuracy {adversarial_accuracy:.2%}, success rate {success_rate:.2%} on {n} samples "
        f"({threat.norm} eps={threat.eps:g}{skipped}); median perturbation norm {median_text}; "
        f"{seconds:.1f} s"
    )


def _json_number(value: float) -> float | str | None:
    """A float for JSON: NaN (nothing to measure) is null, an infinite eps is "inf"."""
    if math.isnan(value):
        return None
    return value if math.isfinite(value) else str(value)


def _parse_attack_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``--option key=value`` pairs as keyword arguments: ``step-size`` is ``step_size``; values
    are int, float, bool (true/false) or else text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise AdvtrainError(f"--option {item!r} must look like key=value, e.g. steps=100")
        if key in options:
            raise AdvtrainError(f"--option {key} is given twice")
        if key in _ATTACK_ARGS_FROM_FLAGS:
            raise AdvtrainError(f"--option {key}: use {_ATTACK_ARGS_FROM_FLAGS[key]} instead")
        if key in _ATTACK_ARGS_FROM_DATA:
            raise AdvtrainError(
                f"--option {key}: the threat model comes from the dataset (--norm, --eps)"
            )
        options[key] = _parse_option_value(text.strip())
    return options


def _parse_option_value(text: str) -> int | float | bool | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _init_parameters(cls: type) -> dict[str, inspect.Parameter] | None:
    """The parameters a class's constructor takes, following ``**kwargs`` up the ``__init__``
    chain; None when they cannot be told."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())[1:]  # not self
        except (TypeError, ValueError):
            return None
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return found


def _check_attack_options(name: str, cls: type, options: dict[str, Any]) -> set[str] | None:
    """Refuse options the attack does not take and arguments the command line cannot give;
    return the names the attack accepts (None: unknown, left to the constructor)."""
    parameters = _init_parameters(cls)
    if parameters is None:
        return None
    settable = sorted(
        p
        for p in parameters
        if p not in _ATTACK_ARGS_FROM_FLAGS and p not in _ATTACK_ARGS_FROM_DATA
    )
    for key in options:
        if key not in parameters:
            raise AdvtrainError(
                f"attack {name!r} has no option {key!r}; its options: "
                f"{', '.join(settable) or 'none'}"
            )
    missing = [
        p.name
        for p in parameters.values()
        if p.default is p.empty and p.name != "threat" and p.name not in options
    ]
    if missing:
        raise AdvtrainError(
            f"attack {name!r} needs {', '.join(missing)}, which the command line cannot give"
        )
    return set(parameters)


def _build_attack(name: str, threat: ThreatModel, **kwargs: Any) -> Attack:
    from .attacks import make_attack
    from .util import one_line

    try:
        return make_attack(name, threat, **kwargs)
    except AdvtrainError:
        raise
    except (TypeError, ValueError) as exc:  # an option the attack refuses, or of the wrong type
        raise AdvtrainError(
            f"attack {name!r} cannot be built with these options: {one_line(exc)}"
        ) from None


def _check_output_paths(paths: dict[str, Path]) -> None:
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


def _check_model_output(
    model: nn.Module, x: torch.Tensor, n_classes: int, device: torch.device
) -> None:
    """One forward pass: the model must take the dataset's inputs and give one logit per class."""
    from .util import one_line

    if len(x) == 0:
        return
    try:
        with torch.no_grad():
            logits = model(x[:1].to(device))
    except Exception as exc:  # any failure of a user's model is bad input, not a crash
        raise AdvtrainError(
            f"the model fails on inputs of shape {tuple(x.shape[1:])}: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(logits, torch.Tensor) or logits.shape != (1, n_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AdvtrainError(
            f"the model returns {shape} for one input; expected {n_classes} logits, one per class"
        )


@dataclass
class _Loaded:
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


def _load_model_and_data(
    run_dir: str | None,
    model_file: str | None,
    model_name: str | None,
    weights: str | None,
    dataset: str | None,
    data_dir: str | None,
    seed: int | None,
) -> _Loaded:
    """Exactly one of RUN_DIR, ``--model-file`` or ``--model`` (the last two with ``--weights``
    and ``--dataset``): the model with its weights loaded, and the dataset split with ``seed``
    (default: the run's, else 0)."""
    from .checkpoint import load_weights_into
    from .data import load_dataset
    from .models import build_model, load_user_model

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
    data = load_dataset(
        dataset,
        data_dir=data_dir or run.get("data_dir"),
        seed=seed,
        val_fraction=run.get("val_fraction", 0.1),
        test_fraction=run.get("test_fraction", 0.2),
    )
    if model_file:
        model = load_user_model(model_file, weights)
        source = f"{model_file} with {weights}"
    else:
        name = run.get("model", model_name)
        model = build_model(str(name), in_shape=data.info.shape, n_classes=data.info.n_classes)
        load_weights_into(model, run.get("weights", weights))
        source = f"{name} with {run.get('weights', weights)}"
    return _Loaded(model, data, run, str(dataset), int(seed), source)


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
