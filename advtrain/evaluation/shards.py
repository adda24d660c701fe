"""Fixed chunks of points, so that an evaluation split over processes gives one process's result.

The points are cut, in index order, into chunks of ``batch_size``. Every attack of the cascade
runs chunk by chunk: on the standing points of one chunk at a time, with its seed derived from
the attack's seed and the chunk's index, and with torch's global generator seeded the same way
(for models that draw random numbers at every call). What happens to a point therefore depends
only on its chunk, never on which process attacks it or what else that process attacks.

Under ``torch.distributed`` (``torchrun``), rank ``r`` of ``N`` takes chunks ``r, r + N, ...``;
after each attack the ranks exchange the rows their chunks changed, so every rank holds the
whole per-sample state and the merged report equals the one-process report with the same seed
(and the same ``batch_size``: it fixes the chunks). One process has a single rank and no
exchange; the chunks then only fix the seeds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..attacks.base import Attack
from ..distributed import gathered_objects
from .points import Points

#: Seeds of chunk ``c > 0`` are ``seed + SEED_STRIDE * c``; chunk 0 keeps ``seed``, so an
#: evaluation of at most ``batch_size`` points is seeded exactly as its attacks were built.
SEED_STRIDE = 1_000_003
T = TypeVar("T")


def step_seed(seed: int, name: str) -> int:
    """The seed of the step called ``name`` (an attack of the cascade, a check, an escalation):
    ``seed`` plus the first four bytes of SHA-256 of the name (UTF-8), read as a big-endian
    unsigned integer. Stable across runs, processes and platforms, and distinct per name, so a
    step keeps its random stream when steps are added or reordered; its chunks then follow
    :func:`chunk_seed`."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return seed + int.from_bytes(digest[:4], "big")


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of ``chunk`` derived from an attack's ``seed``."""
    return seed + SEED_STRIDE * chunk


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global generators (CPU and ``device``) seeded with ``seed``, restored on exit."""
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Shards:
    """The chunks of ``n`` points of ``size`` each, and which of them this rank attacks."""

    n: int
    size: int
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, n: int, size: int) -> Shards:
        """The chunks of this process: all of them, or this rank's share under torch.distributed."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(n, size, dist.get_rank(), dist.get_world_size())
        return cls(n, size)

    @property
    def shared(self) -> bool:
        """Whether other ranks hold the other chunks."""
        return self.world > 1

    def mine(self) -> list[tuple[int, slice]]:
        """``(chunk index, rows)`` of the chunks this rank attacks."""
        count = -(-self.n // self.size)
        return [
            (c, slice(c * self.size, min((c + 1) * self.size, self.n)))
            for c in range(self.rank, count, self.world)
        ]

    def owned(self) -> Tensor:
        """Bool per point: in a chunk of this rank."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        for _, rows in self.mine():
            mask[rows] = True
        return mask

    def for_chunk(self, attack: Attack, chunk: int) -> Attack:
        """``attack`` with the seed of ``chunk`` (the same attack for chunk 0 or no seed)."""
        if attack.seed is None or chunk == 0:
            return attack
        chunk_attack = copy.copy(attack)
        chunk_attack.seed = chunk_seed(attack.seed, chunk)
        return chunk_attack

    def map(self, fn: Callable[[Tensor], Tensor], x: Tensor | Points, seed: int) -> Tensor:
        """``fn`` over ``x`` chunk by chunk, torch's global generator seeded per chunk with
        :func:`chunk_seed` of ``seed``; every rank's rows, in order, on the CPU."""
        if self.n == 0:
            return fn(x[0:0]).cpu()
        parts = []
        for chunk, rows in self.mine():
            with seeded(chunk_seed(seed, chunk), x.device):
                parts.append((rows.start, fn(x[rows]).cpu()))
        if self.shared:
            parts = [part for rank_parts in self.all_gather(parts) for part in rank_parts]
        parts.sort(key=lambda part: part[0])
        return torch.cat([part[1] for part in parts])

    # ------------------------------------------------------------------ exchange between ranks
    def all_gather(self, item: T) -> list[T]:
        """Every rank's ``item`` (picklable; tensors on the CPU), in rank order."""
        # gathered_objects returns list[object]: each rank sent a T, so the list holds T's
        return gathered_objects(item) if self.shared else [item]  # type: ignore[return-value]

    def from_rank_zero(self, item: T) -> T:
        """Rank 0's ``item`` on every rank."""
        if not self.shared:
            return item
        box: list[Any] = [item if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
