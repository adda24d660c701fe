"""The points an evaluation attacks, read a chunk at a time.

:func:`advtrain.evaluate` never needs a whole dataset in memory: every stage asks for the rows it
works on (one chunk of the cascade, the diagnostics' subset, the examples shown), and
:class:`Points` hands them over on the evaluation's device. :class:`TensorPoints` holds inputs
already in memory; :class:`StreamedPoints` reads them on demand from a map-style dataset (a
``torch.utils.data.Dataset`` of ``(x, y)`` items, the ``dataset`` of a ``DataLoader``, or an
indexable source such as :class:`advtrain.data.LazyInputs` that reads many rows at once), so the
memory an evaluation takes is bounded by the chunk (``batch_size``), not by the dataset.

Each streamed read is checked against the threat model (finite values inside the bounds) before
it is used, as :meth:`~advtrain.threat.ThreatModel.validate` checks a tensor before any work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import AdvtrainError

Index = Tensor | slice


class Points:
    """Rows of inputs by index, on ``device``: ``points[index]`` for a slice or an index tensor."""

    device: torch.device

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: Index) -> Tensor:
        raise NotImplementedError

    @property
    def streamed(self) -> bool:
        """Whether the rows are read on demand (not held in memory)."""
        return False

    def chunks(self, size: int) -> list[slice]:
        """Consecutive slices of at most ``size`` rows covering every point."""
        n = len(self)
        return [slice(i, min(i + size, n)) for i in range(0, n, max(size, 1))]

    def fingerprint(self, size: int) -> str:
        """SHA-256 of every input's bytes, read chunk by chunk (the resume state's check that a
        resumed evaluation sees the same points)."""
        digest = hashlib.sha256()
        for rows in self.chunks(size):
            digest.update(self[rows].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


class TensorPoints(Points):
    """Inputs held in memory, as one tensor."""

    def __init__(self, x: Tensor) -> None:
        self.tensor = x
        self.device = x.device

    def __len__(self) -> int:
        return int(self.tensor.shape[0])

    def __getitem__(self, index: Index) -> Tensor:
        if isinstance(index, Tensor):
            index = index.to(self.device)
        return self.tensor[index]


class StreamedPoints(Points):
    """Inputs read on demand from ``source``, moved to ``device`` and checked by ``check``.

    ``source`` is either indexable by an int64 tensor of rows, returning those rows stacked
    (:class:`advtrain.data.LazyInputs`), or a map-style dataset whose items are ``(x, y)``."""

    def __init__(
        self, source: Any, device: torch.device, check: Callable[[Tensor], None] | None = None
    ) -> None:
        self.source = source
        self.device = device
        self.check = check
        self.batched = hasattr(source, "labels")
        self._n = len(source)

    def __len__(self) -> int:
        return self._n

    @property
    def streamed(self) -> bool:
        return True

    def __getitem__(self, index: Index) -> Tensor:
        rows = torch.arange(self._n)[index] if isinstance(index, slice) else index.cpu()
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        if not len(rows):  # no rows: an empty batch of the samples' shape (read off the first)
            return self[torch.zeros(1, dtype=torch.int64)][:0]
        if self.batched:
            x = self.source[rows]
        else:
            x = torch.stack([torch.as_tensor(self.source[int(i)][0]) for i in rows.tolist()])
        x = x.to(self.device, torch.float32)
        if self.check is not None:
            self.check(x)
        return x


def dataset_labels(source: Any) -> Tensor:
    """The labels of a map-style dataset: its ``labels`` when it has them (no pixel read), else
    the second element of every item (one pass over the data)."""
    labels = getattr(source, "labels", None)
    if isinstance(labels, Tensor):
        return labels.to(torch.int64).cpu()
    try:
        values = [int(source[i][1]) for i in range(len(source))]
    except (TypeError, IndexError, ValueError):
        raise AdvtrainError(
            "a dataset to evaluate must give (x, y) items with an integer label y"
        ) from None
    return torch.tensor(values, dtype=torch.int64)


class KeptRows:
    """Adversarial examples of broken points, by index, without a dense copy of the inputs.

    With ``limit`` None every example written is kept; otherwise only those of the ``limit``
    lowest indices (a point's example is written once, when it breaks, so these are the
    examples of the ``limit`` broken points of lowest index). Reading a row not kept gives the
    clean point (a point still standing is its own worst case)."""

    def __init__(self, x: Points, limit: int | None) -> None:
        self.x, self.limit = x, limit
        self.rows: dict[int, Tensor] = {}

    def kept(self, index: list[int]) -> list[int]:
        """The entries of ``index`` whose examples are kept."""
        return [i for i in index if i in self.rows]

    def __setitem__(self, index: Tensor, values: Tensor) -> None:
        for i, row in zip(index.tolist(), values):
            self.rows[int(i)] = row.detach().clone()  # a clone: never a view of the whole batch
        if self.limit is not None and len(self.rows) > self.limit:
            for i in sorted(self.rows)[self.limit :]:
                del self.rows[i]

    def __getitem__(self, index: Tensor) -> Tensor:
        rows = index.cpu().tolist()
        missing = [i for i in rows if i not in self.rows]
        read = (
            dict(zip(missing, self.x[torch.tensor(missing, dtype=torch.int64)])) if missing else {}
        )
        parts = [self.rows[i] if i in self.rows else read[i] for i in rows]
        if not parts:
            return self.x[torch.zeros(0, dtype=torch.int64)]
        return torch.stack([p.to(self.x.device) for p in parts])
