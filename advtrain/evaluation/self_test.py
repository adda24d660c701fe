"""The binarization self-test: do the attacks find an adversarial example known to exist?

Zimmermann, Brendel, Tramèr & Carlini, "Increasing confidence in adversarial robustness
evaluations" (NeurIPS 2022). An attack that fails may fail because the model is robust or because
the attack is broken, and the robust accuracy cannot tell the two apart. The test builds, around
each of a few clean points, a classification task whose answer is known: the model's readout (its
last linear layer) is replaced by a binary one, fitted on the model's own features so that

- the clean point and ``inner`` points drawn uniformly from the ball of radius
  ``(1 - gap) * eps`` around it are class 0 ("clean"), and
- one ``boundary`` point at distance ``eps`` (a corner of the linf ball, a point on the l2 or l1
  sphere, moved into the bounds, the mask and the constraints) is class 1 ("adversarial").

The boundary point lies inside the threat model, so an adversarial example provably exists; a
working attack, run on the binarized model with the clean point labelled 0, must find one. The
paper's defaults are one boundary point, a gap of 5% of eps and a readout fitted to separate the
training points perfectly (a point where no linear readout separates them is a setup failure,
left out); the share of points where the attacks find an adversarial example is the test's pass
rate, and an evaluation passes at 0.95 or more. Of 13 published defences, the paper found 11
whose original evaluations fail it.

What it proves: the attacks, the escalations and their settings can find an adversarial example
that exists inside the ball and is reached through the model's own feature extractor (its
preprocessing, randomness and gradient masking included). What it does not: the binarized task
is not the original one (a model can be robust to its own readout and not to this one, and an
attack can pass here and still miss the original's adversarial examples), and it says nothing of
the layers after the features.

Each point gets its own readout; the binarized model picks the readout of the test point whose
threat model holds the input (the nearest one, in the threat model's norm; points are chosen at
least ``2 * eps`` apart, so the nearest is the owner of every input an attack may try), so every
attack of the library, black-box ones included, runs on all points at once as it would on any
model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import AdvtrainError
from ..models.features import readout_name
from ..threat import ThreatModel, lp_norm
from .findings import VERDICT, WARNING, Check, CheckName

#: The pass rate the paper asks of an evaluation (Zimmermann et al. 2022).
PASS_THRESHOLD = 0.95
#: The defaults of :func:`plan`: inner points per test point (the clean point among them), the
#: gap between the inner ball and the boundary (a share of eps), and the random boundary points
#: drawn to tell whether random sampling alone would find the adversarial region.
INNER_POINTS, GAP, RANDOM_PROBES = 128, 0.05, 64


# ---------------------------------------------------------------------- features
def readout_layer(
    model: nn.Module, probe: Tensor, name: str | None = None
) -> tuple[str, nn.Linear]:
    """The model's readout: its last ``nn.Linear`` called in a forward pass (or the one named
    ``name``: a module name of ``model``, matched on its last dotted parts, so ``"fc"`` or
    ``"head.fc"`` name a wrapped model's layer too), checked to give the model's output shape.

    Raises:
        AdvtrainError: no linear layer, a name that is not one, or a layer whose output is not
            the shape of the model's output.
    """
    modules = dict(model.named_modules())
    if name is not None:
        hits = [m for m in modules if m == name or m.endswith("." + name)]
        if not hits:
            raise AdvtrainError(
                f"self-test: the model has no module named {name!r} (its features are the input "
                "of the last linear layer: name that layer)"
            )
        chosen = hits[0]
        if not isinstance(modules[chosen], nn.Linear):
            raise AdvtrainError(
                f"self-test: module {name!r} is a {type(modules[chosen]).__name__}, not a "
                "torch.nn.Linear: name the linear layer whose input are the features"
            )
    else:
        try:
            chosen = readout_name(model, probe)
        except AdvtrainError as exc:
            raise AdvtrainError(
                f"self-test: {exc}; pass self_test_features=NAME (the readout's module name) "
                "for a model whose readout is a linear layer"
            ) from None
    layer = modules[chosen]
    assert isinstance(layer, nn.Linear)
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            out = model(probe)
    finally:
        handle.remove()
    if not seen or tuple(seen[-1].shape) != tuple(out.shape):
        raise AdvtrainError(
            f"self-test: the output of layer {chosen!r} is not the model's output "
            f"(shape {tuple(seen[-1].shape) if seen else None} vs {tuple(out.shape)}); pass "
            "self_test_features=NAME, the model's readout layer"
        )
    return chosen, layer


def features(model: nn.Module, layer: nn.Linear, x: Tensor, batch_size: int) -> Tensor:
    """The input of ``layer`` (the features) for ``x``, flattened, in batches, on the CPU."""
    parts: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inputs, _o: parts.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        handle.remove()
    return torch.cat([p.flatten(1).float().cpu() for p in parts])


# ---------------------------------------------------------------------- the binarized model
class Binarized(nn.Module):
    """``model`` with its readout ``layer`` replaced, for an input near test point ``k``, by the
    binary readout ``(0, w_k . f + b_k)``: class 1 is "adversarial".

    The test point owning an input is the nearest anchor in the threat model's norm.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Linear,
        anchors: Tensor,
        weight: Tensor,
        bias: Tensor,
        norm: str,
    ) -> None:
        super().__init__()
        self.model, self.layer, self.norm = model, layer, norm
        # plain tensors on the model's device, not buffers: nothing here is trained or saved
        self.anchors: Tensor = anchors.flatten(1).clone()
        self.weight: Tensor = weight.clone()
        self.bias: Tensor = bias.clone()
        self._owner: Tensor | None = None

    def owners(self, x: Tensor) -> Tensor:
        """The index of the anchor nearest each row of ``x``."""
        p = {"linf": math.inf, "l2": 2.0, "l1": 1.0}[self.norm]
        flat = x.detach().flatten(1).to(self.anchors.dtype)
        return torch.cdist(flat, self.anchors, p=p).argmin(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        self._owner = self.owners(x)
        handle = self.layer.register_forward_hook(self._readout)
        try:
            return self.model(x)
        finally:
            handle.remove()
            self._owner = None

    def _readout(self, _module: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> Tensor:
        owner = self._owner
        assert owner is not None
        f = inputs[0].flatten(1)
        if len(f) != len(owner):
            raise AdvtrainError(
                f"self-test: the readout saw {len(f)} rows for a batch of {len(owner)} inputs; "
                "name a readout that sees one row per input (self_test_features)"
            )
        w, b = self.weight[owner].to(f.dtype), self.bias[owner].to(f.dtype)
        score = (f * w).sum(dim=1) + b
        return torch.stack([torch.zeros_like(score), score], dim=1)


# ---------------------------------------------------------------------- planting the example
def _boundary_point(threat: ThreatModel, x: Tensor, generator: torch.Generator) -> Tensor:
    """A point at distance eps from ``x`` (a linf corner, or a uniform direction on the l2 or
    l1 sphere), then moved into the threat model (mask, bounds, constraints)."""
    shape = (1, *x.shape)
    if threat.norm == "linf":
        signs = torch.randint(0, 2, shape, generator=generator).to(x) * 2 - 1
        delta = signs * threat.eps
    else:
        direction = torch.randn(shape, generator=generator).to(x)
        if threat.norm == "l1":
            direction = direction.sign() * torch.rand(shape, generator=generator).to(x) ** 4
        norm = lp_norm(threat.apply_mask(direction), threat.norm).clamp_min(1e-12)
        delta = direction / norm.reshape((1,) + (1,) * x.dim()) * threat.eps
    return threat.project(x.unsqueeze(0) + threat.apply_mask(delta), x.unsqueeze(0))


def _inner_points(threat: ThreatModel, x: Tensor, count: int, gap: float, seed: int) -> Tensor:
    """``x`` and ``count - 1`` points uniform in the ball of radius ``(1 - gap) * eps``, in the
    threat model."""
    inner = threat.replace(eps=threat.eps * (1 - gap))
    generator = torch.Generator(device=x.device.type).manual_seed(seed)
    copies = x.unsqueeze(0).expand(count - 1, *x.shape)
    drawn = inner.random_start(copies, generator)
    return torch.cat([x.unsqueeze(0), drawn])


def _fit_readout(feats: Tensor, labels: np.ndarray) -> tuple[Tensor, Tensor] | None:
    """A linear readout separating the features perfectly (logistic regression, weak
    regularisation, classes balanced), rescaled so its scores span one unit; None when the
    fitted readout does not separate them."""
    from sklearn.linear_model import LogisticRegression

    data = feats.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a separable set never "converges": expected
        fit = LogisticRegression(C=1e4, max_iter=2000, class_weight="balanced").fit(data, labels)
    scores = data @ fit.coef_[0] + fit.intercept_[0]
    if not bool(((scores > 0) == (labels == 1)).all()):
        return None
    scale = float(scores.max() - scores.min()) or 1.0
    weight = torch.from_numpy(fit.coef_[0] / scale).float()
    return weight, torch.tensor(float(fit.intercept_[0] / scale))


# ---------------------------------------------------------------------- the plan and the result
@dataclass
class Plan:
    """The binarized model of the chosen test points, and what fitting it found."""

    points: Tensor  # indices (into the evaluation's points) of the tested points
    model: Binarized | None
    layer: str
    setup_failed: list[int] = field(default_factory=list)
    #: test points where one of ``RANDOM_PROBES`` random boundary points is already class 1
    random_hits: list[int] = field(default_factory=list)


def spaced(x: Tensor, candidates: Tensor, threat: ThreatModel, count: int) -> Tensor:
    """Up to ``count`` of ``candidates`` (indices, in the order given) at least ``2 * eps`` apart
    in the threat model's norm, greedily: no input can then lie in two of their balls."""
    chosen: list[int] = []
    kept: list[Tensor] = []
    for i in candidates.tolist():
        row = x[i : i + 1].flatten(1)
        if kept:
            gaps = lp_norm(torch.cat(kept) - row, threat.norm)
            if bool((gaps <= 2 * threat.eps).any()):
                continue
        chosen.append(i)
        kept.append(row)
        if len(chosen) == count:
            break
    return torch.tensor(chosen, dtype=torch.int64)


def plan(
    model: nn.Module,
    x: Tensor,
    threat: ThreatModel,
    points: Tensor,
    *,
    seed: int,
    features_layer: str | None = None,
    inner: int = INNER_POINTS,
    gap: float = GAP,
    batch_size: int = 1000,
) -> Plan:
    """Fit the binary readout of each point of ``x`` (the tested points, evaluation indices
    ``points``) on the features of ``model`` and build the binarized model."""
    name, layer = readout_layer(model, x[:1], features_layer)
    weights, biases, ok, failed, random_hits = [], [], [], [], []
    for k, index in enumerate(points.tolist()):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        inside = _inner_points(threat, x[k], inner, gap, seed * 1_000_003 + index)
        edge = _boundary_point(threat, x[k], generator)
        feats = features(model, layer, torch.cat([inside, edge]), batch_size)
        labels = np.zeros(len(feats), dtype=np.int64)
        labels[-1] = 1
        fitted = _fit_readout(feats, labels)
        if fitted is None:
            failed.append(index)
            continue
        weight, bias = fitted
        probes = torch.cat([_boundary_point(threat, x[k], generator) for _ in range(RANDOM_PROBES)])
        if bool(((features(model, layer, probes, batch_size) @ weight + bias) > 0).any()):
            random_hits.append(index)
        weights.append(weight)
        biases.append(bias)
        ok.append(k)
    chosen = points[ok]
    if not ok:
        return Plan(chosen, None, name, failed, random_hits)
    binarized = Binarized(
        model,
        layer,
        x[ok],
        torch.stack(weights).to(x.device),
        torch.stack(biases).to(x.device),
        threat.norm,
    )
    return Plan(chosen, binarized, name, failed, random_hits)


@dataclass(frozen=True)
class SelfTestResult:
    """What the self-test found: per tested point whether the attacks broke the binarized model
    there, and which step did (``None``: none); the points whose readout could not be fitted;
    the pass rate against :data:`PASS_THRESHOLD`."""

    points: list[int]
    found_by: list[str | None]
    steps: list[str]
    layer: str
    setup_failed: list[int]
    random_hits: list[int]
    threshold: float = PASS_THRESHOLD

    @property
    def passed(self) -> int:
        return sum(by is not None for by in self.found_by)

    @property
    def pass_rate(self) -> float:
        return self.passed / len(self.points) if self.points else float("nan")

    def check(self) -> Check:
        """The report's check: a verdict when the pass rate is under the threshold."""
        n = len(self.points)
        evidence: dict[str, Any] = {
            "points": n,
            "passed": self.passed,
            "pass_rate": self.pass_rate if n else None,
            "threshold": self.threshold,
            "features": self.layer,
            "steps": self.steps,
            # the points every step (``steps``) missed
            "failures": [p for p, by in zip(self.points, self.found_by) if by is None],
            "found_by": dict(zip(map(str, self.points), self.found_by)),
            "setup_failed": self.setup_failed,
            "random_boundary_points_hit": self.random_hits,
        }
        if not n:
            return Check(
                CheckName.SELF_TEST,
                False,
                "not run: no test point could be set up (no linear readout of the features "
                f"separates the planted example at {len(self.setup_failed)} points)",
                WARNING,
                evidence,
            )
        failed = evidence["failures"]
        fired = self.pass_rate < self.threshold
        detail = (
            f"the attacks found the adversarial example planted inside the eps-ball at "
            f"{self.passed} of {n} points ({self.pass_rate:.1%}; the test asks "
            f"{self.threshold:.0%})"
        )
        if failed:
            shown = ", ".join(map(str, failed[:10])) + (" ..." if len(failed) > 10 else "")
            detail += f"; every attack ({', '.join(self.steps)}) missed it at points {shown}"
        if fired:
            detail += ": the attacks fail where an adversarial example exists"
        elif self.random_hits:
            detail += (
                f"; random points at distance eps also reach the planted region at "
                f"{len(self.random_hits)} of them (the paper's random baseline)"
            )
        return Check(CheckName.SELF_TEST, fired, detail, VERDICT, evidence)


def not_run(reason: str) -> Check:
    """The check of a self-test that could not run (the thorough suite on a model whose
    features cannot be read): reported, never a verdict."""
    return Check(CheckName.SELF_TEST, False, f"not run: {reason}", WARNING, {"points": 0})


def result_of(plan_: Plan, found_by: Sequence[str | None], steps: Sequence[str]) -> SelfTestResult:
    """The result of running ``steps`` on ``plan_``'s binarized model (``found_by`` per point)."""
    return SelfTestResult(
        points=[int(i) for i in plan_.points.tolist()],
        found_by=list(found_by),
        steps=list(steps),
        layer=plan_.layer,
        setup_failed=plan_.setup_failed,
        random_hits=plan_.random_hits,
    )
