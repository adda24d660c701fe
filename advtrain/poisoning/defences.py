"""Training-set defences: find the poisoned rows from the penultimate layer's features.

* :func:`spectral_signatures` (Tran, Li & Madry 2018, "Spectral signatures in backdoor
  attacks", NeurIPS): per class, centre the features, take the top right singular vector, score
  each row by its squared projection on it; remove the ``1.5 * eps * N`` highest scores of
  every class, ``eps * N`` being the expected number of poisoned rows (Tran et al. remove
  1.5 times the poisons they expect, from each class; ART's SpectralSignatureDefense uses the
  same multiplier 1.5). Here at most half of a class is removed.
* :func:`activation_clustering` (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy &
  Srivastava 2018, "Detecting backdoor attacks on deep neural networks by activation
  clustering"): per class, reduce the features to 10 dimensions (FastICA as the paper, or PCA,
  ART's default), split them by 2-means, and flag the smaller cluster when it holds less than
  35% of the class (ART's ``smaller`` analysis and its size threshold).

Each returns :class:`Suspects`: the flagged rows ranked by score (the spectral score, or for
activation clustering the distance to the larger cluster's centre, each divided by its class's
mean so that classes compare), and every row's score. :func:`detection` measures flagged rows
against the recorded poisons; :func:`remove` drops them before retraining.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from torch import Tensor

from ..data import Split
from ..errors import AdvtrainError

#: Tran et al.'s multiplier on the expected number of poisons removed from each class.
SPECTRAL_MULTIPLIER = 1.5
#: Chen et al.'s reduced dimension, and ART's relative size below which a cluster is poisoned.
AC_DIMS = 10
AC_SIZE_THRESHOLD = 0.35


@dataclass(frozen=True)
class Suspects:
    """Rows a defence flags, ranked: ``indices`` (positions in the split, most suspect first)
    with their ``scores``; ``all_scores`` holds every row's score (0 where a class was not
    analysed)."""

    method: str
    indices: np.ndarray
    scores: np.ndarray
    all_scores: np.ndarray

    def ranked(self) -> list[tuple[int, float]]:
        """``(index, score)`` pairs, most suspect first."""
        return [(int(i), float(s)) for i, s in zip(self.indices, self.scores)]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "suspects": [list(p) for p in self.ranked()]}


@dataclass(frozen=True)
class Detection:
    """Flagged rows against the recorded poisons: precision, recall, and the counts."""

    precision: float | None
    recall: float | None
    flagged: int
    poisoned: int
    found: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def detection(flagged: np.ndarray, poisoned: np.ndarray) -> Detection:
    """Precision (share of flagged rows that are poisoned) and recall (share of poisoned rows
    flagged); None when undefined (nothing flagged, or nothing poisoned)."""
    flagged_set = {int(i) for i in flagged}
    truth = {int(i) for i in poisoned}
    found = len(flagged_set & truth)
    precision = found / len(flagged_set) if flagged_set else None
    recall = found / len(truth) if truth else None
    return Detection(precision, recall, len(flagged_set), len(truth), found)


def _classes(labels: Tensor | np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    y = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    classes = np.unique(y)
    return y, [np.flatnonzero(y == c) for c in classes]


def _ranked(method: str, scores: np.ndarray, flagged: np.ndarray) -> Suspects:
    order = flagged[np.argsort(-scores[flagged], kind="stable")]
    return Suspects(method, order.astype(np.int64), scores[order], scores)


def _check(features: Tensor, labels: Tensor | np.ndarray) -> np.ndarray:
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise AdvtrainError(
            f"features of shape {tuple(features.shape)} do not match {len(labels)} labels"
        )
    return features.detach().cpu().double().numpy()


def spectral_signatures(
    features: Tensor,
    labels: Tensor | np.ndarray,
    expected_rate: float,
    multiplier: float = SPECTRAL_MULTIPLIER,
) -> Suspects:
    """Tran et al.'s spectral signatures over ``features`` ``(N, d)``, grouped by ``labels``;
    ``expected_rate`` is the share of poisoned rows the defender expects (an upper bound)."""
    if not (math.isfinite(expected_rate) and 0 < expected_rate < 1):
        raise AdvtrainError(f"expected poisoning rate must be in (0, 1), got {expected_rate}")
    if not (math.isfinite(multiplier) and multiplier > 0):
        raise AdvtrainError(f"multiplier must be > 0, got {multiplier}")
    f = _check(features, labels)
    _, groups = _classes(labels)
    scores = np.zeros(len(f))
    flagged: list[np.ndarray] = []
    budget = math.ceil(multiplier * expected_rate * len(f))
    for rows in groups:
        if len(rows) < 2:
            continue
        centred = f[rows] - f[rows].mean(axis=0, keepdims=True)
        raw = (centred @ _principal_axes(centred)[0][:, 0]) ** 2
        scores[rows] = raw / max(float(raw.mean()), 1e-12)
        k = min(budget, len(rows) // 2)
        if k > 0:
            flagged.append(rows[np.argsort(-raw, kind="stable")[:k]])
    chosen = np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
    return _ranked("spectral", scores, chosen)


def activation_clustering(
    features: Tensor,
    labels: Tensor | np.ndarray,
    *,
    dims: int = AC_DIMS,
    reduce: str = "ica",
    size_threshold: float = AC_SIZE_THRESHOLD,
    seed: int = 0,
) -> Suspects:
    """Chen et al.'s activation clustering over ``features`` ``(N, d)``, grouped by
    ``labels``: ``reduce`` is ``"ica"`` (FastICA, the paper's) or ``"pca"`` (ART's default)."""
    if reduce not in ("ica", "pca"):
        raise AdvtrainError(f"reduce must be ica or pca, got {reduce!r}")
    if not 0 < size_threshold < 0.5 + 1e-9:
        raise AdvtrainError(f"size threshold must be in (0, 0.5], got {size_threshold}")
    f = _check(features, labels)
    _, groups = _classes(labels)
    scores = np.zeros(len(f))
    flagged: list[np.ndarray] = []
    for rows in groups:
        if len(rows) < 4:
            continue
        low = _reduce(f[rows], dims, reduce, seed)
        assignment, centres = two_means(low, seed)
        sizes = np.bincount(assignment, minlength=2)
        small = int(np.argmin(sizes))
        big = 1 - small
        distance = np.linalg.norm(low - centres[big], axis=1)
        scores[rows] = distance / max(float(distance.mean()), 1e-12)
        if sizes[small] / len(rows) < size_threshold:
            flagged.append(rows[assignment == small])
    chosen = np.concatenate(flagged) if flagged else np.zeros(0, dtype=np.int64)
    return _ranked("ac", scores, chosen)


def _principal_axes(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The right singular vectors of ``centred`` ``(n, d)`` as columns ``(d, r)`` with their
    singular values ``(r,)``, largest first: the eigenvectors of the ``d x d`` Gram matrix, in
    float64 (far cheaper than an SVD of the tall matrix when ``n >> d``), on one BLAS thread: on
    matrices this small more threads only wait for each other, for seconds on shared cores."""
    with threadpool_limits(limits=1):
        gram = centred.T @ centred
        values, vectors = np.linalg.eigh(gram)
    order = np.argsort(-values, kind="stable")
    return vectors[:, order], np.sqrt(np.clip(values[order], 0.0, None))


def two_means(
    points: np.ndarray, seed: int = 0, restarts: int = 10, steps: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """2-means (Lloyd's algorithm from k-means++ seeds, ``restarts`` times, the lowest
    within-cluster sum of squares kept, as scikit-learn's ``KMeans(2, n_init=10)``):
    each point's cluster (0 or 1) and the two centres."""
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _restart in range(restarts):
        first = points[rng.integers(len(points))]
        d2 = ((points - first) ** 2).sum(axis=1)
        total = float(d2.sum())
        second = points[rng.choice(len(points), p=d2 / total)] if total > 0 else first
        centres = np.stack([first, second])
        assignment = np.zeros(len(points), dtype=np.int64)
        for step in range(steps):
            distances = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2)
            new = distances.argmin(axis=1)
            for c in (0, 1):
                if (new == c).any():
                    centres[c] = points[new == c].mean(axis=0)
            if step and (new == assignment).all():
                break
            assignment = new
        inertia = float(((points - centres[assignment]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assignment.copy(), centres.copy())
    assert best is not None
    return best[1], best[2]


def _reduce(features: np.ndarray, dims: int, reduce: str, seed: int) -> np.ndarray:
    """``features`` of one class in ``dims`` dimensions: their top principal components (at
    most the data's rank, so dead units cannot make the whitening divide by zero), then for
    ``"ica"`` FastICA's independent components of those."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    centred = features - features.mean(axis=0, keepdims=True)
    axes, s = _principal_axes(centred)
    rank = int((s > 1e-6 * max(float(s[0]), 1e-30)).sum()) if len(s) else 0
    k = max(1, min(dims, rank))
    with threadpool_limits(limits=1):
        low = centred @ axes[:, :k]
    if reduce == "pca" or k < 2:
        return low
    # one BLAS thread: on a class's small matrix, more threads only wait for each other
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=200)
        sources = ica.fit_transform(low)
    return low if not np.isfinite(sources).all() else sources


def remove(split: Split, indices: np.ndarray) -> Split:
    """``split`` without the rows ``indices`` (their file row numbers go with them)."""
    keep = np.ones(len(split), dtype=bool)
    keep[np.asarray(indices, dtype=np.int64)] = False
    index = torch.from_numpy(np.flatnonzero(keep))
    rows = None if split.rows is None else split.rows[keep]
    return Split(split.x[index], split.y[index], rows)
