"""The ``advtrain`` command line: bad input ends with one error line and exit status 2, never a
traceback; ``train`` writes a complete run directory and ``evaluate`` measures it.

Most tests call :func:`advtrain.cli.run` in-process; a few start real processes
(``python -m advtrain`` and the ``advtrain`` console script) to check what a user sees.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advtrain.checkpoint import load_checkpoint
from advtrain.cli import run

from .conftest import MNIST_DIR, MODELS_DIR, require

TINY = ["--epochs", "1", "--eval-steps", "2", "--attack-steps", "3"]
MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread, and do not collapse when other processes share
    the two cores (OpenMP's barriers spin); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Run in a scratch directory, and make any MNIST download fail at once instead of reaching
    the network (nothing here should download)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADVTRAIN_DATA", raising=False)
    monkeypatch.setenv("ADVTRAIN_MNIST_MIRROR", "http://127.0.0.1:9/")


def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = run([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, *needles: str) -> str:
    """Exit status 2 and exactly one line ``advtrain: error: ...`` naming every needle."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("advtrain: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def subprocess_env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "ADVTRAIN_MNIST_MIRROR": "http://127.0.0.1:9/",
    }


def console_script() -> str:
    beside = Path(sys.executable).parent / "advtrain"
    if beside.is_file():
        return str(beside)
    found = shutil.which("advtrain")
    assert found, "the advtrain console script is not installed"
    return found


def flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- a trained run, once


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``advtrain train`` with tiny settings (digits, PGD): (exit status, stdout, stderr, run
    directory)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run(["train", *TINY, "--out", str(run_dir), "--quiet"])
    return rc, out.getvalue(), err.getvalue(), run_dir


@pytest.fixture
def run_dir(trained_run):
    rc, _, err, path = trained_run
    assert rc == 0, err
    return path


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the trained run directory, to damage."""
    return Path(shutil.copytree(run_dir, tmp_path / "run-copy"))


# ---------------------------------------------------------------------- train: happy paths


def test_train_writes_a_complete_run_directory(trained_run):
    rc, out, err, run_dir = trained_run
    assert rc == 0, err
    assert "Traceback" not in err
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.json",
        "metrics.jsonl",
        "model.safetensors",
        "model.json",
        "last.safetensors",
        "summary.json",
    } <= names

    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "digits" and config["model"] == "digits-cnn"
    assert config["method"] == "pgd"
    assert (config["epochs"], config["eval_steps"], config["attack_steps"]) == (1, 2, 3)

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["epoch"] == 1
    for key in ("val_clean_accuracy", "val_robust_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    assert record["val_robust_accuracy"] <= record["val_clean_accuracy"]

    sidecar = json.loads((run_dir / "model.json").read_text())
    assert sidecar["model"] == "digits-cnn"
    assert (
        sidecar["sha256"]
        == hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    )
    assert sidecar["eps"] == pytest.approx(0.2) and sidecar["norm"] == "linf"
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    assert meta["epoch"] == 1 and state

    summary = json.loads((run_dir / "summary.json").read_text())
    clean, robust = summary["test_clean_accuracy"], summary["test_robust_accuracy"]
    assert 0.0 <= robust <= clean <= 1.0
    assert summary["best_epoch"] == 1
    # stdout reports the test figures of summary.json
    assert f"test clean accuracy {clean:.2%}" in out
    assert f"robust accuracy {robust:.2%}" in out
    assert str(run_dir) in out


def test_train_reads_toml_config_and_flags_override_it(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        '[train]\nepochs = 1\nmethod = "standard"\neval-steps = 2\n'
        "batch_size = 128\nseed = 3\neps = 0.15\n"
    )
    out_dir = tmp_path / "toml-run"
    rc, _, err = cli(
        capsys, "train", "--config", config, "--seed", "7", "--out", out_dir, "--quiet"
    )
    assert rc == 0, err
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["method"] == "standard"  # from the file
    assert saved["epochs"] == 1 and saved["eval_steps"] == 2 and saved["batch_size"] == 128
    assert saved["seed"] == 7  # the flag beats the file
    assert saved["attack_steps"] == 10  # neither: the default
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert json.loads((out_dir / "model.json").read_text())["method"] == "standard"
    assert json.loads((out_dir / "model.json").read_text())["eps"] == pytest.approx(0.15)
    # evaluate takes the run's eps (not the dataset's 0.2) unless told otherwise
    rc, _, err = cli(
        capsys,
        "evaluate",
        out_dir,
        "--n",
        "20",
        "--suite",
        "pgd",
        "--steps",
        "1",
        "--json",
        tmp_path / "e.json",
    )
    assert rc == 0, err
    assert "eps=0.15" in json.loads((tmp_path / "e.json").read_text())["attack"]


def test_train_without_quiet_logs_each_epoch(capsys, tmp_path):
    rc, out, err = cli(
        capsys,
        "train",
        "--method",
        "standard",
        "--epochs",
        "2",
        "--eval-steps",
        "1",
        "--batch-size",
        "256",
        "--out",
        tmp_path / "loud",
    )
    assert rc == 0, err
    assert "training digits-cnn on digits" in out
    assert len(re.findall(r"^epoch +\d/2 ", out, flags=re.M)) == 2


# ---------------------------------------------------------------------- evaluate: happy paths


def test_evaluate_run_dir_writes_json(capsys, run_dir, tmp_path):
    target = tmp_path / "out.json"
    rc, out, err = cli(
        capsys, "evaluate", run_dir, "--n", "50", "--suite", "pgd", "--steps", "3", "--json", target
    )
    assert rc == 0, err
    figures = json.loads(target.read_text())
    assert figures["n"] == 50
    assert figures["dataset"] == "digits"
    assert "steps=3" in figures["attack"] and "eps=0.2" in figures["attack"]
    assert 0.0 <= figures["robust_accuracy"] <= figures["clean_accuracy"] <= 1.0
    assert figures["clean_accuracy"] > 0.3  # a trained model, far above chance (0.1)
    assert f"clean accuracy {figures['clean_accuracy']:.2%}" in out and "n=50" in out


def test_evaluate_run_dir_reproduces_the_training_summary(capsys, run_dir, tmp_path):
    """Default evaluation (PGD-40, the run's seed, split and eps) gives the test figures that
    training wrote to summary.json."""
    target = tmp_path / "full.json"
    rc, _, err = cli(capsys, "evaluate", run_dir, "--suite", "pgd", "--json", target)
    assert rc == 0, err
    figures = json.loads(target.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert figures["n"] == 360
    assert figures["clean_accuracy"] == pytest.approx(summary["test_clean_accuracy"])
    assert figures["robust_accuracy"] == pytest.approx(summary["test_robust_accuracy"])


def test_evaluate_released_mnist_checkpoint(capsys, tmp_path):
    weights = require(MODELS_DIR / "pgd_madry.pth")
    data_dir = require(MNIST_DIR)
    target = tmp_path / "madry.json"
    rc, _, err = cli(
        capsys,
        "evaluate",
        "--model",
        "mnist-small",
        "--weights",
        weights,
        "--dataset",
        "mnist",
        "--data-dir",
        data_dir,
        "--n",
        "100",
        "--suite",
        "pgd",
        "--steps",
        "5",
        "--json",
        target,
    )
    assert rc == 0, err
    figures = json.loads(target.read_text())
    assert figures["n"] == 100 and figures["dataset"] == "mnist"
    assert "eps=0.3" in figures["attack"]
    assert figures["clean_accuracy"] >= 0.95
    assert 0.8 <= figures["robust_accuracy"] <= figures["clean_accuracy"]  # a PGD-trained model


NET_PY = """\
from torch import nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
"""


def test_evaluate_user_model_file(capsys, tmp_path):
    from safetensors.torch import save_file

    from advtrain.data import load_dataset

    (tmp_path / "net.py").write_text(NET_PY)
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):  # full-batch logistic regression: about 95% test accuracy
        loss = torch.nn.functional.cross_entropy(model(data.train.x), data.train.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )

    target = tmp_path / "user.json"
    user_model = (
        "--model-file",
        f"{tmp_path / 'net.py'}:make",
        "--weights",
        tmp_path / "w.safetensors",
        "--dataset",
        "digits",
    )
    rc, _, err = cli(
        capsys,
        "evaluate",
        *user_model,
        "--n",
        "50",
        "--suite",
        "pgd",
        "--steps",
        "2",
        "--json",
        target,
    )
    assert rc == 0, err
    figures = json.loads(target.read_text())
    assert figures["n"] == 50
    # the self-test names a readout the model does not have before any attack runs
    rc, _, err = cli(
        capsys,
        "evaluate",
        *user_model,
        "--n",
        "5",
        "--suite",
        "quick",
        "--self-test",
        "--self-test-features",
        "head",
    )
    assert rc == 2 and "self-test: the model has no module named 'head'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # the sandwich: verified accuracy (CROWN) beside the attacks' robust accuracy
    certified = tmp_path / "certified.json"
    rc, out, err = cli(
        capsys,
        "evaluate",
        *user_model,
        "--n",
        "20",
        "--suite",
        "quick",
        "--eps",
        "0.01",
        "--certify",
        "crown",
        "--json",
        certified,
    )
    assert rc == 0, err
    sandwich = json.loads(certified.read_text())["certified"]
    assert 0 < sandwich["verified_accuracy"] <= sandwich["robust_accuracy"]
    assert "certified (crown): verified" in out + err
    # the weights were loaded: an untrained linear layer would sit near 10%
    assert figures["clean_accuracy"] >= 0.85
    assert 0.0 <= figures["robust_accuracy"] <= figures["clean_accuracy"]


def test_help_and_version_in_process(capsys):
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "train" in out and "evaluate" in out
    rc, out, _ = cli(capsys, "train", "--help")
    assert rc == 0 and "--attack-steps" in out and "--config" in out
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and importlib.metadata.version("advtrain") in out


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["train", "--dataset", "nope"],
            ["unknown dataset", "'nope'", "breast-cancer", "digits", "fraud", "mnist"],
        ),
        (
            ["train", "--model", "nope"],
            [
                "unknown model",
                "'nope'",
                "digits-cnn",
                "mlp",
                "mnist-large",
                "mnist-small",
                "preact-resnet18",
            ],
        ),
        (
            ["train", "--method", "nope", "--epochs", "1"],
            ["unknown method", "'nope'", "pgd", "standard"],
        ),
        (["train", "--norm", "l7"], ["unknown norm", "'l7'", "linf", "l2", "l1"]),
        (["train", "--optimizer", "rmsprop"], ["optimizer", "rmsprop", "adam", "sgd"]),
        (
            ["evaluate", "--model", "nope", "--weights", "w.pth", "--dataset", "digits"],
            ["unknown model", "'nope'", "mnist-small"],
        ),
        (
            ["evaluate", "--model", "digits-cnn", "--weights", "w.pth", "--dataset", "nope"],
            ["unknown dataset", "'nope'", "digits"],
        ),
    ],
)
def test_unknown_names(capsys, args, needles):
    assert_one_line_error(*cli(capsys, *args), *needles)


@pytest.mark.parametrize(
    "value, needles",
    [
        ("-0.1", ["eps", "-0.1"]),
        ("nan", ["eps", "nan"]),
        ("inf", ["eps", "inf"]),
        ("abc", ["--eps", "abc"]),
    ],
)
def test_bad_eps_for_train(capsys, value, needles):
    assert_one_line_error(*cli(capsys, "train", "--eps", value, *TINY), *needles)


@pytest.mark.parametrize(
    "value, needles",
    [("nan", ["eps", "nan"]), ("-1", ["eps", "-1"]), ("1e-3x", ["--eps", "1e-3x"])],
)
def test_bad_eps_for_evaluate(capsys, run_dir, value, needles):
    assert_one_line_error(*cli(capsys, "evaluate", run_dir, "--eps", value, "--n", "5"), *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--epochs", "0"], ["epochs", "0"]),
        (["train", "--epochs", "two"], ["--epochs", "two"]),
        (["train", "--lr", "-1"], ["lr"]),
        (["train", "--batch-size", "0"], ["batch_size"]),
    ],
)
def test_bad_numbers_for_train(capsys, args, needles):
    assert_one_line_error(*cli(capsys, *args), *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--steps", "0"], ["--steps", "0"]),
        (["--n", "0"], ["--n", "0"]),
        (["--restarts", "0"], ["restarts"]),
        (["--step-size", "-1"], ["step_size"]),
    ],
)
def test_bad_numbers_for_evaluate(capsys, run_dir, args, needles):
    assert_one_line_error(*cli(capsys, "evaluate", run_dir, "--suite", "pgd", *args), *needles)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--suite", "fast"], ["unknown suite", "fast", "quick, standard, thorough, pgd"]),
        (["--steps", "5"], ["--steps", "--suite pgd"]),
        (["--suite", "pgd", "--html", "r.html"], ["--html", "pgd"]),
    ],
)
def test_bad_suite_flags_for_evaluate(capsys, run_dir, args, needles):
    assert_one_line_error(*cli(capsys, "evaluate", run_dir, "--n", "5", *args), *needles)


def test_evaluate_suite_writes_json_and_html(capsys, run_dir, tmp_path):
    rc, out, err = cli(
        capsys,
        "evaluate",
        run_dir,
        "--n",
        "16",
        "--suite",
        "quick",
        "--json",
        tmp_path / "r.json",
        "--html",
        tmp_path / "r.html",
    )
    assert rc == 0, err
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["settings"]["n"] == 16 and figures["settings"]["suite"] == "quick"
    assert figures["settings"]["dataset"] == "digits" and figures["settings"]["eps"] == 0.2
    # the quick suite's cascade, in order; a check that fires on this barely trained model may
    # add escalation steps between them, each recorded as an escalation
    suite = ["apgd-ce", "apgd-t", "square"]
    steps = list(figures["per_attack"])
    assert [step for step in steps if step in suite] == suite
    assert len(steps) == len(suite) or figures["escalations"], steps
    assert f"robust accuracy {figures['robust_accuracy']:.2%}" in out
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page


def test_missing_data_directory(capsys):
    assert_one_line_error(
        *cli(capsys, "train", "--dataset", "mnist", "--data-dir", "/does/not/exist", *TINY),
        "/does/not/exist",
        "does not exist",
    )


def mnist_copy(tmp_path: Path) -> Path:
    """A data directory with links to the real MNIST files (to replace one of them)."""
    source = require(MNIST_DIR)
    target = tmp_path / "mnist"
    target.mkdir()
    for name in MNIST_NAMES:
        (target / name).symlink_to(source / name)
    return target


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


def _other_content(data: bytes) -> bytes:  # a valid gzip of changed content
    content = bytearray(gzip.decompress(data))
    content[-1] ^= 0x01
    return gzip.compress(bytes(content))


@pytest.mark.parametrize(
    "name, damage, needle",
    [
        ("t10k-labels-idx1-ubyte.gz", _truncate, "gzip"),
        ("train-labels-idx1-ubyte.gz", _flip, "gzip"),
        ("t10k-labels-idx1-ubyte.gz", _other_content, "checksum mismatch"),
    ],
)
def test_corrupt_mnist_file(capsys, tmp_path, name, damage, needle):
    data_dir = mnist_copy(tmp_path)
    link = data_dir / name
    original = link.read_bytes()
    link.unlink()
    link.write_bytes(damage(original))
    assert_one_line_error(
        *cli(
            capsys,
            "train",
            "--dataset",
            "mnist",
            "--model",
            "mnist-small",
            "--data-dir",
            data_dir,
            *TINY,
            "--out",
            tmp_path / "never",
        ),
        name,
        needle,
    )
    assert not (tmp_path / "never").exists()


def test_mnist_file_missing_and_no_mirror(capsys, tmp_path):
    data_dir = mnist_copy(tmp_path)
    (data_dir / "t10k-images-idx3-ubyte.gz").unlink()
    assert_one_line_error(
        *cli(capsys, "train", "--dataset", "mnist", "--data-dir", data_dir, *TINY),
        "download",
        "t10k-images-idx3-ubyte.gz",
    )
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        n for n in MNIST_NAMES if n != "t10k-images-idx3-ubyte.gz"
    )  # no partial file left


def test_corrupt_checkpoint_in_run_dir(capsys, run_copy):
    flip_byte(run_copy / "model.safetensors")
    assert_one_line_error(
        *cli(capsys, "evaluate", run_copy, "--n", "5", "--suite", "pgd", "--steps", "1"),
        "corrupt checkpoint",
        "model.safetensors",
        "SHA-256",
    )


def test_truncated_checkpoint_without_sidecar(capsys, run_copy):
    weights = run_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (run_copy / "model.json").unlink()
    assert_one_line_error(
        *cli(capsys, "evaluate", run_copy, "--n", "5", "--suite", "pgd", "--steps", "1"),
        "model.safetensors",
    )


def test_run_dir_without_config(capsys, run_copy):
    (run_copy / "config.json").unlink()
    assert_one_line_error(*cli(capsys, "evaluate", run_copy, "--n", "5"), "config.json", "missing")


def test_run_dir_that_does_not_exist(capsys, tmp_path):
    assert_one_line_error(*cli(capsys, "evaluate", tmp_path / "nope"), "nope", "does not exist")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_garbage_weights_file(capsys, tmp_path, suffix):
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{this is not a checkpoint" * 3)
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model",
            "digits-cnn",
            "--weights",
            garbage,
            "--dataset",
            "digits",
            "--n",
            "5",
            "--suite",
            "pgd",
            "--steps",
            "1",
        ),
        str(garbage),
    )


def test_garbage_weights_for_a_run_dir(capsys, run_dir, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    assert_one_line_error(
        *cli(capsys, "evaluate", run_dir, "--weights", garbage, "--n", "5"), str(garbage)
    )


def test_missing_weights_file(capsys, tmp_path):
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model",
            "digits-cnn",
            "--weights",
            tmp_path / "w.pth",
            "--dataset",
            "digits",
        ),
        "w.pth",
        "not found",
    )


def test_pickled_module_is_not_a_state_dict(capsys, tmp_path):
    data_dir = require(MNIST_DIR)
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model",
            "mnist-small",
            "--weights",
            path,
            "--dataset",
            "mnist",
            "--data-dir",
            data_dir,
            "--n",
            "5",
            "--suite",
            "pgd",
            "--steps",
            "1",
        ),
        str(path),
        "not a plain state dict",
        "Linear",
    )


def test_weights_of_another_architecture(capsys):
    weights = require(MODELS_DIR / "fgsm.pth")
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model",
            "digits-cnn",
            "--weights",
            weights,
            "--dataset",
            "digits",
            "--n",
            "5",
            "--suite",
            "pgd",
            "--steps",
            "1",
        ),
        "fgsm.pth",
        "does not fit",
        "shape mismatch",
    )


def test_bad_toml_syntax(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepochs = \n")
    assert_one_line_error(*cli(capsys, "train", "--config", path), "bad.toml", "not valid TOML")


def test_unknown_toml_key(capsys, tmp_path):
    path = tmp_path / "unknown.toml"
    path.write_text("[train]\nepochz = 1\n")
    line = assert_one_line_error(*cli(capsys, "train", "--config", path), "epochz")
    assert "epochs" in line  # the known keys are listed


def test_bad_toml_value(capsys, tmp_path):
    path = tmp_path / "nan.toml"
    path.write_text("eps = nan\n")
    assert_one_line_error(*cli(capsys, "train", "--config", path), "eps", "nan")


@pytest.mark.parametrize("name", ["none.toml", "two\nlines.toml"])
def test_missing_config_file(capsys, tmp_path, name):
    line = assert_one_line_error(
        *cli(capsys, "train", "--config", tmp_path / name), "does not exist"
    )
    assert " ".join(name.split()) in line  # a newline in a file name still gives one line


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--model", "digits-cnn", "--model-file", "net.py:make", "--weights", "w.pth"],
        ["RUN", "--model", "digits-cnn"],
        ["RUN", "--model-file", "net.py:make"],
    ],
)
def test_evaluate_needs_exactly_one_model_source(capsys, run_dir, args):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    assert_one_line_error(
        *cli(capsys, "evaluate", *args), "exactly one", "RUN_DIR", "--model-file", "--model"
    )


def test_evaluate_model_needs_weights_and_dataset(capsys, tmp_path):
    assert_one_line_error(
        *cli(capsys, "evaluate", "--model", "digits-cnn", "--dataset", "digits"), "--weights"
    )
    assert_one_line_error(
        *cli(capsys, "evaluate", "--model", "digits-cnn", "--weights", "w.pth"), "--dataset"
    )


def test_user_model_file_problems(capsys, tmp_path):
    (tmp_path / "net.py").write_text(NET_PY)
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model-file",
            f"{tmp_path / 'net.py'}:nothing",
            "--weights",
            "w.pth",
            "--dataset",
            "digits",
        ),
        "nothing",
    )
    assert_one_line_error(
        *cli(
            capsys,
            "evaluate",
            "--model-file",
            "missing.py:make",
            "--weights",
            "w.pth",
            "--dataset",
            "digits",
        ),
        "missing.py",
        "not found",
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--bogus"], "--bogus"),
        (["evaluate", "--bogus", "1"], "--bogus"),
        (["train", "--epochs"], "--epochs"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_unknown_options_and_commands(capsys, args, needle):
    assert_one_line_error(*cli(capsys, *args), needle)


# Inputs that once ended in a traceback (found while writing these tests); now regressions.
_ONCE_TRACEBACKS = [
    pytest.param(["train", "--device", "nope", *TINY, "--quiet"], ["nope"], id="train-device-nope"),
    pytest.param(["train", "--seed", "-1", *TINY, "--quiet"], ["seed"], id="train-negative-seed"),
    pytest.param(
        ["evaluate", "RUN", "--device", "nope", "--n", "5"], ["nope"], id="evaluate-device-nope"
    ),
    pytest.param(
        ["evaluate", "RUN", "--batch-size", "0", "--n", "5"], ["batch"], id="evaluate-batch-size-0"
    ),
    pytest.param(
        ["evaluate", "RUN", "--seed", "-3", "--n", "5"], ["seed"], id="evaluate-negative-seed"
    ),
    pytest.param(["train", "--config", "OUT_INT", "--quiet"], ["out"], id="toml-out-not-a-string"),
    pytest.param(
        ["train", "--config", "MIXED", "--quiet"], ["[train]"], id="toml-keys-outside-table"
    ),
]


@pytest.mark.parametrize("args, needles", _ONCE_TRACEBACKS)
def test_inputs_that_once_raised(capsys, run_dir, tmp_path, args, needles):
    (tmp_path / "out.toml").write_text("out = 5\nepochs = 1\neval_steps = 1\nattack_steps = 1\n")
    (tmp_path / "mixed.toml").write_text("epochs = 1\n[train]\neval_steps = 1\n")
    names = {
        "RUN": str(run_dir),
        "OUT_INT": str(tmp_path / "out.toml"),
        "MIXED": str(tmp_path / "mixed.toml"),
    }
    assert_one_line_error(*cli(capsys, *[names.get(a, a) for a in args]), *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    rc, out, err = cli(
        capsys, "train", "--device", "cuda", *TINY, "--quiet", "--out", tmp_path / "r"
    )
    assert_one_line_error(rc, out, err, "CUDA is not available")


def test_bare_command_prints_help(capsys):
    rc, out, err = cli(capsys)
    assert rc == 0 and "Commands:" in out and "train" in out and "evaluate" in out and not err


# ---------------------------------------------------------------------- real processes

# name -> (launcher, arguments); CORRUPT_RUN is a copy of the trained run with a flipped byte.
PROCESSES = {
    "unknown-dataset": ("module", ["train", "--dataset", "nope"]),
    "nan-eps": ("script", ["train", "--eps", "nan"]),
    "corrupt-run": ("script", ["evaluate", "CORRUPT_RUN", "--n", "5"]),
    "help": ("module", ["--help"]),
    "version": ("script", ["--version"]),
}


@pytest.fixture(scope="module")
def processes(run_dir_module, tmp_path_factory):
    """Every command of PROCESSES run as a real process, all at once (each spends seconds
    importing torch): name -> (exit status, stdout, stderr)."""
    scratch = tmp_path_factory.mktemp("processes")
    corrupt = Path(shutil.copytree(run_dir_module, scratch / "corrupt-run"))
    flip_byte(corrupt / "model.safetensors")
    started = {}
    for name, (launcher, args) in PROCESSES.items():
        args = [str(corrupt) if a == "CORRUPT_RUN" else a for a in args]
        command = [sys.executable, "-m", "advtrain"] if launcher == "module" else [console_script()]
        started[name] = subprocess.Popen(
            command + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=scratch,
            env=subprocess_env(),
        )
    results = {}
    for name, process in started.items():
        out, err = process.communicate(timeout=180)
        results[name] = (process.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def run_dir_module(trained_run):
    rc, _, err, path = trained_run
    assert rc == 0, err
    return path


@pytest.mark.parametrize(
    "name, needles",
    [
        ("unknown-dataset", ["unknown dataset", "'nope'", "mnist"]),  # python -m advtrain
        ("nan-eps", ["eps", "nan"]),  # the console script
        ("corrupt-run", ["corrupt checkpoint", "model.safetensors"]),
    ],
)
def test_error_in_a_real_process(processes, name, needles):
    rc, out, err = processes[name]
    assert_one_line_error(rc, out, err, *needles)
    assert out == ""


def test_help_in_a_real_process(processes):
    rc, out, err = processes["help"]
    assert rc == 0, err
    assert "Usage: advtrain" in out and "train" in out and "evaluate" in out
    assert err == ""


def test_version_in_a_real_process(processes):
    rc, out, err = processes["version"]
    assert rc == 0, err
    assert importlib.metadata.version("advtrain") in out
    assert err == ""
