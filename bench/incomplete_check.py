"""The cost of the "loss still improving" diagnostic: its 400-iteration APGD-CE with every point
running every iteration, against settled points leaving at the checkpoints (``settle_below``,
as ``advtrain.evaluation.diagnostics.incomplete`` runs it now), back to back in one process.

For each model (``--models``: released MNIST checkpoints of ``../shared/models`` or
``preact-resnet18``, see ``bench/eval_speed.py``): the diagnostics' subset of up to 100 of the
correctly classified points among the first ``--n`` test images (drawn as the suite draws it),
then the cascade's gradient attacks on it (APGD-CE, APGD-T over ``min(9, n_classes - 1)``
targets) for the points it leaves standing, then both runs of the check on those. Prints per
model and run: points broken, seconds, and the images sent through the model with a backward
pass.

    .venv/bin/python bench/incomplete_check.py [--n 1000] [--models fgsm.pth,pgd_madry.pth] \
        [--threads 2]
    .venv/bin/python bench/incomplete_check.py --models preact-resnet18 --n 10 --train 10000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import PassCounter, load

from advtrain.attacks import APGD, APGDT
from advtrain.evaluation import predict
from advtrain.evaluation.diagnostics import SETTLED_LOSS
from advtrain.evaluation.run_checks import _subset
from advtrain.evaluation.shards import step_seed
from advtrain.threat import ThreatModel


def compare(name: str, n: int, train: int, seed: int) -> None:
    model, x, y, eps, n_classes = load(name, n, train)
    threat = ThreatModel(norm="linf", eps=eps)
    subset = _subset(predict(model, x) == y, 100, seed)
    xs, ys = x[subset], y[subset]
    standing = predict(model, APGD(threat, seed=step_seed(seed, "apgd-ce"))(model, xs, ys)) == ys
    index = standing.nonzero().squeeze(1)
    targets = min(9, n_classes - 1)
    apgdt = APGDT(threat, n_targets=targets, seed=step_seed(seed, "apgd-t"))
    standing[index[predict(model, apgdt(model, xs[index], ys[index])) != ys[index]]] = False
    xs, ys = xs[standing], ys[standing]
    print(f"{name}: subset {len(subset)}, standing after APGD-CE and APGD-T {len(xs)}", flush=True)
    check_seed = step_seed(seed, "loss still improving")
    for label, settle in (
        ("every point, 400 iterations", None),
        ("settled points leave", SETTLED_LOSS),
    ):
        attack = APGD(threat, steps=400, seed=check_seed, settle_below=settle)
        counter = PassCounter(model)
        start = time.perf_counter()
        broken = int((predict(model, attack(model, xs, ys)) != ys).sum())
        seconds = time.perf_counter() - start
        counter.close()
        passes = sum(counter.backward.values())
        print(
            f"  {label:<30} breaks {broken:>3}  {seconds:7.1f} s  {passes:>9,} images fwd+bwd",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--models", default="fgsm.pth,pgd_madry.pth")
    parser.add_argument("--train", type=int, default=2500, help="preact-resnet18: its cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        compare(name, args.n, args.train, args.seed)


if __name__ == "__main__":
    main()
