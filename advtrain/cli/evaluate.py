"""``advtrain evaluate``: the robustness of a run or a model file, by an evaluation suite
(:func:`advtrain.evaluation.evaluate`) or by PGD alone (``--suite pgd``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from ..errors import AdvtrainError
from ..evaluation.findings import CheckName
from .loading import (
    check_output_paths,
    load_model_and_data,
    model_options,
    parse_classes,
    table_options,
)
from .processes import echo, leave_process_group, speaker, torchrun

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from ..data import Dataset
    from ..evaluation import Report
    from ..threat import ThreatModel


@click.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--model-file", help="Your own model as path/to/file.py:factory.")
@click.option(
    "--model",
    "model_name",
    help="An architecture, with --weights: a built-in name, torchvision:NAME or timm:NAME.",
)
@click.option("--weights", type=click.Path(dir_okay=False), help="safetensors or .pth state dict.")
@click.option("--dataset", help="Dataset whose test split is evaluated (default: the run's).")
@click.option("--data-dir", help="Directory of data files.")
@table_options
@model_options
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
    "--attack-classes",
    help="Attack only the rows of these true classes (comma-separated class names or "
    "indices, e.g. 1 for the fraud rows of a fraud table); the others keep their clean "
    "prediction.",
)
@click.option(
    "--fpr",
    type=float,
    help="With a positive class: the false-positive rate of the operating point whose recall "
    "is reported clean and attacked (default 0.01).",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False),
    help="Keep the evaluation's state in this directory as it goes; run the same command "
    "again after an interruption and it goes on from there (same report as an uninterrupted "
    "run). Other settings than the saved ones are refused.",
)
@click.option(
    "--self-test/--no-self-test",
    default=None,
    help="Run the binarization self-test (Zimmermann et al. 2022): an adversarial example is "
    "planted inside the eps-ball of a few points and the suite's attacks must find it "
    "(default: with --suite thorough only).",
)
@click.option(
    "--self-test-features",
    metavar="MODULE",
    help="The self-test reads the features at the input of this module, the model's readout "
    "layer (a torch.nn.Linear; default: the last one the model calls).",
)
@click.option(
    "--certify",
    "certify_method",
    type=click.Choice(["crown", "crown-ibp", "ibp"]),
    help="Verify every point by bound propagation (CROWN, CROWN-IBP or IBP) and report verified "
    "accuracy, a proven lower bound, beside the attacks' robust accuracy, an upper bound.",
)
@click.option(
    "--smoothing-sigma",
    type=float,
    help="Also certify the randomized-smoothing classifier built on the model at this Gaussian "
    "noise level (Cohen et al. 2019; l2 radii; a different classifier, reported apart).",
)
@click.option(
    "--smoothing-samples",
    type=int,
    default=100_000,
    show_default=True,
    help="Randomized smoothing's estimation samples per point (n; n0 = 100, alpha = 0.001).",
)
@click.option(
    "--detector",
    "detector_path",
    type=click.Path(dir_okay=False),
    help="Also measure this adversarial-input detector (a .safetensors file with its JSON "
    "sidecar): TPR at 1%/5% FPR and AUROC on the suite's examples and under an adaptive attack on "
    "classifier + detector, and the pair's robust accuracy. With --fit-detector: where to save it "
    "(default RUN_DIR/detector-KIND.safetensors).",
)
@click.option(
    "--fit-detector",
    "fit_kind",
    type=click.Choice(["mahalanobis", "squeezing", "binary"]),
    help="Fit this detector on the first 10,000 training inputs (its threshold on the validation "
    "split at --detector-fpr), save it, and measure it as --detector does.",
)
@click.option(
    "--detector-fpr",
    type=float,
    default=0.05,
    show_default=True,
    help="The clean false-positive rate --fit-detector sets the threshold at.",
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
    table: str | None,
    schema: str | None,
    image_size: str | None,
    normalize: str | None,
    num_classes: int | None,
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
    attack_classes: str | None,
    fpr: float | None,
    resume_dir: str | None,
    self_test: bool | None,
    self_test_features: str | None,
    certify_method: str | None,
    smoothing_sigma: float | None,
    smoothing_samples: int,
    detector_path: str | None,
    fit_kind: str | None,
    detector_fpr: float,
    nproc: int,
) -> None:
    """Robustness of a trained run (RUN_DIR) or of a model file with weights.

    The default is the standard suite: a survivor cascade of APGD-CE, APGD-T, FAB-T and Square,
    gradient-masking diagnostics with automatic escalation, and every metric. Under torchrun
    (or with --nproc) the ranks share the points and rank 0 writes the report.
    """
    from ..distributed import env_world_size, init_from_env, rank_device
    from ..util import resolve_device

    _check_flags(suite, steps, step_size, restarts, limit, batch_size, html_path, nproc)
    target_device = rank_device(resolve_device(device))
    if nproc > 1 and env_world_size() == 1:
        sys.exit(torchrun("evaluate", nproc))
    rank, _ = init_from_env(target_device.type)
    say = speaker(rank)
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
    model, data, dataset, seed = loaded.model, loaded.data, loaded.dataset, loaded.seed
    threat = loaded.threat_model(norm, eps)
    if getattr(model, "black_box", False) and suite == "pgd":
        raise AdvtrainError("--suite pgd needs gradients; a tree ensemble is evaluated black-box")
    streamed = _streamed_test_points(data.test.x, limit, suite)
    if streamed is not None:
        x, y = streamed, data.test.y[: len(streamed)]
    else:
        x, y = data.test.x[:limit], data.test.y[:limit]
    if resume_dir is not None and (suite == "pgd" or getattr(model, "black_box", False)):
        raise AdvtrainError("--resume goes with the quick, standard and thorough suites")
    model = model.to(target_device)
    detector = _detector(
        fit_kind, detector_path, detector_fpr, run_dir, model, data, x, threat, seed, suite, nproc
    )
    if detector is not None:
        say(f"detector: {detector.describe()}")
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
    from ..evaluation import evaluate as run_evaluation

    chunks, world = -(-len(x) // batch_size), env_world_size()
    if world > chunks:
        say(
            f"note: {world} processes share {chunks} chunk(s) of --batch-size {batch_size}; "
            f"--batch-size {-(-len(x) // world)} or less gives each of them work"
        )
    if getattr(model, "black_box", False):
        report = _evaluate_black_box(model, data, x, y, threat, seed, batch_size, attack_classes)
        say("black-box evaluation (a tree ensemble): " + str(report.settings.get("note", "")))
    else:
        report = run_evaluation(
            model,
            *((x,) if streamed is not None else (x, y)),
            threat=threat,
            suite=suite,
            seed=seed,
            batch_size=batch_size,
            n_classes=data.info.n_classes,
            positive_class=data.info.positive_class,
            attack_classes=parse_classes(attack_classes, data.info.classes),
            fpr=0.01 if fpr is None else fpr,
            resume=resume_dir,
            self_test=self_test,
            self_test_features=self_test_features,
            certify=certify_method or False,
            smoothing_sigma=smoothing_sigma,
            smoothing_samples=smoothing_samples,
            examples=8 if detector is None else len(x),  # a detector's figures need them all
        )
    report.settings["dataset"] = dataset
    _say_report(say, report, threat.norm)
    figures = None
    if detector is not None:
        from ..detection import evaluate_detector

        figures = evaluate_detector(
            model, detector, x, y, threat, report=report, seed=seed, batch_size=batch_size
        )
        say(figures.summary())
    if json_path and rank == 0 and figures is not None:
        from ..util import atomic_write_json

        atomic_write_json(json_path, {**report.to_dict(), "detector": figures.to_dict()})
    elif json_path and rank == 0:
        report.to_json(json_path)
    if html_path and rank == 0:
        report.to_html(html_path)
        say(f"report: {html_path}")
    leave_process_group()


def _streamed_test_points(x: Any, limit: int | None, suite: str) -> Any:
    """Images read on demand (:class:`advtrain.data.LazyInputs`) stay so for the suites, which
    read them a chunk at a time: the first ``limit`` of them as a view; None for inputs held in
    memory (and for ``--suite pgd``, which takes a tensor)."""
    from ..data import LazyInputs

    if not isinstance(x, LazyInputs) or suite == "pgd":
        return None
    return x.subset(slice(0, limit)) if limit is not None else x


def _evaluate_black_box(
    model: nn.Module,
    data: Dataset,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    seed: int,
    batch_size: int,
    attack_classes: str | None,
) -> Report:
    """A model seen only through its scores (a tree ensemble): feature search, HopSkipJump, and
    transfer from an MLP surrogate fitted to the model's own labels on the training split."""
    from ..evaluation import evaluate_black_box, predict
    from ..models import build_model
    from ..training import fit_surrogate

    torch.manual_seed(seed)
    surrogate = build_model("mlp", in_shape=data.info.shape, n_classes=data.info.n_classes)
    x_train = data.train.x[:]  # a tensor (tree ensembles take tables, which are held whole)
    labels = predict(model, x_train, batch_size=batch_size)
    fit_surrogate(surrogate, x_train, labels, seed=seed)
    return evaluate_black_box(
        model,
        x,
        y,
        threat,
        surrogate=surrogate,
        seed=seed,
        batch_size=batch_size,
        positive_class=data.info.positive_class,
        attack_classes=parse_classes(attack_classes, data.info.classes),
    )


def _check_flags(
    suite: str,
    steps: int | None,
    step_size: float | None,
    restarts: int | None,
    limit: int | None,
    batch_size: int,
    html_path: str | None,
    nproc: int,
) -> None:
    """Refuse an unknown suite, a count below 1 and flags that do not go with the suite."""
    from ..distributed import env_world_size
    from ..evaluation.steps import SUITES

    if suite not in (*SUITES, "pgd"):
        raise AdvtrainError(
            f"unknown suite {suite!r}; choose one of: {', '.join((*SUITES, 'pgd'))}"
        )
    counts: tuple[tuple[str, int | None], ...] = (
        ("--steps", steps),
        ("--batch-size", batch_size),
        ("--restarts", restarts),
        ("--n", limit),
    )
    for flag, count in counts:
        if count is not None and count < 1:
            raise AdvtrainError(f"{flag} must be a positive integer, got {count}")
    if suite != "pgd":
        pgd_only: tuple[tuple[str, float | None], ...] = (
            ("--steps", steps),
            ("--step-size", step_size),
            ("--restarts", restarts),
        )
        for flag, value in pgd_only:
            if value is not None:
                raise AdvtrainError(f"{flag} applies to --suite pgd only")
    elif html_path:
        raise AdvtrainError("--html needs an evaluation suite (quick, standard, thorough), not pgd")
    if suite == "pgd" and (nproc > 1 or env_world_size() > 1):
        raise AdvtrainError("--suite pgd runs in one process; leave out --nproc and torchrun")


def _say_report(say: Callable[[str], None], report: Report, norm: str) -> None:
    """The report's summary, accuracy after each attack, triggered checks, escalations and the
    robust margin, one line each."""
    say(report.summary())
    say(
        "  after each attack: "
        + ", ".join(f"{name} {acc:.2%}" for name, acc in report.per_attack.items())
    )
    for check in report.triggered:
        say(f"  {check.severity} - {check.name}: {check.detail}")
    for check in report.diagnostics:
        if check.name == CheckName.SELF_TEST.value and not check.triggered:
            say(f"  {check.name}: {check.detail}")
    for step in report.escalations:
        say(
            f"  escalated ({step.reason}): {step.action}; robust accuracy "
            f"{step.robust_before:.2%} -> {step.robust_after:.2%}"
        )
    _say_positive(say, report)
    _say_certificates(say, report)
    if report.robust_margin.get("median") is not None:
        radius = report.adversarial_radius
        say(
            f"  median robust margin {report.robust_margin['median']:.4g} ({norm}); "
            f"adversarial radius {'-' if radius is None else format(radius, '.4g')}"
        )


def _say_certificates(say: Callable[[str], None], report: Report) -> None:
    """The sandwich's sides, and the smoothed model's certified accuracy, one line each."""
    if report.certified:
        counts = report.certified["decided_by"]
        say(
            f"  certified ({report.certified['method']}): verified {counts['verified']}, "
            f"broken by an attack {counts['attack']}, open {counts['open']}, misclassified "
            f"{counts['misclassified']}; gap {report.certified['gap']:.2%}"
        )
    if report.smoothing:
        figures = report.smoothing["certified_accuracy_l2"]
        say(
            f"  smoothed model (sigma {report.smoothing['sigma']:g}, n {report.smoothing['n']}), "
            "certified accuracy at l2 radius: "
            + ", ".join(f"{r} {a:.2%}" for r, a in figures.items())
        )


def _say_positive(say: Callable[[str], None], report: Report) -> None:
    """The positive class's figures, clean and attacked, and its recall at the operating point."""
    figures = report.positive_metrics
    if not figures:
        return
    clean, attacked = figures.get("clean") or {}, figures.get("attacked") or {}

    def pair(key: str) -> str:
        a, b = clean.get(key), attacked.get(key)
        if a is None or b is None:
            return f"{key} -"
        return f"{key} {a:.2%} -> {b:.2%}"

    say(
        f"  positive class {figures.get('positive_class', '')} (clean -> attacked): "
        + ", ".join(pair(k) for k in ("recall", "precision", "pr_auc", "roc_auc"))
    )
    at = figures.get("at_fpr") or {}
    if at.get("recall_clean") is not None:
        say(
            f"  recall at FPR {at['fpr']:.2%}: {at['recall_clean']:.2%} clean, "
            f"{at['recall_attacked']:.2%} attacked (threshold {at['threshold']:.4g})"
        )


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
    from ..attacks import PGD
    from ..evaluation import clean_and_robust_accuracy
    from ..util import atomic_write_json

    attack = PGD(
        threat,
        steps=steps,
        step_size=2.5 * threat.eps / steps if step_size is None else step_size,
        restarts=restarts,
        seed=seed,
    )
    result = clean_and_robust_accuracy(model, x, y, attack, batch_size=batch_size)
    echo(
        f"clean accuracy {result.clean_accuracy:.2%}  robust accuracy {result.robust_accuracy:.2%}"
        f"  (PGD-{steps}, {restarts} restart(s), {threat.norm} eps={threat.eps:g}, "
        f"step {attack.step_size:g}, n={result.n})"
    )
    if json_path:
        atomic_write_json(
            json_path, {**result.to_dict(), "attack": repr(attack), "dataset": dataset}
        )


#: Training inputs ``--fit-detector`` fits on (the binary detector attacks each with PGD-10).
FIT_POINTS = 10_000


def _detector(
    fit_kind: str | None,
    path: str | None,
    fpr: float,
    run_dir: str | None,
    model: nn.Module,
    data: Dataset,
    x: Any,
    threat: ThreatModel,
    seed: int,
    suite: str,
    nproc: int,
) -> Any:
    """``--fit-detector`` (fitted by the library, saved) or ``--detector`` (loaded), or None."""
    if fit_kind is None and path is None:
        return None
    from ..distributed import env_world_size

    if suite == "pgd" or nproc > 1 or env_world_size() > 1:
        raise AdvtrainError(
            "--detector goes with the quick, standard and thorough suites, in one process"
        )
    if not isinstance(x, torch.Tensor) or not isinstance(data.train.x, torch.Tensor):
        raise AdvtrainError("--detector needs test and training inputs held in memory")
    from ..detection import fit_detector, load_detector, save_detector

    if fit_kind is None:
        assert path is not None
        return load_detector(path, model, probe=x[:2])
    if path is None:
        if run_dir is None:
            raise AdvtrainError("--fit-detector without RUN_DIR needs --detector PATH to save it")
        path = str(Path(run_dir) / f"detector-{fit_kind}.safetensors")
    check_output_paths({"--detector": Path(path)})
    detector = fit_detector(
        fit_kind,
        model,
        data.train.x[:FIT_POINTS],
        data.train.y[:FIT_POINTS],
        data.val.x[:],
        threat=threat,
        fpr=fpr,
        seed=seed,
    )
    save_detector(detector, path)
    echo(f"detector saved: {path}")
    return detector
