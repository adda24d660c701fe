"""The survivor cascade: attacks run one after another on the points still classified correctly.

AutoAttack's recipe (Croce & Hein 2020): each attack sees only the points that every attack
before it failed to break, and each point keeps the first adversarial example found, so the
robust accuracy is the per-sample worst case over the whole ensemble and the later, costlier
attacks run on fewer points. :class:`Cascade` holds that per-sample state.

Which attacks each suite runs, and with which losses for two classes, is :mod:`.steps`'s.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import EOT, Attack
from ..attacks.base import MinNormAttack
from ..attacks.counting import CountedModel
from ..errors import AdvtrainError
from ..threat import ThreatModel, lp_norm
from .cascade_units import SCALAR_FIELDS, replay, row_state, unit_of
from .iterate_watch import IterateWatch
from .journal import Journal
from .points import KeptRows, TensorPoints
from .progress import Progress
from .shards import Shards, chunk_seed, seeded
from .steps import Step, step_loss

Judge = Callable[[Tensor], Tensor]


@dataclass
class Cascade:
    """Per-sample state of an evaluation: which points stand, what broke the others, with what.

    ``x`` is the points (a tensor, or :class:`.points.Points` read a chunk at a time).
    ``attack_model`` is what gradients are taken of (the model, or a repaired wrapper of it);
    ``judge`` gives the labels that count (the model's prediction, or a majority vote of a
    randomised model); ``score`` (optional) gives the logits the report measures, kept per
    broken point in ``adv_logits`` as it breaks. ``attackable`` (bool per sample, default all)
    names the points an attacker moves: the others are never attacked and keep their clean
    prediction, so a correctly classified one stands to the end.

    ``x_adv`` holds the adversarial example of every broken point (``keep_points``, the
    default), or, for points read on demand, only those of the ``examples`` broken points of
    lowest index (:class:`KeptRows`): the memory then stays bounded by the chunk.

    An attack output outside the threat model (``threat.contains``: the ball, the bounds, the
    mask, and the feature constraints where the threat model has them) is refused: never counted
    as adversarial. ``refused`` counts, per step, the refused outputs that the judge would have
    counted as adversarial; ``losses`` names the loss each step ran with (:func:`step_loss`),
    ``gives_up`` the steps that give up on hopeless points (the report's settings list them);
    ``seconds`` the wall-clock time of each step; ``feasible`` per step, the adversarial points
    it kept and how many satisfy the feature constraints.

    With a ``journal`` (:mod:`.journal`), each step's work on each chunk is saved as it ends,
    under ``scope``, and replayed instead of run when the evaluation resumes.

    With ``watch_iterates`` (the default), every forward call of each attack is watched for
    adversarial iterates of the chunk's points (:class:`.iterate_watch.IterateWatch`; silent
    success, Pintor et al. 2022): a point an attack visited inside the threat model and
    misclassified, but did not return, is recorded as broken by that step with the visited point
    (judged again by ``judge``) and listed in ``silent`` (step name -> point indices). Not for a
    randomised model attacked through EOT: its majority-vote judge cannot be checked from single
    passes. ``watched`` (bool per sample) restricts the watch to some points (the evaluation
    watches its diagnostics subset: matching every row of every call to every point of a chunk
    costs as much as the model's own forward pass on small models).
    """

    x: Any  # Tensor | Points: made Points in __post_init__
    y: Tensor
    threat: ThreatModel
    judge: Judge
    standing: Tensor  # bool per sample
    adv_pred: Tensor  # the judged label of each point's current worst case (clean at first)
    x_adv: Any = field(init=False)  # Tensor, or KeptRows
    broken_by: list[str | None] = field(init=False)
    norm: Tensor = field(init=False)  # perturbation norm of the example that broke each point
    margin: Tensor = field(init=False)  # smallest adversarial norm known per point
    measured: Tensor = field(init=False)  # bool: a minimum-norm attack has run on the point
    correct: Tensor = field(init=False)  # bool: classified correctly before any attack
    per_attack: dict[str, float] = field(default_factory=dict)
    #: The chunks the points are attacked in, and this rank's share of them.
    shards: Shards = None  # type: ignore[assignment]  # default: one chunk, one rank
    #: bool per sample: the points attacks may move (default: all).
    attackable: Tensor = None  # type: ignore[assignment]  # default: every point
    refused: dict[str, int] = field(default_factory=dict)
    losses: dict[str, str] = field(default_factory=dict)
    #: The steps run that give up on hopeless points (:mod:`~advtrain.attacks.give_up`).
    gives_up: set[str] = field(default_factory=set)
    score: Judge | None = None
    keep_points: bool = True
    examples: int = 8
    journal: Journal | None = None
    scope: str = "cascade"
    #: Told of each chunk as the cascade goes (a progress bar); None: silent.
    progress: Progress | None = None
    #: The forward-pass count of the evaluated model (journaled with each unit).
    counter: CountedModel | None = None
    adv_logits: Tensor | None = field(default=None, init=False)
    seconds: dict[str, float] = field(default_factory=dict)
    feasible: dict[str, tuple[int, int]] = field(default_factory=dict)
    watch_iterates: bool = True
    #: bool per sample: the points whose iterates are watched (None: every point).
    watched: Tensor | None = None
    silent: dict[str, list[int]] = field(default_factory=dict)
    _runs: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.x, Tensor):
            self.x = TensorPoints(self.x)
        n = len(self.x)
        if self.attackable is None:
            self.attackable = torch.ones(n, dtype=torch.bool)
        self.attackable = self.attackable.cpu().to(torch.bool)
        if self.keep_points and isinstance(self.x, TensorPoints):
            self.x_adv = self.x.tensor.clone()
        else:
            self.x_adv = KeptRows(self.x, None if self.keep_points else self.examples)
        self.broken_by = [None if s else "clean" for s in self.standing.tolist()]
        self.norm = torch.zeros(n)
        self.margin = torch.where(self.standing, torch.full((n,), float("inf")), torch.zeros(n))
        self.measured = torch.zeros(n, dtype=torch.bool)
        self.correct = self.standing.clone()
        if self.shards is None:
            self.shards = Shards(n, max(n, 1))

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def robust_accuracy(self) -> float:
        return float(self.standing.float().mean()) if len(self.x) else float("nan")

    def indices(self) -> Tensor:
        """Indices of the standing points that attacks may move."""
        return (self.standing & self.attackable.to(self.standing.device)).nonzero().squeeze(1)

    def closest_standing(self, share: float, least: int) -> Tensor:
        """Indices of the standing points with the smallest known margin (the minimum-norm
        attack's): ``share`` of them, at least ``least`` (all, if fewer stand). Before a
        minimum-norm attack has measured them all (suites without FAB-T), every standing point."""
        index = self.indices()
        if not bool(self.measured[index].all()):
            return index
        count = min(len(index), max(least, math.ceil(share * len(index))))
        return index[self.margin[index].argsort(stable=True)[:count]]

    def run(
        self,
        step: Step,
        attack_model: nn.Module,
        label: str | None = None,
        among: Tensor | None = None,
    ) -> int:
        """Run one attack on the standing points (those of ``among`` only, when given: indices),
        chunk by chunk (:mod:`.shards`); returns how many it broke."""
        name = label or step.name
        start = time.perf_counter()
        # a minimum-norm step measures every point classified correctly at first, for its margin
        chosen = (self.correct & ~self.measured) if step.min_norm else self.standing.clone()
        chosen &= self.attackable.to(chosen.device)
        if among is not None:
            chosen &= torch.isin(torch.arange(len(self.x)), among.cpu())
        before = self._snapshot()
        prior, prior_silent = self.refused.pop(name, 0), self.silent.pop(name, [])
        broken = self._each_chunk(
            name,
            chosen,
            step.attack,
            lambda attack, index: self._attack(step, attack, attack_model, index, name),
        )
        broken, refused, silent = self._exchange(
            before, broken, self.refused.pop(name, 0), self.silent.pop(name, [])
        )
        if prior + refused:
            self.refused[name] = prior + refused
        if prior_silent + silent:
            self.silent[name] = prior_silent + silent
        self.per_attack[name] = self.robust_accuracy
        self.losses[name] = step_loss(step.attack)
        if getattr(step.attack, "give_up", None) is not None:
            self.gives_up.add(name)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return broken

    def measure(
        self,
        attack: MinNormAttack,
        attack_model: nn.Module,
        name: str = "robust margins",
    ) -> None:
        """Robust margins of the correctly classified points not measured yet (nothing broken)."""
        start = time.perf_counter()
        before = self._snapshot()
        self._each_chunk(
            name,
            self.correct & ~self.measured & self.attackable.to(self.correct.device),
            attack,
            lambda chunk_attack, index: self._margins(chunk_attack, attack_model, index),
        )
        self._exchange(before, 0, 0, [])
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _each_chunk(
        self,
        name: str,
        chosen: Tensor,
        attack: Attack,
        work: Callable[[Attack, Tensor], int],
    ) -> int:
        """``work(attack seeded for the chunk, indices)`` on the ``chosen`` points of each chunk of
        this rank, with torch's global generator seeded for the chunk; the sum of its results.
        With a journal, a chunk's saved outcome is replayed instead (:mod:`.journal`)."""
        total, progress = 0, self.progress
        mine = self.shards.mine()
        # the same step name may run twice on one cascade (an escalation repeating a step of
        # the cascade): each run is its own unit, numbered in the order the runs come
        runs = self._runs[name] = self._runs.get(name, 0) + 1
        for done, (chunk, rows) in enumerate(mine):
            if progress is not None:
                progress(name, done, len(mine), int(self.indices().numel()))
            index = chosen[rows].nonzero().squeeze(1) + rows.start
            if not len(index):
                continue
            key = f"{self.scope}|{name}|{runs}|{chunk}"
            unit = None if self.journal is None else self.journal.get(key)
            if unit is not None:
                total += replay(self, index, unit)
                continue
            before = row_state(self, index, name)
            counted = self._counted()
            with seeded(chunk_seed(attack.seed or 0, chunk), self.device):
                result = work(self.shards.for_chunk(attack, chunk), index)
            total += result
            if self.journal is not None:
                unit = unit_of(self, index, before, result, name)
                unit.facts["forwards"] = [a - b for a, b in zip(self._counted(), counted)]
                self.journal.put(key, unit)
        if progress is not None:
            progress(name, len(mine), len(mine), int(self.indices().numel()))
        return total

    def _margins(self, attack: Attack, attack_model: nn.Module, index: Tensor) -> int:
        if not isinstance(attack, MinNormAttack):
            raise AdvtrainError(f"robust margins need a MinNormAttack, got {type(attack).__name__}")
        result = attack.min_norm(attack_model, self.x[index], self.y[index])
        norms = torch.where(result.success, result.norm, torch.full_like(result.norm, float("inf")))
        self.margin[index] = torch.minimum(self.margin[index], norms.cpu())
        self.measured[index] = True
        return 0

    def _attack(
        self, step: Step, attack: Attack, attack_model: nn.Module, index: Tensor, name: str
    ) -> int:
        """One attack on the points ``index`` (of one chunk); returns how many it broke."""
        x, y = self.x[index], self.y[index]
        keep = None if self.watched is None else self.watched[index.cpu()].to(x.device)
        watch = None
        if keep is None:
            watch = self._watch(attack_model, x, y)
        elif bool(keep.any()):
            watch = self._watch(attack_model, x[keep], y[keep])
        with contextlib.nullcontext() if watch is None else watch.hooked():
            broken = self._attack_once(step, attack, attack_model, index, name, x, y)
        if watch is None:
            return broken
        if keep is None:
            return broken + self._recover(watch, index, x, name)
        return broken + self._recover(watch, index[keep.to(index.device)], x[keep], name)

    def _attack_once(
        self,
        step: Step,
        attack: Attack,
        attack_model: nn.Module,
        index: Tensor,
        name: str,
        x: Tensor,
        y: Tensor,
    ) -> int:
        if step.min_norm and isinstance(attack, MinNormAttack):  # Step checks it is one
            result = attack.min_norm(attack_model, x, y)
            found = result.success & (result.norm <= self.threat.eps * (1 + 1e-6) + 1e-7)
            self.margin[index] = torch.minimum(self.margin[index], result.norm.cpu())
            self.measured[index] = True
            x_adv = torch.where(
                found.reshape((-1,) + (1,) * (x.dim() - 1)), self.threat.project(result.x_adv, x), x
            )
            standing = self.standing[index]
            index, x_adv = index[standing], x_adv[standing.to(x_adv.device)]
            x = x[standing.to(x.device)]
        else:
            x_adv = attack(attack_model, x, y)
        return self.record(index, x_adv, name, clean=x) if len(index) else 0

    def _watch(self, attack_model: nn.Module, x: Tensor, y: Tensor) -> IterateWatch | None:
        """The watch of an attack's iterates on the points ``x``, where they are watched."""
        if not self.watch_iterates or isinstance(attack_model, EOT) or not self.threat.bounded:
            return None
        return IterateWatch(attack_model, x, y, self.threat)

    def _recover(self, watch: IterateWatch, index: Tensor, x: Tensor, name: str) -> int:
        """Record the points ``watch`` saw broken that still stand (silent successes of ``name``,
        listed in ``silent``); returns how many the judge confirmed."""
        positions, rows = watch.broken()
        if not len(positions):
            return 0
        still = self.standing[index[positions]].cpu()
        if not bool(still.any()):
            return 0
        chosen, at = index[positions[still]], positions[still].to(x.device)
        broken = self.record(chosen, rows[still.to(rows.device)].to(x.device), name, clean=x[at])
        newly = chosen[~self.standing[chosen].cpu()]
        if len(newly):
            self.silent.setdefault(name, []).extend(newly.tolist())
        return broken

    # ------------------------------------------------------------------ resume
    def _counted(self) -> tuple[int, int]:
        """The forward passes counted so far (inputs, calls)."""
        return (0, 0) if self.counter is None else (self.counter.points, self.counter.calls)

    def logits_rows(self, index: Tensor, logits: Tensor) -> None:
        """``adv_logits[index] = logits``, allocating ``adv_logits`` at the first write."""
        if self.adv_logits is None:
            self.adv_logits = torch.zeros(len(self.x), logits.shape[1])
        self.adv_logits[index] = logits.float().cpu()

    # ------------------------------------------------------------------ ranks
    def _snapshot(self) -> tuple[Tensor, Tensor] | None:
        return (self.standing.clone(), self.measured.clone()) if self.shards.shared else None

    def _exchange(
        self, before: tuple[Tensor, Tensor] | None, broken: int, refused: int, silent: list[int]
    ) -> tuple[int, int, list[int]]:
        """Under several ranks: send the rows this rank changed since ``before``, take the
        others'; returns the numbers broken and refused, and the silent successes, over all
        ranks."""
        if before is None:
            return broken, refused, silent
        changed = (self.standing != before[0]) | (self.measured != before[1])
        index = (changed & self.shards.owned()).nonzero().squeeze(1)
        newly = [i for i in index.tolist() if bool(before[0][i]) and not bool(self.standing[i])]
        kept = self.x_adv.kept(newly) if isinstance(self.x_adv, KeptRows) else newly
        kept_index = torch.tensor(kept, dtype=torch.int64)
        rows = {
            "index": index,
            "broken": broken,
            "refused": refused,
            "silent": silent,
            "feasible": dict(self.feasible),
            "broken_by": [self.broken_by[i] for i in index.tolist()],
            "kept_index": kept_index,
            "kept_rows": self.x_adv[kept_index.to(self.device)].cpu() if kept else None,
            "adv_logits": None if self.adv_logits is None else self.adv_logits[index],
            **{f: getattr(self, f)[index.to(getattr(self, f).device)].cpu() for f in SCALAR_FIELDS},
        }
        total, refused_total, silent_all = 0, 0, []
        for sent in self.shards.all_gather(rows):
            total += sent["broken"]
            refused_total += sent["refused"]
            silent_all += sent["silent"]
            for f in SCALAR_FIELDS:
                tensor = getattr(self, f)
                tensor[sent["index"].to(tensor.device)] = sent[f].to(tensor.device)
            for i, by in zip(sent["index"].tolist(), sent["broken_by"]):
                self.broken_by[i] = by
            if sent["adv_logits"] is not None and len(sent["index"]):
                self.logits_rows(sent["index"], sent["adv_logits"])
            if sent["kept_rows"] is not None:
                self.x_adv[sent["kept_index"].to(self.device)] = sent["kept_rows"].to(self.device)
        return total, refused_total, sorted(silent_all)

    def record(self, index: Tensor, x_adv: Tensor, name: str, clean: Tensor | None = None) -> int:
        """Judge adversarial candidates for the standing points ``index`` (whose clean points
        are ``clean``, read again when not given); keep the successes inside the threat model,
        refuse (and count in ``refused[name]``) the others."""
        x = self.x[index] if clean is None else clean
        inside = self.threat.contains(x_adv, x).cpu()
        pred = self.judge(x_adv)
        fooled = (pred != self.y[index]).cpu()
        outside = int((fooled & ~inside).sum())
        if outside:
            self.refused[name] = self.refused.get(name, 0) + outside
        success = fooled & inside
        chosen = index[success]
        if len(chosen) == 0:
            return 0
        on = success.to(x_adv.device)
        kept, from_clean = x_adv[on], x[success.to(x.device)]
        self.x_adv[chosen.to(self.device)] = kept
        self.adv_pred[chosen] = pred[success.to(pred.device)].to(self.adv_pred.device)
        self.standing[chosen] = False
        norms = lp_norm(kept - from_clean, self.threat.norm).cpu()
        self.norm[chosen] = norms
        self.margin[chosen] = torch.minimum(self.margin[chosen], norms)
        if self.score is not None:
            self.logits_rows(chosen.cpu(), self.score(kept))
        if self.threat.constraints is not None:
            was = self.feasible.get(name, (0, 0))
            ok = int(self.threat.constraints.feasible(kept, from_clean).sum())
            self.feasible[name] = (was[0] + len(chosen), was[1] + ok)
        for i in chosen.tolist():
            self.broken_by[i] = name
        return int(success.sum())
