"""Tree ensembles (XGBoost, LightGBM, scikit-learn) as black-box models of encoded table rows.

A fraud team's production model is usually a gradient-boosted tree ensemble trained on the raw
columns of its table. :func:`load_tree_model` reads one from a file that loads without running
code and wraps it in :class:`TreeEnsemble`, an ``nn.Module`` that the attacks and the evaluation
call like any other model: ``forward(z)`` takes encoded rows ``z`` of shape ``(n, d)`` (the scaled
feature space of :mod:`advtrain.feasibility`), maps them to the units the trees were trained on
(``raw = offset + scale * z`` per coordinate, when ``offset``/``scale`` are given; rounding
integer columns is the caller's business, as the threat model's constraints already keep them
on integers) and returns log-probabilities, float32 ``(n, K)``.

The booster runs in NumPy, so the output carries no autograd graph: the model is a black box
(``TreeEnsemble.black_box`` is True). Attack it with score- or decision-based attacks
(:class:`~advtrain.attacks.FeatureSearch`, :class:`~advtrain.attacks.HopSkipJump`) or by transfer
from a differentiable surrogate; :func:`advtrain.evaluation.black_box.evaluate_black_box` runs
all three.

Formats, by suffix:

- ``.json``, ``.ubj``: an XGBoost model (``Booster.save_model``), read with
  ``xgboost.Booster.load_model``;
- ``.txt``: a LightGBM text model (``Booster.save_model``), read with
  ``lightgbm.Booster(model_file=...)``;
- ``.skops``: a scikit-learn classifier saved with ``skops.io.dump``. The types the file needs
  beyond skops' defaults (``skops.io.get_untrusted_types``) must all come from scikit-learn's
  ensemble, tree, linear-model, pipeline or preprocessing modules; any other type is refused by
  name, and the file is loaded trusting exactly the listed ones.

Pickles (``.pkl``, ``.pickle``, ``.joblib``, ``.sav``) are refused without being opened:
unpickling runs arbitrary code.

Scores: where the booster's link is known the log-probabilities come from its raw margins,
exactly (``log_softmax`` for XGBoost ``multi:*`` and LightGBM ``multiclass``; a binary booster's
single margin ``m`` gives the two columns ``logsigmoid(-m), logsigmoid(m)``; LightGBM
``multiclassova`` gives ``logsigmoid`` per class), so the margin loss of a score-based attack
keeps its signal where the probabilities round to 0 or 1. scikit-learn models give the log of
``predict_proba`` (floored at ``1e-300`` in float64, so a zero probability stays finite).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import AdvtrainError, DataError
from ..util import one_line

#: Suffixes read as XGBoost, LightGBM and skops files.
XGBOOST_SUFFIXES = (".json", ".ubj")
LIGHTGBM_SUFFIXES = (".txt",)
SKOPS_SUFFIXES = (".skops",)
#: Suffixes of pickled models, refused unopened.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav")
SAFE_FORMATS = (
    "XGBoost JSON/UBJSON (.json, .ubj), LightGBM text (.txt), scikit-learn skops (.skops)"
)
#: Module prefixes of the types a skops file may need beyond skops' own trusted defaults.
SKOPS_ALLOWED_MODULES = (
    "sklearn.ensemble.",
    "sklearn.tree.",
    "sklearn.linear_model.",
    "sklearn.pipeline.",
    "sklearn.preprocessing.",
)
#: Floor of a probability before its logarithm (scikit-learn models).
PROBABILITY_FLOOR = 1e-300
INSTALL_HINT = "pip install advtrain[trees]"

# XGBoost objectives by link: the margins' softmax, or the sigmoid of a single margin.
_XGB_SOFTMAX = ("multi:softprob", "multi:softmax")
_XGB_SIGMOID = ("binary:logistic", "binary:logitraw")


class TreeEnsemble(nn.Module):
    """A tree ensemble as a model of encoded rows: ``forward(z)`` returns log-probabilities.

    Built by :func:`load_tree_model`. ``predict_margins`` is the booster's own scoring of raw
    rows (NumPy float64 ``(n, n_features)``) and ``link`` turns its output into
    log-probabilities. ``offset`` and ``scale`` (float64 ``(n_features,)`` CPU tensors, or None:
    0 and 1) map encoded rows to raw ones; the model has no parameters or buffers, so it stays
    on the CPU whatever ``.to()`` says, and its output goes to the input's device.

    Attributes:
        black_box: always True: the scores come from NumPy, with no gradient.
        kind: ``"xgboost"``, ``"lightgbm"`` or ``"sklearn"``.
        path: the file the model was read from.
        n_features: the number of raw features the booster takes.
        n_classes: the number of classes ``K`` (2 for a binary booster).
    """

    black_box = True

    def __init__(
        self,
        predict_margins: Callable[[np.ndarray], np.ndarray],
        link: str,
        *,
        kind: str,
        path: Path,
        n_features: int,
        n_classes: int,
        offset: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        self._predict = predict_margins
        self.link = link
        self.kind = kind
        self.path = path
        self.n_features = n_features
        self.n_classes = n_classes
        self.offset = offset
        self.scale = scale

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, path={str(self.path)!r}, n_features={self.n_features}, "
            f"n_classes={self.n_classes}, link={self.link}"
        )

    def raw(self, z: Tensor) -> np.ndarray:
        """The rows the booster sees: ``offset + scale * z`` (float64 NumPy)."""
        if z.dim() != 2:
            raise AdvtrainError(
                f"tree model {self.path.name} takes rows (n, d), got shape {tuple(z.shape)}"
            )
        if z.shape[1] != self.n_features:
            raise AdvtrainError(
                f"tree model {self.path.name} takes {self.n_features} features, "
                f"got rows of {z.shape[1]}"
            )
        raw = z.detach().to("cpu", torch.float64)
        if self.scale is not None:
            raw = raw * self.scale
        if self.offset is not None:
            raw = raw + self.offset
        return raw.numpy()

    def forward(self, z: Tensor) -> Tensor:
        """Log-probabilities, float32 ``(n, K)`` on ``z``'s device, without an autograd graph."""
        if len(z) == 0:
            return torch.zeros((0, self.n_classes), dtype=torch.float32, device=z.device)
        with torch.no_grad():
            scores = torch.from_numpy(
                np.asarray(self._predict(self.raw(z)), dtype=np.float64)
            ).reshape(len(z), -1)
            return _log_probabilities(scores, self.link).to(z.device, torch.float32)


def _log_probabilities(scores: Tensor, link: str) -> Tensor:
    """Log-probabilities (float64) from a booster's output under its link."""
    if link == "softmax":
        return torch.log_softmax(scores, dim=1)
    if link == "sigmoid":
        margin = scores[:, :1]
        return torch.cat([nn.functional.logsigmoid(-margin), nn.functional.logsigmoid(margin)], 1)
    if link == "ova":
        return nn.functional.logsigmoid(scores)
    if scores.shape[1] == 1:  # probabilities of the positive class only
        scores = torch.cat([1 - scores, scores], 1)
    return scores.clamp_min(PROBABILITY_FLOOR).log()


# ---------------------------------------------------------------------- loading
def load_tree_model(
    path: str | Path,
    *,
    offset: Tensor | np.ndarray | Sequence[float] | float | None = None,
    scale: Tensor | np.ndarray | Sequence[float] | float | None = None,
    n_classes: int | None = None,
) -> TreeEnsemble:
    """Read a tree-ensemble classifier from ``path`` (format by suffix, see the module's
    docstring) as a :class:`TreeEnsemble` of encoded rows.

    Args:
        path: an XGBoost ``.json``/``.ubj``, LightGBM ``.txt`` or scikit-learn ``.skops`` file.
        offset, scale: ``raw = offset + scale * z``, scalars or one value per feature (default:
            0 and 1, the encoded rows are the raw ones). Their length must match the booster's
            feature count.
        n_classes: the number of classes expected (default: what the model says); a model with
            another count is refused.

    Every failure (a pickle, a missing package, a corrupt file, an untrusted type, a feature or
    class count that does not fit) is a one-line :class:`~advtrain.errors.AdvtrainError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DataError(
            f"refusing to load {path.name}: a pickle can run arbitrary code when loaded and is "
            f"never unpickled; save the model in a safe format: {SAFE_FORMATS}"
        )
    readers = {
        **dict.fromkeys(XGBOOST_SUFFIXES, _read_xgboost),
        **dict.fromkeys(LIGHTGBM_SUFFIXES, _read_lightgbm),
        **dict.fromkeys(SKOPS_SUFFIXES, _read_skops),
    }
    reader = readers.get(suffix)
    if reader is None:
        raise DataError(
            f"unknown tree model format {path.name!r}; the safe formats: {SAFE_FORMATS}"
        )
    if not path.is_file():
        raise DataError(f"tree model file {path} does not exist")
    predict, link, n_features, classes, kind = reader(path)
    if n_classes is not None and n_classes != classes:
        raise DataError(f"tree model {path.name} has {classes} classes, the data {n_classes}")
    offset_t = _per_feature("offset", offset, n_features, path)
    scale_t = _per_feature("scale", scale, n_features, path)
    return TreeEnsemble(
        predict,
        link,
        kind=kind,
        path=path,
        n_features=n_features,
        n_classes=classes,
        offset=offset_t,
        scale=scale_t,
    )


def _per_feature(name: str, value: object, n_features: int, path: Path) -> Tensor | None:
    """``offset``/``scale`` as a float64 ``(n_features,)`` tensor (None stays None)."""
    if value is None:
        return None
    try:
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
    except (TypeError, ValueError):
        raise AdvtrainError(f"{name} must be numbers, got {type(value).__name__}") from None
    if tensor.numel() == 1:
        tensor = tensor.expand(n_features).clone()
    if tensor.numel() != n_features:
        raise AdvtrainError(
            f"tree model {path.name} takes {n_features} features, but {name} has "
            f"{tensor.numel()} values (one per encoded feature)"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise AdvtrainError(f"{name} must be finite")
    return tensor


_Read = tuple[Callable[[np.ndarray], np.ndarray], str, int, int, str]


def _need(module: str, what: str) -> Any:
    """Import an optional package or say which extra installs it."""
    try:
        return __import__(module)
    except ImportError:
        raise AdvtrainError(
            f"reading {what} models needs the {module} package: {INSTALL_HINT}"
        ) from None


def _corrupt(path: Path, exc: BaseException) -> DataError:
    """The one-line error of a file its library cannot read (XGBoost's stack trace cut off)."""
    message = str(exc).split("Stack trace:")[0]
    return DataError(
        f"cannot read tree model {path}: {type(exc).__name__}: {one_line(message, 160)}"
    )


def _read_xgboost(path: Path) -> _Read:
    xgb = _need("xgboost", "XGBoost")
    booster = xgb.Booster()
    try:
        booster.load_model(str(path))
        learner = json.loads(booster.save_config())["learner"]
        objective = str(learner["objective"]["name"])
        params = learner["learner_model_param"]
        n_features = int(booster.num_features())
        num_class = int(params.get("num_class", "0"))
        num_target = int(params.get("num_target", "1"))
    except Exception as exc:  # xgboost raises XGBoostError, JSON/key errors for odd configs
        raise _corrupt(path, exc) from None
    if objective in _XGB_SOFTMAX:
        link, classes = "softmax", num_class
    elif objective in _XGB_SIGMOID and num_target == 1:
        link, classes = "sigmoid", 2
    else:
        raise DataError(
            f"tree model {path.name} is not a classifier advtrain can score (XGBoost objective "
            f"{objective!r}; supported: {', '.join(_XGB_SIGMOID + _XGB_SOFTMAX)})"
        )

    def predict(raw: np.ndarray) -> np.ndarray:
        margins = booster.inplace_predict(raw, predict_type="margin", validate_features=False)
        return np.asarray(margins)

    return predict, link, n_features, classes, "xgboost"


def _read_lightgbm(path: Path) -> _Read:
    lgb = _need("lightgbm", "LightGBM")
    try:
        booster = lgb.Booster(model_file=str(path))
        objective = str(booster.dump_model(num_iteration=0).get("objective", ""))
        n_features = int(booster.num_feature())
        per_iteration = int(booster.num_model_per_iteration())
    except Exception as exc:  # lightgbm raises LightGBMError for a corrupt file
        raise _corrupt(path, exc) from None
    words = objective.split()
    name = words[0] if words else ""
    sigmoid = 1.0
    for word in words[1:]:
        if word.startswith("sigmoid:"):
            sigmoid = float(word.split(":", 1)[1])
    if name == "binary":
        link, classes = "sigmoid", 2
    elif name in ("multiclass", "softmax"):
        link, classes = "softmax", per_iteration
    elif name in ("multiclassova", "ova"):
        link, classes = "ova", per_iteration
    else:
        raise DataError(
            f"tree model {path.name} is not a classifier advtrain can score (LightGBM objective "
            f"{objective!r}; supported: binary, multiclass, multiclassova)"
        )
    scaled = sigmoid if link in ("sigmoid", "ova") else 1.0

    def predict(raw: np.ndarray) -> np.ndarray:
        return np.asarray(booster.predict(raw, raw_score=True)) * scaled

    return predict, link, n_features, classes, "lightgbm"


def _allowed_skops_type(name: str) -> bool:
    return name.startswith(SKOPS_ALLOWED_MODULES)


def _read_skops(path: Path) -> _Read:
    _need("skops", "scikit-learn (skops)")
    import skops.io

    try:
        untrusted = list(skops.io.get_untrusted_types(file=path))
    except Exception as exc:  # not a skops archive: zipfile/JSON errors
        raise _corrupt(path, exc) from None
    refused = sorted(t for t in untrusted if not _allowed_skops_type(t))
    if refused:
        raise DataError(
            f"refusing to load {path.name}: it needs types outside scikit-learn's ensemble, tree, "
            f"linear-model, pipeline and preprocessing modules: {', '.join(refused)}"
        )
    try:
        model = skops.io.load(path, trusted=untrusted)
    except Exception as exc:
        raise _corrupt(path, exc) from None
    if not callable(getattr(model, "predict_proba", None)):
        raise DataError(
            f"tree model {path.name} holds a {type(model).__name__}, which has no predict_proba"
        )
    n_features = getattr(model, "n_features_in_", None)
    classes = getattr(model, "classes_", None)
    if n_features is None or classes is None:
        raise DataError(f"tree model {path.name} holds an unfitted {type(model).__name__}")
    names = getattr(model, "feature_names_in_", None)

    def predict(raw: np.ndarray) -> np.ndarray:
        rows: Any = raw
        if names is not None:  # fitted on a DataFrame: give it one, with its column names
            import pandas as pd

            rows = pd.DataFrame(raw, columns=list(names))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(model.predict_proba(rows))

    return predict, "probabilities", int(n_features), len(classes), "sklearn"


__all__ = ["TreeEnsemble", "load_tree_model"]
