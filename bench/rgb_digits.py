"""A 32×32 RGB image set that can be built here: MNIST digits 0–4, resized and coloured.

Each MNIST image (x/255 in [0, 1]) is resized from 28×28 to 32×32 (bilinear) and painted with
a foreground and a background colour drawn per image from a seeded generator; the digit's
intensity ``m`` blends them, ``x = (1 - m) * background + m * foreground``. The first of a few
drawn pairs whose luminance differs by at least ``MIN_CONTRAST`` is taken, so every digit stays
legible. Only the classes 0–4 are kept (5 classes, as the first try in issue 23).

Also :func:`rgb_resnet`: advtrain's own ``preact-resnet18`` trained on it with FGSM-RS at
eps 8/255 for 4 epochs (Wong, Rice & Kolter 2020, "Fast is better than free": SGD with
momentum 0.9, weight decay 5e-4, the one-cycle learning rate peaking at 0.1), cached under
``bench/.cache/`` so reruns reuse it.

    .venv/bin/python bench/rgb_digits.py [--train 2500] [--retrain]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.data import load_dataset  # noqa: E402
from advtrain.data.base import Dataset, DatasetInfo, Split  # noqa: E402

#: The shared data beside the checkout (``$ADVTRAIN_SHARED`` where it was copied elsewhere).
MNIST_DIR = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared")) / "data" / "mnist"
CACHE = ROOT / "bench" / ".cache"
CLASSES = (0, 1, 2, 3, 4)
SIZE = 32
EPS = 8 / 255
#: Least difference of luminance between the foreground and background colours.
MIN_CONTRAST = 0.35
#: Colour pairs drawn per image.
TRIES = 8
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def colour(x: Tensor, seed: int) -> Tensor:
    """Grey images ``x`` (N, 1, 28, 28) in [0, 1] -> (N, 3, 32, 32) coloured, seeded. Each image
    draws ``TRIES`` colour pairs and takes the first legible one (dark on white if none is), so
    an image's colours depend on its position only: a prefix of the set is coloured alike."""
    generator = torch.Generator().manual_seed(seed)
    n = len(x)
    pairs = torch.rand(n, TRIES, 2, 3, generator=generator)
    legible = ((pairs[:, :, 0] - pairs[:, :, 1]) @ _LUMA).abs() >= MIN_CONTRAST
    first = torch.where(legible.any(1), legible.float().argmax(1), -1)
    chosen = pairs[torch.arange(n), first.clamp_min(0)]
    chosen[first < 0] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    fg, bg = chosen[:, 0], chosen[:, 1]
    m = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    out = (1 - m) * bg[:, :, None, None] + m * fg[:, :, None, None]
    return out.clamp(0, 1).contiguous()


def _pick(split: Split, count: int | None, seed: int) -> Split:
    keep = torch.isin(split.y, torch.tensor(CLASSES)).nonzero().squeeze(1)
    if count is not None:
        keep = keep[:count]
    return Split(colour(split.x[keep], seed), split.y[keep].clone())


def rgb_digits(
    n_train: int | None = 3000,
    n_val: int | None = 300,
    n_test: int | None = None,
    seed: int = 0,
    data_dir: str | Path = MNIST_DIR,
) -> Dataset:
    """Coloured 32×32 MNIST, classes 0–4: the first ``n_train`` training images of those classes
    (of MNIST's own train split), ``n_val`` of its validation split, ``n_test`` of the official
    test set (None: all of them); each split coloured with its own seed derived from ``seed``."""
    mnist = load_dataset("mnist", data_dir=data_dir, download=False)
    info = DatasetInfo(
        name="rgb-digits",
        kind="image",
        classes=tuple(str(c) for c in CLASSES),
        shape=(3, SIZE, SIZE),
        lower=0.0,
        upper=1.0,
        mutable=None,
        default_eps=EPS,
        positive_class=None,
    )
    return Dataset(
        info,
        _pick(mnist.train, n_train, seed),
        _pick(mnist.val, n_val, seed + 1),
        _pick(mnist.test, n_test, seed + 2),
    )


def checkpoint_path(n_train: int, seed: int = 0) -> Path:
    return CACHE / f"preact-resnet18-rgb-digits-fgsm-rs-{n_train}-seed{seed}.pt"


def rgb_resnet(
    n_train: int = 2500,
    seed: int = 0,
    retrain: bool = False,
    log: bool = True,
    device: str = "auto",
) -> tuple[nn.Module, Path]:
    """advtrain's ``preact-resnet18`` trained with FGSM-RS at 8/255 for 4 epochs on
    :func:`rgb_digits` (``n_train`` images) on ``device`` (``auto``: CUDA where there is one),
    loaded from the cache when there; returned on the CPU, in eval mode."""
    import advtrain

    path = checkpoint_path(n_train, seed)
    model = advtrain.build_model("preact-resnet18", in_shape=(3, SIZE, SIZE), n_classes=5)
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), path
    held_out = min(200, max(n_train // 10, 16))  # validation and test images of the run
    data = rgb_digits(n_train=n_train, n_val=held_out, n_test=held_out, seed=seed)
    config = advtrain.TrainConfig(
        dataset="rgb-digits",
        model="preact-resnet18",
        method="fgsm-rs",
        eps=EPS,
        epochs=4,
        batch_size=64,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="onecycle",
        seed=seed,
        device=device,
        eval_batch_size=held_out,
    )
    start = time.perf_counter()
    trainer = advtrain.Trainer(model, data, config, log=print if log else None)
    result = trainer.fit()
    kept = trainer.kept_model
    if log:
        print(
            f"trained in {time.perf_counter() - start:.0f} s: test clean "
            f"{result.test_clean_accuracy:.2%}, PGD-40 {result.test_robust_accuracy:.2%} "
            f"({held_out} test images), best epoch {result.best_epoch}"
        )
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in kept.state_dict().items()}, tmp)
    tmp.replace(path)
    model = advtrain.build_model("preact-resnet18", in_shape=(3, SIZE, SIZE), n_classes=5)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval(), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    model, path = rgb_resnet(args.train, args.seed, args.retrain, device=args.device)
    test = rgb_digits(n_train=0, n_val=0, seed=args.seed).test
    with torch.inference_mode():
        pred = torch.cat([model(x).argmax(1) for x in test.x.split(500)])
    print(f"{path}: clean accuracy {float((pred == test.y).float().mean()):.2%} on {len(test)}")


if __name__ == "__main__":
    main()
