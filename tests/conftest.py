"""Shared fixtures: real data from ../shared, and small trained models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MNIST_DIR = SHARED / "data" / "mnist"
MODELS_DIR = SHARED / "models" / "fast-adversarial-mnist"

# One thread per test process (several test modules also say so when imported): the fixed figures
# of the suite were computed that way, floating-point sums depend on the thread count, and the
# two pytest-xdist workers of `make test` then share the two cores without oversubscribing them.
torch.set_num_threads(1)


def require(path: Path) -> Path:
    """Skip when ``path`` is missing on a developer's machine; fail under CI."""
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing under CI")
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def digits():
    from advtrain.data import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def digits_model(digits):
    """A standard-trained (undefended) digits-cnn, about 95% accurate, trained in a second."""
    from advtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("digits-cnn", in_shape=digits.info.shape, n_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = digits.train.x, digits.train.y
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        for index in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@pytest.fixture(scope="session")
def mnist_first_1000():
    """The first 1,000 MNIST test images and labels, read from ../shared/data/mnist."""
    from advtrain.data import load_dataset

    data = load_dataset("mnist", data_dir=require(MNIST_DIR), download=False)
    return data.test.x[:1000], data.test.y[:1000]


def released_model(name: str) -> torch.nn.Module:
    """One of the fast-adversarial MNIST checkpoints loaded into mnist-small."""
    from advtrain.checkpoint import load_weights_into
    from advtrain.models import build_model

    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, require(MODELS_DIR / name))
    return model.eval()
