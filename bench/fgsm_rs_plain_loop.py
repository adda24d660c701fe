"""FGSM with random start on MNIST as a bare loop: no validation split, no catastrophic-overfitting
watch, no best-epoch selection, the last weights kept.

The recipe of Wong, Rice & Kolter (ICLR 2020) for MNIST: all 60,000 training images, batch 100,
10 epochs, Adam with a triangular learning rate (0 -> 5e-3 at epoch 4 -> 0, set per batch), a
uniform start in the eps-ball, one signed-gradient step of 0.375 taken from the *unclamped* start,
the result clamped to the ball and into [0, 1]. Each seed's model is then measured exactly as
``bench/mnist_fgsm_rs.sh`` measures ours (``advtrain evaluate --suite pgd``: PGD-50 with 10
restarts, step 0.01, seed 0, full test set in chunks of 1,000), so the figures compare one to one
with ``advtrain train --seed S`` runs of the same recipe.

It exists to tell seed luck from a trainer difference: the one adversarial batch this loop and
``advtrain``'s ``fgsm-rs`` build from the same start are identical (checked to 6e-8), yet the
loop's final models range from robust to collapsed depending on the seed.

    .venv/bin/python bench/fgsm_rs_plain_loop.py --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks import PGD  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import clean_and_robust_accuracy  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS, STEP, EPOCHS, BATCH, LR = 0.3, 0.375, 10, 100, 5e-3


def triangle(t: float) -> float:
    """Learning rate at fractional epoch ``t``: up to LR at 2/5 of the run, down to 0 at the end."""
    peak = EPOCHS * 2 // 5
    return LR * (t / peak if t <= peak else max(0.0, (EPOCHS - t) / (EPOCHS - peak)))


def train(seed: int, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    batches = len(x) // BATCH
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x))
        for b in range(batches):
            rows = order[b * BATCH : (b + 1) * BATCH]
            xb, yb = x[rows], y[rows]
            for group in optimizer.param_groups:
                group["lr"] = triangle(epoch + (b + 1) / batches)
            start = torch.empty_like(xb).uniform_(-EPS, EPS).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xb + start), yb), start)
            delta = (start.detach() + STEP * grad.sign()).clamp(-EPS, EPS)
            x_adv = (xb + delta).clamp(0, 1)
            loss = F.cross_entropy(model(x_adv), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    x = torch.cat([data.train.x, data.val.x])
    y = torch.cat([data.train.y, data.val.y])
    attack = PGD(eps=EPS, steps=50, step_size=0.01, restarts=10, seed=0)
    for seed in args.seeds:
        start = time.perf_counter()
        model = train(seed, x, y)
        seconds = time.perf_counter() - start
        found = clean_and_robust_accuracy(model, data.test.x, data.test.y, attack, batch_size=1000)
        print(
            f"seed {seed}: clean {found.clean_accuracy:.2%}, "
            f"PGD-50 x 10 {found.robust_accuracy:.2%} "
            f"(training {seconds:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
