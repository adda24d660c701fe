"""APGD-CE, APGD-DLR and APGD-T against torchattacks' on the released MNIST checkpoints.

First ``--n`` MNIST test images, linf eps 0.3, 100 iterations (the paper's; torchattacks defaults
to 10), seed 0 for both. Prints robust accuracy and time for each pair, measured in one run.

    .venv/bin/python bench/apgd_compare.py [--n 1000] [--skip-targeted]
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

from advtrain.attacks import APGD, APGDDLR, APGDT  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS, STEPS = 0.3, 100


def main() -> None:
    import torchattacks

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--skip-targeted", action="store_true", help="APGD-T takes ~1 min a model")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    pairs = {
        "APGD-CE": (
            lambda: APGD(eps=EPS, steps=STEPS, seed=0),
            lambda m: torchattacks.APGD(m, eps=EPS, steps=STEPS, loss="ce", seed=0),
        ),
        "APGD-DLR": (
            lambda: APGDDLR(eps=EPS, steps=STEPS, seed=0),
            lambda m: torchattacks.APGD(m, eps=EPS, steps=STEPS, loss="dlr", seed=0),
        ),
        "APGD-T": (
            lambda: APGDT(eps=EPS, steps=STEPS, seed=0),
            lambda m: torchattacks.APGDT(m, eps=EPS, steps=STEPS, n_classes=10, seed=0),
        ),
    }
    if args.skip_targeted:
        del pairs["APGD-T"]
    print(f"linf eps={EPS}, {STEPS} iterations, first {args.n} MNIST test images, seed 0")
    print(f"{'model':<16}{'attack':<10}{'advtrain':>10}{'s':>7}{'torchattacks':>14}{'s':>7}")
    for name in ("pgd_madry.pth", "fgsm.pth"):
        model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
        load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / name)
        model.eval()
        for attack, (ours, theirs) in pairs.items():
            row = []
            for make in (ours, lambda theirs=theirs: lambda m, a, b: theirs(m)(a, b)):
                torch.manual_seed(0)
                start = time.perf_counter()
                x_adv = make()(model, x, y)
                seconds = time.perf_counter() - start
                row += [float((predict(model, x_adv) == y).float().mean()), seconds]
            print(
                f"{name:<16}{attack:<10}{row[0]:>10.2%}{row[1]:>7.1f}{row[2]:>14.2%}{row[3]:>7.1f}"
            )


if __name__ == "__main__":
    main()
