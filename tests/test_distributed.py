"""Data-parallel training under torchrun (2 gloo processes on the CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advtrain.checkpoint import load_checkpoint

ARGS = ["train", "--epochs", "2", "--batch-size", "64", "--quiet"]  # digits: last batch partial


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def advtrain(*args: str | Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "advtrain", *map(str, args)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # torchrun's own report comes last; the ranks' messages (errors, aborts) before it
    said = [line for line in result.stderr.splitlines() if "rror" in line or "terminate" in line]
    assert result.returncode == 0, "\n".join(said[:10]) + "\n" + result.stderr[-1500:]
    return result


def weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / name)[0]


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol, msg=key)


def test_two_processes_end_with_the_weights_of_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    advtrain(*ARGS, "--method", "standard", "--out", one)
    result = advtrain(*ARGS, "--method", "standard", "--out", two, "--nproc", "2")
    # float sums in another order: equal to rounding, not bit for bit
    assert_close(weights(two), weights(one), atol=1e-5)
    assert_close(weights(two, "model.safetensors"), weights(one, "model.safetensors"), atol=1e-5)
    # the epoch's figures are reduced over both ranks and written once, by rank 0
    lines = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for got, want in zip(lines, reference):
        assert got["train_accuracy"] == pytest.approx(want["train_accuracy"])
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["val_robust_accuracy"] == pytest.approx(want["val_robust_accuracy"])
    assert result.stdout.count("run directory:") == 1  # rank 0 speaks for the run


@pytest.mark.parametrize("method", ["pgd", "free"])
def test_two_processes_resume_mid_epoch_to_the_same_weights(tmp_path, method):
    """Rewound to a checkpoint inside epoch 2: PGD (random starts drawn on each rank) and free
    (each rank carries its own perturbation between batches) end as the uninterrupted run."""
    run = tmp_path / "run"
    # free counts each pass over the data as `replays` epochs: 4 epochs of 2 replays = 2 passes
    extra = ["--epochs", "4", "--method-option", "replays=2"] if method == "free" else []
    advtrain(
        *ARGS, "--method", method, *extra, "--out", run, "--nproc", "2", "--checkpoint-every", "5"
    )
    rewound = tmp_path / "rewound"
    rewound.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (rewound / path.name).write_bytes(path.read_bytes())
    slots = {p: json.loads(p.read_text()) for p in rewound.glob("resume-*.json")}
    finished = [
        p for p, meta in slots.items() if meta["next_batch"] == 0 and meta["next_epoch"] == 3
    ]
    middle = [p for p, meta in slots.items() if meta["next_batch"] > 0 and meta["next_epoch"] == 2]
    assert finished and middle
    for path in finished:  # as if killed before the end of epoch 2
        path.unlink()
        path.with_suffix(".safetensors").unlink()
    result = advtrain("train", "--resume", rewound, "--nproc", "2")
    assert "resuming" in result.stdout
    assert_close(weights(rewound), weights(run), atol=0)

    # the resumed epoch's figures count every rank's rows from before the checkpoint too
    def figures(path: Path) -> list[dict]:
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert figures(rewound) == figures(run)


def test_two_process_evaluation_merges_to_the_one_process_report(tmp_path):
    """Three chunks of 12 points over 2 ranks (rank 0 takes two); eps 0.05 leaves survivors, so
    every step of the quick cascade (Square's thousand queries included), the diagnostics and the
    margins (FAB-T after the cascade) have work to merge."""
    run = tmp_path / "run"
    advtrain("train", "--method", "standard", "--epochs", "1", "--quiet", "--out", run)
    common = [
        "evaluate",
        run,
        "--n",
        "36",
        "--batch-size",
        "12",
        "--eps",
        "0.05",
        "--suite",
        "quick",
    ]
    advtrain(*common, "--json", tmp_path / "one.json")
    result = advtrain(*common, "--json", tmp_path / "two.json", "--nproc", "2")
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["settings"].pop("processes"), two["settings"].pop("processes")) == (1, 2)
    for report in (one, two):  # wall-clock times, and the passes: every rank probes the model
        for key in ("seconds", "seconds_by_stage", "forward_passes"):
            del report["settings"][key]
        del report["model_card"]["forward_passes_used"]
    assert 0 < two["robust_accuracy"] < two["clean_accuracy"]
    assert {row["broken_by"] for row in two["per_sample"]} >= {"clean", "apgd-ce", None}
    assert two == one  # bit for bit: each chunk is attacked alike wherever it runs
    assert result.stdout.count("clean accuracy") == 1  # rank 0 speaks for the run


def test_synchronised_batchnorm_matches_one_process(tmp_path):
    """digits-cnn-bn: with --sync-bn the 2-process run normalises over the global batch, as one
    process does; without it each rank normalises over its half, and the weights drift apart."""
    runs = {name: tmp_path / name for name in ("one", "synced", "local")}
    bn = [*ARGS, "--model", "digits-cnn-bn", "--method", "standard", "--epochs", "1"]
    advtrain(*bn, "--out", runs["one"])
    advtrain(*bn, "--out", runs["synced"], "--nproc", "2", "--sync-bn")
    advtrain(*bn, "--out", runs["local"], "--nproc", "2")
    one = weights(runs["one"])
    # statistics summed in another order; Adam enlarges rounding where a gradient is near zero
    # (measured: 1.7e-4 at most, running statistics 3e-6; unsynchronised: 6e-2)
    assert_close(weights(runs["synced"]), one, atol=1e-3)
    local = weights(runs["local"])
    assert max(float((local[k].float() - one[k].float()).abs().max()) for k in one) > 1e-2
