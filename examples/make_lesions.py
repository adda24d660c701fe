"""Write a small, synthetic, medical-style image set: skin lesions, benign or malignant.

    python examples/make_lesions.py OUT_DIR [--n 400] [--seed 0]

writes ``OUT_DIR/train/<class>/NNNN.png`` (three quarters of the images) and
``OUT_DIR/test/<class>/NNNN.png`` (the rest), 32x32 RGB, the two classes in equal numbers, the
same files for the same ``--n`` and ``--seed``. ``advtrain train --data OUT_DIR`` reads them
(it carves its validation split from train/).

The pictures follow the "ABCD" cues dermatologists screen for (Asymmetry, Border, Colour,
Diameter; Nachbar et al. 1994), drawn on a textured skin-coloured background:

- ``benign``: a round or slightly oval blob, smooth-edged, of one even tan to brown colour;
- ``malignant``: an irregular, asymmetric blob whose border is notched and spiculated, darker
  at its rim, with blue-black patches inside, and a little larger on average.

The two classes overlap (a mildly irregular malignant one next to an oval benign one), so a
model does not get every image right. Nothing here is real patient data, and a model trained
on it says nothing about real lesions: it is a stand-in to run the workflow end to end.
Only numpy and Pillow are used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
#: Drawn at this multiple of SIZE, then downsampled (smooth, anti-aliased edges).
SUPERSAMPLE = 4
CLASSES = ("benign", "malignant")
TRAIN_SHARE = 0.75


def skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """A skin-coloured background (H, W, 3) in [0, 1]: a base tone, blotchy low-frequency
    shading, fine grain and a few faint hairs."""
    base = np.array([0.85, 0.64, 0.52]) + rng.normal(0, 0.04, 3)
    coarse = rng.normal(0, 1, (5, 5)).astype(np.float32)
    blotch = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    image = base[None, None, :] * (1 + 0.05 * blotch[:, :, None])
    image = image + rng.normal(0, 0.02, (size, size, 1)) + rng.normal(0, 0.01, (size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(rng.integers(0, 3)):  # hairs: thin dark lines
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5)
        distance = np.abs(np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5) - offset)
        image = image * (1 - 0.35 * (distance < 0.006)[:, :, None])
    return image


def lesion(rng: np.random.Generator, malignant: bool, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A lesion's colour (H, W, 3) and opacity (H, W), both in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = 0.5 + rng.normal(0, 0.06, 2)
    dy, dx = yy - cy, xx - cx
    angle, distance = np.arctan2(dy, dx), np.hypot(dy, dx)
    radius = rng.uniform(0.16, 0.26) if malignant else rng.uniform(0.13, 0.22)
    stretch = rng.uniform(0.8, 1.2)  # an oval
    boundary = radius * (1 + (stretch - 1) * np.cos(2 * (angle - rng.uniform(0, np.pi))))
    if malignant:  # notched, lobed, spiculated border
        irregular = rng.uniform(0.08, 0.25)
        for k in rng.choice(np.arange(3, 9), size=3, replace=False):
            boundary = boundary * (
                1 + irregular * rng.uniform(0.3, 1) * np.cos(k * angle + rng.uniform(0, 6.3))
            )
        spikes = rng.integers(3, 9)
        spike_angles = rng.uniform(-np.pi, np.pi, spikes)
        for spike in spike_angles:
            gap = np.angle(np.exp(1j * (angle - spike)))
            boundary = boundary * (1 + rng.uniform(0.15, 0.4) * np.exp(-((gap / 0.12) ** 2)))
    edge = 0.012 if malignant else rng.uniform(0.02, 0.035)  # sharper edges for malignant
    alpha = 1 / (1 + np.exp((distance - boundary) / edge))
    tone = np.array([0.55, 0.36, 0.25]) * rng.uniform(0.7, 1.1)
    colour = np.broadcast_to(tone, (size, size, 3)).copy()
    if malignant:
        rim = np.exp(-(((distance - 0.8 * boundary) / (0.18 * boundary + 1e-6)) ** 2))
        colour = colour * (1 - 0.45 * rim[:, :, None])
        for _ in range(rng.integers(1, 4)):  # blue-black patches
            py, px = cy + rng.normal(0, radius / 2, 1), cx + rng.normal(0, radius / 2, 1)
            patch = np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * (radius / 4) ** 2))
            colour = colour * (1 - 0.5 * patch[:, :, None]) + 0.5 * patch[:, :, None] * np.array(
                [0.18, 0.16, 0.28]
            )
    else:
        colour = colour * (1 + 0.05 * rng.normal(0, 1, (1, 1, 3)))
    return np.clip(colour, 0, 1), alpha


def draw(rng: np.random.Generator, malignant: bool) -> Image.Image:
    """One 32x32 RGB picture of a lesion on skin."""
    big = SIZE * SUPERSAMPLE
    colour, alpha = lesion(rng, malignant, big)
    image = skin(rng, big) * (1 - alpha[:, :, None]) + colour * alpha[:, :, None]
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BOX)


def write(out: Path, n: int, seed: int) -> dict[str, int]:
    """Write ``n`` images under ``out`` (see the module docstring); the count per split."""
    rng = np.random.default_rng(seed)
    per_class = n // len(CLASSES)
    n_train = round(per_class * TRAIN_SHARE)
    counts = {"train": 0, "test": 0}
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            split = "train" if i < n_train else "test"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            draw(rng, malignant=label == 1).save(folder / f"{i:04d}.png")
            counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="Folder to create (must be new or empty).")
    parser.add_argument("--n", type=int, default=400, help="Images in all (default 400).")
    parser.add_argument("--seed", type=int, default=0, help="Seed (default 0).")
    args = parser.parse_args(argv)
    if args.n < 16:
        parser.error("--n must be at least 16 (a few images per class and split)")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder")
    counts = write(args.out, args.n, args.seed)
    print(f"wrote {counts['train']} training and {counts['test']} test images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
