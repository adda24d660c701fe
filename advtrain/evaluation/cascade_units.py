"""A cascade's work on one chunk as a journal unit (:mod:`.journal`): saved as it ends, replayed
when the evaluation resumes.

A unit holds what the work changed of its rows (the per-sample tensors, the adversarial rows it
kept, the logits) and the counts it added (forward passes, refused outputs, feasible points, the
silent successes it recovered), so that replaying it leaves the :class:`.cascade.Cascade` as
running it did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import AdvtrainError
from .journal import Unit
from .points import KeptRows

if TYPE_CHECKING:
    from .cascade import Cascade

#: The per-sample tensors of a :class:`.cascade.Cascade` that attacks change (besides
#: ``broken_by``, ``adv_logits`` and ``x_adv``).
SCALAR_FIELDS = ("standing", "adv_pred", "norm", "margin", "measured")


def row_state(cascade: Cascade, index: Tensor, name: str) -> dict[str, Any]:
    """What a unit of step ``name`` may change of the rows ``index``: to tell what it changed."""
    return {
        "broken": [cascade.broken_by[i] for i in index.tolist()],
        "refused": dict(cascade.refused),
        "feasible": dict(cascade.feasible),
        "silent": len(cascade.silent.get(name, [])),
    }


def unit_of(
    cascade: Cascade, index: Tensor, before: dict[str, Any], result: int, name: str
) -> Unit:
    """The outcome of a unit of work of step ``name`` on the rows ``index``, for the journal."""
    rows = index.cpu()
    newly = [i for i, was in zip(rows.tolist(), before["broken"]) if was != cascade.broken_by[i]]
    kept = cascade.x_adv.kept(newly) if isinstance(cascade.x_adv, KeptRows) else newly
    tensors: dict[str, Tensor] = {
        "index": rows,
        **{f: getattr(cascade, f)[rows.to(getattr(cascade, f).device)] for f in SCALAR_FIELDS},
    }
    if kept:
        kept_index = torch.tensor(kept, dtype=torch.int64)
        tensors["kept_index"] = kept_index
        tensors["kept_rows"] = cascade.x_adv[kept_index.to(cascade.device)]
    if cascade.adv_logits is not None:
        tensors["adv_logits"] = cascade.adv_logits[rows]
    return Unit(
        tensors,
        {
            "result": result,
            "broken_by": [cascade.broken_by[i] for i in rows.tolist()],
            "refused": cascade.refused.get(name, 0) - before["refused"].get(name, 0),
            "feasible": [
                a - b
                for a, b in zip(
                    cascade.feasible.get(name, (0, 0)), before["feasible"].get(name, (0, 0))
                )
            ],
            "silent": cascade.silent.get(name, [])[before["silent"] :],
        },
    )


def replay(cascade: Cascade, index: Tensor, unit: Unit) -> int:
    """Apply a saved unit's outcome to the rows ``index``; returns its result."""
    rows = unit.tensors["index"]
    if not torch.equal(rows, index.cpu()):
        raise AdvtrainError(
            "the resume state does not match this evaluation (a chunk's points differ)"
        )
    for f in SCALAR_FIELDS:
        target = getattr(cascade, f)
        target[rows.to(target.device)] = unit.tensors[f].to(target.device, target.dtype)
    for i, by in zip(rows.tolist(), unit.facts["broken_by"]):
        cascade.broken_by[i] = by
    if "adv_logits" in unit.tensors:
        cascade.logits_rows(rows, unit.tensors["adv_logits"])
    if "kept_index" in unit.tensors:
        kept = unit.tensors["kept_index"]
        cascade.x_adv[kept.to(cascade.device)] = unit.tensors["kept_rows"].to(cascade.device)
    if cascade.counter is not None:
        cascade.counter.points += int(unit.facts["forwards"][0])
        cascade.counter.calls += int(unit.facts["forwards"][1])
    name = unit.facts["key"].split("|")[1]
    if unit.facts["refused"]:
        cascade.refused[name] = cascade.refused.get(name, 0) + int(unit.facts["refused"])
    counted, feasible = unit.facts["feasible"]
    if counted:
        was = cascade.feasible.get(name, (0, 0))
        cascade.feasible[name] = (was[0] + counted, was[1] + feasible)
    if unit.facts.get("silent"):
        cascade.silent.setdefault(name, []).extend(int(i) for i in unit.facts["silent"])
    return int(unit.facts["result"])
