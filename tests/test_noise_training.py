"""The ``gaussian`` training method (Cohen et al. 2019's noise augmentation) and ``--sigma``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from advtrain.cli import run
from advtrain.errors import AdvtrainError
from advtrain.threat import ThreatModel
from advtrain.training import make_method
from advtrain.training.noise_methods import GaussianNoise

THREAT = ThreatModel("linf", 0.1)


def test_gaussian_is_registered_with_its_sigma():
    assert make_method("gaussian", THREAT).sigma == 0.25  # the default
    built = make_method("gaussian", THREAT, sigma=0.5, steps=3, step_size=0.1)
    assert isinstance(built, GaussianNoise) and built.sigma == 0.5


@pytest.mark.parametrize("options", [{"sigma": 0}, {"sigma": -0.1}, {"sigma": "x"}, {"beta": 1}])
def test_gaussian_refuses_bad_options_in_one_line(options):
    with pytest.raises(AdvtrainError) as info:
        make_method("gaussian", THREAT, **options)
    assert "\n" not in str(info.value)


def test_gaussian_trains_on_unclipped_noisy_inputs_and_its_loss_falls():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)
    y = (x.flatten(1).mean(dim=1) > 0.5).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    method = make_method("gaussian", THREAT, sigma=0.25)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    seen = []
    model[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    losses = []
    for _ in range(60):
        loss, logits = method.loss(model, x, y)
        assert logits.shape == (64, 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    assert not torch.equal(seen[0], x)
    assert float(seen[0].min()) < 0 and float(seen[0].max()) > 1  # not clipped to the box
    assert not torch.equal(seen[0], seen[1])  # a fresh draw each step


def _cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.fixture
def _scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADVTRAIN_MNIST_MIRROR", "http://127.0.0.1:9/")


@pytest.mark.usefixtures("_scratch")
def test_cli_sigma_reaches_the_gaussian_method(capsys, tmp_path):
    out = tmp_path / "run"
    rc, err = _cli(
        capsys,
        *("train", "--method", "gaussian", "--sigma", "0.3", "--epochs", "1"),
        *("--eval-steps", "1", "--batch-size", "256", "--quiet", "--out", out),
    )
    assert rc == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "gaussian" and config["method_options"] == {"sigma": 0.3}


@pytest.mark.usefixtures("_scratch")
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--sigma", "0.3"), "--sigma goes with --method gaussian"),
        (("--method", "pgd", "--sigma", "0.3"), "not 'pgd'"),
        (("--method", "gaussian", "--sigma", "0.3", "--method-option", "sigma=0.2"), "not both"),
        (("--method", "gaussian", "--sigma", "-1"), "sigma"),
    ],
)
def test_cli_sigma_in_a_wrong_combination_is_one_error_line(capsys, args, needle):
    rc, err = _cli(capsys, "train", *args, "--epochs", "1", "--quiet")
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("advtrain: error: ")
    assert needle in err and "Traceback" not in err
