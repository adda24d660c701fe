"""How a score-based search (:class:`~advtrain.attacks.square.Square`) runs the model on its
candidates: a strategy injected into the attack.

- :class:`FullQueries`: every query is the model's own forward pass on the candidates.
- :class:`WindowQueries` (Square's default): where the model is a convolutional
  ``nn.Sequential`` and a query changes one window at the same place in every point, the feature
  maps of the current points are kept and only the patches the window reaches are recomputed
  (:mod:`~advtrain.attacks.window_forward`), when that saves a third of the work; elsewhere it is
  :class:`FullQueries`. A decision is never taken on the window pass's logits: the candidates
  they call adversarial are judged by the model itself.

A strategy opens a :class:`QueryPass` for one search over one batch. The pass may keep
per-sample state (:meth:`QueryPass.start`: a list of tensors the search keeps with its other
per-sample tensors, compacting them with the rest) and update it for the candidates accepted
(:meth:`QueryPass.commit`). Each search opens its own pass, so one strategy may serve several
searches at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from ..losses import is_adversarial
from .counting import uncounted
from .window_forward import MAX_MAP_BYTES, Change, WindowForward

#: A window of a query: top row, left column and (height, width), the same in every point.
Window = tuple[Tensor, Tensor, tuple[int, int]]


class QueryPass(ABC):
    """The forward pass of one search over a batch of points shaped ``shape`` (one sample)."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]) -> None:
        self.model, self.shape = model, shape

    def model_logits(self, candidates: Tensor) -> Tensor:
        """The model's own logits of candidates (given on the search's planes)."""
        return self.model(candidates.reshape(len(candidates), *self.shape))

    def start(self, x: Tensor) -> list[Tensor]:
        """The per-sample state of the points ``x`` (none by default)."""
        return []

    @abstractmethod
    def logits(
        self,
        candidates: Tensor,
        maps: list[Tensor],
        window: Window | None,
        y: Tensor,
        target: Tensor | None,
    ) -> tuple[Tensor, Any]:
        """Logits of ``candidates`` (which equal the current points whose state is ``maps``
        outside ``window``; None: anywhere), and what :meth:`commit` needs of them."""

    def commit(self, maps: list[Tensor], pending: Any, source: Tensor, dest: Tensor) -> None:
        """Write the state of candidates ``source`` (rows of the last :meth:`logits` call) into
        rows ``dest`` of ``maps``, in place (nothing by default)."""
        return None


class _FullPass(QueryPass):
    def logits(
        self,
        candidates: Tensor,
        maps: list[Tensor],
        window: Window | None,
        y: Tensor,
        target: Tensor | None,
    ) -> tuple[Tensor, Any]:
        return self.model_logits(candidates), None


class _WindowPass(QueryPass):
    """Keeps the feature maps of the current points; see :class:`WindowQueries`."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...], local: WindowForward) -> None:
        super().__init__(model, shape)
        self.local = local
        self.counter = uncounted(model)[1]

    def start(self, x: Tensor) -> list[Tensor]:
        if self.counter is not None:
            self.counter.add(len(x))
        return self.local.start(x)[1]

    def logits(
        self,
        candidates: Tensor,
        maps: list[Tensor],
        window: Window | None,
        y: Tensor,
        target: Tensor | None,
    ) -> tuple[Tensor, Any]:
        """The window pass where it pays, else the full pass through the kept layers; the
        pending state is the :class:`Change` or the whole new state."""
        local = self.local
        if self.counter is not None:  # the window pass stands for a full pass of each candidate
            self.counter.add(len(candidates))
        if window is None or not local.pays(window[2]):
            logits, new_maps = local.start(candidates)
            return logits, new_maps
        logits, change = local(candidates, maps, int(window[0]), int(window[1]), window[2])
        flagged = is_adversarial(logits, y, target)
        if bool(flagged.any()):
            flagged = flagged.nonzero().squeeze(1)
            logits[flagged] = self.model_logits(candidates[flagged])
        return logits, change

    def commit(self, maps: list[Tensor], pending: Any, source: Tensor, dest: Tensor) -> None:
        if isinstance(pending, Change):
            self.local.commit(maps, pending, source, dest)
            return
        for feature, new in zip(maps, pending):
            feature[dest] = new[source]


class QueryForward(ABC):
    """A strategy for running the model on a search's candidates."""

    @abstractmethod
    def open(
        self, model: nn.Module, x: Tensor, shape: tuple[int, ...], windowed: bool
    ) -> QueryPass:
        """The pass of one search over the points ``x`` (on the search's planes) of samples
        shaped ``shape``; ``windowed``: each query changes one window at the same place in every
        point, and the search queries only the rows that changed."""


class FullQueries(QueryForward):
    """Every query is one forward pass of the model on the whole candidates."""

    def open(
        self, model: nn.Module, x: Tensor, shape: tuple[int, ...], windowed: bool
    ) -> QueryPass:
        return _FullPass(model, shape)

    def __repr__(self) -> str:
        return "FullQueries()"


class WindowQueries(QueryForward):
    """The window pass where the model allows it (a convolutional ``nn.Sequential`` in eval mode
    on planes shaped like its inputs, windowed queries) and its kept feature maps fit in
    ``max_map_bytes`` (default :data:`~advtrain.attacks.window_forward.MAX_MAP_BYTES`); else
    :class:`FullQueries`."""

    def __init__(self, max_map_bytes: int = MAX_MAP_BYTES) -> None:
        self.max_map_bytes = max_map_bytes

    def open(
        self, model: nn.Module, x: Tensor, shape: tuple[int, ...], windowed: bool
    ) -> QueryPass:
        if windowed and tuple(x.shape[1:]) == tuple(shape):
            local = WindowForward.build(uncounted(model)[0], tuple(shape))
            if local is not None and local.map_bytes(x) <= self.max_map_bytes:
                return _WindowPass(model, shape, local)
        return _FullPass(model, shape)

    def __repr__(self) -> str:
        return f"WindowQueries(max_map_bytes={self.max_map_bytes})"
