"""Our standard evaluation suite against torchattacks' AutoAttack with the paper's 100 iterations.

Same model (a released fast-adversarial MNIST checkpoint), same first ``--n`` MNIST test images,
linf eps 0.3, one run each, measured in one process. torchattacks' ``AutoAttack`` class builds its
APGD, APGD-T and FAB with torchattacks' default of 10 iterations, so the stand-in is assembled here
from the same four attacks with AutoAttack's standard settings (Croce & Hein 2020): APGD-CE and
APGD-T (9 targets) with 100 iterations, FAB-T (9 targets, 100 iterations), Square with 5,000
queries, one restart each, run as a survivor cascade (torchattacks' ``MultiAttack``).

Prints robust accuracy (lower is stronger) and seconds for both, and the ratio of times
(AutoAttack / advtrain: above 2 means advtrain takes at most half the time). Our time includes
the gradient-masking diagnostics and the robust-margin measurement that AutoAttack does not do.

    .venv/bin/python bench/eval_speed.py [--n 1000] [--model pgd_madry.pth] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS = 0.3


def autoattack_standard(model, seed: int):
    """torchattacks' attacks with AutoAttack's standard settings and 100 iterations."""
    import torchattacks
    from torchattacks.wrappers.multiattack import MultiAttack

    return MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, n_classes=10,
                           seed=seed),
        torchattacks.FAB(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=10, seed=seed),
        torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=5000, n_restarts=1, seed=seed),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default="pgd_madry.pth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-autoattack", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / args.model)
    model.eval()
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    print(f"{args.model}, first {args.n} MNIST test images, linf eps {EPS}, "
          f"{torch.get_num_threads()} threads", flush=True)

    start = time.perf_counter()
    report = advtrain.evaluate(model, x, y, eps=EPS, suite="standard", seed=args.seed)
    ours = time.perf_counter() - start
    print(f"advtrain standard suite: robust accuracy {report.robust_accuracy:.2%}, {ours:.1f} s",
          flush=True)
    print("  after each attack: " + ", ".join(f"{k} {v:.2%}" for k, v in report.per_attack.items()))
    print("  checks fired: " + (", ".join(c.name for c in report.triggered) or "none"))
    if args.skip_autoattack:
        return

    attack = autoattack_standard(model, args.seed)
    start = time.perf_counter()
    x_adv = attack(x, y)
    theirs = time.perf_counter() - start
    robust = float((predict(model, x_adv) == y).float().mean())
    print(f"torchattacks AutoAttack (standard, 100 iterations): robust accuracy {robust:.2%}, "
          f"{theirs:.1f} s", flush=True)
    print(f"time ratio AutoAttack / advtrain: {theirs / ours:.2f}x; robust accuracy "
          f"advtrain - AutoAttack: {100 * (report.robust_accuracy - robust):+.2f} points")


if __name__ == "__main__":
    main()
