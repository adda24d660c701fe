"""Models as people have them: tuple, dict and object outputs reduced to logits, and the
normalisation put inside the model so that attacks stay in [0, 1] pixel space."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from advtrain.attacks import PGD
from advtrain.errors import AdvtrainError
from advtrain.models.adapters import (
    NORMALIZATIONS,
    Normalize,
    logits_model,
    parse_normalization,
    with_normalization,
)
from advtrain.threat import ThreatModel


class Shaped(nn.Module):
    """A tiny CNN whose output is wrapped as ``kind`` says."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, torch.zeros(1)
        if self.kind == "dict":
            return {"logits": logits, "hidden": logits * 0}
        if self.kind == "object":
            return SimpleNamespace(logits=logits, loss=None)
        if self.kind == "bad dict":
            return {"scores": logits}
        if self.kind == "string":
            return "logits"
        return logits


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "object"])
def test_every_usual_output_gives_the_logits_and_attacks_work(kind):
    torch.manual_seed(0)
    plain = Shaped("tensor")
    x = torch.rand(6, 3, 8, 8)
    plain(x)  # materialise the lazy layer
    model = Shaped(kind)
    model.load_state_dict(plain.state_dict())
    adapted = logits_model(model)
    assert torch.equal(adapted(x), plain(x))
    assert logits_model(adapted) is adapted
    y = plain(x).argmax(1)
    threat = ThreatModel(eps=8 / 255)
    x_adv = PGD(threat, steps=3, seed=0)(adapted, x, y)
    assert bool(threat.contains(x_adv, x).all())


@pytest.mark.parametrize(("kind", "needle"), [("bad dict", "'logits'"), ("string", "str")])
def test_other_outputs_are_a_clear_error(kind, needle):
    model = logits_model(Shaped(kind))
    with pytest.raises(AdvtrainError, match=needle):
        model(torch.rand(2, 3, 8, 8))


def test_normalisation_inside_the_model_keeps_attacks_in_pixel_space():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    mean, std = NORMALIZATIONS["cifar10"]
    model = with_normalization(net, mean, std)
    x = torch.rand(4, 3, 8, 8)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-6)
    threat = ThreatModel(eps=8 / 255)
    x_adv = PGD(threat, steps=3, seed=0)(model, x, model(x).argmax(1))
    assert bool(threat.contains(x_adv, x).all())  # the attack saw [0, 1] pixels
    assert set(dict(model.named_buffers())) == {"0.mean", "0.std"}  # saved with the weights


def test_normalisation_names_and_errors():
    assert parse_normalization("imagenet") == NORMALIZATIONS["imagenet"]
    assert parse_normalization("0.5,0.25") == ((0.5,), (0.25,))
    assert parse_normalization("0.1/0.2/0.3,1/2/3") == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("cifar", "0.5", "a,b", "0.1/0.2,1"):
        with pytest.raises(AdvtrainError, match="normalisation"):
            parse_normalization(bad)
    with pytest.raises(AdvtrainError, match="std"):
        Normalize((0.5,), (0.0,))
    one = Normalize((0.5,), (0.5,))
    assert torch.allclose(one(torch.ones(1, 3, 2, 2)), torch.ones(1, 3, 2, 2))
    with pytest.raises(AdvtrainError, match="3 channels"):
        Normalize(*NORMALIZATIONS["imagenet"])(torch.rand(1, 1, 4, 4))


HF_STYLE_PY = """
import torch
from types import SimpleNamespace


class Net(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def forward(self, x):
        logits = self.body(x)
        if self.kind == "dict":
            return {"logits": logits, "hidden_states": None}
        if self.kind == "object":
            return SimpleNamespace(logits=logits)
        return {"scores": logits}


def make_dict():
    return Net("dict")


def make_object():
    return Net("object")


def make_bad():
    return Net("bad")
"""


@pytest.mark.parametrize("factory", ["make_dict", "make_object", "make_bad"])
def test_a_model_file_with_dict_or_object_output_is_evaluated(capsys, tmp_path, factory):
    import json

    from safetensors.torch import save_file

    from advtrain.cli import run

    (tmp_path / "hf.py").write_text(HF_STYLE_PY)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_file({f"body.{k}": v for k, v in body.state_dict().items()}, tmp_path / "w.safetensors")
    report = tmp_path / "r.json"
    capsys.readouterr()
    rc = run(
        ["evaluate", "--model-file", f"{tmp_path / 'hf.py'}:{factory}",
         "--weights", str(tmp_path / "w.safetensors"), "--dataset", "digits", "--n", "20",
         "--suite", "pgd", "--steps", "2", "--json", str(report)]
    )  # fmt: skip
    err = capsys.readouterr().err
    if factory == "make_bad":
        assert rc == 2 and "'logits'" in err and "Traceback" not in err
    else:
        assert rc == 0, err
        assert json.loads(report.read_text())["n"] == 20
