"""Every epoch of an MNIST ``fgsm-rs`` run under the authors' evaluation, seed by seed.

Trains ``mnist-small`` with the fast-adversarial recipe (batch 100, Adam, one-cycle learning rate
peaking at 5e-3, eps 0.3, 10 epochs) through :class:`advtrain.training.Trainer`, keeps a copy of
the weights after each epoch, and measures each copy with PGD-50, 10 restarts, step 0.01 on the
first ``--n`` MNIST test images, next to the validation figures the trainer chose its epoch by.
The released ``fgsm.pth`` is measured on the same images first. Not a test: about 3 minutes per
seed on a 2-core CPU.

    .venv/bin/python bench/fgsm_rs_epochs.py --seeds 0 1 2 3                      # defaults
    .venv/bin/python bench/fgsm_rs_epochs.py --seeds 0 1 2 3 --set warmup_epochs=0
    .venv/bin/python bench/fgsm_rs_epochs.py --seeds 0 1 2 3 --set ema_decay=0
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks import PGD  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import clean_and_robust_accuracy  # noqa: E402
from advtrain.models import build_model  # noqa: E402
from advtrain.training import Trainer, load_config  # noqa: E402
from advtrain.training.observers import EpochEnd, EpochObserver  # noqa: E402
from advtrain.util import parse_option_value  # noqa: E402

RECIPE = dict(
    dataset="mnist",
    model="mnist-small",
    method="fgsm-rs",
    eps=0.3,
    epochs=10,
    batch_size=100,
    lr=5e-3,
    schedule="onecycle",
)


class Snapshots(EpochObserver):
    """Keeps a copy of the weights the run validated at the end of every epoch (their average
    when the run keeps one)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def epoch_end(self, end: EpochEnd) -> None:
        self.snapshots.append(copy.deepcopy(end.kept_model.state_dict()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="training options over the recipe, e.g. warmup_epochs=0",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, sign, text = item.partition("=")
        if not sign:
            parser.error(f"--set {item!r} must look like key=value, e.g. warmup_epochs=0")
        overrides[key.strip().replace("-", "_")] = parse_option_value(text)
    data_dir = str(SHARED / "data" / "mnist")
    attack = PGD(eps=0.3, steps=50, step_size=0.01, restarts=10, seed=0)

    def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        found = clean_and_robust_accuracy(model.eval(), x, y, attack, batch_size=500)
        return found.clean_accuracy, found.robust_accuracy

    released = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(released, SHARED / "models" / "fast-adversarial-mnist" / "fgsm.pth")
    test = load_dataset("mnist", data_dir=data_dir, download=False).test
    x, y = test.x[: args.n], test.y[: args.n]
    clean, robust = measure(released, x, y)
    print(
        f"released fgsm.pth, first {args.n} test images: clean {clean:.2%}, "
        f"PGD-50 x 10 {robust:.2%}",
        flush=True,
    )
    for seed in args.seeds:
        config = load_config(None, **{**RECIPE, "data_dir": data_dir, "seed": seed, **overrides})
        data = load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            seed=config.seed,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
        )
        torch.manual_seed(config.seed)
        model = build_model(config.model, in_shape=data.info.shape, n_classes=data.info.n_classes)
        trainer = Trainer(model, data, config)
        snapshots = Snapshots()
        trainer.observers.insert(0, snapshots)
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start
        print(
            f"seed {seed} (eps warm-up {config.eps_warmup_epochs} epoch(s), weight average "
            f"{config.weight_averaging_decay or 'off'}): kept epoch "
            f"{result.best_epoch} of {len(result.history)}, {seconds:.0f} s"
            f"{'; ' + result.extra['stop_reason'] if result.extra['stop_reason'] else ''}",
            flush=True,
        )
        for record, weights in zip(result.history, snapshots.snapshots):
            model.load_state_dict(weights)
            clean, robust = measure(model, x, y)
            mark = " <- kept" if record.epoch == result.best_epoch else ""
            print(
                f"  epoch {record.epoch:>2}: validation clean {record.val_clean_accuracy:.2%} "
                f"PGD-{config.eval_steps} {record.val_robust_accuracy:.2%} | test clean "
                f"{clean:.2%} PGD-50 x 10 {robust:.2%}{mark}",
                flush=True,
            )


if __name__ == "__main__":
    main()
