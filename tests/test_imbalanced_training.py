"""Training for a minority class: balanced sampling, the positive class's validation figures, and
the best epoch kept by its robust recall or PR-AUC (issue 22)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from advtrain.checkpoint import load_checkpoint
from advtrain.data import load_dataset
from advtrain.data.base import LoadRequest
from advtrain.data.tabular import tabular_dataset
from advtrain.errors import AdvtrainError
from advtrain.models import build_model
from advtrain.training import TrainConfig, Trainer
from advtrain.training.observers import selection_key
from advtrain.training.sampling import balanced_order, epoch_order


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def table():
    """5,000 rows (a quarter for validation), 8 features, 2% positives shifted by 1.5 standard
    deviations along 3 features: the classes overlap, so at a 2% prior the most accurate rule
    flags almost no positive, while a rule for balanced classes flags most of them."""
    rng = np.random.default_rng(7)
    n, positives = 5000, 100
    y = np.zeros(n, dtype=np.int64)
    y[rng.choice(n, positives, replace=False)] = 1
    x = rng.normal(size=(n, 8))
    x[y == 1, :3] += 1.5
    return tabular_dataset(
        x,
        y,
        LoadRequest(seed=0, val_fraction=0.25, test_fraction=0.2),
        name="imbalanced",
        classes=("legit", "fraud"),
        feature_names=tuple(f"f{i}" for i in range(8)),
        default_eps=0.02,
        positive_class=1,
    )


def fresh_model(table, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", in_shape=table.info.shape, n_classes=2)


RUN = dict(
    dataset="imbalanced",
    model="mlp",
    method="pgd",
    epochs=4,
    batch_size=128,
    attack_steps=2,
    eval_steps=2,
    lr=3e-3,
    seed=3,
    device="cpu",
)


@pytest.fixture(scope="module")
def runs(table, tmp_path_factory):
    """The same model trained plainly and with balanced sampling: {name: (result, run_dir)}."""
    found = {}
    for name, weight in (("plain", None), ("balanced", "balanced")):
        run_dir = tmp_path_factory.mktemp(name)
        config = TrainConfig(**RUN, class_weight=weight)
        found[name] = (Trainer(fresh_model(table), table, config, run_dir).fit(), run_dir)
    return found


# ---------------------------------------------------------------------- sampling


def test_balanced_order_gives_every_class_an_equal_share():
    labels = torch.tensor([0] * 95 + [1] * 5 + [2] * 3)
    generator = torch.Generator().manual_seed(0)
    order = balanced_order(labels, generator)
    assert order.dtype == torch.int64 and len(order) == len(labels)
    counts = torch.bincount(labels[order], minlength=3).tolist()
    assert counts == [35, 34, 34]  # 103 = 3 * 34 + 1: the first class gets the extra row
    # the minority rows are each drawn floor or ceil times; the majority's drawn at most once
    drawn = torch.bincount(order, minlength=len(labels))
    assert set(drawn[95:100].tolist()) <= {6, 7} and set(drawn[100:].tolist()) <= {11, 12}
    assert int(drawn[:95].max()) == 1
    # seeded by the generator alone
    again = balanced_order(labels, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)
    assert not torch.equal(order, balanced_order(labels, torch.Generator().manual_seed(1)))


def test_without_class_weight_the_order_is_the_plain_shuffle():
    labels = torch.tensor([0] * 50 + [1] * 2)
    a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(epoch_order(labels, None, a), torch.randperm(52, generator=b))
    assert torch.equal(a.get_state(), b.get_state())  # nothing else drawn


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"class_weight": "balance"}, "unknown class_weight 'balance'"),
        ({"class_weight": 2}, "unknown class_weight 2"),
        ({"select_by": "recall"}, "unknown select_by 'recall'"),
    ],
)
def test_bad_imbalance_options_are_one_line_errors(overrides, needle):
    with pytest.raises(AdvtrainError, match=needle) as caught:
        TrainConfig(**overrides)
    assert "\n" not in str(caught.value)


def test_class_weight_none_spelled_out_is_unset():
    assert TrainConfig(class_weight="none").class_weight is None
    assert TrainConfig().class_weight is None and TrainConfig().select_by == "auto"


def test_auto_selection_follows_the_positive_class():
    config = TrainConfig()
    assert config.selection(None) == "robust-accuracy"
    assert config.selection(1) == "pr-auc"
    assert TrainConfig(select_by="robust-recall").selection(0) == "robust-recall"
    with pytest.raises(AdvtrainError, match="needs a dataset with a positive class; 'digits'"):
        Trainer(
            fresh_digits(),
            load_dataset("digits", seed=0),
            TrainConfig(select_by="robust-recall", device="cpu"),
        )


def fresh_digits() -> torch.nn.Module:
    return build_model("digits-cnn", in_shape=(1, 8, 8), n_classes=10)


# ---------------------------------------------------------------------- training


def test_balanced_sampling_finds_the_minority_class(runs, table):
    plain, _ = runs["plain"]
    balanced, _ = runs["balanced"]
    positives = int((table.val.y == 1).sum())
    assert positives >= 20
    # Measured (torch CPU, one thread): plain recall 0.0 every epoch; balanced 0.92 or more
    plain_best = max(r.val_clean_recall for r in plain.history)
    balanced_kept = balanced.history[balanced.best_epoch - 1]
    assert plain_best <= 0.1
    assert balanced_kept.val_clean_recall >= plain_best + 0.4
    assert balanced_kept.val_robust_recall >= plain_best + 0.3
    assert balanced.extra["test_clean_recall"] >= plain.extra["test_clean_recall"] + 0.4
    # the plain model looks accurate: it is the share of the majority class
    assert plain.test_clean_accuracy > 0.95


def test_records_and_files_carry_the_positive_class_figures(runs):
    for result, run_dir in runs.values():
        assert result.extra["select_by"] == "pr-auc"  # auto, on a dataset with a positive class
        assert result.extra["positive_class"] == 1
        for record in result.history:
            for name in ("recall", "pr_auc"):
                clean = getattr(record, f"val_clean_{name}")
                robust = getattr(record, f"val_robust_{name}")
                assert 0 <= robust <= 1 and 0 <= clean <= 1
            assert record.val_robust_recall <= record.val_clean_recall
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [r.to_dict() for r in result.history]
        summary = json.loads((run_dir / "summary.json").read_text())
        for key in ("test_clean_recall", "test_robust_recall", "test_robust_pr_auc"):
            assert summary[key] == result.extra[key]
        assert summary["class_weight"] == result.extra["class_weight"]
    assert runs["balanced"][0].extra["class_weight"] == "balanced"


def test_the_kept_epoch_is_the_best_robust_pr_auc_of_the_history(runs):
    for result, run_dir in runs.values():
        keys = [selection_key(r, "pr-auc", True) for r in result.history]
        best = max(range(len(keys)), key=lambda i: (keys[i], -i))
        assert result.best_epoch == best + 1
        _, meta = load_checkpoint(run_dir / "model.safetensors")
        assert meta["epoch"] == result.best_epoch
        assert meta["val_robust_pr_auc"] == result.history[best].val_robust_pr_auc


def test_datasets_without_a_positive_class_record_no_positive_figures():
    data = load_dataset("digits", seed=0)
    config = TrainConfig(method="standard", epochs=1, eval_steps=1, device="cpu")
    result = Trainer(fresh_digits(), data, config).fit()
    assert result.extra["select_by"] == "robust-accuracy"
    assert "positive_class" not in result.extra and "test_robust_recall" not in result.extra
    assert not any("recall" in key or "pr_auc" in key for key in result.history[0].to_dict())


# (val robust accuracy, val robust recall, val robust PR-AUC) per epoch, imposed on real epochs
SCRIPTED = [
    (0.98, 0.00, 0.30),  # robust-accuracy keeps this one: the model that flags nothing
    (0.90, 0.60, 0.50),  # robust-recall keeps this one
    (0.93, 0.40, 0.70),  # pr-auc keeps this one
    (0.95, 0.60, 0.40),  # ties on recall with epoch 2, worse PR-AUC: not kept
    (0.97, 0.20, 0.60),
]


@pytest.mark.parametrize(
    "select_by, expected", [("robust-accuracy", 1), ("robust-recall", 2), ("pr-auc", 3)]
)
def test_select_by_keeps_the_epoch_of_its_figure(table, tmp_path, monkeypatch, select_by, expected):
    config = TrainConfig(
        **{**RUN, "epochs": len(SCRIPTED), "attack_steps": 1, "eval_steps": 1, "batch_size": 512},
        select_by=select_by,
    )
    trainer = Trainer(fresh_model(table), table, config, tmp_path)
    real_epoch = trainer._epoch
    states = []

    def scripted_epoch(epoch, generator):
        record = real_epoch(epoch, generator)
        states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        robust, recall, pr_auc = SCRIPTED[epoch - 1]
        return dataclasses.replace(
            record,
            val_clean_accuracy=0.99,
            val_robust_accuracy=robust,
            val_robust_recall=recall,
            val_robust_pr_auc=pr_auc,
        )

    monkeypatch.setattr(trainer, "_epoch", scripted_epoch)
    result = trainer.fit()
    assert result.best_epoch == expected and result.extra["select_by"] == select_by
    kept, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["epoch"] == expected
    for k, v in states[expected - 1].items():
        assert torch.equal(kept[k], v), k
        assert torch.equal(trainer.model.state_dict()[k], v), k


def test_early_stop_follows_the_selection_figure(table, monkeypatch):
    lines: list[str] = []
    config = TrainConfig(
        **{**RUN, "epochs": len(SCRIPTED), "attack_steps": 1, "eval_steps": 1, "batch_size": 512},
        early_stop=2,
        select_by="robust-recall",
    )
    trainer = Trainer(fresh_model(table), table, config, log=lines.append)
    real_epoch = trainer._epoch

    def scripted_epoch(epoch, generator):
        robust, recall, pr_auc = SCRIPTED[epoch - 1]
        return dataclasses.replace(
            real_epoch(epoch, generator),
            val_robust_accuracy=robust,
            val_robust_recall=recall,
            val_robust_pr_auc=pr_auc,
        )

    monkeypatch.setattr(trainer, "_epoch", scripted_epoch)
    result = trainer.fit()
    # by robust accuracy epoch 1 stays best and the run would stop after epoch 3; by robust
    # recall epoch 2 is best, and epochs 3 and 4 bring nothing better
    assert result.best_epoch == 2 and len(result.history) == 4
    assert (
        "no better robust recall of the positive class for 2 epoch(s)"
        in result.extra["stop_reason"]
    )


# ---------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands for the process dying."""


def test_a_balanced_run_resumes_exactly(table, tmp_path):
    config = TrainConfig(
        **{**RUN, "epochs": 3, "checkpoint_every": 7, "augment": "noise"},
        class_weight="balanced",
        select_by="pr-auc",
    )
    reference = Trainer(fresh_model(table), table, config, tmp_path / "ref").fit()

    trainer = Trainer(fresh_model(table), table, config, tmp_path / "run")
    save, count = trainer._save_resume, 0

    def saving(*args):
        nonlocal count
        count += 1
        save(*args)
        if count == 5:  # 22 batches an epoch: the first save of epoch 2, mid-epoch
            raise Killed

    trainer._save_resume = saving
    with pytest.raises(Killed):
        trainer.fit()
    torch.manual_seed(123)  # the global RNG elsewhere: the resume restores it
    resumed = Trainer(fresh_model(table, seed=9), table, config, tmp_path / "run")
    result = resumed.fit(resume=True)
    for name in ("model.safetensors", "last.safetensors"):
        got, _ = load_checkpoint(tmp_path / "run" / name)
        want, _ = load_checkpoint(tmp_path / "ref" / name)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key}"

    def without_seconds(records):
        return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in records]

    assert without_seconds(result.history) == without_seconds(reference.history)
    assert result.best_epoch == reference.best_epoch
    assert result.extra["test_robust_pr_auc"] == reference.extra["test_robust_pr_auc"]
