"""Verified accuracy of ``mnist-small`` trained for it, next to Wong & Kolter (2018).

Trains advtrain's ``mnist-small`` (the small convolutional network of Wong & Kolter, "Provable
defenses against adversarial examples via the convex outer adversarial polytope", ICML 2018:
two 4x4 stride-2 convolutions with 16 and 32 filters, a 100-unit layer) with ``ibp`` (default)
or ``crown-ibp`` through the :class:`advtrain.Trainer` API on MNIST (``../shared/data/mnist``:
the 54,000 images of the trainer's training split, 1,000 of its validation split for the
per-epoch PGD check), at a training eps larger than the test eps as Gowal et al. (2018) and
Zhang et al. (ICLR 2020) do on MNIST (0.2 for a test eps of 0.1), with the trainer's linear eps
ramp (``--warmup`` epochs; kappa 1 -> 0.5 along it), Adam at 1e-3, a cosine learning rate and
batches of 100. The kept weights (the trainer's best epoch by PGD on the validation images) are
cached under ``bench/.cache/``, one file per setting (``--retrain`` trains again).

It then verifies the whole MNIST test set (``--n``, default 10,000) at linf eps 0.1 with IBP,
CROWN-IBP and full CROWN (``advtrain.certify.verify``; each a cascade from IBP up), printing
clean accuracy, verified accuracy and the wall time of each, beside Wong & Kolter's verified
robust error of 4.44% at eps 0.1 (95.56% verified) for the same architecture, and whether
advtrain matches or beats it.

Other rows (the cascade's robust accuracy: the upper bound beside these lower bounds; randomized
smoothing, ``bench/smoothing_mnist.py``) plug in through :data:`EXTRA_ROWS`.

Short trials (one thread each, on 2 cores shared with other jobs; verified on all 10,000 test
images at eps 0.1; train eps 0.2 and kappa 1 -> 0.5 unless said; seconds: training):

    method     epochs/ramp  setting          seconds  clean   IBP     CROWN-IBP  CROWN
    ibp         6/3                             111  95.49%  90.98%  91.16%
    crown-ibp   6/3         kappa 1 -> 0        509  93.53%  88.50%  88.92%
    ibp        30/10                            632  97.64%  95.46%  95.57%
    ibp        30/10        train eps 0.15      532  98.10%  95.17%  95.26%     95.26%
    ibp        30/10        kappa 1 -> 0        495  96.92%  94.99%  95.03%
    ibp        45/15                            757  97.89%  95.67%  95.70%     95.70%
    ibp        45/15        batches of 50       882  97.84%  95.65%  95.71%     95.71%
    ibp        60/20                            953  97.80%  95.63%  95.67%     95.68%

CROWN-IBP's backward pass over the 9 margins costs about 8x an IBP step on this network while
beta > 0, and did worse than IBP at equal epochs, so ``ibp`` is the default. On 2 uncontended
threads an IBP epoch took 9-12 s (24 epochs of a 60-epoch run, stopped when another job came),
so the default 45/15 trains in about 8 minutes; verifying 10,000 images takes seconds.

    .venv/bin/python bench/certify_mnist.py [--method ibp] [--epochs 45] [--warmup 15]
        [--batch-size 100] [--lr 1e-3] [--train-eps 0.2] [--eps 0.1] [--n 10000] [--threads 2]
        [--retrain]
    .venv/bin/python bench/certify_mnist.py --train 2000 --epochs 1 --warmup 1 --n 200  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402
from advtrain.certify import verify  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.data.base import Dataset, Split  # noqa: E402
from advtrain.models import build_model  # noqa: E402
from advtrain.threat import ThreatModel  # noqa: E402
from advtrain.util import parse_key_values  # noqa: E402

#: Wong & Kolter (ICML 2018), MNIST, linf eps 0.1, their small convolutional network:
#: verified (robust) error 4.44%.
WONG_KOLTER_VERIFIED = 1 - 0.0444


@dataclass(frozen=True)
class Row:
    """One line of the result table: a figure on the test points and its wall time."""

    what: str
    accuracy: float
    seconds: float
    note: str = ""


def sandwich_rows(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, args: argparse.Namespace
) -> list[Row]:
    """The sandwich on the first ``--cascade`` test images: ``advtrain.evaluate`` with the
    standard suite and ``certify="crown"`` (verified and attacked side by side; a point both
    verified and broken would stop it with an error)."""
    if args.cascade <= 0:
        return []
    n = min(args.cascade, len(x))
    start = time.perf_counter()
    report = advtrain.evaluate(
        model, x[:n], y[:n], threat=threat, suite="standard", certify="crown", seed=args.seed
    )
    seconds = time.perf_counter() - start
    sides = report.certified["decided_by"] if report.certified else {}
    note = (
        f"first {n}: verified {sides.get('verified')}, broken {sides.get('attack')}, open "
        f"{sides.get('open')}, misclassified {sides.get('misclassified')}"
    )
    verified = report.certified["verified_accuracy"] if report.certified else float("nan")
    return [
        Row(f"verified, crown, first {n}", verified, float("nan"), "(in the evaluation)"),
        Row(f"robust, standard suite, first {n}", report.robust_accuracy, seconds, note),
    ]


#: Functions ``(model, x, y, threat, args) -> rows`` run after the bounds, in order.
EXTRA_ROWS: list[Callable[[nn.Module, Tensor, Tensor, ThreatModel, argparse.Namespace], list[Row]]]
EXTRA_ROWS = [sandwich_rows]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="ibp", choices=("ibp", "crown-ibp"))
    parser.add_argument("--train", type=int, default=None, help="training images (default all)")
    parser.add_argument("--val", type=int, default=1000, help="validation images per epoch")
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--warmup", type=int, default=15, help="epochs of the eps ramp")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--train-eps", type=float, default=0.2)
    parser.add_argument("--eps", type=float, default=0.1, help="test eps")
    parser.add_argument("--option", action="append", default=[], help="method option k=v")
    parser.add_argument("--n", type=int, default=10000, help="test images to verify")
    parser.add_argument("--bounds", default="ibp,crown-ibp,crown", help="bound methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cascade",
        type=int,
        default=1000,
        help="evaluate the first N test images with the standard suite and certify='crown' "
        "(the sandwich; 0: skip)",
    )
    parser.add_argument(
        "--smoothing",
        default=None,
        metavar="ARGS",
        help="also run bench/smoothing_mnist.py with these arguments (e.g. '--every 20 --n "
        "100000 --epochs 40')",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true")
    return parser.parse_args()


def subset(split: Split, n: int | None, seed: int) -> Split:
    """The first ``n`` rows of a seeded shuffle of ``split`` (all of them for ``None``)."""
    if n is None or n >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]
    assert isinstance(split.x, Tensor)
    return Split(split.x[order], split.y[order])


def training_config(args: argparse.Namespace) -> advtrain.TrainConfig:
    options = parse_key_values(args.option, "--option", "kappa_end=0.5")
    return advtrain.TrainConfig(
        dataset="mnist",
        model="mnist-small",
        method=args.method,
        eps=args.train_eps,
        epochs=args.epochs,
        warmup_epochs=args.warmup,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adam",
        schedule=args.schedule,
        eval_steps=5,
        seed=args.seed,
        device="cpu",
        method_options=options,
    )


def cache_path(config: advtrain.TrainConfig, n_train: int | None) -> Path:
    settings = json.dumps([config.to_dict(), n_train], sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return CACHE / f"mnist-small-{config.method}-{digest}.pt"


def trained_model(args: argparse.Namespace, data: Dataset) -> tuple[nn.Module, float | None]:
    """The cached or newly trained model (eval mode) and its training seconds (``None``: cached)."""
    config = training_config(args)
    path = cache_path(config, args.train)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    if path.exists() and not args.retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"weights from {path.relative_to(ROOT)}")
        return model.eval(), None
    small = Dataset(
        data.info,
        subset(data.train, args.train, args.seed),
        subset(data.val, args.val, args.seed + 1),
        subset(data.test, 500, args.seed + 2),  # the trainer's own PGD-40 check at the end
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    trainer = advtrain.Trainer(model, small, config, log=print)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    print(
        f"trained {config.method} in {seconds:.0f} s on {len(small.train)} images: best epoch "
        f"{result.best_epoch}, PGD-40 at train eps {config.eps} on 500 test images: "
        f"clean {result.test_clean_accuracy:.2%}, robust {result.test_robust_accuracy:.2%}"
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    print(f"weights cached in {path.relative_to(ROOT)}")
    return model.eval(), seconds


def bound_rows(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, methods: list[str]
) -> list[Row]:
    rows = []
    start = time.perf_counter()
    with torch.no_grad():
        clean = float((torch.cat([model(b).argmax(1) for b in x.split(1000)]) == y).float().mean())
    rows.append(Row("clean accuracy", clean, time.perf_counter() - start))
    for method in methods:
        start = time.perf_counter()
        found = verify(model, x, y, threat, method)
        rows.append(Row(f"verified, {method}", found.accuracy, time.perf_counter() - start))
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model, train_seconds = trained_model(args, data)
    assert isinstance(data.test.x, Tensor)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    threat = ThreatModel("linf", args.eps)
    rows = bound_rows(model, x, y, threat, [m for m in args.bounds.split(",") if m])
    for extra in EXTRA_ROWS:
        rows.extend(extra(model, x, y, threat, args))
    trained = "cached" if train_seconds is None else f"{train_seconds:.0f} s"
    print(
        f"\nmnist-small, {args.method} (train eps {args.train_eps}, {args.epochs} epochs, ramp "
        f"{args.warmup}; training {trained}), MNIST test[:{len(y)}], linf eps {args.eps}, "
        f"{args.threads} threads"
    )
    print(f"{'':28}{'accuracy':>10}{'seconds':>10}")
    for row in rows:
        seconds = "" if row.seconds != row.seconds else f"{row.seconds:.1f}"  # nan: not timed
        print(f"{row.what:28}{row.accuracy:>10.2%}{seconds:>10}  {row.note}")
    print(f"{'Wong & Kolter 2018, verified':28}{WONG_KOLTER_VERIFIED:>10.2%}{'':>10}  (paper)")
    verified = [row.accuracy for row in rows if row.what.startswith("verified")]
    if verified:
        best = max(verified)
        verdict = "matches or beats" if best >= WONG_KOLTER_VERIFIED else "falls short of"
        print(f"best verified {best:.2%} {verdict} Wong & Kolter's {WONG_KOLTER_VERIFIED:.2%}")
    if args.smoothing is not None:
        import shlex

        import smoothing_mnist

        print("\nrandomized smoothing (bench/smoothing_mnist.py " + args.smoothing + "):")
        smoothing_mnist.run(smoothing_mnist.parse_args(shlex.split(args.smoothing)))


if __name__ == "__main__":
    main()
