"""Backdoor attacks: a poisoned copy of a training split, with the poisoned rows recorded.

Every attack poisons exactly ``round(rate * N)`` of the ``N`` rows (Python's ``round``, half to
even), drawn without replacement from ``seed``, and stamps them with its trigger
(:mod:`advtrain.poisoning.triggers`); :meth:`Backdoor.apply` is the same stamp, used on test
inputs to measure the attack success rate.

* :func:`badnets` (Gu et al. 2017): a patch, rows drawn from the classes other than the
  target, their labels flipped to the target ("all-to-one", as BackdoorBench).
* :func:`blended` (Chen et al. 2017): a noise pattern blended in at ``alpha`` (0.2), same
  rows and labels as BadNets.
* :func:`clean_label` (Turner, Tsipras & Madry 2019, "Label-consistent backdoor attacks"):
  rows drawn from the target class only, labels kept; each image is first pushed by PGD
  (advtrain's :class:`~advtrain.attacks.PGD`, untargeted, every step taken) against a model
  trained on clean data, so that its own features are hard to learn and the model leans on
  the trigger, then the checkerboard patch is stamped. Turner et al. use linf eps 8/255 or
  16/255 on CIFAR-10; here eps defaults to the dataset's default eps (0.3 on MNIST).
* :func:`feature_trigger`: for tables, a few mutable features set to an extreme and repaired
  onto the schema's constraints; rows and labels as BadNets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks import PGD
from ..data import DatasetInfo, Split
from ..errors import AdvtrainError
from .triggers import BlendTrigger, FeatureTrigger, PatchTrigger, Trigger

#: The attack names :func:`make_backdoor` knows, with the kind of data each takes.
BACKDOORS: dict[str, str] = {
    "badnets": "image",
    "blended": "image",
    "clean-label": "image",
    "feature-trigger": "tabular",
}


@dataclass(frozen=True, eq=False)
class Poisoned:
    """A poisoned copy of a split: ``split`` (inputs and labels as trained on), the sorted
    positions ``indices`` of the poisoned rows, and the attack that made it."""

    split: Split
    indices: np.ndarray
    backdoor: Backdoor

    @property
    def mask(self) -> np.ndarray:
        """Bool ``(N,)``: True on the poisoned rows."""
        mask = np.zeros(len(self.split), dtype=bool)
        mask[self.indices] = True
        return mask


@dataclass(frozen=True, eq=False)
class Backdoor:
    """One backdoor attack: its trigger, target class, poisoning rate and seed.

    ``labels`` is ``"flip"`` (poisons drawn from the other classes, relabelled as the target)
    or ``"clean"`` (poisons drawn from the target class, labels kept). ``perturb`` (clean-label)
    maps the chosen rows before the trigger is stamped.
    """

    name: str
    trigger: Trigger
    target: int
    rate: float
    seed: int = 0
    labels: Literal["flip", "clean"] = "flip"
    perturb: PGD | None = None
    reference: nn.Module | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 0 < self.rate < 1):
            raise AdvtrainError(f"poisoning rate must be in (0, 1), got {self.rate!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise AdvtrainError(f"target class must be an integer >= 0, got {self.target!r}")

    def apply(self, x: Tensor) -> Tensor:
        """``x`` with the trigger: the function that poisons and that triggers test inputs."""
        return self.trigger.apply(x)

    def count(self, n: int) -> int:
        """How many of ``n`` rows are poisoned: ``round(rate * n)``."""
        return round(self.rate * n)

    def choose(self, y: Tensor) -> np.ndarray:
        """The sorted positions to poison among labels ``y``."""
        n = len(y)
        k = self.count(n)
        labels = y.cpu().numpy()
        pool = np.flatnonzero(
            labels == self.target if self.labels == "clean" else labels != self.target
        )
        where = "of the target class" if self.labels == "clean" else "outside the target class"
        if k < 1:
            raise AdvtrainError(f"rate {self.rate} poisons no row of {n} (round(rate * N) = 0)")
        if k > len(pool):
            raise AdvtrainError(
                f"rate {self.rate} asks for {k} poisoned rows but only {len(pool)} rows are "
                f"{where} (target class {self.target})"
            )
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)

    def poison(self, split: Split) -> Poisoned:
        """A poisoned copy of ``split`` (the original is left as it is)."""
        if not isinstance(split.x, Tensor):
            raise AdvtrainError("poisoning needs inputs held in memory (a tensor), not read lazily")
        indices = self.choose(split.y)
        index = torch.from_numpy(indices)
        x, y = split.x.clone(), split.y.clone()
        rows = x[index]
        if self.perturb is not None:
            if self.reference is None:
                raise AdvtrainError(f"{self.name} needs a model trained on clean data")
            rows = self.perturb(self.reference, rows, y[index]).detach()
        x[index] = self.apply(rows).to(x.dtype)
        if self.labels == "flip":
            y[index] = self.target
        return Poisoned(dataclasses.replace(split, x=x, y=y), indices, self)


def _check_target(info: DatasetInfo, target: int) -> None:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < info.n_classes:
        raise AdvtrainError(
            f"target class must be in [0, {info.n_classes}) for {info.name}, got {target!r}"
        )


def badnets(
    info: DatasetInfo, *, rate: float, target: int = 0, seed: int = 0, size: int | None = None
) -> Backdoor:
    """BadNets (Gu et al. 2017): a solid patch in the bottom-right corner, labels flipped."""
    _check_target(info, target)
    trigger = PatchTrigger.for_data(info, size=size)
    return Backdoor("badnets", trigger, target, rate, seed)


def blended(
    info: DatasetInfo, *, rate: float, target: int = 0, seed: int = 0, alpha: float = 0.2
) -> Backdoor:
    """Blended (Chen et al. 2017): uniform noise blended in at ``alpha``, labels flipped."""
    _check_target(info, target)
    return Backdoor("blended", BlendTrigger.for_data(info, alpha, seed), target, rate, seed)


def clean_label(
    info: DatasetInfo,
    reference: nn.Module,
    *,
    rate: float,
    target: int = 0,
    seed: int = 0,
    eps: float | None = None,
    steps: int = 20,
    size: int | None = None,
) -> Backdoor:
    """Clean-label (Turner et al. 2019): target-class rows pushed by untargeted PGD (linf
    ``eps``, ``steps`` steps, all taken) against ``reference`` (a model trained on clean
    data), then stamped with a checkerboard patch; labels kept."""
    _check_target(info, target)
    threat = info.threat_model(norm="linf", eps=eps)
    attack = PGD(threat, steps=steps, early_stop=False, seed=seed)
    trigger = PatchTrigger.for_data(info, size=size, pattern="checkerboard")
    return Backdoor(
        "clean-label",
        trigger,
        target,
        rate,
        seed,
        labels="clean",
        perturb=attack,
        reference=reference,
    )


def feature_trigger(
    info: DatasetInfo, *, rate: float, target: int = 0, seed: int = 0, n_features: int = 3
) -> Backdoor:
    """A table trigger: ``n_features`` mutable features at an extreme, repaired onto the
    schema's constraints; labels flipped."""
    _check_target(info, target)
    trigger = FeatureTrigger.for_data(info, n_features, seed)
    return Backdoor("feature-trigger", trigger, target, rate, seed)


def make_backdoor(
    name: str,
    info: DatasetInfo,
    *,
    rate: float,
    target: int = 0,
    seed: int = 0,
    reference: nn.Module | None = None,
) -> Backdoor:
    """The attack ``name`` (:data:`BACKDOORS`) for ``info``'s data; ``clean-label`` needs
    ``reference``, a model trained on clean data."""
    kind = BACKDOORS.get(name)
    if kind is None:
        raise AdvtrainError(f"unknown attack {name!r}; choose from: {', '.join(BACKDOORS)}")
    if kind != info.kind:
        raise AdvtrainError(f"attack {name} is for {kind} data; {info.name} is {info.kind} data")
    if name == "badnets":
        return badnets(info, rate=rate, target=target, seed=seed)
    if name == "blended":
        return blended(info, rate=rate, target=target, seed=seed)
    if name == "clean-label":
        if reference is None:
            raise AdvtrainError("clean-label needs a model trained on clean data")
        return clean_label(info, reference, rate=rate, target=target, seed=seed)
    return feature_trigger(info, rate=rate, target=target, seed=seed)


def triggered(
    backdoor: Backdoor, x: Tensor, y: Tensor, batch_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """The test inputs not of the target class, triggered, with their true labels: what the
    attack success rate and the robust accuracy on triggered inputs are measured on."""
    keep = y != backdoor.target
    xs, ys = x[keep], y[keep]
    parts = [backdoor.apply(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]
    return (torch.cat(parts) if parts else xs.clone()), ys
