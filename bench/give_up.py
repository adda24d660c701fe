"""APGD-T and Square with and without giving up on hopeless points (``advtrain.attacks.give_up``).

The quick and standard suites let APGD-T (linf only) drop a point, at its checkpoints, whose
targeted DLR loss is further below zero than 8 times the gain since the start carried on to the
last iteration, and let Square drop one whose margin is further below zero than 16 times the
gain its progress extrapolates to by the last query. This measures what that costs and saves
where they run in the suite, per model and norm:

- APGD-T (4 targets, the standard suite's) on the points APGD-CE leaves standing, with every
  iteration and with ``give_up=APGD_FACTOR``, same seed: the points each breaks, those the full
  run breaks and the other does not (``lost``), the images through the model (forward+backward)
  and the time;
- Square on the points still standing after APGD-CE and the full APGD-T: with every query (5,000),
  seeds ``--seed`` and ``--seed + 1`` (the second shows how much two full runs differ by chance
  alone), and with ``GiveUp()`` (seed ``--seed``): points broken, lost, queries and time.

Models: the released fast-adversarial MNIST checkpoints (first ``--n`` test images; linf 0.3 and,
with ``--l2``, l2 2.0) and ``preact-resnet18`` (``bench/rgb_digits.py``, first ``--resnet-n``
coloured test images, linf 8/255, or ``--resnet-eps``, where more points break; its second full
Square run is skipped unless ``--resnet-twice``). APGD-T gives up in l2 here too, to show why the
suites do not let it there.

    .venv/bin/python bench/give_up.py [--n 1000] [--resnet-n 10] [--l2] [--threads 2]
    .venv/bin/python bench/give_up.py --models preact-resnet18 --resnet-n 20 --resnet-eps 0.0627
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import MNIST_MODELS, RESNET, load

from advtrain.attacks import APGD, APGDT, GiveUp, Square
from advtrain.attacks.give_up import APGD_FACTOR
from advtrain.evaluation import predict
from advtrain.threat import ThreatModel


class ImageCount:
    """Images through ``model``'s forward with autograd on (forward+backward), by a hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        if torch.is_grad_enabled():
            self.images += len(inputs[0])

    def close(self) -> int:
        self.handle.remove()
        return self.images


def apgd_t_run(model, x, y, threat: ThreatModel, n_classes: int, seed: int, give_up):
    attack = APGDT(threat, n_targets=min(4, n_classes - 1), give_up=give_up, seed=seed)
    count = ImageCount(model)
    start = time.perf_counter()
    broken = predict(model, attack(model, x, y)) != y
    seconds = time.perf_counter() - start
    return broken, count.close(), seconds


def report(label: str, full: set[int], kept: set[int], cost: str) -> str:
    lost, gained = sorted(full - kept), sorted(kept - full)
    return (
        f"  {label}: breaks {len(kept)}, {cost}; lost {len(lost)} {lost}, "
        f"gained {len(gained)} {gained}"
    )


def apgd_t_compare(model, x, y, threat: ThreatModel, n_classes: int, seed: int) -> torch.Tensor:
    """APGD-T on APGD-CE's survivors, full and giving up; returns the full run's survivors."""
    index = (predict(model, x) == y).nonzero().squeeze(1)
    index = index[predict(model, APGD(threat, seed=seed)(model, x[index], y[index])) == y[index]]
    xs, ys = x[index], y[index]
    full, full_images, full_s = apgd_t_run(model, xs, ys, threat, n_classes, seed, None)
    kept, kept_images, kept_s = apgd_t_run(model, xs, ys, threat, n_classes, seed, APGD_FACTOR)
    as_set = lambda broken: set(broken.nonzero().squeeze(1).tolist())  # noqa: E731
    print(
        f"  APGD-T on the {len(index)} APGD-CE survivors, full: breaks {int(full.sum())}, "
        f"{full_images:,} images, {full_s:.1f} s\n"
        + report(
            "APGD-T give-up",
            as_set(full),
            as_set(kept),
            f"{kept_images:,} images ({kept_images / max(full_images, 1):.2f}), {kept_s:.1f} s "
            f"({full_s / max(kept_s, 1e-9):.2f}x faster)",
        ),
        flush=True,
    )
    return index[~full]


def square_run(model, x, y, threat: ThreatModel, seed: int, give_up: GiveUp | None):
    start = time.perf_counter()
    outcome = Square(threat, n_queries=5000, give_up=give_up, seed=seed).outcome(model, x, y)
    seconds = time.perf_counter() - start
    broken = set(outcome.success.nonzero().squeeze(1).tolist())
    assert outcome.queries is not None
    return broken, int(outcome.queries.sum()), seconds


def compare(name: str, norm: str, eps: float | None, n: int, seed: int, twice: bool) -> None:
    model, x, y, default_eps, n_classes = load(name, n, train=10000)
    threat = ThreatModel(norm=norm, eps=default_eps if eps is None else eps)
    print(f"{name} {norm} eps {threat.eps:.4g}, first {n} test images", flush=True)
    index = apgd_t_compare(model, x, y, threat, n_classes, seed)
    xs, ys = x[index], y[index]
    full, full_queries, full_s = square_run(model, xs, ys, threat, seed, None)
    other = square_run(model, xs, ys, threat, seed + 1, None)[0] if twice else None
    kept, kept_queries, kept_s = square_run(model, xs, ys, threat, seed, GiveUp())
    chance = ""
    if other is not None:
        chance = (
            f"; a second full run (seed {seed + 1}) breaks {len(other)}, "
            f"differs from the first on {len(full ^ other)}"
        )
    print(
        f"  Square on the {len(index)} survivors of both, full: breaks {len(full)}, "
        f"{full_queries:,} queries, {full_s:.1f} s{chance}\n"
        + report(
            "Square give-up",
            full,
            kept,
            f"{kept_queries:,} queries ({kept_queries / max(full_queries, 1):.2f}), "
            f"{kept_s:.1f} s ({full_s / max(kept_s, 1e-9):.2f}x faster)",
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--resnet-n", type=int, default=10)
    parser.add_argument("--l2", action="store_true", help="also l2 eps 2.0 on the MNIST models")
    parser.add_argument("--resnet-twice", action="store_true")
    parser.add_argument("--resnet-eps", type=float, default=None, help="default 8/255")
    parser.add_argument("--models", default=",".join((*MNIST_MODELS, RESNET)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        if name == RESNET:
            compare(name, "linf", args.resnet_eps, args.resnet_n, args.seed, args.resnet_twice)
            continue
        compare(name, "linf", None, args.n, args.seed, True)
        if args.l2:
            compare(name, "l2", 2.0, args.n, args.seed, True)


if __name__ == "__main__":
    main()
