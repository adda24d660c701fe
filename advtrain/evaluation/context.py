"""What every stage of :func:`advtrain.evaluate` works from: the model, the data, the threat
model, the settings, and the model as attacks and judgements must see it.

:class:`SuiteSettings` holds the caller's options. :meth:`EvalContext.build` looks at the model
once: is it randomised (repeated passes disagree, :func:`~advtrain.attacks.is_randomized`)?
Does it return probabilities? It then builds the wrappers once (Athalye, Carlini & Wagner 2018):

- the attacked model: ``log(p)`` of a model returning probabilities
  (:class:`~advtrain.attacks.adaptive.LogProbabilities`), then, for a randomised model,
  :class:`~advtrain.attacks.EOT` over ``eot_samples`` passes;
- the repaired model: straight-through gradients for step functions
  (:class:`~advtrain.attacks.adaptive.StraightThrough`) around the attacked one;
- the judge: the argmax of the model, or for a randomised model a
  :func:`~advtrain.attacks.majority_vote` over ``votes`` passes.

The metrics' logits are the attacked model's outputs, so they follow ``eot_samples`` as well.

:meth:`EvalContext.at_threshold` gives the same context for the thresholded classifier of an
operating point (:class:`ShiftedLogit`: the positive class's logit lowered by the threshold, so
that the argmax is the decision "positive-class score >= threshold").
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..attacks import EOT
from ..attacks.adaptive import (
    LogProbabilities,
    StraightThrough,
    draws_per_call,
    is_randomized,
    looks_like_probabilities,
    majority_vote,
)
from ..attacks.counting import CountedModel
from ..errors import AdvtrainError
from ..threat import ThreatModel
from .cascade import Cascade
from .journal import Journal
from .points import Points
from .progress import Progress
from .shards import Shards, seeded, step_seed


@dataclass(frozen=True)
class SuiteSettings:
    """The options of :func:`advtrain.evaluate` beyond the model, the data and the threat model.

    Attributes:
        suite: ``"quick"``, ``"standard"`` (AutoAttack's recipe) or ``"thorough"``.
        seed: the base seed; every step's seed is derived from it and the step's name
            (:func:`.shards.step_seed`), and torch's global generator is seeded with it (and
            per chunk) for randomised models.
        batch_size: most points per forward pass, and the size of the chunks the points are
            attacked in (:mod:`.shards`).
        diagnostics_points: size of the subset the masking checks run on.
        eot_samples: stochastic passes averaged per gradient (and per metric) of a randomised
            model.
        votes: stochastic passes per majority-vote judgement of a randomised model.
        radius_threshold: the adversarial radius is the largest eps where accuracy stays at or
            above this fraction of the clean accuracy.
        positive_class: for binary/imbalanced data, the class whose precision/recall/F1 matter.
        examples: adversarial examples kept for the report's pictures.
        attack_classes: only the points whose true label is one of these are attacked (None:
            every point); the others keep their clean prediction in every attacked figure.
        fpr: with ``positive_class``, the false-positive rate of the operating point whose recall
            is reported clean and attacked (None: no operating point).
        self_test: run the binarization self-test (:mod:`.self_test`); None: with the thorough
            suite only, where a model whose features cannot be read is reported, not an error.
        self_test_points: most test points of the self-test.
        self_test_features: the module name of the model's readout layer, whose input are the
            features the self-test reads (None: the last ``nn.Linear`` called).
        certify: the bound method that verifies every point for the sandwich (``"ibp"``,
            ``"crown-ibp"``, ``"crown"``; None: no bound propagation).
        smoothing_sigma: certify the smoothed model at this noise level too (None: not).
        smoothing_samples: randomized smoothing's estimation samples per point.
    """

    suite: str = "standard"
    seed: int = 0
    batch_size: int = 1000
    diagnostics_points: int = 100
    eot_samples: int = 16
    votes: int = 32
    radius_threshold: float = 0.5
    positive_class: int | None = None
    examples: int = 8
    attack_classes: tuple[int, ...] | None = None
    fpr: float | None = 0.01
    self_test: bool | None = None
    self_test_points: int = 32
    self_test_features: str | None = None
    certify: str | None = None
    smoothing_sigma: float | None = None
    smoothing_samples: int = 100_000

    @property
    def runs_self_test(self) -> bool:
        """Whether the evaluation runs the self-test (asked for, or the thorough suite's)."""
        return self.suite == "thorough" if self.self_test is None else self.self_test


@dataclass(frozen=True)
class EvalContext:
    """One evaluation's inputs, and the model wrapped once for attacks and judgements.

    Built by :meth:`build`; ``model`` is the caller's model, already frozen in eval mode.
    """

    model: nn.Module
    x: Points
    y: Tensor
    threat: ThreatModel
    settings: SuiteSettings
    n_classes: int
    #: Repeated forward passes disagree: attacked through EOT, judged by a majority vote.
    randomized: bool
    #: The model returns probabilities: attacked (and measured) through log(p).
    probabilities: bool
    #: A randomised model that draws once per forward call
    #: (:func:`~advtrain.attacks.draws_per_call`): EOT and the vote then sample across calls,
    #: one copy of the batch per call.
    per_call: bool
    #: The model as attacks see it (log(p), EOT): gradients are taken of this.
    attack_model: nn.Module
    #: ``attack_model`` with straight-through gradients for step functions (BPDA).
    repaired_model: nn.Module
    shards: Shards
    device: str
    #: ``time.perf_counter()`` when the evaluation began.
    started: float
    #: The saved state of a resumable evaluation (:mod:`.journal`); None: nothing saved.
    journal: Journal | None = None
    #: Told of each chunk of each attack (a progress bar); None: silent.
    progress: Progress | None = None
    #: The count of the forward passes of ``model`` (:class:`~advtrain.attacks.CountedModel`).
    counter: CountedModel | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        x: Points,
        y: Tensor,
        threat: ThreatModel,
        settings: SuiteSettings,
        *,
        n_classes: int | None,
        device: str,
        started: float,
    ) -> EvalContext:
        """Probe ``model`` on the first 32 points (seeded with ``settings.seed``) and wrap it."""
        n = len(x)
        probe = x[: min(32, n)]
        with seeded(settings.seed, x.device):
            randomized = is_randomized(model, probe) if n else False
            with torch.no_grad():
                probe_out = model(probe)
        if probe_out.dim() != 2:
            raise AdvtrainError(
                f"the model must return logits (N, C), got shape {tuple(probe_out.shape)}"
            )
        probabilities = looks_like_probabilities(probe_out)
        with seeded(settings.seed, x.device):
            per_call = draws_per_call(model, probe) if randomized else False
        attack_model: nn.Module = LogProbabilities(model) if probabilities else model
        if randomized:
            attack_model = EOT(attack_model, samples=settings.eot_samples, chunk=_chunk(per_call))
        return cls(
            model=model,
            x=x,
            y=y,
            threat=threat,
            settings=settings,
            n_classes=n_classes or int(probe_out.shape[1]),
            randomized=randomized,
            probabilities=probabilities,
            per_call=per_call,
            attack_model=attack_model,
            repaired_model=StraightThrough(attack_model),
            shards=Shards.current(n, settings.batch_size),
            device=device,
            started=started,
        )

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def attackable(self) -> Tensor:
        """bool per point (on the CPU): its true label is one of ``attack_classes`` (all points
        when not given)."""
        classes = self.settings.attack_classes
        y = self.y.cpu()
        if classes is None:
            return torch.ones(len(y), dtype=torch.bool)
        return torch.isin(y, torch.tensor(list(classes), dtype=y.dtype))

    def at_threshold(self, positive: int, threshold: float) -> EvalContext:
        """This context for the thresholded classifier: the model (``log(p)`` of one returning
        probabilities) with the logit of ``positive`` lowered by ``threshold``
        (:class:`ShiftedLogit`), attacked through EOT and judged by majority vote as the model
        itself is."""
        base: nn.Module = LogProbabilities(self.model) if self.probabilities else self.model
        shifted = ShiftedLogit(base, positive, threshold)
        attack_model: nn.Module = (
            EOT(shifted, samples=self.settings.eot_samples, chunk=_chunk(self.per_call))
            if self.randomized
            else shifted
        )
        return replace(
            self,
            model=shifted,
            probabilities=False,
            attack_model=attack_model,
            repaired_model=StraightThrough(attack_model),
        )

    @property
    def watches_iterates(self) -> bool:
        """Whether the cascades watch the attacks' iterates for silent successes: the thorough
        suite, on a model that is not randomised (matching every forward call's rows to their
        points costs about as much as a small model's own pass, so the other suites leave it)."""
        return self.settings.suite == "thorough" and not self.randomized

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def repaired_outputs(self) -> bool:
        """Whether the model had to be wrapped (randomness or probabilities)."""
        return self.randomized or self.probabilities

    @property
    def white_box(self) -> str:
        """The white-box attack of the escalations, in words."""
        return "PGD with the sparse l1 step" if self.threat.norm == "l1" else "APGD"

    def seed_for(self, name: str) -> int:
        """The seed of the step called ``name``: :func:`.shards.step_seed` of the base seed."""
        return step_seed(self.settings.seed, str(name))

    def judge(self, points: Tensor) -> Tensor:
        """The labels that count: the model's argmax, or a majority vote of a randomised model."""
        if self.randomized:
            batch = self.settings.batch_size * 4
            return majority_vote(
                self.model,
                points,
                samples=self.settings.votes,
                batch_size=batch,
                separate_calls=self.per_call,
            )
        return self.argmax(points)

    def argmax(self, points: Tensor) -> Tensor:
        """The model's own predicted labels (one pass), in batches."""
        return argmax(self.model, points, self.settings.batch_size)

    def logits(self, points: Tensor) -> Tensor:
        """Logits for the metrics, on the CPU: the attacked model's outputs (log(p) of
        probabilities; mean log-probabilities over ``eot_samples`` passes of a randomised
        model), in batches."""
        size = self.settings.batch_size
        with torch.no_grad():
            parts = [
                self.attack_model(points[i : i + size]).float().cpu()
                for i in range(0, len(points), size)
            ]
        return torch.cat(parts) if parts else torch.zeros(0, 1)


class ShiftedLogit(nn.Module):
    """A classifier moved to an operating point: ``model(x)`` with the logit of class
    ``positive`` lowered by ``threshold``.

    Its argmax is ``positive`` exactly when ``z_p - max_{c != p} z_c > threshold`` (ties go to the
    lower class index, as argmax's do), so attacking it with any loss attacks the decision at that
    threshold instead of at the argmax. With two classes the score is the positive class's
    log-odds, and the threshold a probability threshold of ``sigmoid(threshold)``.
    """

    def __init__(self, model: nn.Module, positive: int, threshold: float) -> None:
        super().__init__()
        self.model, self.positive, self.threshold = model, int(positive), float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.model(x)
        shift = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
        shift[self.positive] = self.threshold
        return logits - shift


def _chunk(per_call: bool) -> int | None:
    """EOT's copies per forward call: one for a model that draws once per call, else all."""
    return 1 if per_call else None


def cascade_for(
    ctx: EvalContext, scope: str, clean_pred: Tensor, attackable: Tensor | None = None
) -> Cascade:
    """A :class:`.cascade.Cascade` of ``ctx``'s points judged by ``ctx.judge``, from the clean
    predictions ``clean_pred``, its work journaled under ``scope``; adversarial examples kept
    whole only for points held in memory (else the report's few examples)."""
    correct = clean_pred.cpu() == ctx.y.cpu()
    return Cascade(
        ctx.x,
        ctx.y,
        ctx.threat,
        ctx.judge,
        correct.clone(),
        clean_pred.clone(),
        shards=ctx.shards,
        attackable=ctx.attackable if attackable is None else attackable,
        score=ctx.logits,
        keep_points=not ctx.x.streamed or ctx.settings.positive_class is not None,
        examples=ctx.settings.examples,
        journal=ctx.journal,
        scope=scope,
        progress=ctx.progress,
        counter=ctx.counter,
        # single passes of a randomised model say nothing of its vote: its iterates go unwatched
        watch_iterates=ctx.watches_iterates,
        watched=_watched(ctx, correct),
    )


def _watched(ctx: EvalContext, correct: Tensor) -> Tensor:
    """bool per point: the diagnostics subset, whose iterates the cascades watch."""
    subset = diagnostics_subset(correct & ctx.attackable, ctx.settings.diagnostics_points, ctx.seed)
    chosen = torch.zeros(len(correct), dtype=torch.bool)
    chosen[subset] = True
    return chosen


def check_classes(name: str, classes: Sequence[int], n_classes: int) -> tuple[int, ...]:
    """``classes`` as a tuple of class indices of a model with ``n_classes`` classes, or a
    one-line :class:`~advtrain.errors.AdvtrainError` naming ``name`` and the bad entry."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise AdvtrainError(f"{name} must be a sequence of class indices, got {classes!r}")
    if not classes:
        raise AdvtrainError(f"{name} is empty: name at least one class to attack")
    checked = []
    for c in classes:
        try:
            index = operator.index(c) if not isinstance(c, bool) else -1
        except TypeError:
            index = -1
        if not 0 <= index < n_classes:
            raise AdvtrainError(f"{name}: {c!r} is not a class of this model (0..{n_classes - 1})")
        checked.append(index)
    return tuple(sorted(set(checked)))


def argmax(model: nn.Module, points: Tensor, batch_size: int) -> Tensor:
    """The model's predicted labels, in batches."""
    if len(points) == 0:
        return torch.zeros(0, dtype=torch.int64, device=points.device)
    with torch.no_grad():
        return torch.cat(
            [
                model(points[i : i + batch_size]).argmax(dim=1)
                for i in range(0, len(points), batch_size)
            ]
        )


def diagnostics_subset(correct: Tensor, size: int, seed: int) -> Tensor:
    """Up to ``size`` correctly classified points, drawn with ``seed``, in index order."""
    index = correct.nonzero().squeeze(1)
    if len(index) > size:
        generator = torch.Generator().manual_seed(seed)
        index = index[torch.randperm(len(index), generator=generator)[:size]].sort().values
    return index
