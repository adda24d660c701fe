"""The two standard MNIST CNNs of the adversarial-training literature; inputs (1, 28, 28) in
[0, 1]."""

from __future__ import annotations

from torch import nn

from ._shapes import expect_shape

MNIST_SHAPE = (1, 28, 28)


def mnist_small(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """The small CNN of Wong, Rice & Kolter (2020), "Fast is better than free: revisiting
    adversarial training" (ICLR). Laid out exactly as their released checkpoints (keys
    ``0.*, 2.*, 5.*, 7.*``)."""
    expect_shape("mnist-small", in_shape, MNIST_SHAPE)
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, n_classes),
    )


def mnist_large(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """The MNIST CNN of Madry et al. (2018), "Towards deep learning models resistant to adversarial
    attacks" (ICLR): two 5x5 conv + max-pool stages (32, 64 filters), then a 1024-unit layer."""
    expect_shape("mnist-large", in_shape, MNIST_SHAPE)
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 1024),
        nn.ReLU(),
        nn.Linear(1024, n_classes),
    )
