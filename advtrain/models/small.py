"""Small, fast models for the bundled toy datasets: a CNN for 8x8 digits and an MLP for tables."""

from __future__ import annotations

from torch import nn

from ._shapes import expect_rank


def digits_cnn(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """A two-conv CNN for scikit-learn's 8x8 digits (any (C, H, W) works; the flatten size follows).

    Not from a paper: a LeNet-style stack (LeCun et al. 1998, "Gradient-based learning applied to
    document recognition") shrunk for quick runs on a CPU.
    """
    return _digits_cnn("digits-cnn", in_shape, n_classes, batchnorm=False)


def digits_cnn_bn(in_shape: tuple[int, ...], n_classes: int) -> nn.Sequential:
    """:func:`digits_cnn` with BatchNorm (Ioffe & Szegedy 2015) after each convolution: the small
    model for BatchNorm-dependent features (synchronised BatchNorm across processes)."""
    return _digits_cnn("digits-cnn-bn", in_shape, n_classes, batchnorm=True)


def _digits_cnn(
    name: str, in_shape: tuple[int, ...], n_classes: int, batchnorm: bool
) -> nn.Sequential:
    channels, height, width = expect_rank(name, in_shape, 3, "(C, H, W)")
    # a 3x3 conv with stride 2 and padding 1 maps n pixels to ceil(n / 2)
    flat = 64 * ((height + 1) // 2) * ((width + 1) // 2)

    def norm(width: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(width)] if batchnorm else []

    # no convolution bias before a BatchNorm: it would be subtracted right away (zero gradient)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1, bias=not batchnorm),
        *norm(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=not batchnorm),
        *norm(64),
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
