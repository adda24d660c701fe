"""The attack protocol shared by every attack.

An attack is configured once (threat model, hyperparameters) and called as
``attack(model, x, y, *, target=None) -> x_adv``. The base class gives every attack:

- input checks and the threat model's validation, with one-line errors;
- the model put in eval mode with its parameters frozen, and both restored afterwards, so no
  parameter gradient is ever left behind;
- batching, and moving inputs to the model's device and back;
- points the model already gets wrong returned as they are, never attacked;
- restarts that keep the worst case *per sample* (a success beats any failure; among failures
  the higher loss wins), run only on the points that are still standing;
- an optional progress bar (``progress=True``) over batches and restarts.

Minimum-norm attacks (:class:`MinNormAttack`: CW-L2, DeepFool, FAB, ...) search for the smallest
perturbation that changes the prediction. ``attack.min_norm(model, x, y)`` returns it with its
norm (the robust margin of each point); called as an ordinary attack they keep what fits in the
threat model's ``eps``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..device_sync import compaction_interval
from ..errors import AdvtrainError
from ..losses import is_adversarial
from ..threat import ThreatModel, lp_norm
from ..util import check_positive_int
from .fast_grad import fast_input_gradients


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` parameters; restore both on exit.

    Each submodule gets back its own mode: a wrapper built around an eval-mode model is in
    training mode (``nn.Module``'s default), and restoring the wrapper's mode recursively would
    leave the inner model training (dropout and BatchNorm batch statistics on) after the attack.

    Inside, input gradients of small-channel CPU convolutions take a faster backward
    (:mod:`~advtrain.attacks.fast_grad`).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with fast_input_gradients():
            yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def put_rows(target: Tensor, index: Tensor, chosen: Tensor, values: Tensor) -> None:
    """``target[index[chosen]] = values[chosen]``: on the CPU by selecting the rows; elsewhere
    (see :func:`~advtrain.device_sync.compaction_interval`) by writing ``index``'s rows whole,
    with no read-back."""
    if compaction_interval(target.device) == 1:
        target[index[chosen]] = values[chosen]
        return
    rows = chosen.reshape((-1,) + (1,) * (values.dim() - 1))
    target[index] = torch.where(rows, values, target[index])


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a stateless model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default


@dataclass
class Outcome:
    """What one run of an attack found for a batch: the points, their success and loss."""

    x_adv: Tensor
    success: Tensor  # bool, per sample
    loss: Tensor  # per sample, the objective the attack ascends (higher is worse for the model)

    def merge(self, other: Outcome, index: Tensor) -> None:
        """Keep, per sample, the worse of self[index] and ``other`` (success first, then loss),
        written by :func:`put_rows` (no read-back to the host off the CPU)."""
        have_success, have_loss = self.success[index], self.loss[index]
        better = (other.success & ~have_success) | (
            (other.success == have_success) & (other.loss > have_loss)
        )
        for mine, theirs in (
            (self.x_adv, other.x_adv),
            (self.success, other.success),
            (self.loss, other.loss),
        ):
            put_rows(mine, index, better, theirs)


class Attack(ABC):
    """Base class of all attacks.

    Args:
        threat: the threat model; when omitted it is built from ``norm``, ``eps``, ``lower``,
            ``upper`` and ``mask``.
        restarts: independent runs; each sample keeps its worst case over them.
        batch_size: attack this many samples at a time (``None``: all at once).
        seed: seeds the attack's own random generator (random starts), for reproducible results.
        progress: show a progress bar (on standard error) over batches and restarts.
    """

    #: The registry name of the attack.
    name: ClassVar[str] = ""
    #: The norms the attack supports.
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    #: Whether the attack accepts an unbounded threat model (``eps = inf``).
    unbounded: ClassVar[bool] = False

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        norm: str = "linf",
        eps: float | None = None,
        lower: float | Tensor = 0.0,
        upper: float | Tensor = 1.0,
        mask: Tensor | None = None,
        restarts: int = 1,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = False,
    ) -> None:
        if threat is None:
            if eps is None and self.unbounded:
                eps = float("inf")
            if eps is None:
                raise AdvtrainError(f"{type(self).__name__} needs a threat model or an eps")
            threat = ThreatModel(norm=norm, eps=eps, lower=lower, upper=upper, mask=mask)  # type: ignore[arg-type]
        elif not isinstance(threat, ThreatModel):
            raise AdvtrainError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            raise AdvtrainError(
                f"{type(self).__name__} supports the norms {', '.join(self.norms)}, not {threat.norm}"
            )
        if not threat.bounded and not self.unbounded:
            raise AdvtrainError(f"{type(self).__name__} needs a finite eps")
        check_positive_int("restarts", restarts)
        if batch_size is not None:
            check_positive_int("batch_size", batch_size)
        self.threat = threat
        self.restarts = restarts
        self.batch_size = batch_size
        self.seed = seed
        self.progress = bool(progress)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._hyperparameters().items())
        return f"{type(self).__name__}({fields})"

    def _hyperparameters(self) -> dict[str, object]:
        return {"norm": self.threat.norm, "eps": self.threat.eps, "restarts": self.restarts}

    # ------------------------------------------------------------------ the protocol
    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> Tensor:
        """Adversarial examples for ``x`` (labels ``y``), inside the threat model.

        With ``target`` (one class per sample) the attack tries to make the model predict it.
        """
        return self._batched(model, x, y, target, self._restarts).x_adv

    def _batched(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        runner: Callable[..., Outcome],
    ) -> Outcome:
        """Checks, device moves, seeding, freezing and batching around ``runner`` (per batch)."""
        _check_inputs(x, y, target)
        self.threat.validate(x)
        home = x.device
        device = model_device(model, default=home)
        x, y = x.detach().to(device), y.to(device)
        target = None if target is None else target.to(device)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
        size = self.batch_size or max(len(x), 1)
        starts = range(0, len(x), size)
        pieces = []
        with (
            frozen(model),
            _progress_bar(self.progress, self.name or type(self).__name__, len(starts)) as advance,
        ):
            for i in starts:
                batch = (
                    x[i : i + size],
                    y[i : i + size],
                    None if target is None else target[i : i + size],
                )
                if self.screens_clean_points:
                    pieces.append(self._unbroken(runner, model, *batch, generator))
                else:
                    pieces.append(runner(model, *batch, generator))
                advance()
        if not pieces:
            empty = torch.zeros(0, device=home)
            return Outcome(x.clone().to(home), empty.bool(), empty)
        return Outcome(
            *(
                torch.cat([getattr(p, f) for p in pieces]).detach().to(home)
                for f in ("x_adv", "success", "loss")
            )
        )

    @property
    def screens_clean_points(self) -> bool:
        """Whether points already adversarial before the attack are returned untouched, without
        running it on them. False where an attack must perturb every point (PGD crafting training
        inputs) or checks the clean point itself as a counted query (Square, HopSkipJump)."""
        return True

    @staticmethod
    def _unbroken(
        runner: Callable[..., Outcome],
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """``runner`` on the points the model gets right (with ``target``: does not yet put in
        the target class). The others are already adversarial: they come back unchanged, as
        successes at distance 0, and draw nothing from ``generator`` (as in AutoAttack)."""
        with torch.no_grad():
            done = (
                is_adversarial(model(x), y, target)
                if len(x)
                else torch.zeros(0, dtype=torch.bool, device=x.device)
            )
        if not bool(done.any()):
            return runner(model, x, y, target, generator)
        zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        outcome = Outcome(x.clone(), done.clone(), zero)
        index = (~done).nonzero().squeeze(1)
        if len(index):
            found = runner(
                model, x[index], y[index], None if target is None else target[index], generator
            )
            outcome.x_adv[index] = found.x_adv
            outcome.success[index] = found.success
            outcome.loss[index] = found.loss.to(outcome.loss.dtype)
        return outcome

    def _restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """Run the attack ``restarts`` times, each time only on the samples not yet broken."""
        best: Outcome | None = None
        for _ in range(self.restarts):
            index = (
                torch.arange(len(x), device=x.device)
                if best is None
                else (~best.success).nonzero().squeeze(1)
            )
            if len(index) == 0:
                break
            outcome = self.run(
                model, x[index], y[index], None if target is None else target[index], generator
            )
            if best is None:
                best = outcome
            else:
                best.merge(outcome, index)
        assert best is not None
        return best

    @abstractmethod
    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        """One run of the attack on one batch (model already frozen, tensors on its device)."""


class MinNormAttack(Attack):
    """Base of the minimum-norm attacks: they search for the smallest adversarial perturbation.

    Subclasses implement :meth:`minimize`. ``eps`` may be omitted (unbounded, ``inf``);
    :meth:`min_norm` returns, per point, the smallest adversarial perturbation found and its
    norm (``inf`` where none was found). Called as an ordinary attack, the point found is kept
    when it fits in the eps-ball and is otherwise projected onto it (and usually fails).
    Restarts run on every point and keep the smallest norm.
    """

    norms = ("l2", "linf")
    unbounded = True

    @abstractmethod
    def minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Per point, the smallest adversarial point found (inside the bounds, mask respected);
        where none was found, any point (it is judged by the model afterwards)."""

    def min_norm(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> MinNormResult:
        """The smallest adversarial perturbation found for each point, and its norm."""
        outcome = self._batched(model, x, y, target, self._minimize_restarts)
        norms = torch.where(
            outcome.success, -outcome.loss, torch.full_like(outcome.loss, float("inf"))
        )
        x_adv = torch.where(
            _rows(outcome.success, x), outcome.x_adv, x.detach().to(outcome.x_adv.device)
        )
        return MinNormResult(x_adv, norms, outcome.success)

    def _minimize_restarts(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        index = torch.arange(len(x), device=x.device)
        best: Outcome | None = None
        for _ in range(self.restarts):
            outcome = self._judged(
                model, x, y, target, self.minimize(model, x, y, target, generator)
            )
            if best is None:
                best = outcome
            else:
                best.merge(outcome, index)
        assert best is not None
        return best

    def _judged(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, x_found: Tensor
    ) -> Outcome:
        """An outcome for points found: success as the model says, loss = minus the norm."""
        x_found = self.threat.clip_bounds(x + self.threat.apply_mask(x_found.detach() - x))
        with torch.no_grad():
            success = (
                is_adversarial(model(x_found), y, target)
                if len(x)
                else torch.zeros(0, dtype=torch.bool, device=x.device)
            )
        norms = lp_norm(x_found - x, self.threat.norm)
        return Outcome(
            x_found, success, torch.where(success, -norms, torch.full_like(norms, float("-inf")))
        )

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
    ) -> Outcome:
        found = self._judged(model, x, y, target, self.minimize(model, x, y, target, generator))
        if not self.threat.bounded:
            return found
        x_adv = self.threat.project(found.x_adv, x)
        with torch.no_grad():
            success = is_adversarial(model(x_adv), y, target)
        return Outcome(x_adv, success, found.loss)


@dataclass
class MinNormResult:
    """Per point: the smallest adversarial example found, its perturbation norm, and success."""

    x_adv: Tensor  # the clean point where no adversarial example was found
    norm: Tensor  # inf where none was found
    success: Tensor


def _rows(flags: Tensor, like: Tensor) -> Tensor:
    return flags.reshape((-1,) + (1,) * (like.dim() - 1))


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over ``total`` batches on standard error, or a no-op."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _check_inputs(x: Tensor, y: Tensor, target: Tensor | None) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise AdvtrainError("x and y must be tensors")
    if x.dim() < 2:
        raise AdvtrainError(f"x must be a batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise AdvtrainError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, labels in (("y", y), ("target", target)):
        if labels is None:
            continue
        if labels.shape != (x.shape[0],):
            raise AdvtrainError(
                f"{name} must have shape ({x.shape[0]},) to match x, got {tuple(labels.shape)}"
            )
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise AdvtrainError(f"{name} must hold integer class labels, got {labels.dtype}")
        if len(labels) and int(labels.min()) < 0:
            raise AdvtrainError(f"{name} holds a negative class label")
