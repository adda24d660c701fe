"""Robust accuracy of our attacks against torchattacks' of the same name, on the released MNIST
models.

The fast-adversarial checkpoints (``../shared/models/fast-adversarial-mnist``), first ``--n`` MNIST
test images, linf eps 0.3, each attack with its paper's settings, one restart, for each seed:

- APGD-CE and APGD-T: 100 iterations (torchattacks defaults to 10), APGD-T over 9 target classes;
- CW-margin PGD: Madry's PGD-40 with step 0.01 and the Carlini-Wagner margin loss (torchattacks'
  PGD with its cross-entropy swapped for the same margin loss, as it has no such option);
- Square: 5,000 queries, p_init 0.8, margin loss.

Prints robust accuracy (lower is a stronger attack) and time, per seed and averaged, and the
number of images that one library breaks and the other does not (``differ``).

    .venv/bin/python bench/released_compare.py [--n 1000] [--seeds 0 1 2] [--attacks apgd-ce square]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks import make_attack  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.losses import cw_margin  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS = 0.3
MODELS = ("pgd_madry.pth", "fgsm.pth")


def _torchattacks_cw_pgd(model, seed):
    """torchattacks' PGD (Madry's MNIST settings) with the CW margin in place of cross-entropy."""
    import torchattacks
    import torchattacks.attacks.pgd as module

    class MarginLoss(torch.nn.Module):
        def forward(self, logits, labels):
            return cw_margin(logits, labels).sum()

    # torchattacks builds `nn.CrossEntropyLoss()` inside PGD.forward: swap it for the margin.
    module.nn = types.SimpleNamespace(CrossEntropyLoss=MarginLoss)
    torch.manual_seed(seed)  # its random start draws from the global generator
    return torchattacks.PGD(model, eps=EPS, alpha=0.01, steps=40, random_start=True)


def attacks(seed: int):
    """name -> (ours, torchattacks'), each a function of the model returning a callable attack."""
    import torchattacks

    return {
        "apgd-ce": (
            lambda m: make_attack("apgd-ce", eps=EPS, steps=100, seed=seed),
            lambda m: torchattacks.APGD(m, eps=EPS, steps=100, loss="ce", seed=seed),
        ),
        "apgd-t": (
            lambda m: make_attack("apgd-t", eps=EPS, steps=100, n_targets=9, seed=seed),
            lambda m: torchattacks.APGDT(m, eps=EPS, steps=100, n_classes=10, seed=seed),
        ),
        "cw-pgd": (
            lambda m: make_attack("pgd", eps=EPS, steps=40, step_size=0.01, loss="cw", seed=seed),
            lambda m: _torchattacks_cw_pgd(m, seed),
        ),
        "square": (
            lambda m: make_attack("square", eps=EPS, n_queries=5000, p_init=0.8, seed=seed),
            lambda m: torchattacks.Square(
                m,
                norm="Linf",
                eps=EPS,
                n_queries=5000,
                p_init=0.8,
                n_restarts=1,
                loss="margin",
                seed=seed,
            ),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--attacks", nargs="+", default=["apgd-ce", "apgd-t", "cw-pgd", "square"])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    print(f"linf eps={EPS}, first {args.n} MNIST test images, seeds {args.seeds}")
    print(
        f"{'model':<15}{'attack':<9}{'seed':>5}{'advtrain':>10}{'s':>8}{'torchattacks':>14}{'s':>8}"
        f"{'differ':>8}"
    )
    for name in args.models:
        model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
        load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / name)
        model.eval()
        for attack in args.attacks:
            rows = []
            for seed in args.seeds:
                ours, theirs = attacks(seed)[attack]
                row, standing = [], []
                for make in (ours, theirs):
                    torch.manual_seed(seed)
                    run = make(model)
                    start = time.perf_counter()
                    x_adv = run(model, x, y) if make is ours else run(x, y)
                    seconds = time.perf_counter() - start
                    standing.append(predict(model, x_adv) == y)
                    row += [float(standing[-1].float().mean()), seconds]
                row.append(int((standing[0] != standing[1]).sum()))
                rows.append(row)
                print(
                    f"{name:<15}{attack:<9}{seed:>5}{row[0]:>10.2%}{row[1]:>8.1f}"
                    f"{row[2]:>14.2%}{row[3]:>8.1f}{row[4]:>8d}",
                    flush=True,
                )
            if len(rows) > 1:
                avg = [mean(column) for column in zip(*rows)]
                print(
                    f"{name:<15}{attack:<9}{'mean':>5}{avg[0]:>10.2%}{avg[1]:>8.1f}"
                    f"{avg[2]:>14.2%}{avg[3]:>8.1f}{avg[4]:>8.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
