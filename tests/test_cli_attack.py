"""``advtrain attack``: runs one attack from the command line and saves what it found.

The .npz must hold points inside the dataset's threat model (bounds and immutable features
included) with the model's real predictions on them; bad input ends with one error line and exit
status 2. Everything runs in-process on tiny, quickly trained models.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from advtrain.attacks import ATTACKS, FGSM
from advtrain.attacks.registry import init_parameters
from advtrain.checkpoint import load_weights_into
from advtrain.cli import run
from advtrain.cli.attack_options import parse_attack_options
from advtrain.data import load_dataset
from advtrain.models import build_model
from advtrain.threat import lp_norm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY = re.compile(
    r"^attack (?P<name>\S+)(?: towards class \d+)?: clean accuracy (?P<clean>[\d.]+)%, "
    r"adversarial accuracy (?P<adv>[\d.]+)%, success rate (?P<rate>[\d.]+|nan)% on (?P<n>\d+) "
    r"samples \((?P<norm>\w+) eps=(?P<eps>[\d.e+-]+)[^)]*\); median perturbation norm "
    r"(?P<median>\S+); [\d.]+ s$"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADVTRAIN_DATA", raising=False)
    monkeypatch.setenv("ADVTRAIN_MNIST_MIRROR", "http://127.0.0.1:9/")


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("advtrain: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def train_quietly(*args: str) -> Path:
    out_dir = Path(args[args.index("--out") + 1])
    sink_out, sink_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(sink_out), contextlib.redirect_stderr(sink_err):
        rc = run(
            [
                "train",
                "--epochs",
                "1",
                "--method",
                "standard",
                "--eval-steps",
                "1",
                "--quiet",
                *args,
            ]
        )
    assert rc == 0, sink_err.getvalue()
    return out_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """An undefended digits-cnn run (one epoch of standard training, about 88% accurate)."""
    return train_quietly("--out", str(tmp_path_factory.mktemp("attack") / "run"))


@pytest.fixture(scope="module")
def cancer_run(tmp_path_factory):
    """An mlp trained for one epoch on breast-cancer (tabular, per-feature bounds)."""
    return train_quietly(
        "--dataset",
        "breast-cancer",
        "--model",
        "mlp",
        "--out",
        str(tmp_path_factory.mktemp("attack") / "cancer"),
    )


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def run_model(run: Path, dataset) -> torch.nn.Module:
    meta = json.loads((run / "model.json").read_text())
    model = build_model(
        meta["model"], in_shape=dataset.info.shape, n_classes=dataset.info.n_classes
    )
    load_weights_into(model, run / "model.safetensors")
    return model.eval()


def check_saved_attack(
    path: Path, model: torch.nn.Module, dataset, norm: str, eps: float, n: int
) -> dict[str, np.ndarray]:
    """The npz holds the first n test points, x_adv inside the threat model, and the model's
    own predictions and success flags for them."""
    saved = load_npz(path)
    assert {
        "x",
        "x_adv",
        "y",
        "pred_clean",
        "pred_adv",
        "success",
        "perturbation_norm",
        "meta",
    } <= set(saved)
    x, x_adv = torch.from_numpy(saved["x"]), torch.from_numpy(saved["x_adv"])
    assert x.shape == (n, *dataset.info.shape) and x_adv.shape == x.shape
    assert torch.equal(x, dataset.test.x[:n])
    assert np.array_equal(saved["y"], dataset.test.y[:n].numpy())
    threat = dataset.info.threat_model(norm=norm, eps=eps)
    assert bool(threat.contains(x_adv, x).all())
    with torch.no_grad():
        assert np.array_equal(saved["pred_clean"], model(x).argmax(1).numpy())
        assert np.array_equal(saved["pred_adv"], model(x_adv).argmax(1).numpy())
    assert saved["success"].dtype == np.bool_
    if "target" not in saved:
        assert np.array_equal(saved["success"], saved["pred_adv"] != saved["y"])
    np.testing.assert_allclose(
        saved["perturbation_norm"], lp_norm(x_adv - x, norm).numpy(), rtol=1e-6, atol=1e-7
    )
    meta = json.loads(str(saved["meta"]))
    assert meta["norm"] == norm and meta["eps"] == pytest.approx(eps) and meta["n"] == n
    assert meta["dataset"] == dataset.info.name and "seed" in meta
    return saved


# ---------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("name, norm, eps", [("fgsm", "linf", 0.2), ("pgd", "l2", 1.0)])
def test_attack_writes_npz_png_and_summary(capsys, run_dir, tmp_path, name, norm, eps):
    digits = load_dataset("digits", seed=0)
    model = run_model(run_dir, digits)
    out = tmp_path / f"{name}.npz"
    rc, stdout, err = cli(
        capsys,
        "attack",
        run_dir,
        "--attack",
        name,
        "--norm",
        norm,
        "--eps",
        str(eps),
        "--n",
        "60",
        "--out",
        out,
        "--json",
        tmp_path / "summary.json",
        "--option",
        "loss=ce",
    )
    assert rc == 0, err
    saved = check_saved_attack(out, model, digits, norm, eps, 60)
    meta = json.loads(str(saved["meta"]))
    assert meta["name"] == name and meta["attack"].startswith(ATTACKS[name].__name__ + "(")
    assert f"eps={eps}" in meta["attack"]

    png = out.with_suffix(".png")  # the default picture path
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file

    lines = stdout.splitlines()
    assert len(lines) == 1
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    clean = float((saved["pred_clean"] == saved["y"]).mean())
    adversarial = float((saved["pred_adv"] == saved["y"]).mean())
    assert summary["clean_accuracy"] == pytest.approx(clean)
    assert summary["adversarial_accuracy"] == pytest.approx(adversarial)
    assert summary["success_rate"] == pytest.approx(saved["success"].mean())
    assert summary["n"] == 60 and summary["norm"] == norm
    assert match["n"] == "60" and match["norm"] == norm and float(match["eps"]) == eps
    assert float(match["clean"]) == pytest.approx(100 * clean, abs=0.006)
    assert float(match["adv"]) == pytest.approx(100 * adversarial, abs=0.006)
    median = float(np.median(saved["perturbation_norm"][saved["success"]]))
    assert summary["median_perturbation_norm"] == pytest.approx(median, rel=1e-5)
    # an undefended model at these radii: the attack does break points, and never helps accuracy
    assert saved["success"].sum() >= 10
    assert adversarial <= clean


def test_default_eps_and_all_test_samples(capsys, run_dir, tmp_path):
    digits = load_dataset("digits", seed=0)
    rc, _, err = cli(
        capsys, "attack", run_dir, "--attack", "fgsm", "--out", tmp_path / "a.npz", "--no-png"
    )
    assert rc == 0, err
    check_saved_attack(
        tmp_path / "a.npz", run_model(run_dir, digits), digits, "linf", 0.2, len(digits.test)
    )
    assert not (tmp_path / "a.png").exists()


def test_model_and_weights_path_matches_the_run_dir(capsys, run_dir, tmp_path):
    """--model + --weights + --dataset gives the same attack as the run directory (same seed)."""
    common = ["--attack", "pgd", "--n", "40", "--option", "steps=5", "--no-png"]
    rc, _, err = cli(capsys, "attack", run_dir, *common, "--out", tmp_path / "a.npz")
    assert rc == 0, err
    rc, _, err = cli(
        capsys,
        "attack",
        "--model",
        "digits-cnn",
        "--weights",
        run_dir / "model.safetensors",
        "--dataset",
        "digits",
        *common,
        "--out",
        tmp_path / "b.npz",
        "--png",
        tmp_path / "b-grid.png",
    )
    assert rc == 0, err
    a, b = load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz")
    for key in ("x", "x_adv", "pred_adv", "success"):
        assert np.array_equal(a[key], b[key]), key
    assert "steps=5" in json.loads(str(b["meta"]))["attack"]


def test_targeted_attack_reaches_the_target(capsys, run_dir, tmp_path):
    digits = load_dataset("digits", seed=0)
    model = run_model(run_dir, digits)
    out = tmp_path / "t.npz"
    rc, stdout, err = cli(
        capsys,
        "attack",
        run_dir,
        "--attack",
        "pgd",
        "--eps",
        "0.5",
        "--n",
        "80",
        "--target-class",
        "3",
        "--out",
        out,
        "--json",
        tmp_path / "t.json",
        "--rows",
        "3",
    )
    assert rc == 0, err
    saved = check_saved_attack(out, model, digits, "linf", 0.5, 80)
    y, pred_adv, success = saved["y"], saved["pred_adv"], saved["success"]
    assert np.array_equal(saved["target"], np.full(80, 3))
    own = y == 3
    assert 0 < own.sum() < 80
    # points already of class 3 are left alone and never count as successes
    assert np.array_equal(saved["x_adv"][own], saved["x"][own])
    assert not success[own].any()
    assert np.array_equal(success, (pred_adv == 3) & ~own)
    rate = success[~own].mean()
    assert rate >= 0.8, rate  # an undefended model at a generous eps
    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["success_rate"] == pytest.approx(rate)
    assert summary["attacked"] == int((~own).sum()) and summary["target_class"] == 3
    assert "towards class 3" in stdout and f"{int(own.sum())} of class 3 not attacked" in stdout


def test_tabular_attack_honours_feature_bounds(capsys, cancer_run, tmp_path):
    data = load_dataset("breast-cancer", seed=0)
    model = run_model(cancer_run, data)
    out = tmp_path / "cancer.npz"
    rc, _, err = cli(
        capsys,
        "attack",
        cancer_run,
        "--attack",
        "pgd",
        "--eps",
        "0.3",
        "--n",
        "50",
        "--out",
        out,
        "--rows",
        "5",
    )
    assert rc == 0, err
    saved = check_saved_attack(out, model, data, "linf", 0.3, 50)
    x_adv = saved["x_adv"]
    lower, upper = data.info.lower.numpy(), data.info.upper.numpy()
    assert (x_adv >= lower - 1e-6).all() and (x_adv <= upper + 1e-6).all()
    assert np.abs(x_adv - saved["x"]).max() > 0.1  # the attack did move the points
    if data.info.mutable is not None:
        fixed = ~data.info.mutable.numpy()
        assert np.array_equal(x_adv[:, fixed], saved["x"][:, fixed])
    assert out.with_suffix(".png").read_bytes().startswith(PNG_SIGNATURE)


def test_tabular_attack_keeps_immutable_features(capsys, tmp_path):
    """fraud has immutable features: they never change, while the others do."""
    from safetensors.torch import save_file

    data = load_dataset("fraud", seed=0)
    assert data.info.mutable is not None and not bool(data.info.mutable.all())
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=data.info.shape, n_classes=2).eval()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    out = tmp_path / "fraud.npz"
    rc, _, err = cli(
        capsys,
        "attack",
        "--model",
        "mlp",
        "--weights",
        tmp_path / "w.safetensors",
        "--dataset",
        "fraud",
        "--attack",
        "pgd",
        "--eps",
        "0.5",
        "--n",
        "30",
        "--option",
        "steps=10",
        "--option",
        "early-stop=false",
        "--out",
        out,
    )
    assert rc == 0, err
    saved = check_saved_attack(out, model, data, "linf", 0.5, 30)
    delta = saved["x_adv"] - saved["x"]
    mutable = data.info.mutable.numpy()
    assert (delta[:, ~mutable] == 0).all()
    assert (np.abs(delta[:, mutable]).max(axis=0) > 0).all()
    assert json.loads(str(saved["meta"]))["attack"].count("early_stop=False") == 1


# ---------------------------------------------------------------------- options and progress


def test_option_values_are_typed():
    parsed = parse_attack_options(
        ("steps=7", "step-size=0.5", "random_start=False", "loss=cw", "rho=1e-2")
    )
    assert parsed == {
        "steps": 7,
        "step_size": 0.5,
        "random_start": False,
        "loss": "cw",
        "rho": 0.01,
    }
    assert type(parsed["steps"]) is int and type(parsed["random_start"]) is bool


class _Base:
    def __init__(self, threat=None, *, seed=None, progress=False):
        self.progress = progress


class _Forwarding(_Base):
    def __init__(self, threat=None, *, steps=1, **kwargs):
        super().__init__(threat, **kwargs)


class _Closed(_Base):
    def __init__(self, threat=None, *, steps=1):
        super().__init__(threat)


def test_constructor_parameters_follow_the_kwargs_chain():
    assert {"threat", "steps", "seed", "progress"} == set(init_parameters(_Forwarding))
    assert {"threat", "steps"} == set(init_parameters(_Closed))


class _ProgressProbe(FGSM):
    """FGSM that records the progress flag it was given."""

    seen: ClassVar[list[bool]] = []

    def __init__(self, threat=None, *, progress: bool = False, **kwargs):
        type(self).seen.append(progress)
        super().__init__(threat, **kwargs)


class _NoProgress(FGSM):
    """FGSM whose constructor takes no progress argument and no **kwargs."""

    def __init__(
        self,
        threat=None,
        *,
        restarts: int = 1,
        seed: int | None = None,
        batch_size: int | None = None,
    ):
        super().__init__(threat, restarts=restarts, seed=seed, batch_size=batch_size)


def test_progress_is_passed_only_to_attacks_that_take_it(capsys, run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(ATTACKS, "probe-progress", _ProgressProbe)
    monkeypatch.setitem(ATTACKS, "probe-closed", _NoProgress)
    monkeypatch.setattr(_ProgressProbe, "seen", [])
    common = ["--n", "10", "--no-png"]
    for flags in (["--progress"], []):
        rc, _, err = cli(
            capsys,
            "attack",
            run_dir,
            "--attack",
            "probe-progress",
            *common,
            *flags,
            "--out",
            tmp_path / "p.npz",
        )
        assert rc == 0, err
    assert _ProgressProbe.seen == [True, False]
    rc, out, err = cli(
        capsys,
        "attack",
        run_dir,
        "--attack",
        "probe-closed",
        "--progress",
        *common,
        "--out",
        tmp_path / "c.npz",
    )
    assert rc == 0, err
    assert "attack probe-closed:" in out


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--attack", "nope"], ["unknown attack", "'nope'", "fgsm", "pgd", "apgd-ce"]),
        (["--attack", "pgd", "--option", "bogus=1"], ["bogus", "pgd", "steps"]),
        (["--attack", "fgsm", "--option", "steps"], ["--option", "key=value"]),
        (["--attack", "fgsm", "--option", "=3"], ["--option", "key=value"]),
        (["--attack", "pgd", "--option", "eps=0.1"], ["--eps"]),
        (["--attack", "pgd", "--option", "steps=abc"], ["steps", "abc"]),
        (["--attack", "apgd-ce", "--option", "rho=high"], ["apgd-ce"]),
        (["--attack", "pgd", "--eps", "-0.1"], ["eps", "-0.1"]),
        (["--attack", "pgd", "--eps", "nan"], ["eps", "nan"]),
        (["--attack", "apgd-ce", "--norm", "l1"], ["l1", "linf", "l2"]),
        (["--attack", "pgd", "--norm", "l7"], ["unknown norm", "'l7'"]),
        (["--attack", "pgd", "--target-class", "10"], ["--target-class", "10", "0 to 9"]),
        (["--attack", "pgd", "--target-class", "-1"], ["--target-class"]),
        (["--attack", "pgd", "--n", "0"], ["--n", "0"]),
        (["--attack", "pgd", "--rows", "0"], ["--rows"]),
        (["--attack", "pgd", "--device", "nope"], ["nope"]),
        (["--attack", "pgd", "--weights", "missing.safetensors"], ["missing.safetensors"]),
    ],
)
def test_bad_input_is_one_line(capsys, run_dir, tmp_path, args, needles):
    out = tmp_path / "bad.npz"
    assert_one_line_error(*cli(capsys, "attack", run_dir, *args, "--out", out), *needles)
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_bad_sources_and_outputs(capsys, run_dir, tmp_path):
    assert_one_line_error(
        *cli(capsys, "attack", "--attack", "pgd", "--out", "a.npz"), "exactly one", "RUN_DIR"
    )
    assert_one_line_error(
        *cli(capsys, "attack", tmp_path / "nowhere", "--attack", "pgd", "--out", "a.npz"),
        "does not exist",
    )
    assert_one_line_error(
        *cli(
            capsys,
            "attack",
            "--model",
            "digits-cnn",
            "--weights",
            run_dir / "model.safetensors",
            "--attack",
            "pgd",
            "--out",
            "a.npz",
        ),
        "--dataset",
    )
    assert_one_line_error(*cli(capsys, "attack", run_dir, "--attack", "pgd"), "--out")
    assert_one_line_error(
        *cli(
            capsys, "attack", run_dir, "--attack", "pgd", "--out", tmp_path / "no" / "dir" / "a.npz"
        ),
        "does not exist",
    )
    assert_one_line_error(
        *cli(capsys, "attack", run_dir, "--attack", "pgd", "--out", "same.png"),
        "--out",
        "--png",
        "same file",
    )


WRONG_NET_PY = """\
from torch import nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
"""


def test_user_model_with_the_wrong_number_of_classes(capsys, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "net.py").write_text(WRONG_NET_PY)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "w.safetensors")
    assert_one_line_error(
        *cli(
            capsys,
            "attack",
            "--model-file",
            f"{tmp_path / 'net.py'}:make",
            "--weights",
            tmp_path / "w.safetensors",
            "--dataset",
            "digits",
            "--attack",
            "fgsm",
            "--out",
            "a.npz",
        ),
        "10 logits",
    )


def test_help_lists_the_attack_command(capsys):
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "attack" in out
    rc, out, _ = cli(capsys, "attack", "--help")
    assert rc == 0
    for flag in (
        "--attack",
        "--option",
        "--target-class",
        "--out",
        "--png",
        "--json",
        "--progress",
    ):
        assert flag in out
