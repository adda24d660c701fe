"""Scan a user's own training data for poisoned rows: spectral signatures and activation
clustering (:mod:`.defences`) on the penultimate-layer features of the user's model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..data import Split
from ..errors import AdvtrainError
from ..models.features import penultimate_features
from .defences import Suspects, activation_clustering, spectral_signatures

#: The defences a scan may run.
SCANNERS = ("spectral", "ac")


@dataclass(frozen=True)
class ScanResult:
    """The suspects each defence ranked, over ``n`` rows; ``rows`` maps a position to the
    row's number in the user's file (tables), when known."""

    n: int
    expected_rate: float
    suspects: dict[str, Suspects]
    rows: np.ndarray | None = None

    def row_of(self, index: int) -> int | None:
        return None if self.rows is None else int(self.rows[index])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "expected_rate": self.expected_rate,
            "defences": {
                name: [
                    {
                        "index": i,
                        "score": s,
                        **({"row": self.row_of(i)} if self.rows is not None else {}),
                    }
                    for i, s in found.ranked()
                ]
                for name, found in self.suspects.items()
            },
        }


def scan(
    model: nn.Module,
    split: Split,
    *,
    defences: tuple[str, ...] = SCANNERS,
    expected_rate: float = 0.01,
    seed: int = 0,
) -> ScanResult:
    """Run ``defences`` over ``split`` (the rows ``model`` was trained on, with their labels)."""
    unknown = [d for d in defences if d not in SCANNERS]
    if unknown or not defences:
        raise AdvtrainError(
            f"unknown defence {unknown[0] if unknown else ''!r}; choose from: {', '.join(SCANNERS)}"
        )
    features = penultimate_features(model, split.x)
    found: dict[str, Suspects] = {}
    for name in defences:
        if name == "spectral":
            found[name] = spectral_signatures(features, split.y, expected_rate)
        else:
            found[name] = activation_clustering(features, split.y, seed=seed)
    return ScanResult(len(split), expected_rate, found, split.rows)
