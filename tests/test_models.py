"""Model registry, the released MNIST checkpoints, and user models given as file.py:factory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from advtrain.checkpoint import save_checkpoint
from advtrain.errors import AdvtrainError, CheckpointError, UnknownNameError
from advtrain.models import MODELS, build_model, load_user_model

from .conftest import MODELS_DIR as RELEASED
from .conftest import require as need

SHAPES = {
    "digits-cnn": (1, 8, 8),
    "digits-cnn-bn": (1, 8, 8),
    "mlp": (30,),
    "mnist-large": (1, 28, 28),
    "mnist-small": (1, 28, 28),
    "preact-resnet18": (3, 32, 32),
}


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert MODELS == (
        "digits-cnn",
        "digits-cnn-bn",
        "mlp",
        "mnist-large",
        "mnist-small",
        "preact-resnet18",
    )
    assert set(SHAPES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_models_give_logits(name: str) -> None:
    torch.manual_seed(0)
    n_classes = 3
    model = build_model(name, in_shape=SHAPES[name], n_classes=n_classes)
    assert isinstance(model, nn.Module)
    x = torch.rand(3, *SHAPES[name])
    logits = model(x)
    assert logits.shape == (3, n_classes)
    assert torch.isfinite(logits).all()
    # logits, not probabilities: rows need not sum to one
    assert not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 28, 28), (2, 5, 5)])
def test_digits_cnn_takes_other_image_sizes(shape: tuple[int, ...]) -> None:
    model = build_model("digits-cnn", in_shape=shape, n_classes=4)
    assert model(torch.rand(2, *shape)).shape == (2, 4)
    assert model[5].in_features == 64 * ((shape[1] + 1) // 2) * ((shape[2] + 1) // 2)


def test_mnist_small_is_the_released_layout() -> None:
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    assert [type(m) for m in model] == [
        nn.Conv2d,
        nn.ReLU,
        nn.Conv2d,
        nn.ReLU,
        nn.Flatten,
        nn.Linear,
        nn.ReLU,
        nn.Linear,
    ]
    assert (model[0].in_channels, model[0].out_channels, model[0].kernel_size) == (1, 16, (4, 4))
    assert (model[0].stride, model[0].padding, model[2].stride, model[2].padding) == (
        (2, 2),
        (1, 1),
        (2, 2),
        (1, 1),
    )
    assert (model[2].in_channels, model[2].out_channels, model[2].kernel_size) == (16, 32, (4, 4))
    assert (model[5].in_features, model[5].out_features) == (32 * 7 * 7, 100)
    assert (model[7].in_features, model[7].out_features) == (100, 10)
    assert list(model.state_dict()) == [
        f"{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")
    ]


def test_mnist_large_is_madrys_cnn() -> None:
    model = build_model("mnist-large", in_shape=(1, 28, 28), n_classes=10)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight")}
    assert list(shapes.values()) == [(32, 1, 5, 5), (64, 32, 5, 5), (1024, 7 * 7 * 64), (10, 1024)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == 2


def test_preact_resnet18_structure() -> None:
    model = build_model("preact-resnet18", in_shape=(3, 32, 32), n_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 4 * 2 * 2  # stem + 4 stages x 2 blocks x 2 convs
    assert [
        stage[0].conv1.out_channels
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4)
    ] == [
        64,
        128,
        256,
        512,
    ]
    assert model.layer1[0].shortcut is None and model.layer2[0].shortcut is not None
    assert sum(p.numel() for p in model.parameters()) == 11_172_170


@pytest.mark.parametrize(
    "name, shape, expected",
    [
        ("mnist-small", (1, 8, 8), "(1, 28, 28)"),
        ("mnist-large", (3, 28, 28), "(1, 28, 28)"),
        ("mlp", (1, 8, 8), "(d,)"),
        ("digits-cnn", (64,), "(C, H, W)"),
        ("preact-resnet18", (32, 32), "(C, H, W)"),
        ("mlp", (0,), "positive"),
        ("mlp", "abc", "positive"),
    ],
)
def test_wrong_input_shape(name: str, shape: tuple[int, ...], expected: str) -> None:
    with pytest.raises(AdvtrainError) as exc:
        build_model(name, in_shape=shape, n_classes=10)
    message = one_line(exc)
    assert name in message and expected in message


@pytest.mark.parametrize("n_classes", [0, 1, 2.5, True])
def test_bad_n_classes(n_classes: object) -> None:
    with pytest.raises(AdvtrainError, match="n_classes"):
        build_model("mlp", in_shape=(4,), n_classes=n_classes)  # type: ignore[arg-type]


def test_unknown_model_lists_names() -> None:
    with pytest.raises(UnknownNameError) as exc:
        build_model("resnet-9000", in_shape=(1, 28, 28), n_classes=10)
    message = one_line(exc)
    assert "resnet-9000" in message and all(name in message for name in MODELS)


# --------------------------------------------------------------------------- released checkpoints


def test_released_checkpoints_match_their_sums() -> None:
    sums = dict(
        reversed(line.split())
        for line in need(RELEASED / "SHA256SUMS").read_text().splitlines()
        if line
    )
    assert set(sums) == {"fgsm.pth", "pgd_madry.pth"}
    for name, digest in sums.items():
        assert hashlib.sha256((RELEASED / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("name", ["fgsm.pth", "pgd_madry.pth"])
def test_released_checkpoint_is_accurate(name: str, mnist_first_1000) -> None:
    from advtrain.checkpoint import load_weights_into

    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, need(RELEASED / name), strict=True)
    x, y = mnist_first_1000
    assert x.shape == (1000, 1, 28, 28) and float(x.max()) == 1.0
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95, f"{name}: {accuracy:.3f}"


# --------------------------------------------------------------------------- user models

FACTORY = """
import torch
from torch import nn

def make(hidden=5):
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2))

NOT_CALLABLE = 3

def not_a_module():
    return "a string"

def crashes():
    raise RuntimeError("boom\\nsecond line")
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def test_user_model_without_weights(user_file: Path) -> None:
    model = load_user_model(f"{user_file}:make", hidden=7)
    assert isinstance(model, nn.Sequential) and model[0].out_features == 7
    assert model(torch.rand(4, 3)).shape == (4, 2)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_user_model_with_weights(user_file: Path, tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    trained = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    weights = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_checkpoint(weights, trained.state_dict(), {"note": "test"})
    else:
        torch.save(trained.state_dict(), weights)
    model = load_user_model(f"{user_file}:make", weights)
    x = torch.rand(6, 3)
    assert torch.equal(model(x), trained(x))


def test_user_model_with_wrong_weights(user_file: Path, tmp_path: Path) -> None:
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_user_model(f"{user_file}:make", tmp_path / "w.pth")


def test_user_models_are_separate_modules(user_file: Path) -> None:
    first = load_user_model(f"{user_file}:make")
    user_file.write_text(FACTORY.replace("nn.Linear(3, hidden)", "nn.Linear(4, hidden)"))
    second = load_user_model(f"{user_file}:make")
    assert first[0].in_features == 3 and second[0].in_features == 4


def test_user_file_can_import_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "helper_layers_xyz.py").write_text("from torch import nn\nWIDTH = 6\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nimport helper_layers_xyz\n"
        "def make():\n    return nn.Linear(2, helper_layers_xyz.WIDTH)\n"
    )
    assert load_user_model(f"{tmp_path / 'net.py'}:make").out_features == 6


@pytest.mark.parametrize(
    "suffix, match",
    [
        (":missing", "no attribute 'missing'"),
        (":NOT_CALLABLE", "not a callable"),
        (":not_a_module", "returned a str, not a torch.nn.Module"),
        (":crashes", "RuntimeError: boom second line"),
        ("", "path/to/file.py:factory"),
        (":", "path/to/file.py:factory"),
    ],
)
def test_user_model_errors(user_file: Path, suffix: str, match: str) -> None:
    with pytest.raises(AdvtrainError, match=match) as exc:
        load_user_model(f"{user_file}{suffix}")
    one_line(exc)


def test_user_model_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AdvtrainError, match="not found") as exc:
        load_user_model(f"{tmp_path / 'nope.py'}:make")
    assert "nope.py" in one_line(exc)


@pytest.mark.parametrize(
    "source, match",
    [
        (
            "import no_such_module_abc\n",
            "ModuleNotFoundError: No module named 'no_such_module_abc'",
        ),
        ("def broken(:\n", "SyntaxError"),
        ("raise ValueError('first\\nsecond')\n", "ValueError: first second"),
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
    ],
)
def test_user_model_import_errors(tmp_path: Path, source: str, match: str) -> None:
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(AdvtrainError, match=match) as exc:
        load_user_model(f"{path}:make")
    assert "bad.py" in one_line(exc)
