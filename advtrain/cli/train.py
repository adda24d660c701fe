"""``advtrain train``: build a dataset, a model and a :class:`~advtrain.training.Trainer` from the
flags (over a TOML file, over the defaults) and fit; or resume an interrupted run."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any

import click
import torch

if TYPE_CHECKING:
    from ..data import Dataset
    from ..training import TrainConfig

from ..errors import AdvtrainError
from .loading import with_model_classes
from .processes import echo, leave_process_group, speaker, torchrun


@click.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="TOML file of settings."
)
@click.option("--dataset", help="digits (default), mnist, breast-cancer, fraud, transactions.")
@click.option(
    "--data",
    type=click.Path(),
    help="Your own table (.csv or .parquet) instead of --dataset, with --schema; or your own "
    "images: a folder of class folders (or of train/, test/ and val/ folders of them), an .npz "
    "(x and y, or MedMNIST's) or a CIFAR-10/100 folder.",
)
@click.option(
    "--image-size",
    metavar="H[xW]",
    help="Resize the images of a --data folder to H x W pixels (default: their own size, "
    "which must then be the same for all).",
)
@click.option(
    "--schema",
    type=click.Path(dir_okay=False),
    help="The table's TOML schema: label, column types, bounds, mutability, directions, rules.",
)
@click.option(
    "--class-weight",
    help="balanced: class-balanced batches (for a rare positive class such as fraud); "
    "none (default).",
)
@click.option(
    "--select-by",
    help="The validation figure that keeps the best epoch: auto (default: the positive class's "
    "robust PR-AUC where there is one, else robust accuracy), robust-accuracy, robust-recall, "
    "pr-auc.",
)
@click.option(
    "--model",
    help="digits-cnn (default; mlp for tables), mnist-small, mnist-large, mlp, preact-resnet18, "
    "torchvision:NAME or timm:NAME (pip install 'advtrain[vision]').",
)
@click.option(
    "--normalize",
    help="Mean/std normalisation as the model's first layer: imagenet, cifar10 or MEAN,STD "
    "(m1/m2/m3,s1/s2/s3); the data and the attacks stay in [0, 1].",
)
@click.option(
    "--num-classes",
    type=int,
    help="Outputs of the model's head when it needs more than the data's classes.",
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
    "--sigma",
    type=float,
    help="Noise level of --method gaussian (Gaussian augmentation for randomized smoothing; "
    "default 0.25, in pixel units): the same as --method-option sigma=...",
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
    "(default: a tenth of --epochs for fgsm-rs, else 0).",
)
@click.option(
    "--ema-decay",
    type=float,
    help="Validate, keep and save an exponential moving "
    "average of the weights with this decay (default: 0.995 for fgsm-rs, "
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
    sigma: float | None,
    nproc: int,
    **options: Any,
) -> None:
    """Train a model, adversarially by default; with no options, PGD training on digits."""
    from ..distributed import env_world_size
    from ..models import build_model
    from ..training import Trainer, load_config
    from ..training.config import load_run_config, parse_method_options

    if nproc > 1 and env_world_size() == 1:
        sys.exit(torchrun("train", nproc))

    if method_option:
        options["method_options"] = parse_method_options(method_option)
    if sigma is not None:
        options["method_options"] = _with_sigma(options.get("method_options") or {}, sigma)
    _check_table_options(options)
    if resume is not None:
        if config_path is not None:
            raise AdvtrainError(
                "--resume takes the settings from RUN_DIR/config.json; leave out --config"
            )
        config = load_run_config(resume, **options)
    else:
        config = load_config(config_path, **options)
    if sigma is not None and config.method != "gaussian":
        raise AdvtrainError(f"--sigma goes with --method gaussian, not {config.method!r}")
    data = _load_data(config)
    if (
        data.info.kind == "tabular"
        and options.get("model") is None
        and config.model == "digits-cnn"
    ):
        config = dataclasses.replace(config, model="mlp")  # the default model is for images
    data = with_model_classes(data, config.num_classes)
    torch.manual_seed(config.seed)
    model = build_model(
        config.model,
        in_shape=data.info.shape,
        n_classes=data.info.n_classes,
        normalize=config.normalize,
    )
    trainer = Trainer(
        model, data, config, config.out, progress=not quiet, log=None if quiet else echo
    )
    say = speaker(trainer.rank)
    quiet = quiet or trainer.rank > 0  # rank 0 speaks for the run
    if not quiet:
        echo(
            f"training {config.model} on {config.data or config.dataset} ({len(data.train)} "
            f"{'rows' if data.info.kind == 'tabular' else 'images'}) with "
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
    if result.extra.get("test_robust_recall") is not None:
        extra = result.extra
        say(
            f"positive class {extra['positive_class']}: recall {extra['test_clean_recall']:.2%} "
            f"clean, {extra['test_robust_recall']:.2%} under PGD-40; PR-AUC "
            f"{extra['test_clean_pr_auc']:.3f} clean, {extra['test_robust_pr_auc']:.3f} under "
            f"PGD-40 (accuracy on imbalanced data mostly counts the other class)"
        )
    say(f"run directory: {config.out}")
    leave_process_group()


def _with_sigma(method_options: dict[str, Any], sigma: float) -> dict[str, Any]:
    """``--sigma`` as the method option it stands for (given once: not also as an option)."""
    if "sigma" in method_options:
        raise AdvtrainError("give --sigma or --method-option sigma=..., not both")
    return {**method_options, "sigma": sigma}


def _check_table_options(options: dict[str, Any]) -> None:
    """``--data`` goes without ``--dataset``: a table with ``--schema`` (recorded as "table"),
    images without it (recorded as "images", with ``--image-size``)."""
    from ..data.images import is_image_source

    data = options.get("data")
    images = data is not None and is_image_source(data)
    if options.get("image_size") is not None and not images:
        raise AdvtrainError("--image-size goes with --data of images (a folder, .npz, CIFAR)")
    if data is None:
        if options.get("schema") is not None:
            raise AdvtrainError("--schema goes with --data FILE.csv|FILE.parquet")
        return
    if options.get("dataset") is not None:
        raise AdvtrainError("give --dataset or --data, not both")
    if images and options.get("schema") is not None:
        raise AdvtrainError(f"--schema is for tables; '{data}' is image data (leave --schema out)")
    if not images and options.get("schema") is None:
        raise AdvtrainError("--data needs --schema FILE.toml (the label, types and rules)")
    options["dataset"] = "images" if images else "table"


def _load_data(config: TrainConfig) -> Dataset:
    """The configuration's table, images or named dataset, split by its seed."""
    from ..training.config_data import load_config_data

    return load_config_data(config)
