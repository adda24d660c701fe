"""Resume checkpoints: everything a run needs to go on as if it had never stopped.

At the end of every epoch (and every ``checkpoint_every`` batches) the trainer writes one
:class:`ResumeState`: the weights, the optimizer (and gradient scaler) state, the run's progress
(:class:`~advtrain.training.records.RunState`: epochs done, best epoch with its weights, optimizer
step, which the learning-rate schedule and eps warm-up are functions of), the position inside
the current epoch (the order of its batches, the next batch, its running totals), the states of
the batch generator and of the global torch RNG (and CUDA's), the weight average, and the state
the method keeps between batches; under torchrun, every rank's own RNG, method state and totals.
Tensors go to the safetensors file (the generator states as uint8 tensors), the rest to its JSON
sidecar. Two slots, ``resume-0`` and ``resume-1``, are written in turn, so that a process killed
while writing one leaves the other intact; :func:`read_newest` takes the newest slot whose
checksum holds. With the same configuration a resumed run ends with exactly the weights of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import AdvtrainError, CheckpointError
from ..util import one_line
from .averaging import WeightAverage
from .config import TrainConfig
from .records import EpochRecord, RunState

RESUME_SLOTS = ("resume-0.safetensors", "resume-1.safetensors")
RESUME_KIND = "advtrain-resume"

#: An epoch's running totals: summed loss, correct predictions, rows seen.
Totals = tuple[float, int, int]
#: An epoch begun before a resume: (batch order, next batch, summed loss, correct, rows seen).
Partial = tuple[Tensor, int, float, int, int]


@dataclass
class RankState:
    """What one rank of a distributed run keeps of its own: its RNG (random starts), the state of
    its method (e.g. the perturbation ``free`` carries) and its running totals of the epoch."""

    rng: Tensor
    method: dict[str, Tensor]
    epoch_totals: Totals | None


@dataclass
class ResumeState:
    """One resume checkpoint (see the module docstring); ``next_batch`` 0 is an epoch's start."""

    config: dict[str, Any]
    run: RunState
    next_batch: int
    epoch_order: Tensor | None
    epoch_totals: Totals | None
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    average: dict[str, Tensor] | None
    average_updates: int | None
    rng_torch: Tensor
    rng_batches: Tensor
    rng_cuda: list[Tensor]
    method: dict[str, Tensor]
    ranks: list[RankState] = field(default_factory=list)

    # ------------------------------------------------------------------ to and from files
    def write(self, run_dir: Path) -> None:
        """Save into the slot of this checkpoint's serial number."""
        tensors, meta = self._flatten()
        save_checkpoint(run_dir / RESUME_SLOTS[self.run.serial % 2], tensors, meta)

    def _flatten(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        run = self.run
        tensors = {f"model.{k}": v for k, v in self.model.items()}
        tensors.update({f"best.{k}": v for k, v in (run.best_state or {}).items()})
        tensors.update({f"average.{k}": v for k, v in (self.average or {}).items()})
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in self.optimizer["state"].items():
            for name, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{name}"] = value
                else:
                    scalars.setdefault(str(index), {})[name] = value
        tensors["rng.torch"] = self.rng_torch
        tensors["rng.batches"] = self.rng_batches
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(self.rng_cuda)})
        tensors.update({f"method.{k}": v for k, v in self.method.items()})
        for rank, own in enumerate(self.ranks):
            tensors[f"rng.torch.rank{rank}"] = own.rng
            tensors.update({f"ranks.{rank}.method.{k}": v for k, v in own.method.items()})
        if self.epoch_order is not None:
            tensors["epoch.order"] = self.epoch_order
        meta = {
            "kind": RESUME_KIND,
            "serial": run.serial,
            "config": self.config,
            "next_epoch": run.next_epoch,
            "next_batch": self.next_batch,
            "epoch_totals": _listed(self.epoch_totals),
            "global_step": run.global_step,
            "cuda_rng_states": len(self.rng_cuda),
            "average_updates": self.average_updates,
            "history": [r.to_dict() for r in run.history],
            "best_epoch": run.best_epoch,
            "best_key": _listed(run.best_key),
            "stop_reason": run.stop_reason,
            "warnings": run.warnings,
            "optimizer": {"param_groups": self.optimizer["param_groups"], "scalars": scalars},
            "scaler": self.scaler,
            "ranks": [{"epoch_totals": _listed(own.epoch_totals)} for own in self.ranks],
        }
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> ResumeState:
        """The state :meth:`write` saved as ``tensors`` and ``meta`` (KeyError, TypeError or
        ValueError when they do not hold one)."""

        def take(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        optimizer_state: dict[int, dict[str, Any]] = {}
        for key, value in take("optim.").items():
            index, name = key.split(".", 1)
            optimizer_state.setdefault(int(index), {})[name] = value
        for index, scalars in meta["optimizer"]["scalars"].items():
            optimizer_state.setdefault(int(index), {}).update(scalars)
        best = take("best.")
        run = RunState(
            history=[EpochRecord(**r) for r in meta["history"]],
            best_epoch=meta["best_epoch"],
            best_key=_key(meta["best_key"]),
            best_state=best or None,
            global_step=meta["global_step"],
            stop_reason=meta["stop_reason"],
            warnings=list(meta["warnings"]),
            next_epoch=meta["next_epoch"],
            serial=meta["serial"],
        )
        ranks = [
            RankState(
                rng=tensors[f"rng.torch.rank{rank}"],
                method=take(f"ranks.{rank}.method."),
                epoch_totals=_totals(own["epoch_totals"]),
            )
            for rank, own in enumerate(meta.get("ranks") or [])
        ]
        return cls(
            config=meta["config"],
            run=run,
            next_batch=meta["next_batch"],
            epoch_order=tensors.get("epoch.order"),
            epoch_totals=_totals(meta["epoch_totals"]),
            model=take("model."),
            optimizer={"state": optimizer_state, "param_groups": meta["optimizer"]["param_groups"]},
            scaler=meta.get("scaler"),
            average=take("average.") if meta["average_updates"] is not None else None,
            average_updates=meta["average_updates"],
            rng_torch=tensors["rng.torch"],
            rng_batches=tensors["rng.batches"],
            rng_cuda=[tensors[f"rng.cuda.{i}"] for i in range(meta["cuda_rng_states"])],
            method=take("method."),
            ranks=ranks,
        )

    # ------------------------------------------------------------------ from and to a trainer
    @classmethod
    def capture(
        cls,
        config: TrainConfig,
        run: RunState,
        position: tuple[int, int, Tensor | None, Totals | None],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        average: WeightAverage | None,
        generator: torch.Generator,
        method: dict[str, Tensor],
        ranks: list[RankState],
    ) -> ResumeState:
        """The state of a run at ``position`` (next epoch, next batch, the epoch's batch order
        and running totals when inside it): ``run`` with the states of its parts."""
        next_epoch, next_batch, order, totals = position
        return cls(
            config=config.to_dict(),
            run=dataclasses.replace(run, next_epoch=next_epoch),
            next_batch=next_batch,
            epoch_order=order,
            epoch_totals=totals,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            average=average.state_dict() if average is not None else None,
            average_updates=average.updates if average is not None else None,
            rng_torch=torch.get_rng_state(),
            rng_batches=generator.get_state(),
            rng_cuda=cuda_rng_states(),
            method=method,
            ranks=ranks,
        )

    def restore_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        average: WeightAverage | None,
        generator: torch.Generator,
        rank: int,
    ) -> None:
        """Load the weights and the optimizer, scaler, average and RNG states of rank ``rank``
        (KeyError, TypeError, ValueError or RuntimeError when they do not fit)."""
        model.load_state_dict(self.model)
        if average is not None:
            if self.average is None or self.average_updates is None:
                raise KeyError("average")
            average.load_state_dict(self.average, self.average_updates)
        optimizer.load_state_dict(optimizer_state(self.optimizer, optimizer.param_groups))
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)
        torch.set_rng_state(self.ranks[rank].rng if rank < len(self.ranks) else self.rng_torch)
        generator.set_state(self.rng_batches)
        set_cuda_rng_states(self.rng_cuda)

    # ------------------------------------------------------------------ one rank's view
    def own(self, rank: int, world: int) -> RankState | None:
        """Rank ``rank``'s own state when the checkpoint has one per rank of this run's world."""
        return self.ranks[rank] if len(self.ranks) == world else None

    def partial_epoch(self, rank: int, world: int) -> Partial | None:
        """The epoch begun at the checkpoint, for rank ``rank``: (batch order, next batch, its
        running totals), None at an epoch's start. Totals are the rank's own when the checkpoint
        has them, else rank 0's (the other ranks' rows then left out of the epoch's)."""
        if not self.next_batch:
            return None
        own = self.own(rank, world)
        totals = own.epoch_totals if own is not None else self.epoch_totals
        if own is None and rank > 0:
            totals = (0.0, 0, 0)
        if totals is None or self.epoch_order is None:
            raise KeyError("epoch_totals")
        return (self.epoch_order, self.next_batch, *totals)

    def method_state(self, rank: int, world: int) -> dict[str, Tensor]:
        """The method's state for rank ``rank`` (its own when the checkpoint has it)."""
        own = self.own(rank, world)
        return own.method if own is not None else self.method


def optimizer_state(saved: dict[str, Any], current_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``saved`` (from a checkpoint) as an optimizer state dict: JSON turned tuples (Adam's
    betas) into lists, which go back to tuples where the current optimizer has tuples."""
    groups = []
    for group, current in zip(saved["param_groups"], current_groups):
        group = dict(group)
        for key, value in group.items():
            if isinstance(current.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
        groups.append(group)
    return {"state": saved["state"], "param_groups": groups}


def cuda_rng_states() -> list[Tensor]:
    """Every CUDA device's RNG state (none before CUDA is initialised)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []


def set_cuda_rng_states(states: list[Tensor]) -> None:
    """Restore :func:`cuda_rng_states` when this machine has the same devices."""
    if states and torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states)


def clear_slots(run_dir: Path) -> None:
    """Remove a previous run's checkpoints: they must not be resumed into a new run."""
    for slot in RESUME_SLOTS:
        for path in (run_dir / slot, (run_dir / slot).with_suffix(".json")):
            path.unlink(missing_ok=True)


def unfit(source: Path | None, exc: Exception) -> CheckpointError:
    """The one-line error of a checkpoint that does not fit this run."""
    return CheckpointError(
        f"cannot resume {source}: its checkpoint does not fit "
        f"this run ({type(exc).__name__}: {one_line(exc, 120)})"
    )


def read_newest(
    source: Path | None, config: TrainConfig, log: Callable[[str], None]
) -> ResumeState | None:
    """The newest intact resume checkpoint of run directory ``source`` (None: none yet), after
    checking that ``config`` is the run's."""
    if source is None:
        raise AdvtrainError("resuming needs a run directory")
    path = source / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdvtrainError(
            f"cannot resume: '{path}' is missing (not an advtrain run directory)"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise AdvtrainError(f"cannot resume: '{path}' is not valid JSON") from None
    differences = config_differences(saved, config)
    if differences:
        raise AdvtrainError(
            f"cannot resume {source}: the configuration differs from its "
            f"config.json in {differences}"
        )
    newest: tuple[dict[str, Tensor], dict[str, Any]] | None = None
    for slot in RESUME_SLOTS:
        if not (source / slot).exists():
            continue
        try:
            tensors, meta = load_checkpoint(source / slot)
        except CheckpointError as exc:  # torn by a kill while it was written: the other one
            log(f"skipping {slot}: {exc}")
            continue
        if meta.get("kind") != RESUME_KIND:
            continue
        if newest is None or meta["serial"] > newest[1]["serial"]:
            newest = (tensors, meta)
    if newest is None:
        log(f"no checkpoint in {source} yet: starting from the beginning")
        return None
    differences = config_differences(newest[1]["config"], config)
    if differences:
        raise AdvtrainError(
            f"cannot resume {source}: its checkpoint was written with "
            f"another configuration ({differences})"
        )
    try:
        return ResumeState.from_checkpoint(*newest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise unfit(source, exc) from None


def config_differences(saved: dict[str, Any], config: TrainConfig) -> str:
    """The keys (other than ``out``) where ``saved`` (a config.json) and ``config`` differ."""
    try:
        reference = TrainConfig(**{k: v for k, v in saved.items() if k in config.to_dict()})
    except (AdvtrainError, TypeError) as exc:
        return f"a config.json this version cannot read ({one_line(exc, 120)})"
    ours, theirs = config.to_dict(), reference.to_dict()
    differing = [
        f"{key} ({theirs[key]!r} in the run, {ours[key]!r} here)"
        for key in ours
        if key != "out" and ours[key] != theirs[key]
    ]
    return ", ".join(differing)


def _listed(values: tuple[Any, ...] | None) -> list[Any] | None:
    return None if values is None else list(values)


def _key(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _totals(values: list[Any] | None) -> Totals | None:
    return None if values is None else (float(values[0]), int(values[1]), int(values[2]))
