"""Square with and without giving up on hopeless points (``advtrain.attacks.GiveUp``).

The standard suite's Square drops a point when, at a checkpoint, its margin is further below zero
than ``factor`` times the gain its progress extrapolates to by the last query. This measures what
that costs and saves where Square runs in the suite: on the points still standing after APGD-CE
and APGD-T (4 targets, the standard suite's), per model and norm:

- Square with every query (5,000), seeds ``--seed`` and ``--seed + 1``: the points each breaks;
  the second seed shows how much two full runs differ by chance alone;
- Square with ``GiveUp()`` (seed ``--seed``): the points it breaks, those the full run of the same
  seed breaks and it does not (``lost``), the queries it used and its time, against the full run's.

Models: the released fast-adversarial MNIST checkpoints (first ``--n`` test images; linf 0.3 and,
with ``--l2``, l2 2.0) and ``preact-resnet18`` (``bench/rgb_digits.py``, first ``--resnet-n``
coloured test images, linf 8/255; its second full run is skipped unless ``--resnet-twice``).

    .venv/bin/python bench/square_give_up.py [--n 1000] [--resnet-n 10] [--l2] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import MNIST_MODELS, RESNET, load

from advtrain.attacks import APGD, APGDT, GiveUp, Square
from advtrain.evaluation import predict
from advtrain.threat import ThreatModel


def survivors(model, x, y, threat: ThreatModel, n_classes: int, seed: int) -> torch.Tensor:
    """Indices of the points APGD-CE and then APGD-T (4 targets) leave correctly classified."""
    index = (predict(model, x) == y).nonzero().squeeze(1)
    for attack in (
        APGD(threat, seed=seed),
        APGDT(threat, n_targets=min(4, n_classes - 1), seed=seed),
    ):
        x_adv = attack(model, x[index], y[index])
        index = index[predict(model, x_adv) == y[index]]
    return index


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
    index = survivors(model, x, y, threat, n_classes, seed)
    xs, ys = x[index], y[index]
    full, full_queries, full_s = square_run(model, xs, ys, threat, seed, None)
    other = square_run(model, xs, ys, threat, seed + 1, None)[0] if twice else None
    kept, kept_queries, kept_s = square_run(model, xs, ys, threat, seed, GiveUp())
    lost, gained = sorted(full - kept), sorted(kept - full)
    chance = ""
    if other is not None:
        chance = (
            f"; a second full run (seed {seed + 1}) breaks {len(other)}, "
            f"differs from the first on {len(full ^ other)}"
        )
    share = kept_queries / max(full_queries, 1)
    print(
        f"{name} {norm} eps {threat.eps:.4g}: {len(index)} of {n} points survive APGD-CE + APGD-T\n"
        f"  full Square: breaks {len(full)}, {full_queries:,} queries, {full_s:.1f} s{chance}\n"
        f"  give-up    : breaks {len(kept)}, {kept_queries:,} queries ({share:.2f}), "
        f"{kept_s:.1f} s ({full_s / max(kept_s, 1e-9):.2f}x faster); lost {len(lost)} {lost}, "
        f"gained {len(gained)} {gained}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--resnet-n", type=int, default=10)
    parser.add_argument("--l2", action="store_true", help="also l2 eps 2.0 on the MNIST models")
    parser.add_argument("--resnet-twice", action="store_true")
    parser.add_argument("--models", default=",".join((*MNIST_MODELS, RESNET)))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        if name == RESNET:
            compare(name, "linf", None, args.resnet_n, args.seed, args.resnet_twice)
            continue
        compare(name, "linf", None, args.n, args.seed, True)
        if args.l2:
            compare(name, "l2", 2.0, args.n, args.seed, True)


if __name__ == "__main__":
    main()
