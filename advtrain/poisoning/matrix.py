"""The attack x defence matrix (BackdoorBench's way of reporting backdoors): every attack against
every defence, with clean accuracy (C-Acc), attack success rate (ASR) and accuracy on triggered
inputs (R-Acc), and for the detecting defences the precision and recall of the flagged rows.

What is reused: one model trained on clean data (the baseline, and the reference the
clean-label attack perturbs against), one model per attack trained on its poisoned data (the
``none`` cell, the features spectral signatures and activation clustering read, and the model
STRIP guards), and one retraining per training-set defence on the rows it kept.

Figures per cell, on the test split:

* C-Acc: clean test inputs classified correctly;
* ASR: test inputs not of the target class, triggered (:meth:`Backdoor.apply`), classified as
  the target; R-Acc: the same inputs classified as their true label;
* spectral, ac: precision and recall of the removed rows against the poisoned ones;
* strip: the poisoned model behind STRIP, on at most ``strip_inputs`` clean and as many
  triggered test inputs; a rejected input gets no answer, so it counts against C-Acc, for
  neither ASR nor R-Acc; precision and recall of the rejections over the two sets together.
  STRIP superimposes images, so it is not run on tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import Dataset, Split
from ..errors import AdvtrainError
from ..models import build_model
from ..models.features import penultimate_features
from ..training import TrainConfig, Trainer
from ..training.observers import BestEpoch
from ..training.validation import logits_of
from .backdoors import BACKDOORS, Backdoor, Poisoned, make_backdoor, triggered
from .defences import activation_clustering, detection, remove, spectral_signatures
from .pictures import trigger_picture
from .strip import STRIP_FRR, STRIP_SAMPLES, fit_strip

#: The defences a matrix can hold.
DEFENCES = ("none", "spectral", "ac", "strip")


@dataclass(frozen=True)
class MatrixSettings:
    """How each model of the matrix is trained (advtrain's Trainer, ``standard`` method, Adam,
    the last epoch kept) and how STRIP is run. ``val_rows`` caps the validation rows checked
    after each epoch."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    val_rows: int = 1000
    strip_samples: int = STRIP_SAMPLES
    strip_frr: float = STRIP_FRR
    strip_inputs: int = 1000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_rows", "strip_samples", "strip_inputs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdvtrainError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.strip_frr < 1:
            raise AdvtrainError(f"strip_frr must be in (0, 1), got {self.strip_frr}")


@dataclass
class Cell:
    """One attack against one defence."""

    attack: str
    defence: str
    clean_accuracy: float
    attack_success_rate: float
    robust_accuracy: float
    detection_precision: float | None = None
    detection_recall: float | None = None
    flagged: int | None = None
    poisoned: int | None = None
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Matrix:
    """The matrix: its cells, the clean baseline, the triggers (with pictures), the settings."""

    dataset: str
    model: str
    rate: float
    target: int
    n_train: int
    n_test: int
    settings: dict[str, Any]
    baseline: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)
    triggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def cell(self, attack: str, defence: str) -> Cell:
        for cell in self.cells:
            if cell.attack == attack and cell.defence == defence:
                return cell
        raise KeyError((attack, defence))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model": self.model,
            "rate": self.rate,
            "target": self.target,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "settings": self.settings,
            "baseline": self.baseline,
            "cells": [c.to_dict() for c in self.cells],
            "triggers": self.triggers,
            "seconds": self.seconds,
        }

    def to_html(self) -> str:
        from .matrix_html import render_matrix

        return render_matrix(self)


def parse_names(text: str | Sequence[str], known: Sequence[str], what: str) -> list[str]:
    """Comma-separated names (or a list), each one of ``known``, in order, without repeats."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip() for p in parts if p.strip()]
    if not names:
        raise AdvtrainError(f"no {what} given; choose from: {', '.join(known)}")
    for name in names:
        if name not in known:
            raise AdvtrainError(f"unknown {what[:-1]} {name!r}; choose from: {', '.join(known)}")
    return list(dict.fromkeys(names))


class MatrixModels:
    """Trains (or reads back from ``weights_dir``) the matrix's models."""

    def __init__(
        self,
        data: Dataset,
        model_name: str,
        settings: MatrixSettings,
        weights_dir: Path | None,
        log: Callable[[str], None],
    ) -> None:
        self.data, self.model_name, self.settings = data, model_name, settings
        self.weights_dir, self.log = weights_dir, log
        n_val = min(settings.val_rows, len(data.val))
        self.val = Split(data.val.x[:n_val], data.val.y[:n_val])
        self.tiny = Split(data.val.x[:2], data.val.y[:2])

    def fresh(self) -> nn.Module:
        torch.manual_seed(self.settings.seed)
        info = self.data.info
        return build_model(self.model_name, in_shape=info.shape, n_classes=info.n_classes)

    def train(self, split: Split, key: str) -> nn.Module:
        """A model trained on ``split``; ``key`` names it in the weight cache."""
        model = self.fresh()
        path = self._path(key, split)
        if path is not None and path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
            self.log(f"{key}: weights read from {path}")
            return model.eval()
        s = self.settings
        config = TrainConfig(
            dataset=self.data.info.name,
            model=self.model_name,
            method="standard",
            eps=0.0,
            epochs=s.epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            eval_steps=1,
            seed=s.seed,
            device=s.device,
        )
        # the trainer's own test figures are not used: the matrix measures its own
        data = Dataset(self.data.info, split, self.val, self.tiny)
        trainer = Trainer(model, data, config)
        # the last epoch's weights, as BackdoorBench reports: the best epoch on clean validation
        # data would favour an epoch before the backdoor is learned
        trainer.observers = [o for o in trainer.observers if not isinstance(o, BestEpoch)]
        result = trainer.fit()
        self.log(f"{key}: trained {s.epochs} epochs in {result.seconds:.1f}s")
        trained = trainer.model.cpu().eval()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(trained.state_dict(), path)
        return trained

    def _path(self, key: str, split: Split) -> Path | None:
        """The cache file of a model: named by ``key`` and a digest of the recipe and of the
        training rows themselves (so a defence that removes other rows trains again)."""
        if self.weights_dir is None:
            return None
        rows = hashlib.sha256()
        for part in (split.x, split.y):
            assert isinstance(part, Tensor)
            rows.update(part.contiguous().numpy().tobytes())
        s = self.settings
        recipe = json.dumps(
            [
                self.data.info.name,
                self.model_name,
                len(self.data.train),
                s.epochs,
                s.batch_size,
                s.lr,
                s.seed,
                s.val_rows,
                key,
                rows.hexdigest(),
            ],
        )
        digest = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        return self.weights_dir / f"{key.replace('/', '-')}-{digest}.pt"


def _predictions(model: nn.Module, x: Tensor) -> Tensor:
    return logits_of(model, x, 1024).argmax(dim=1)


def _figures(
    model: nn.Module, test: Split, x_trig: Tensor, y_trig: Tensor, target: int
) -> tuple[float, float, float]:
    clean = float((_predictions(model, test.x) == test.y).float().mean())  # type: ignore[arg-type]
    pred = _predictions(model, x_trig)
    asr = float((pred == target).float().mean()) if len(pred) else float("nan")
    racc = float((pred == y_trig).float().mean()) if len(pred) else float("nan")
    return clean, asr, racc


def run_matrix(
    data: Dataset,
    model_name: str,
    attacks: str | Sequence[str] = ("badnets", "blended", "clean-label"),
    defences: str | Sequence[str] = DEFENCES,
    *,
    rate: float = 0.01,
    target: int = 0,
    settings: MatrixSettings | None = None,
    weights_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Matrix:
    """Every attack of ``attacks`` against every defence of ``defences`` on ``data`` with the
    architecture ``model_name``, poisoning ``rate`` of the training rows towards ``target``.

    ``weights_dir`` keeps each trained model's weights and reads them back on a rerun with the
    same recipe; ``log`` receives one line per step."""
    start = time.perf_counter()
    settings = settings or MatrixSettings()
    say: Callable[[str], None] = log or (lambda line: None)
    attack_names = parse_names(attacks, tuple(BACKDOORS), "attacks")
    defence_names = parse_names(defences, DEFENCES, "defences")
    info = data.info
    if not isinstance(data.train.x, Tensor) or not isinstance(data.test.x, Tensor):
        raise AdvtrainError("the backdoor matrix needs inputs held in memory, not read lazily")
    if "strip" in defence_names and info.kind != "image":
        raise AdvtrainError("STRIP superimposes images; leave strip out for a table")
    for name in attack_names:  # every bad setting fails before any training
        make_backdoor(
            name, info, rate=rate, target=target, seed=settings.seed, reference=nn.Identity()
        ).choose(data.train.y)
    models = MatrixModels(
        data, model_name, settings, None if weights_dir is None else Path(weights_dir), say
    )
    clean_model = models.train(data.train, "clean")
    baseline: dict[str, Any] = {
        "clean_accuracy": float(
            (_predictions(clean_model, data.test.x) == data.test.y).float().mean()
        ),
        "attack_success_rate": {},
    }
    matrix = Matrix(
        info.name,
        model_name,
        rate,
        target,
        len(data.train),
        len(data.test),
        {**dataclasses.asdict(settings), "attacks": attack_names, "defences": defence_names},
        baseline,
    )
    for name in attack_names:
        backdoor = make_backdoor(
            name, info, rate=rate, target=target, seed=settings.seed, reference=clean_model
        )
        begun = time.perf_counter()
        poisoned = backdoor.poison(data.train)
        say(f"{name}: {len(poisoned.indices)} of {len(data.train)} rows poisoned")
        x_trig, y_trig = triggered(backdoor, data.test.x, data.test.y)
        _, clean_asr, _ = _figures(
            clean_model, Split(data.test.x[:1], data.test.y[:1]), x_trig, y_trig, target
        )
        baseline["attack_success_rate"][name] = clean_asr
        matrix.triggers[name] = {
            **backdoor.trigger.describe(),
            "labels": backdoor.labels,
            "picture": trigger_picture(backdoor, data.test, poisoned),
        }
        model = models.train(poisoned.split, f"{name}/none")
        spent = time.perf_counter() - begun
        features = None
        for defence in defence_names:
            cell_start = time.perf_counter()
            if defence == "none":
                figures = _figures(model, data.test, x_trig, y_trig, target)
                matrix.cells.append(Cell(name, "none", *figures, seconds=spent))
            elif defence in ("spectral", "ac"):
                if features is None:
                    features = penultimate_features(model, poisoned.split.x)
                matrix.cells.append(
                    _training_defence(
                        defence, models, poisoned, features, data, x_trig, y_trig, rate
                    )
                )
            else:
                matrix.cells.append(_strip_cell(model, backdoor, data, x_trig, y_trig, settings))
            matrix.cells[-1].seconds += time.perf_counter() - cell_start
            c = matrix.cells[-1]
            say(
                f"{name} x {defence}: C-Acc {c.clean_accuracy:.2%}, ASR {c.attack_success_rate:.2%}"
            )
    matrix.seconds = time.perf_counter() - start
    return matrix


def _training_defence(
    defence: str,
    models: MatrixModels,
    poisoned: Poisoned,
    features: Tensor,
    data: Dataset,
    x_trig: Tensor,
    y_trig: Tensor,
    rate: float,
) -> Cell:
    """Detect with ``defence`` on the poisoned model's features, remove, retrain, measure."""
    labels = poisoned.split.y
    if defence == "spectral":
        suspects = spectral_signatures(features, labels, expected_rate=rate)
    else:
        suspects = activation_clustering(features, labels, seed=models.settings.seed)
    found = detection(suspects.indices, poisoned.indices)
    kept = remove(poisoned.split, suspects.indices)
    model = models.train(kept, f"{poisoned.backdoor.name}/{defence}")
    figures = _figures(model, data.test, x_trig, y_trig, poisoned.backdoor.target)
    return Cell(
        poisoned.backdoor.name,
        defence,
        *figures,
        detection_precision=found.precision,
        detection_recall=found.recall,
        flagged=found.flagged,
        poisoned=found.poisoned,
        note=f"{found.flagged} rows removed, retrained",
    )


def _strip_cell(
    model: nn.Module,
    backdoor: Backdoor,
    data: Dataset,
    x_trig: Tensor,
    y_trig: Tensor,
    settings: MatrixSettings,
) -> Cell:
    """The poisoned model behind STRIP: overlays from the first half of the validation split,
    the threshold from (at most ``strip_inputs`` of) its second half."""
    val = data.val.x
    assert isinstance(val, Tensor)
    half = len(val) // 2
    lower, upper = float(data.info.lower), float(data.info.upper)
    strip = fit_strip(
        model,
        val[:half],
        val[half : half + settings.strip_inputs],
        lower=lower,
        upper=upper,
        samples=settings.strip_samples,
        frr=settings.strip_frr,
        seed=settings.seed,
    )
    n = settings.strip_inputs
    rng = np.random.default_rng(settings.seed)
    test_x = data.test.x
    assert isinstance(test_x, Tensor)
    pick_clean = torch.from_numpy(
        np.sort(rng.choice(len(test_x), min(n, len(test_x)), replace=False))
    )
    pick_trig = torch.from_numpy(
        np.sort(rng.choice(len(x_trig), min(n, len(x_trig)), replace=False))
    )
    xc, yc = test_x[pick_clean], data.test.y[pick_clean]
    xt, yt = x_trig[pick_trig], y_trig[pick_trig]
    flag_c, flag_t = strip.flags(xc), strip.flags(xt)
    pred_c, pred_t = _predictions(model, xc), _predictions(model, xt)
    clean_acc = float(((pred_c == yc) & ~flag_c).float().mean())
    asr = float(((pred_t == backdoor.target) & ~flag_t).float().mean())
    racc = float(((pred_t == yt) & ~flag_t).float().mean())
    flagged = int(flag_c.sum() + flag_t.sum())
    found = int(flag_t.sum())
    precision = found / flagged if flagged else None
    recall = found / len(xt) if len(xt) else None
    return Cell(
        backdoor.name,
        "strip",
        clean_acc,
        asr,
        racc,
        detection_precision=precision,
        detection_recall=recall,
        flagged=flagged,
        poisoned=len(xt),
        note=(
            f"inference filter on {len(xc)} clean + {len(xt)} triggered test inputs; "
            f"{int(flag_c.sum())} clean rejected; threshold {strip.threshold:.4g}"
        ),
    )
