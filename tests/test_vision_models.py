"""Models people already have: ``torchvision:NAME`` and ``timm:NAME`` by name, their weights from
a file, ``--normalize`` inside the model and ``--num-classes``.

The tests marked ``vision`` build real torchvision and timm networks. Those libraries do not
import beside the CPU torch of the main venv, so ``make test`` runs them in ``.venv-vision``
(``make test-vision``) and leaves them out of the main run (``-m "not vision"``); run by hand in
a venv without them they skip, and under CI they fail instead. The others run everywhere, with
fake libraries where they need one.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from advtrain.attacks import PGD
from advtrain.cli import run
from advtrain.errors import AdvtrainError, CheckpointError
from advtrain.models import build_model, hub
from advtrain.models.weights import load_adapted_weights
from advtrain.threat import ThreatModel

SHAPE = (3, 32, 32)


def need(module: str) -> ModuleType:
    """``module`` imported; a skip where it is missing, a failure under CI."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


class Stub(nn.Module):
    """A small CNN standing in for a library's network."""

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv1(x)).flatten(1))


def fake_timm(**extra) -> ModuleType:
    module = ModuleType("timm")
    names = ["resnet18", "resnet18d", "resnet50", "vit_tiny_patch16_224"]
    module.list_models = lambda: names  # type: ignore[attr-defined]
    module.is_model = names.__contains__  # type: ignore[attr-defined]

    def create_model(arch, *, pretrained, num_classes, in_chans, **kw):
        assert pretrained is False
        if "img_size" in kw:  # as a CNN says
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'img_size'")
        return Stub(num_classes, in_chans)

    module.create_model = create_model  # type: ignore[attr-defined]
    vars(module).update(extra)
    return module


def fake_torchvision_models() -> ModuleType:
    module = ModuleType("torchvision.models")
    names = ["resnet18", "resnet34", "vgg11"]
    module.list_models = lambda: names  # type: ignore[attr-defined]

    def get_model(arch, *, weights, num_classes, **kw):
        assert weights is None
        if "image_size" in kw:
            raise TypeError("ResNet.__init__() got an unexpected keyword argument 'image_size'")
        return Stub(num_classes)

    module.get_model = get_model  # type: ignore[attr-defined]
    return module


# --------------------------------------------------------------------------- everywhere


def test_libraries_are_built_by_name_without_weights_and_with_the_inputs_channels(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", fake_timm())
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_torchvision_models())
    model = build_model("timm:resnet18", in_shape=(1, 16, 16), n_classes=4)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 4)
    model = build_model("torchvision:resnet18", in_shape=(1, 16, 16), n_classes=3)
    assert model.model.conv1.in_channels == 1  # the 3-channel stem replaced
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("timm:resnet181", ["timm has no model 'resnet181'", "resnet18, resnet18d"]),
        ("torchvision:resnt18", ["torchvision has no model 'resnt18'", "resnet18"]),
    ],
)
def test_an_unknown_architecture_names_close_ones(monkeypatch, name, needles):
    monkeypatch.setitem(sys.modules, "timm", fake_timm())
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_torchvision_models())
    with pytest.raises(AdvtrainError) as info:
        build_model(name, in_shape=SHAPE, n_classes=3)
    for needle in needles:
        assert needle in str(info.value)


def test_a_missing_or_broken_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(AdvtrainError, match=r"needs timm, .*pip install 'advtrain\[vision\]'"):
        build_model("timm:resnet18", in_shape=SHAPE, n_classes=3)

    def broken(name):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(hub, "importlib", SimpleNamespace(import_module=broken))
    with pytest.raises(AdvtrainError, match=r"does not import beside torch .*torchvision::nms"):
        build_model("torchvision:resnet18", in_shape=SHAPE, n_classes=3)


def test_normalisation_errors(capsys, tmp_path):
    with pytest.raises(AdvtrainError, match="unknown normalisation 'imagnet'"):
        build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10, normalize="imagnet")
    with pytest.raises(AdvtrainError, match="imagenet has 3 means; inputs of shape"):
        build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10, normalize="imagenet")
    weights = tmp_path / "w.safetensors"
    save_file(build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10).state_dict(), weights)
    common = ["evaluate", "--model", "digits-cnn", "--weights", weights, "--dataset", "digits"]
    rc, _, err = cli(capsys, *common, "--normalize", "0.5,0.1,0.2", "--suite", "pgd")
    one_line_error(rc, err, "unknown normalisation '0.5,0.1,0.2'", "MEAN,STD")
    rc, _, err = cli(capsys, *common, "--normalize", "cifar10", "--suite", "pgd")
    one_line_error(rc, err, "normalisation cifar10 has 3 means", "(1, 8, 8)")
    rc, _, err = cli(capsys, "train", "--normalize", "0.5,0", "--epochs", "1")
    one_line_error(rc, err, "every std must be > 0")


def test_num_classes_must_cover_the_labels(capsys, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file(build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=12).state_dict(), weights)
    common = ["evaluate", "--model", "digits-cnn", "--weights", weights, "--dataset", "digits"]
    rc, _, err = cli(capsys, *common, "--num-classes", "5", "--suite", "pgd")
    one_line_error(rc, err, "--num-classes 5 is too few", "10 classes", "at least 10 outputs")
    rc, out, err = cli(capsys, *common, "--num-classes", "12", "--suite", "pgd", "--steps", "2")
    assert rc == 0, err
    assert "robust accuracy" in out


def test_0_255_and_normalised_inputs_are_refused_with_the_likely_mistake():
    threat = ThreatModel(eps=8 / 255)
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(AdvtrainError, match="look like 0-255 pixels; advtrain expects") as info:
        threat.validate(x * 255)
    assert "--normalize" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AdvtrainError, match="look normalised with a mean and std"):
        threat.validate((x - 0.5) / 0.25)


def test_weights_of_the_bare_network_or_of_the_run_load_behind_the_adapters(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10, normalize="0.5,0.25")
    bare, run = tmp_path / "bare.pth", tmp_path / "run.safetensors"
    torch.save({"module." + k: v for k, v in model[1].state_dict().items()}, bare)  # DDP's
    save_file(model.state_dict(), run)
    x = torch.rand(3, 1, 8, 8)
    for path in (bare, run):
        torch.manual_seed(1)
        fresh = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10, normalize="0.5,0.25")
        assert torch.equal(load_adapted_weights(fresh, path)(x), model(x))
    plain = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10)
    with pytest.raises(CheckpointError, match=r"normalisation inside .*--normalize 0\.5,0\.25"):
        load_adapted_weights(plain, run)
    other = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10, normalize="0.4,0.25")
    with pytest.raises(CheckpointError, match=r"saved with normalisation mean 0\.5"):
        load_adapted_weights(other, run)
    wide = build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=12, normalize="0.5,0.25")
    with pytest.raises(CheckpointError, match=r"shape mismatch .*vs"):
        load_adapted_weights(wide, bare)


def test_a_run_keeps_its_normalisation_and_head(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", out, "--method", "standard", "--epochs", "1", "--eval-steps", "1"]
    rc, _, err = cli(capsys, *args, "--normalize", "0.5,0.25", "--num-classes", "11")
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["normalize"], config["num_classes"]) == ("0.5,0.25", 11)
    rc, text, err = cli(capsys, "evaluate", out, "--suite", "pgd", "--steps", "2", "--n", "50")
    assert rc == 0, err
    assert "n=50" in text
    rc, _, err = cli(capsys, "evaluate", out, "--normalize", "cifar10", "--suite", "pgd")
    one_line_error(rc, err, "--normalize cifar10 differs from the run's (0.5,0.25)")


# --------------------------------------------------------------------------- real libraries


class TupleOutput(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return logits, logits.softmax(1)


class DictOutput(TupleOutput):
    def forward(self, x):
        return {"logits": self.net(x), "features": x.mean((2, 3))}


@pytest.mark.vision
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet18", "timm:test_vit"])
def test_real_networks_by_name(name):
    need(name.split(":")[0])
    torch.manual_seed(0)
    model = build_model(name, in_shape=SHAPE, n_classes=3).train()
    assert model(torch.rand(2, *SHAPE)).shape == (2, 3)


@pytest.mark.vision
def test_googlenet_tuple_output_in_training_mode():
    need("torchvision")
    model = build_model("torchvision:googlenet", in_shape=(3, 48, 48), n_classes=3).train()
    assert model(torch.rand(2, 3, 48, 48)).shape == (2, 3)


def wrapped_mobilenet(wrapper: type[nn.Module]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """torchvision's MobileNet v3 small behind ``wrapper`` and the logits adapter, with two
    inputs labelled as it predicts them (so that the attacks run on both)."""
    from advtrain.models import logits_model

    torch.manual_seed(0)
    net = build_model("torchvision:mobilenet_v3_small", in_shape=SHAPE, n_classes=3).model
    model = logits_model(wrapper(net.eval())).eval()
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.vision
def test_a_tuple_output_goes_through_the_evaluation_suite():
    need("torchvision")
    import advtrain

    model, x, y = wrapped_mobilenet(TupleOutput)
    report = advtrain.evaluate(model, x, y, eps=4 / 255, suite="quick", seed=0)
    assert report.clean_accuracy == 1
    assert 0 <= report.robust_accuracy <= 1


@pytest.mark.vision
def test_a_dict_output_goes_through_an_attack():
    need("torchvision")
    from advtrain.evaluation import clean_and_robust_accuracy

    model, x, y = wrapped_mobilenet(DictOutput)
    threat = ThreatModel(eps=4 / 255)
    result = clean_and_robust_accuracy(model, x, y, PGD(threat, steps=3, seed=0))
    assert result.clean_accuracy == 1 and 0 <= result.robust_accuracy <= 1


@pytest.mark.vision
def test_normalisation_inside_keeps_attacks_in_pixel_space():
    need("torchvision")
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", in_shape=SHAPE, n_classes=3, normalize="cifar10")
    model.eval()
    x = torch.rand(2, *SHAPE)
    threat = ThreatModel(eps=8 / 255)
    x_adv = PGD(threat, steps=3, seed=0)(model, x, torch.tensor([0, 1]))
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert bool(threat.contains(x_adv, x).all())


@pytest.mark.vision
def test_cli_evaluates_torchvision_weights_from_elsewhere(capsys, tmp_path):
    """Weights saved from torchvision's own class (its key names), a 10-class grey set and a
    12-output head with normalisation inside: exit 0."""
    tv = need("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=12)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    weights = tmp_path / "resnet18.pth"
    torch.save(net.state_dict(), weights)
    rc, out, err = cli(
        capsys,
        *("evaluate", "--model", "torchvision:resnet18", "--weights", weights),
        *("--dataset", "digits", "--num-classes", "12", "--normalize", "0.5,0.25"),
        *("--suite", "pgd", "--steps", "2", "--n", "8", "--batch-size", "8"),
    )
    assert rc == 0, err
    assert "n=8" in out


def tiny_npz(path) -> None:
    """30 RGB 32×32 images as uint8 pixels, two classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(30) % 2)


@pytest.mark.vision
def test_cli_evaluates_an_imagenet_normalised_torchvision_model_on_an_npz(capsys, tmp_path):
    tv = need("torchvision")
    tiny_npz(tmp_path / "tiny.npz")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(tv.models.resnet18(num_classes=3).state_dict(), weights)
    rc, out, err = cli(
        capsys,
        *("evaluate", "--model", "torchvision:resnet18", "--weights", weights),
        *("--num-classes", "3", "--normalize", "imagenet", "--data", tmp_path / "tiny.npz"),
        *("--suite", "pgd", "--steps", "2", "--n", "4"),
    )
    assert rc == 0, err
    assert "n=4" in out


@pytest.mark.vision
def test_cli_trains_a_timm_model_and_evaluates_the_run(capsys, tmp_path):
    need("timm")
    tiny_npz(tmp_path / "tiny.npz")
    run_dir = tmp_path / "run"
    rc, _, err = cli(
        capsys,
        *("train", "--model", "timm:test_resnet", "--normalize", "cifar10"),
        *("--data", tmp_path / "tiny.npz", "--out", run_dir, "--method", "standard"),
        *("--epochs", "1", "--eval-steps", "1", "--quiet"),
    )
    assert rc == 0, err
    rc, out, err = cli(capsys, "evaluate", run_dir, "--suite", "pgd", "--steps", "2")
    assert rc == 0, err
    assert "robust accuracy" in out
