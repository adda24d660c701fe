"""Evaluation of data sets read a chunk at a time: the same report as in memory, flat memory,
resuming after a real SIGKILL bit for bit, inputs checked before any work, few-class suites."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import advtrain
from advtrain.errors import AdvtrainError
from advtrain.evaluation.cascade import Cascade
from advtrain.evaluation.inputs import logits_only
from advtrain.evaluation.journal import Journal
from advtrain.evaluation.points import TensorPoints
from advtrain.evaluation.progress import terminal_progress
from advtrain.evaluation.shards import Shards
from advtrain.evaluation.steps import Step, suite_attacks

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("seconds", "seconds_by_stage")


def _model(n_classes: int, channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, n_classes),
    ).eval()


def _data(n: int, n_classes: int, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Points the model classifies mostly correctly (its own labels, a few flipped)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % n_classes
    return x, y


def _comparable(report: advtrain.Report) -> dict:
    data = report.to_dict()
    for key in TIMINGS:
        data["settings"].pop(key)
    return data


class Rows:
    """An indexable source with labels, read on demand (like advtrain.data.LazyInputs)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.labels, self.reads = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        self.reads += len(index)
        return self.x[index].clone()


def test_streamed_equals_in_memory_on_the_same_points_and_seed() -> None:
    model = _model(4)
    x, y = _data(12, 4, model)
    options = {
        "eps": 0.3,
        "suite": "quick",
        "batch_size": 8,
        "seed": 3,
        "diagnostics_points": 4,
        "progress": False,
    }
    in_memory = advtrain.evaluate(model, x, y, **options)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    streamed = advtrain.evaluate(model, loader, **options)
    rows = Rows(x, y)
    lazy = advtrain.evaluate(model, rows, **options)
    assert _comparable(streamed) == _comparable(in_memory)
    assert _comparable(lazy) == _comparable(in_memory)
    assert rows.reads > len(x)  # read in chunks, several times, never held
    for key in ("x", "x_adv", "adv_pred"):
        assert torch.equal(streamed.examples[key], in_memory.examples[key])
    assert 0 < in_memory.robust_accuracy < in_memory.clean_accuracy
    card = in_memory.model_card
    assert card["threat_model"] == "Linf" and card["eps"] == 0.3
    assert card["clean_acc"] == round(100 * in_memory.clean_accuracy, 2)
    assert card["number_forward_passes"] == 1 and card["forward_passes_used"] > 12 * 100
    assert card["unreliable"] is False
    stages = in_memory.settings["seconds_by_stage"]
    assert {"clean predictions", "apgd-ce", "apgd-t", "square", "diagnostics", "report"} <= set(
        stages
    )


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from torch import nn
    from torch.utils.data import Dataset
    import advtrain

    torch.set_num_threads(1)

    class Generated(Dataset):
        # 3x64x64 images made from their index: nothing is stored
        def __init__(self, n):
            self.n = n
        def __len__(self):
            return self.n
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.rand(3, 64, 64, generator=g), 1 if i % 100 else 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():  # class 0 just above the boundary (means are 0.5): right on 1 in 100
        model[2].weight.copy_(torch.tensor([[10.0, 10.0, 10.0], [0.0, 0.0, 0.0]]) / 3)
        model[2].bias.copy_(torch.tensor([-4.9, 0.0]))
    for n in (100, 600):
        report = advtrain.evaluate(model, Generated(n), eps=0.01, suite="quick", batch_size=50,
                                   diagnostics_points=4, progress=False)
        print(report.settings["n"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_streamed_memory_is_flat_as_n_grows(tmp_path: Path) -> None:
    # the peak resident memory (never lower than it was) after 100 points, then after 600: the
    # 500 more 3x64x64 float images are 24 MiB, which the peak would grow by if they were held
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    assert [int(out[0]), int(out[2])] == [100, 600]
    grown_kib = int(out[3]) - int(out[1])
    assert grown_kib < 12 * 1024, f"the streamed peak grew by {grown_kib} KiB"


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch import nn
    import advtrain

    torch.set_num_threads(1)
    state, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 4
    report = advtrain.evaluate(model, x, y, eps=0.3, suite="quick", batch_size=2, seed=5,
                               diagnostics_points=4,
                               resume=state if state != "-" else None, progress=False)
    data = report.to_dict()
    for key in ("seconds", "seconds_by_stage"):
        data["settings"].pop(key)
    open(out, "w").write(json.dumps(data, sort_keys=True))
    """
)


def test_resume_after_sigkill_ends_with_the_same_report_bit_for_bit(tmp_path: Path) -> None:
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    state = tmp_path / "state"

    def run(state_arg: str, out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), state_arg, str(out)], cwd=ROOT)

    killed = run(str(state), tmp_path / "never.json")
    units = state / "units"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        if units.is_dir() and len(list(units.glob("*.safetensors"))) >= 5:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the evaluation ended before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    saved = len(list(units.glob("*.safetensors")))
    assert saved >= 5 and not (tmp_path / "never.json").exists()

    resumed, whole = run(str(state), tmp_path / "resumed.json"), run("-", tmp_path / "whole.json")
    assert resumed.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0
    assert len(list(units.glob("*.safetensors"))) > saved
    resumed_text = (tmp_path / "resumed.json").read_text()
    assert resumed_text == (tmp_path / "whole.json").read_text()
    assert json.loads(resumed_text)["clean_accuracy"] > json.loads(resumed_text)["robust_accuracy"]


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    model = _model(3)
    x, y = _data(12, 3, model)
    options = {"suite": "quick", "batch_size": 6, "progress": False, "resume": tmp_path / "s"}
    first = advtrain.evaluate(model, x, y, eps=0.05, **options)
    again = advtrain.evaluate(model, x, y, eps=0.05, **options)  # all replayed
    assert _comparable(again) == _comparable(first)
    with pytest.raises(AdvtrainError, match=r"other settings \(threat differ"):
        advtrain.evaluate(model, x, y, eps=0.1, **options)
    with pytest.raises(AdvtrainError, match="points differ"):
        advtrain.evaluate(model, x.flip(0), y.flip(0), eps=0.05, **options)


def test_targeted_steps_ask_for_at_most_n_classes_minus_one_targets() -> None:
    threat = advtrain.ThreatModel(norm="linf", eps=0.1)
    for suite in ("quick", "standard", "thorough"):
        for n_classes in range(2, 11):
            for step in suite_attacks(suite, threat, n_classes, seed=0):
                targets = getattr(step.attack, "n_targets", None)
                assert targets is None or 1 <= targets <= n_classes - 1, (suite, step.name)
    model = _model(8, seed=8)  # an 8-class set through the standard suite (AutoAttack #110)
    x, y = _data(6, 8, model)
    report = advtrain.evaluate(model, x, y, eps=0.05, suite="standard", progress=False)
    assert report.settings["n_classes"] == 8 and "apgd-t" in report.per_attack


def test_inputs_are_checked_before_any_work() -> None:
    model = _model(3)
    x, y = _data(6, 3, model)
    with pytest.raises(AdvtrainError, match=r"label 17 is outside 0\.\.2"):
        advtrain.evaluate(model, x, torch.tensor([0, 1, 2, 17, 0, 1]), progress=False)
    with pytest.raises(AdvtrainError, match="bounds"):
        advtrain.evaluate(model, x * 255, y, progress=False)

    class Pixels(Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return x[i] * 255, int(y[i])

    with pytest.raises(AdvtrainError, match="bounds"):
        advtrain.evaluate(model, Pixels(), progress=False)

    class Pair(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner(x), x

    points = TensorPoints(x)
    assert logits_only(model, points, seed=0) is model  # a tensor output needs no adapter
    adapted = logits_only(Pair(model), points, seed=0)
    assert torch.equal(adapted(x), model(x))

    class Words(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "no logits"

    with pytest.raises(AdvtrainError, match="logits"):
        advtrain.evaluate(Words(), x, y, progress=False)


def test_progress_bar_on_request_and_quiet_off_a_terminal(capfd: pytest.CaptureFixture) -> None:
    model = _model(3)
    x, y = _data(8, 3, model)
    threat = advtrain.ThreatModel(norm="linf", eps=0.3)
    step = Step("pgd-2", advtrain.PGD(threat, steps=2))
    with torch.no_grad():
        pred = model(x).argmax(1)
    with terminal_progress(True) as bar:
        state = Cascade(x, y, threat, lambda p: model(p).argmax(1), pred == y, pred.clone())
        state.shards = Shards(len(x), 4)
        state.progress = bar
        state.run(step, model)
    shown = capfd.readouterr().err
    assert "pgd-2" in shown and "standing" in shown and "2/2" in shown
    with terminal_progress(None) as bar:  # standard error is no terminal under pytest
        assert bar is None


def test_a_step_run_twice_on_one_cascade_is_journaled_as_two_units(tmp_path: Path) -> None:
    model = _model(3)
    x, y = _data(8, 3, model)
    threat = advtrain.ThreatModel(norm="linf", eps=0.05)  # leaves survivors for the second run
    step = Step("pgd-2", advtrain.PGD(threat, steps=2, seed=0))

    def run(journal: Journal) -> Cascade:
        with torch.no_grad():
            pred = model(x).argmax(1)
        state = Cascade(
            x, y, threat, lambda p: model(p).argmax(1), pred == y, pred.clone(), journal=journal
        )
        state.run(step, model)
        state.run(step.seeded(1), model)  # an escalation repeating a step's name
        return state

    saving = Journal(tmp_path, {"settings": 1})
    first = run(saving)
    journal = Journal(tmp_path, {"settings": 1})
    again = run(journal)
    assert saving.written == 2 and journal.replayed == 2 and journal.written == 0
    assert torch.equal(again.standing, first.standing) and again.broken_by == first.broken_by


def test_a_streamed_set_the_model_gets_all_wrong_still_reports() -> None:
    model = _model(3)
    x, _ = _data(6, 3, model)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 3
    report = advtrain.evaluate(model, TensorDataset(x, wrong), eps=0.1, progress=False)
    assert report.clean_accuracy == 0 == report.robust_accuracy
    assert report.examples["x_adv"].shape == (0, 3, 8, 8)
