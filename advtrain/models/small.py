"""Small, fast models for the bundled toy datasets: a CNN for 8x8 digits and an MLP for tables."""

from __future__ import annotations

from torch import nn

from ._shapes import expect_rank


def digits_cnn(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """A two-conv CNN for scikit-learn's 8x8 digits (any (C, H, W) works; the flatten size follows).

    Not from a paper: a LeNet-style stack (LeCun et al. 1998, "Gradient-based learning applied to
    document recognition") shrunk until it trains in seconds on a CPU.
    """
    channels, height, width = expect_rank("digits-cnn", in_shape, 3, "(C, H, W)")
    # a 3x3 conv with stride 2 and padding 1 maps n pixels to ceil(n / 2)
    flat = 64 * ((height + 1) // 2) * ((width + 1) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, n_classes),
    )


def mlp(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """A two-hidden-layer (64, 64) ReLU perceptron for tabular inputs of shape (d,)
    (Rumelhart, Hinton & Williams 1986, "Learning representations by back-propagating errors")."""
    (features,) = expect_rank("mlp", in_shape, 1, "(d,)")
    return nn.Sequential(
        nn.Linear(features, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, n_classes),
    )
