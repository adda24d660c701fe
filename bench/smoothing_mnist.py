"""Randomized smoothing on MNIST at sigma 0.25: certified accuracy against the l2 radius, beside
a published baseline of Cohen-style Gaussian training.

What runs:

1. advtrain's ``mnist-small`` (Wong, Rice & Kolter 2020's small CNN) is trained with the
   ``gaussian`` method (cross-entropy on ``x + N(0, sigma^2 I)``, Cohen et al. 2019) at
   ``--sigma`` on MNIST's 60,000 training images (``--epochs``, Adam, learning rate 1e-3 cosine
   to 0, batch 128, seed ``--seed``); the weights are cached under ``bench/.cache/`` and reused.
2. The base model's speed under noise is measured first (noisy images per second through
   :meth:`Smoothed.sample_counts`), and the run's expected time printed from it: certifying one
   image costs ``n0 + n`` forward passes.
3. Every ``--every``-th image of the MNIST test set is certified with
   :meth:`advtrain.certify.Smoothed.certify` (``n0 = 100``, ``n = --n``, ``alpha = 0.001``), and
   the certified accuracy at l2 radius 0, 0.25, 0.5, 0.75 and 1.0 printed with the wall time.

``--n`` bounds the largest radius that can be certified: with every sample on the top class,
``pA_lower = alpha^(1/n)``, so no radius beyond ``sigma * Phi^-1(alpha^(1/n))`` (printed) is
ever certified. At sigma 0.25 and alpha 0.001 that is about 0.62 for n = 1,000, 0.80 for
n = 10,000 and 0.95 for the paper's n = 100,000: radius 1.0 is out of reach of sigma 0.25 in
every published table too. A smaller ``n`` also lowers every ``pA_lower``, hence every radius:
the figures at 0.5 and 0.75 drop below the published ones when ``n`` is small.

The baseline (the figures the lead compares with): Jeong & Shin, "Consistency regularization for
certified robustness of smoothed classifiers" (NeurIPS 2020) train and certify the
"Gaussian (Cohen et al., 2019)" baseline on MNIST: LeNet (two 5x5 convolutions of 20 and 50
filters, a 500-unit layer), 90 epochs of SGD with noise sigma 0.25, certified on the full test
set with N0 = 100, N = 100,000, alpha = 0.001 (their EXPERIMENTS.MD). Their per-image
certification logs of five training runs are released in github.com/jh-jeong/smoothing-consistency
(commit a11954aa91adb9924eecf49aaca74051e79bbb86), files
``data/certify/mnist/cohen/noise_0.25_{3870,4067,6298,919,9555}`` (columns idx, label, predict,
radius, correct). :data:`PUBLISHED` holds the certified accuracy computed from those logs
(correct and radius >= r, over the 10,000 images): the mean of the five runs and their range.
The text of the paper's MNIST table could not be read from here; these are the figures of its
released raw data.

The time printed is this process's wall time, split into training (0 when cached), the speed
measurement and certification. Threads: ``--threads`` (default 2).

What ``n`` costs: certifying one image is ``n0 + n`` forward passes of the base model on noisy
copies, nearly all of the time (drawing the noise is about 6% of a pass of ``mnist-small``).
Measured here on 2 threads, with other jobs sharing the 2 cores (load average 4), on
2026-12-04: 7,900 noisy ``mnist-small`` images per second, and 48 s per training epoch. So the
defaults, 500 images (``--every 20``) with ``n = 10,000`` (5.05 million passes, about 11 min)
after 5 epochs (about 4 min), take about 15 min; ``--every 10`` doubles the certification time.
The paper's ``n = 100,000`` on the full test set is a billion passes: about 35 hours at that
speed, about 7 hours on the 2 cores when idle (40,000 noisy images per second). The full test
set with ``n = 10,000`` (``--every 1``), the README's figures, is about 42 minutes alone; each
chunk's certificate is journaled under ``bench/.cache/``, so a stopped run resumes.

    .venv/bin/python bench/smoothing_mnist.py                       # the defaults above
    .venv/bin/python bench/smoothing_mnist.py --every 1 --n 100000  # the paper's setting
    .venv/bin/python bench/smoothing_mnist.py --every 500 --n 200 --epochs 1  # a smoke test

``run(args)`` (``args`` from :func:`parse_args`) returns the figures as a dict, for
``bench/certify_mnist.py``.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
MNIST_DIR = SHARED / "data" / "mnist"
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))

from advtrain.certify import (  # noqa: E402
    Certificate,
    Smoothed,
    SmoothingSettings,
    certified_accuracy,
    max_certifiable_radius,
    write_certified_accuracy_curve,
)
from advtrain.data import load_dataset  # noqa: E402
from advtrain.models import build_model  # noqa: E402
from advtrain.training import make_method  # noqa: E402
from advtrain.util import atomic_write_bytes  # noqa: E402

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
ALPHA = 0.001
N0 = 100

#: Certified accuracy (%) of Cohen-style Gaussian training at sigma 0.25 on the MNIST test set,
#: computed from Jeong & Shin's (NeurIPS 2020) released certification logs (see the module
#: docstring): radius -> (mean of 5 runs, lowest, highest).
PUBLISHED: dict[float, tuple[float, float, float]] = {
    0.0: (99.25, 99.21, 99.30),
    0.25: (98.45, 98.36, 98.57),
    0.5: (96.75, 96.59, 96.89),
    0.75: (93.12, 93.07, 93.20),
    1.0: (0.00, 0.00, 0.00),
}
PUBLISHED_SOURCE = (
    "Jeong & Shin 2020, Gaussian (Cohen et al.) baseline, LeNet, N=100,000, full test set "
    "(mean [range] of 5 runs, from github.com/jh-jeong/smoothing-consistency "
    "data/certify/mnist/cohen/noise_0.25_*)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sigma", type=float, default=0.25, help="noise level (default 0.25)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--every", type=int, default=20, help="every K-th test image (20)")
    parser.add_argument("--n", type=int, default=10_000, help="estimation samples (10,000)")
    parser.add_argument("--batch-size", type=int, default=2000, help="noisy images per pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    parser.add_argument("--curve", type=Path, help="also draw the curve into this PNG")
    return parser.parse_args(argv)


def weights_path(sigma: float, epochs: int, seed: int) -> Path:
    return CACHE / f"mnist-small-gaussian-sigma{sigma:g}-e{epochs}-seed{seed}.pt"


def train_gaussian(
    sigma: float, epochs: int, seed: int = 0, retrain: bool = False, log: bool = True
) -> tuple[torch.nn.Module, float]:
    """``mnist-small`` trained with the ``gaussian`` method at ``sigma`` (cached): the model in
    eval mode and the seconds spent training (0 when loaded from the cache)."""
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    path = weights_path(sigma, epochs, seed)
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    x = torch.cat([data.train.x, data.val.x])
    y = torch.cat([data.train.y, data.val.y])
    torch.manual_seed(seed)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    method = make_method("gaussian", data.info.threat_model(), sigma=sigma)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches)
    start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        total, correct = 0.0, 0
        for index in torch.randperm(len(x)).split(128):
            loss, logits = method.loss(model, x[index], y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
            correct += int((logits.argmax(1) == y[index]).sum())
        if log:
            print(
                f"epoch {epoch}/{epochs}: loss {total / len(x):.4f}, noisy train accuracy "
                f"{correct / len(x):.2%} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), seconds


def noisy_images_per_second(smoothed: Smoothed, x: torch.Tensor, seconds: float = 3.0) -> float:
    """How many noisy images a second :meth:`Smoothed.sample_counts` classifies (one warm-up)."""
    smoothed.sample_counts(x[:1], smoothed.batch_size)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        smoothed.sample_counts(x[:1], smoothed.batch_size)
        done += smoothed.batch_size
    return done / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or load), measure, certify and print; the figures as a dict."""
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    model, train_seconds = train_gaussian(args.sigma, args.epochs, args.seed, args.retrain)
    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    x, y = data.test.x[:: args.every], data.test.y[:: args.every]
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        noisy = model(x + args.sigma * torch.randn_like(x)).argmax(1)
    noisy_accuracy = float((noisy == y).float().mean())
    smoothed = Smoothed(model, args.sigma, batch_size=args.batch_size, seed=args.seed)
    speed = noisy_images_per_second(smoothed, x)
    cap = max_certifiable_radius(args.sigma, args.n, ALPHA)
    expected = len(x) * (N0 + args.n) / speed
    print(
        f"mnist-small, gaussian sigma={args.sigma:g}, {args.epochs} epochs: clean accuracy "
        f"{clean:.2%}, under noise {noisy_accuracy:.2%} ({len(x)} test images)\n"
        f"{speed:,.0f} noisy images/s on {args.threads} threads: certifying {len(x)} images with "
        f"n0={N0}, n={args.n:,} takes about {expected / 60:.1f} min; largest certifiable radius "
        f"{cap:.3f}",
        flush=True,
    )
    start = time.perf_counter()
    chunk = max(1, min(len(x), (20 * args.batch_size) // (N0 + args.n)))
    journal = journal_dir(args)
    journal.mkdir(parents=True, exist_ok=True)
    parts = []
    for first in range(0, len(x), chunk):
        parts.append(_certified_chunk(model, x, first, chunk, args, journal))
        done = min(first + chunk, len(x))
        elapsed = time.perf_counter() - start
        print(
            f"  {done}/{len(x)} certified, {elapsed:.0f}s, "
            f"{elapsed / done * (len(x) - done):.0f}s to go",
            flush=True,
        )
    certify_seconds = time.perf_counter() - start
    certificate = _joined(parts)
    figures = certified_accuracy(certificate, y, RADII)
    print(
        f"\ncertified accuracy (%) at l2 radius; ours: {len(x)} images (every {args.every}th), "
        f"n0={N0}, n={args.n:,}, alpha={ALPHA}\npublished: {PUBLISHED_SOURCE}"
    )
    print(f"{'radius':>7} {'ours':>7} {'published':>22}")
    for r, ours in zip(figures.radii, figures.accuracy):
        mean, low, high = PUBLISHED[r]
        print(f"{r:>7.2f} {100 * ours:>7.2f} {mean:>7.2f} [{low:.2f}, {high:.2f}]")
    total = time.perf_counter() - begin
    print(
        f"abstained {figures.abstained:.2%}; wall time {total:.0f}s (training {train_seconds:.0f}s,"
        f" certification {certify_seconds:.0f}s)"
    )
    if args.curve is not None:
        write_certified_accuracy_curve({"mnist-small, gaussian": (certificate, y)}, args.curve)
    return {
        "sigma": args.sigma,
        "epochs": args.epochs,
        "images": len(x),
        "n0": N0,
        "n": args.n,
        "alpha": ALPHA,
        "clean_accuracy": clean,
        "noisy_accuracy": noisy_accuracy,
        "noisy_images_per_second": speed,
        "max_certifiable_radius": cap,
        "certified_accuracy": dict(zip(figures.radii, figures.accuracy)),
        "abstained": figures.abstained,
        "published": PUBLISHED,
        "seconds": {"total": total, "training": train_seconds, "certification": certify_seconds},
    }


def journal_dir(args: argparse.Namespace) -> Path:
    """Where each chunk's certificate is written as it finishes, so that a run stopped midway
    resumes from its last finished chunk with the same figures (each chunk draws its noise from
    its own seed, derived from ``--seed`` and the chunk's first image)."""
    weights = weights_path(args.sigma, args.epochs, args.seed).stem
    return CACHE / f"{weights}-every{args.every}-n{args.n}-b{args.batch_size}"


_FIELDS = ("prediction", "radius", "abstained", "counts", "selection_counts", "pA_lower")


def _certified_chunk(
    model: torch.nn.Module,
    x: torch.Tensor,
    first: int,
    chunk: int,
    args: argparse.Namespace,
    journal: Path,
) -> Any:
    """The certificate of images ``first .. first + chunk``: read from the journal when a
    previous run wrote it, else computed and written atomically."""
    path = journal / f"chunk-{first:06d}.pt"
    seed = args.seed * 1_000_003 + first
    if path.exists():
        saved = torch.load(path, weights_only=True)
        settings = SmoothingSettings(
            "certify", args.sigma, N0, args.n, ALPHA, args.batch_size, seed, 10
        )
        return Certificate(**{name: saved[name] for name in _FIELDS}, settings=settings)
    smoothed = Smoothed(model, args.sigma, batch_size=args.batch_size, seed=seed)
    certificate = smoothed.certify(x[first : first + chunk], n0=N0, n=args.n, alpha=ALPHA)
    buffer = io.BytesIO()
    torch.save({name: getattr(certificate, name) for name in _FIELDS}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return certificate


def _joined(parts: list[Any]) -> Any:
    """One certificate from the certificates of consecutive chunks."""
    from dataclasses import replace

    first = parts[0]
    return replace(
        first,
        **{
            name: torch.cat([getattr(p, name) for p in parts])
            for name in ("prediction", "radius", "abstained", "counts", "selection_counts")
        },
        pA_lower=torch.cat([p.pA_lower for p in parts]),
    )


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
