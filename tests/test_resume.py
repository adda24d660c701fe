"""Resuming an interrupted training run ends with exactly the weights of an uninterrupted one.

In-process tests interrupt a run at chosen checkpoints (mid-epoch, between an epoch's files and
its checkpoint, with a torn newest checkpoint, with a method that keeps state between batches).
The end-to-end test starts ``advtrain train`` as a real process, kills it with SIGKILL while it
trains, resumes it with ``advtrain train --resume`` and compares the weights bit for bit with an
uninterrupted run. Everything runs on one CPU thread, where PyTorch's kernels are deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advtrain.checkpoint import load_checkpoint
from advtrain.cli import run
from advtrain.data import load_dataset
from advtrain.errors import AdvtrainError
from advtrain.models import build_model
from advtrain.training import METHODS, Method, TrainConfig, Trainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", seed=0)


def fresh_model(data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("digits-cnn", in_shape=data.info.shape, n_classes=data.info.n_classes)


# 10 batches per epoch, a checkpoint after batches 3, 6 and 9 and at the end of each epoch: the
# saves of epoch e are numbers 4e-3, 4e-2, 4e-1 (mid-epoch) and 4e (end). The options that
# draw random numbers or depend on the position are all on: augmentation (the batch generator),
# the PGD start (the global RNG), the schedule and the eps warm-up (the optimizer step).
CONFIG = dict(
    method="pgd",
    epochs=3,
    batch_size=128,
    attack_steps=2,
    eval_steps=1,
    seed=1,
    checkpoint_every=3,
    schedule="cosine",
    warmup_epochs=1,
    augment="crop",
    adv_ratio=0.5,
    device="cpu",
)


class Killed(Exception):
    """Stands for the process dying."""


def interrupt(trainer: Trainer, at: int, before_writing: bool = False) -> None:
    """Make the ``at``-th checkpoint of ``trainer`` the last thing it does (or nearly)."""
    save = trainer._save_resume
    count = 0

    def saving(*args):
        nonlocal count
        count += 1
        if count == at and before_writing:
            raise Killed
        save(*args)
        if count == at:
            raise Killed

    trainer._save_resume = saving


def without_seconds(records):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records]


def assert_same_run(run_dir: Path, reference: Path, result, expected) -> None:
    for name in ("model.safetensors", "last.safetensors"):
        got, meta = load_checkpoint(run_dir / name)
        want, want_meta = load_checkpoint(reference / name)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
        assert meta["epoch"] == want_meta["epoch"]
    assert without_seconds(result.history) == without_seconds(expected.history)
    assert result.best_epoch == expected.best_epoch
    assert result.test_robust_accuracy == expected.test_robust_accuracy
    assert result.test_clean_accuracy == expected.test_clean_accuracy
    epochs = [
        json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [r.epoch for r in expected.history]  # no epoch twice


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run of CONFIG: (run directory, result)."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = Trainer(fresh_model(data), data, TrainConfig(**CONFIG), run_dir)
    return run_dir, trainer.fit()


@pytest.mark.parametrize(
    "at, before_writing, where",
    [
        (6, False, (2, 6)),  # killed mid-epoch 2, right after a checkpoint
        (
            8,
            True,
            (2, 9),
        ),  # killed after epoch 2's metrics line and model files, before its checkpoint
        (1, True, None),  # killed before the first checkpoint: starts again from scratch
    ],
)
def test_interrupted_run_resumes_exactly(data, tmp_path, reference, at, before_writing, where):
    ref_dir, expected = reference
    config = TrainConfig(**CONFIG)
    first = Trainer(fresh_model(data), data, config, tmp_path)
    interrupt(first, at, before_writing)
    with pytest.raises(Killed):
        first.fit()
    lines: list[str] = []
    # from a checkpoint, another initialisation: every weight must come from the checkpoint
    # (with none, the run starts over from the initialisation it is given)
    second = Trainer(
        fresh_model(data, seed=0 if where is None else 123),
        data,
        config,
        tmp_path,
        log=lines.append,
    )
    result = second.fit(resume=True)
    if where is None:
        assert any("starting from the beginning" in line for line in lines)
    else:
        assert any(f"epoch {where[0]}, batch {where[1]}" in line for line in lines), lines
    assert_same_run(tmp_path, ref_dir, result, expected)
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, load_checkpoint(ref_dir / "model.safetensors")[0][key])


def test_a_torn_newest_checkpoint_falls_back_to_the_other_slot(data, tmp_path, reference):
    ref_dir, expected = reference
    config = TrainConfig(**CONFIG)
    first = Trainer(fresh_model(data), data, config, tmp_path)
    interrupt(first, 5)  # save 5 (epoch 2, batch 3) goes to slot 1, save 4 (end of 1) to slot 0
    with pytest.raises(Killed):
        first.fit()
    newest = tmp_path / "resume-1.safetensors"
    torn = bytearray(newest.read_bytes())
    torn[len(torn) // 2] ^= 0xFF  # as if the kill came while this file was being replaced
    newest.write_bytes(bytes(torn))
    lines: list[str] = []
    second = Trainer(fresh_model(data), data, config, tmp_path, log=lines.append)
    result = second.fit(resume=True)
    assert any("skipping resume-1.safetensors" in line for line in lines)
    assert any("the start of epoch 2" in line for line in lines)
    assert_same_run(tmp_path, ref_dir, result, expected)


class StatefulLoss(Method):
    """A method that keeps state between batches: a call counter (a tensor) that scales the
    loss, and from epoch 2 on a frozen copy of the model (a module) it is pulled towards."""

    def __init__(self, threat) -> None:
        super().__init__(threat)
        self.calls = torch.zeros(())
        self.teacher: torch.nn.Module | None = None

    def on_epoch_start(self, model, epoch, epochs):
        if epoch >= 2 and self.teacher is None:
            self.teacher = copy.deepcopy(model).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    def state_dict(self):
        state = {"calls": self.calls}
        if self.teacher is not None:
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return state

    def load_state_dict(self, state, model):
        self.calls = state["calls"].clone()
        weights = {k[8:]: v for k, v in state.items() if k.startswith("teacher.")}
        self.teacher = None
        if weights:
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
            self.teacher.load_state_dict(weights)

    def loss(self, model, x, y):
        self.calls = self.calls + 1
        logits = model(x)
        loss = F.cross_entropy(logits, y) * (1 + 0.5 * torch.sin(self.calls))
        if self.teacher is not None:
            loss = loss + 0.1 * F.mse_loss(logits, self.teacher(x))
        return loss, logits


def stateful_method(threat, *, steps=10, step_size=None):
    del steps, step_size
    return StatefulLoss(threat)


@pytest.mark.parametrize(
    "method, options",
    [
        ("test-stateful", {}),
        ("free", {"replays": 2}),
        ("distillation", {"temperature": 5.0}),
        ("fgsm-rs", {}),  # its state: the weight average it keeps by default
    ],
)
def test_methods_with_state_resume_exactly(data, tmp_path, monkeypatch, method, options):
    monkeypatch.setitem(METHODS, "test-stateful", stateful_method)
    if method not in METHODS:
        pytest.skip(f"method {method!r} is not there yet")
    config = TrainConfig(
        method=method,
        method_options=options,
        epochs=4,
        batch_size=128,
        eval_steps=1,
        seed=2,
        checkpoint_every=4,
        device="cpu",
    )
    reference = Trainer(fresh_model(data), data, config, tmp_path / "reference")
    expected = reference.fit()
    first = Trainer(fresh_model(data), data, config, tmp_path / "run")
    # the second checkpoint of the last epoch: mid-epoch, with the counter advanced and the
    # teacher (or the free perturbation) in place
    batches = first.batches_per_epoch
    per_epoch = (batches - 1) // 4 + 1
    interrupt(first, per_epoch * (first.run_epochs - 1) + 2)
    with pytest.raises(Killed):
        first.fit()
    second = Trainer(fresh_model(data), data, config, tmp_path / "run")
    result = second.fit(resume=True)
    assert_same_run(tmp_path / "run", tmp_path / "reference", result, expected)


def test_resume_refuses_another_configuration(data, tmp_path, reference):
    ref_dir, _ = reference
    other = TrainConfig(**{**CONFIG, "epochs": 5})
    with pytest.raises(AdvtrainError) as info:
        Trainer(fresh_model(data), data, other, ref_dir).fit(resume=True)
    assert "epochs" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AdvtrainError, match=r"config\.json"):
        Trainer(fresh_model(data), data, TrainConfig(**CONFIG), tmp_path / "none").fit(resume=True)
    with pytest.raises(AdvtrainError, match="run directory"):
        Trainer(fresh_model(data), data, TrainConfig(**CONFIG)).fit(resume=True)


def test_a_fresh_run_removes_old_checkpoints(data, tmp_path, reference):
    ref_dir, _ = reference
    (tmp_path / "resume-1.safetensors").write_bytes((ref_dir / "resume-1.safetensors").read_bytes())
    (tmp_path / "resume-1.json").write_bytes((ref_dir / "resume-1.json").read_bytes())
    config = TrainConfig(**CONFIG)
    first = Trainer(fresh_model(data), data, config, tmp_path)
    interrupt(first, 1, before_writing=True)
    with pytest.raises(Killed):
        first.fit()
    assert not (tmp_path / "resume-1.safetensors").exists()


# ---------------------------------------------------------------------- the command line

ARGS = [
    "train",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--attack-steps",
    "2",
    "--eval-steps",
    "1",
    "--checkpoint-every",
    "2",
    "--seed",
    "4",
    "--warmup-epochs",
    "1",
    "--augment",
    "noise",
    "--schedule",
    "onecycle",
    "--device",
    "cpu",
]


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("advtrain: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The uninterrupted run of ARGS, in this process (one thread, as the killed one)."""
    out = tmp_path_factory.mktemp("cli") / "reference"
    rc, _, err = cli(*ARGS, "--out", out, "--quiet")
    assert rc == 0, err
    return out


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "ADVTRAIN_MNIST_MIRROR": "http://127.0.0.1:9/",
    }


def test_killed_process_resumes_to_the_same_weights(tmp_path, cli_reference):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "advtrain", *ARGS, "--out", str(out), "--quiet"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        # wait for the first epoch's line: the run is then at the end of epoch 1 or in epoch 2,
        # whose mid-epoch checkpoints come every two batches
        while not (metrics.exists() and metrics.read_text().strip()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.005)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    assert {p.name for p in out.glob("resume-*.safetensors")}

    resumed = subprocess.run(
        [sys.executable, "-m", "advtrain", "train", "--resume", str(out)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    for name in ("model.safetensors", "last.safetensors"):
        got, _ = load_checkpoint(out / name)
        want, _ = load_checkpoint(cli_reference / name)
        assert set(got) == set(want)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} differs"
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    expected = json.loads((cli_reference / "summary.json").read_text())
    for key in ("best_epoch", "test_clean_accuracy", "test_robust_accuracy"):
        assert summary[key] == expected[key], key
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_flags(tmp_path, cli_reference):
    one_line_error(
        *cli("train", "--resume", cli_reference, "--epochs", "5")[::2],
        "--epochs 5",
        "run's 2",
        "--resume",
    )
    one_line_error(
        *cli("train", "--resume", cli_reference, "--method-option", "beta=2")[::2],
        "--method-option",
    )
    config = tmp_path / "run.toml"
    config.write_text("epochs = 3\n")
    one_line_error(*cli("train", "--resume", cli_reference, "--config", config)[::2], "--config")
    one_line_error(*cli("train", "--resume", tmp_path / "nope")[::2], "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(*cli("train", "--resume", tmp_path / "empty")[::2], "config.json")
    # the same values are accepted; a finished run is measured again, nothing retrained
    before = (cli_reference / "last.safetensors").read_bytes()
    rc, out, err = cli(
        "train",
        "--resume",
        cli_reference,
        "--epochs",
        "2",
        "--seed",
        "4",
        "--out",
        cli_reference,
        "--quiet",
    )
    assert rc == 0, err
    assert (cli_reference / "last.safetensors").read_bytes() == before
    assert "best epoch" in out


def test_train_flags_reach_the_config(tmp_path):
    out = tmp_path / "flags"
    rc, _, err = cli(
        "train",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--eval-steps",
        "1",
        "--method",
        "standard",
        "--method-option",
        "madeup=1",
        "--out",
        out,
    )
    one_line_error(rc, err, "madeup")
    rc, _, err = cli(
        "train",
        "--epochs",
        "2",
        "--batch-size",
        "256",
        "--eval-steps",
        "1",
        "--method",
        "standard",
        "--adv-ratio",
        "0.5",
        "--schedule",
        "piecewise",
        "--warmup-epochs",
        "1",
        "--augment",
        "crop",
        "--early-stop",
        "4",
        "--catastrophic",
        "warn",
        "--co-threshold",
        "0.3",
        "--noise-std",
        "0.1",
        "--amp",
        "off",
        "--channels-last",
        "off",
        "--no-tensorboard",
        "--ema-decay",
        "0.9",
        "--out",
        out,
        "--quiet",
    )
    assert rc == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["adv_ratio"] == 0.5 and saved["schedule"] == "piecewise"
    assert saved["warmup_epochs"] == 1 and saved["augment"] == ["crop"]
    assert saved["early_stop"] == 4 and saved["catastrophic"] == "warn"
    assert saved["co_threshold"] == 0.3 and saved["noise_std"] == 0.1
    assert saved["tensorboard"] is False and saved["amp"] == "off"
    assert saved["ema_decay"] == 0.9
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["eps"] for line in lines] == pytest.approx([0.2, 0.2])
    assert lines[1]["lr"] == pytest.approx(3e-5)  # piecewise: 0.01 x lr in the last quarter
    one_line_error(*cli("train", "--augment", "flip", "--out", tmp_path / "x")[::2], "mirror")
    one_line_error(*cli("train", "--schedule", "linear", "--out", tmp_path / "x")[::2], "linear")
    one_line_error(*cli("train", "--ema-decay", "1", "--out", tmp_path / "x")[::2], "ema_decay")
