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
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from torch import Tensor, nn

from ..device_sync import compaction_interval
from ..errors import AdvtrainError
from ..losses import is_adversarial
from ..threat import Norm, ThreatModel, lp_norm
from ..util import check_positive_int
from .fast_grad import input_gradient_speedup
from .registry import check_options

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class _Frozen:
    """What :func:`frozen` changed on one model, and how many callers hold it frozen."""

    holders: int
    modes: list[tuple[nn.Module, bool]]
    flags: list[tuple[nn.Parameter, bool]]


#: Models frozen right now, by id, so that overlapping calls (nested attacks, or several threads
#: attacking one model) restore the state from before the first of them, after the last.
_FROZEN: dict[int, _Frozen] = {}
_FROZEN_LOCK = threading.Lock()


def _freeze(model: nn.Module) -> None:
    with _FROZEN_LOCK:
        held = _FROZEN.get(id(model))
        if held is not None:
            held.holders += 1
            return
        modes = [(m, m.training) for m in model.modules()]
        flags = [(p, p.requires_grad) for p in model.parameters()]
        _FROZEN[id(model)] = _Frozen(1, modes, flags)
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)


def _thaw(model: nn.Module) -> None:
    with _FROZEN_LOCK:
        held = _FROZEN[id(model)]
        held.holders -= 1
        if held.holders:
            return
        del _FROZEN[id(model)]
        for p, flag in held.flags:
            p.requires_grad_(flag)
        for m, mode in held.modes:
            m.training = mode


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` parameters; restore both on exit.

    Each submodule gets back its own mode: a wrapper built around an eval-mode model is in
    training mode (``nn.Module``'s default), and restoring the wrapper's mode recursively would
    leave the inner model training (dropout and BatchNorm batch statistics on) after the attack.
    Overlapping calls on one model (an attack inside another, or two threads) share one freeze:
    the state from before the first is restored when the last one leaves.

    Inside, the input-gradient speed-up of the model's device is in force
    (:func:`~advtrain.attacks.fast_grad.input_gradient_speedup`: on the CPU, the faster backward
    of small-channel convolutions; nothing elsewhere), for a model with a convolution only: for
    any other (an MLP on a table) it would put every torch call through Python for nothing.
    """
    _freeze(model)
    try:
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        device = model_device(model, torch.device("cpu"))
        with input_gradient_speedup(device) if has_conv else contextlib.nullcontext():
            yield model
    finally:
        _thaw(model)


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
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return default


@dataclass
class Outcome:
    """What an attack found for a batch: the points, their success and loss, and (for attacks
    that count their model queries, see :attr:`Attack.counts_queries`) the queries spent."""

    x_adv: Tensor
    success: Tensor  # bool, per sample
    loss: Tensor  # per sample, the objective the attack ascends (higher is worse for the model)
    queries: Tensor | None = None  # int64, per sample, summed over runs; None: not counted

    def merge(self, other: Outcome, index: Tensor) -> None:
        """Keep, per sample, the worse of self[index] and ``other`` (success first, then loss),
        written by :func:`put_rows` (no read-back to the host off the CPU); the queries of both
        add up."""
        if self.queries is not None and other.queries is not None:
            self.queries[index] += other.queries.to(self.queries.device)
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


class AttackOptions(TypedDict, total=False):
    """The options every attack takes (see :class:`Attack`), for ``**options`` of subclasses."""

    norm: Norm | None
    eps: float | None
    lower: float | Tensor
    upper: float | Tensor
    mask: Tensor | None
    restarts: int
    batch_size: int | None
    seed: int | None
    progress: bool


def already_adversarial(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """The clean-point screen: per point, whether the model already misclassifies it (with
    ``target``: already predicts the target), by one forward pass without gradients."""
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with torch.no_grad():
        return is_adversarial(model(x), y, target)


def rows_of(
    index: Tensor, x: Tensor, y: Tensor, target: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows ``index`` of a batch and its labels (and targets)."""
    return x[index], y[index], None if target is None else target[index]


def rerun_unbroken(
    n: int,
    device: torch.device,
    times: int,
    run: Callable[[int, Tensor, Outcome | None], Outcome],
) -> Outcome:
    """Rerun on the unbroken rows, then merge: ``run(k, index, best)`` for ``k = 0, 1, ...,
    times - 1``, each on the rows ``index`` of the batch (``n`` rows) that no earlier run broke
    (every row at first; ``best`` is the merged outcome so far, None at first), each outcome
    merged into ``best`` per sample (:meth:`Outcome.merge`). Stops early once every row is
    broken."""
    best: Outcome | None = None
    for k in range(times):
        index = torch.arange(n, device=device) if best is None else (~best.success).nonzero()[:, 0]
        if len(index) == 0:
            break
        outcome = run(k, index, best)
        if best is None:
            best = outcome
        else:
            best.merge(outcome, index)
    if best is None:
        raise AdvtrainError("rerun_unbroken needs at least one row and one run")
    return best


class Attack(ABC):
    """Base class of all attacks.

    Args:
        threat: the threat model; when omitted it is built from ``norm`` (default
            :attr:`default_norm`), ``eps``, ``lower``, ``upper`` and ``mask``.
        restarts: independent runs; each sample keeps its worst case over them.
        batch_size: attack this many samples at a time (``None``: all at once).
        seed: seeds the attack's own random generator (random starts), for reproducible results.
        progress: show a progress bar (on standard error) over batches and restarts.

    Subclasses list their own options as typed keyword-only arguments and pass these ones on
    as ``**options: Unpack[AttackOptions]``; an option no constructor takes is refused with an
    :class:`~advtrain.errors.AdvtrainError` that lists the valid ones
    (:func:`~advtrain.attacks.registry.attack_options`).
    """

    #: The registry name of the attack.
    name: ClassVar[str] = ""
    #: The norms the attack supports.
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2", "l1")
    #: The norm of a threat model built from keywords when ``norm`` is not given.
    default_norm: ClassVar[Norm] = "linf"
    #: Whether the attack accepts an unbounded threat model (``eps = inf``).
    unbounded: ClassVar[bool] = False
    #: Whether :meth:`outcome` counts the model queries of each point (score- and
    #: decision-based attacks with a query budget).
    counts_queries: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        check_options(cls, kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        threat: ThreatModel | None = None,
        *,
        norm: Norm | None = None,
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
            threat = ThreatModel(
                norm=self.default_norm if norm is None else norm,
                eps=eps,
                lower=lower,
                upper=upper,
                mask=mask,
            )
        elif not isinstance(threat, ThreatModel):
            raise AdvtrainError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if threat.norm not in self.norms:
            raise AdvtrainError(
                f"{type(self).__name__} supports the norms {', '.join(self.norms)}, "
                f"not {threat.norm}"
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
        return self.outcome(model, x, y, target=target).x_adv

    def outcome(
        self, model: nn.Module, x: Tensor, y: Tensor, *, target: Tensor | None = None
    ) -> Outcome:
        """What the attack found for each point, on ``x``'s device: the adversarial example
        (what :meth:`__call__` returns), its success, the loss the attack ascends and, where
        :attr:`counts_queries`, the model queries each point used, summed over restarts (int64).
        Each call returns its own result, so one attack object may serve several threads."""
        outcome = self._batched(model, x, y, target, self._restarts)
        if self.counts_queries and outcome.queries is None:
            outcome.queries = torch.zeros(len(outcome.x_adv), dtype=torch.int64, device=x.device)
        return outcome

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
        queries = None
        if all(p.queries is not None for p in pieces):
            queries = torch.cat([p.queries for p in pieces if p.queries is not None]).to(home)
        x_adv, success, loss = (
            torch.cat([getattr(p, f) for p in pieces]).detach().to(home)
            for f in ("x_adv", "success", "loss")
        )
        return Outcome(x_adv, success, loss, queries)

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
        the target class; :func:`already_adversarial`). The others are already adversarial:
        they come back unchanged, as successes at distance 0 (no query), and draw nothing from
        ``generator`` (as in AutoAttack)."""
        done = already_adversarial(model, x, y, target)
        if not bool(done.any()):
            return runner(model, x, y, target, generator)
        zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        outcome = Outcome(x.clone(), done.clone(), zero)
        index = (~done).nonzero().squeeze(1)
        if len(index):
            found = runner(model, *rows_of(index, x, y, target), generator)
            outcome.x_adv[index] = found.x_adv
            outcome.success[index] = found.success
            outcome.loss[index] = found.loss.to(outcome.loss.dtype)
            if found.queries is not None:
                outcome.queries = torch.zeros(len(x), dtype=torch.int64, device=x.device)
                outcome.queries[index] = found.queries
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
        return rerun_unbroken(
            len(x),
            x.device,
            self.restarts,
            lambda _, index, __: self.run(model, *rows_of(index, x, y, target), generator),
        )

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

    norms: ClassVar[tuple[str, ...]] = ("l2", "linf")
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
        """Every restart on every point; each point keeps its smallest adversarial norm."""
        index = torch.arange(len(x), device=x.device)
        best: Outcome | None = None
        for _ in range(self.restarts):
            found = self._restart_minimize(model, x, y, target, generator, best)
            outcome = self._judged(model, x, y, target, found)
            if best is None:
                best = outcome
            else:
                best.merge(outcome, index)
        assert best is not None
        return best

    def _restart_minimize(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        target: Tensor | None,
        generator: torch.Generator | None,
        best: Outcome | None,
    ) -> Tensor:
        """One run of :meth:`minimize` for the restarts of :meth:`min_norm`; ``best`` is the
        outcome of the earlier runs (None on the first)."""
        return self.minimize(model, x, y, target, generator)

    def _judged(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, x_found: Tensor
    ) -> Outcome:
        """An outcome for points found: success as the model says, loss = minus the norm."""
        x_found = self.threat.clip_bounds(x + self.threat.apply_mask(x_found.detach() - x))
        success = already_adversarial(model, x_found, y, target)
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
        return self._within_eps(model, x, y, target, self.minimize(model, x, y, target, generator))

    def _within_eps(
        self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, x_found: Tensor
    ) -> Outcome:
        """The outcome of points found by :meth:`minimize`, projected onto the eps-ball (when
        bounded) and judged by the model."""
        found = self._judged(model, x, y, target, x_found)
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
