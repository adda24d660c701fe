"""Inputs read on demand: :class:`LazyInputs`, a read-only, indexable view of a dataset's inputs
that holds only the items asked for in memory.

A split's ``x`` is either a :class:`torch.Tensor` (small sets, held whole) or a
:class:`LazyInputs` (image folders, whose files are opened only when indexed). Both answer
``len(x)``, ``x.shape``, ``x.dtype`` and ``x[index]`` for an int, a slice, a list of ints, a 1-D
integer tensor or array, or a boolean mask; on a :class:`LazyInputs` the answer is a float32
tensor of exactly those items, read through the *reader*: any map-style object with
``len(reader)`` and ``reader[i]`` giving one sample (a tensor or array of the sample shape, or a
tuple whose first element is one, as a :class:`torch.utils.data.Dataset` returns ``(x, y)``);
a reader that also has ``read_batch(positions)`` (an int64 array) answering a stacked float32
tensor is asked for all of an index's samples at once.
:meth:`LazyInputs.chunks` walks the inputs in consecutive chunks, the way to visit all of them
with memory bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError


class Reader(Protocol):
    """A map-style source of samples: ``len(reader)`` and ``reader[i]`` for ``0 <= i < len``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Any: ...


class LazyInputs:
    """The inputs ``reader[positions[0]], reader[positions[1]], ...`` as float32 tensors of
    shape ``sample_shape``, read when indexed and never all at once.

    Args:
        reader: the samples (see the module docstring).
        sample_shape: the shape of one sample, e.g. ``(C, H, W)``; None: read ``reader[0]``'s.
        labels: int64 labels, one per sample of ``reader`` (not per position); None: the
            reader's ``targets`` attribute if it has one (torchvision's convention), else each
            sample's second element, read once on first use of :attr:`labels`.
        positions: which of the reader's samples this view holds, in order (None: all).
    """

    dtype = torch.float32

    def __init__(
        self,
        reader: Reader,
        sample_shape: Sequence[int] | None = None,
        labels: Tensor | np.ndarray | Sequence[int] | None = None,
        positions: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        self.reader = reader
        total = len(reader)
        if positions is None:
            self._positions = np.arange(total, dtype=np.int64)
        else:
            self._positions = np.asarray(positions, dtype=np.int64).reshape(-1)
            if len(self._positions) and (
                self._positions.min() < 0 or self._positions.max() >= total
            ):
                raise DataError(f"positions must lie in [0, {total}) for a reader of {total}")
        self._all_labels: Tensor | None = None
        if labels is not None:
            all_labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
            if len(all_labels) != total:
                raise DataError(f"{len(all_labels)} labels for a reader of {total} samples")
            self._all_labels = all_labels
        if sample_shape is None:
            if total == 0:
                raise DataError("sample_shape is required for an empty reader")
            sample_shape = tuple(self._read(0).shape)
        self.sample_shape: tuple[int, ...] = tuple(int(d) for d in sample_shape)

    # ------------------------------------------------------------------ what a tensor answers
    def __len__(self) -> int:
        return len(self._positions)

    @property
    def shape(self) -> torch.Size:
        """``(N, *sample_shape)``."""
        return torch.Size((len(self), *self.sample_shape))

    def dim(self) -> int:
        """The number of dimensions of :attr:`shape`."""
        return 1 + len(self.sample_shape)

    @property
    def device(self) -> torch.device:
        """Samples are read on the CPU."""
        return torch.device("cpu")

    def __getitem__(self, index: Any) -> Tensor:
        """The items ``index`` selects, read now: an int gives one sample of ``sample_shape``,
        anything else a stacked float32 tensor ``(k, *sample_shape)``."""
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            return self._read(int(self._positions[self._one(int(index))]))
        chosen = self._select(index)
        read_batch = getattr(self.reader, "read_batch", None)
        if read_batch is not None:  # a reader that reads several samples at once
            batch = read_batch(chosen).to(torch.float32)
            if tuple(batch.shape) != (len(chosen), *self.sample_shape):
                raise DataError(
                    f"the reader gave shape {tuple(batch.shape)} for {len(chosen)} samples of "
                    f"{self.sample_shape}"
                )
            return batch
        out = torch.empty((len(chosen), *self.sample_shape), dtype=torch.float32)
        for row, position in enumerate(chosen.tolist()):
            out[row] = self._read(position)
        return out

    def __repr__(self) -> str:
        return f"LazyInputs(n={len(self)}, sample_shape={list(self.sample_shape)})"

    # ------------------------------------------------------------------ beyond a tensor
    @property
    def labels(self) -> Tensor:
        """The int64 labels of this view's samples, in order (see the class docstring)."""
        if self._all_labels is None:
            targets = getattr(self.reader, "targets", None)
            if targets is not None:
                self._all_labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
            else:
                self._all_labels = torch.tensor(
                    [_label_of(self.reader[i], i) for i in range(len(self.reader))],
                    dtype=torch.int64,
                )
        return self._all_labels[torch.from_numpy(self._positions)]

    @property
    def positions(self) -> np.ndarray:
        """Which of the reader's samples this view holds, in order (a copy)."""
        return self._positions.copy()

    def subset(self, index: Any) -> LazyInputs:
        """A view of the items ``index`` selects (any index but an int), nothing read."""
        chosen = self._select(index)
        view = LazyInputs(self.reader, self.sample_shape, positions=chosen)
        view._all_labels = self._all_labels
        return view

    def chunks(self, size: int) -> Iterator[Tensor]:
        """The inputs in order, ``size`` at a time (the last chunk may be shorter)."""
        if size < 1:
            raise DataError(f"chunk size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            yield self[start : start + size]

    # ------------------------------------------------------------------ internals
    def _one(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} inputs")
        return i % n if n else i

    def _select(self, index: Any) -> np.ndarray:
        """The reader positions ``index`` selects (a slice, ints, or a boolean mask)."""
        if isinstance(index, slice):
            return self._positions[index]
        if isinstance(index, Tensor):
            index = index.detach().cpu().numpy()
        array = np.asarray(index)
        if array.dtype == np.bool_:
            if array.shape != (len(self),):
                raise IndexError(
                    f"a boolean mask must have shape ({len(self)},), got {array.shape}"
                )
            return self._positions[array]
        if array.size == 0:
            return np.empty(0, dtype=np.int64)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise IndexError(
                "index LazyInputs with an int, a slice, a 1-D sequence of ints or a boolean "
                f"mask, got {type(index).__name__} of shape {array.shape}"
            )
        n = len(self)
        if array.min() < -n or array.max() >= n:
            raise IndexError(f"index out of range for {n} inputs")
        return self._positions[array]

    def _read(self, position: int) -> Tensor:
        item = self.reader[position]
        if isinstance(item, tuple):
            item = item[0]
        sample = torch.as_tensor(np.asarray(item) if not isinstance(item, Tensor) else item)
        sample = sample.to(torch.float32)
        shape = getattr(self, "sample_shape", None)
        if shape is not None and tuple(sample.shape) != shape:
            raise DataError(f"sample {position} has shape {tuple(sample.shape)}, expected {shape}")
        return sample


def _label_of(item: Any, position: int) -> int:
    if not isinstance(item, tuple) or len(item) < 2:
        raise DataError(
            f"sample {position} is not an (input, label) pair: give LazyInputs its labels"
        )
    return int(item[1])


#: A split's inputs: a tensor held whole or a :class:`LazyInputs` read on demand.
Inputs: TypeAlias = Tensor | LazyInputs
