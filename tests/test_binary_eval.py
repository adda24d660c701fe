"""Binary and imbalanced data: no DLR with two classes, attack only chosen classes, the positive
class's figures clean and attacked (recall at a fixed false-positive rate at the operating point),
and the feasibility of the adversarial points under feature constraints.

One tiny MLP on a synthetic, imbalanced two-class table (a few hundred rows), trained once.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import Tensor, nn

import advtrain
from advtrain.attacks import PGD
from advtrain.errors import AdvtrainError
from advtrain.evaluation import metrics, run_attack
from advtrain.evaluation.context import EvalContext, ShiftedLogit, SuiteSettings
from advtrain.evaluation.escalation import RULES
from advtrain.evaluation.html import render_html
from advtrain.evaluation.steps import DLR_SKIPPED, step_loss, suite_attacks
from advtrain.feasibility import FeatureConstraints
from advtrain.threat import ThreatModel

torch.set_num_threads(1)
EPS = 0.1
FEATURES, ROWS, POSITIVE = 6, 240, 1


@pytest.fixture(scope="module")
def table() -> tuple[Tensor, Tensor]:
    """Two Gaussian blobs in [0, 1]^6, about a quarter of the rows positive."""
    generator = torch.Generator().manual_seed(0)
    y = (torch.rand(ROWS, generator=generator) < 0.25).long()
    direction = torch.linspace(-1.0, 1.0, FEATURES) / math.sqrt(FEATURES)
    noise = 0.1 * torch.randn(ROWS, FEATURES, generator=generator)
    x = 0.5 + noise + 0.12 * (2 * y[:, None].float() - 1) * direction
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def model(table: tuple[Tensor, Tensor]) -> nn.Module:
    """A small MLP, about 90% accurate and not robust at eps 0.1."""
    x, y = table
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(150):
        loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def _context(model: nn.Module, x: Tensor, y: Tensor, n_classes: int) -> EvalContext:
    threat = ThreatModel(norm="linf", eps=EPS)
    return EvalContext.build(
        model, x, y, threat, SuiteSettings(), n_classes=n_classes, device="cpu", started=0.0
    )


# --------------------------------------------------------------------------- no DLR for 2 classes
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("suite", ["quick", "standard", "thorough"])
def test_no_suite_step_ascends_dlr_with_two_classes(norm: str, suite: str) -> None:
    threat = ThreatModel(norm=norm, eps=EPS)  # type: ignore[arg-type]  # parametrised names
    steps = suite_attacks(suite, threat, 2, seed=0)
    losses = {step.name: step_loss(step.attack) for step in steps}
    assert "dlr" not in losses.values(), losses
    assert not any("dlr" in name or name.startswith("apgd-t") for name in losses)
    assert "cw" in losses.values()  # the margin takes DLR's place
    # three classes or more: AutoAttack's steps and names, unchanged
    names = [step.name for step in suite_attacks(suite, threat, 10, seed=0)]
    expected = {
        ("linf", "quick"): ["apgd-ce", "apgd-t", "square"],
        ("linf", "standard"): ["apgd-ce", "apgd-t", "fab-t", "square"],
        ("linf", "thorough"): [
            "apgd-ce",
            "apgd-t",
            "fab-t",
            "square",
            "apgd-ce x5",
            "apgd-dlr x5",
            "apgd-t all",
            "square 10k x2",
        ],
    }
    if norm == "l1":
        assert names == ["pgd-l1-ce", "pgd-l1-cw", "pgd-l1-dlr"]
    else:
        assert names == expected[("linf", suite)]


def test_no_escalation_ascends_dlr_with_two_classes(table, model) -> None:
    x, y = table
    two = _context(model, x[:40], y[:40], n_classes=2)
    ten = _context(model, x[:40], y[:40], n_classes=10)  # as if there were ten classes
    for rule in RULES:
        for planned in rule.steps:
            assert step_loss(planned.build(two).attack) != "dlr", rule.name
    built = [planned.build(ten) for rule in RULES for planned in rule.steps]
    assert sum(step_loss(step.attack) == "dlr" for step in built) == 3  # apgd-t, apgd-dlr, x3
    assert "apgd-t (straight-through)" in [step.name for step in built]


def test_binary_cascade_runs_no_dlr_and_still_breaks_a_weak_model(table, model) -> None:
    x, y = table
    report = advtrain.evaluate(
        model, x, y, eps=EPS, suite="quick", diagnostics_points=30, seed=0, fpr=None
    )
    per_step = report.losses["per_step"]
    assert list(report.per_attack) == list(per_step)[: len(report.per_attack)]
    assert "apgd-cw" in per_step and "dlr" not in per_step.values()
    assert report.losses["skipped"] == {"dlr": DLR_SKIPPED}
    assert "dlr" not in report.losses["used"]
    assert report.clean_accuracy > 0.8
    assert report.robust_accuracy < report.clean_accuracy - 0.2  # the weak model is broken
    data = report.to_dict()
    assert data["losses"]["skipped"]["dlr"].startswith("DLR skipped: 2 classes")
    page = render_html(report)
    assert "DLR skipped: 2 classes" in page
    assert 'data-metric="loss:apgd-cw">cw<' in page


# --------------------------------------------------------------------------- attack classes
def test_only_the_chosen_classes_are_attacked(table, model) -> None:
    x, y = table
    every = advtrain.evaluate(model, x, y, eps=EPS, suite="quick", diagnostics_points=30, fpr=None)
    fraud = advtrain.evaluate(
        model, x, y, eps=EPS, suite="quick", diagnostics_points=30, attack_classes=[1], fpr=None
    )
    assert fraud.attack_classes == [1]
    for row in fraud.per_sample:
        assert row["attacked"] == (row["label"] == 1)
        if row["label"] != 1:  # left alone: clean prediction in every attacked figure
            assert row["adv_pred"] == row["clean_pred"]
            assert row["broken_by"] in (None, "clean")
    assert any(r["label"] == 1 and r["broken_by"] not in (None, "clean") for r in fraud.per_sample)
    assert fraud.robust_accuracy > every.robust_accuracy
    negatives = [r for r in fraud.per_sample if r["label"] == 0]
    kept = sum(r["clean_pred"] == 0 for r in negatives) / len(negatives)
    assert fraud.classification["adversarial"]["per_class"][0].recall == pytest.approx(kept)
    assert fraud.to_dict()["attack_classes"] == [1]


def test_attack_classes_out_of_range_is_one_line_error(table, model) -> None:
    x, y = table
    with pytest.raises(AdvtrainError, match=r"attack_classes: 5 is not a class") as info:
        advtrain.evaluate(model, x[:20], y[:20], eps=EPS, suite="quick", attack_classes=[5])
    assert "\n" not in str(info.value)
    with pytest.raises(AdvtrainError, match="fpr must be"):
        advtrain.evaluate(model, x[:20], y[:20], eps=EPS, positive_class=1, fpr=1.5)


def test_run_attack_attacks_only_the_chosen_classes(table, model) -> None:
    x, y = table
    run = run_attack(model, PGD(eps=EPS, steps=10, seed=0), x, y, attack_classes=[1])
    assert torch.equal(run.attacked, y == 1)
    assert torch.equal(run.x_adv[y == 0], x[y == 0])
    assert not bool(run.success[y == 0].any()) and bool(run.success[y == 1].any())


# --------------------------------------------------------------------------- positive class
def test_threshold_keeps_the_false_positive_rate() -> None:
    scores = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.95])
    negative = torch.tensor([True, True, True, True, True, False, False, False])
    # 5 negatives, fpr 0.2: one may be flagged (0.9); 0.7 must not: halfway to 0.8
    assert metrics.threshold_at_fpr(scores, negative, 0.2) == pytest.approx(0.75)
    # fpr 0.1: none may be flagged: halfway between 0.9 and 0.95
    assert metrics.threshold_at_fpr(scores, negative, 0.1) == pytest.approx(0.925)
    t = metrics.threshold_at_fpr(scores, negative, 0.1)
    assert int((scores[negative] >= t).sum()) == 0


def test_the_shifted_classifier_decides_at_the_threshold(table, model) -> None:
    x, _ = table
    with torch.no_grad():
        scores = metrics.positive_score(model(x), POSITIVE)
        threshold = float(scores.median())
        decided = ShiftedLogit(model, POSITIVE, threshold)(x).argmax(dim=1) == POSITIVE
    assert torch.equal(decided, scores > threshold)


@pytest.mark.parametrize("fpr", [0.05, 0.4])
def test_positive_class_figures_clean_and_attacked(table, model, fpr: float) -> None:
    """At fpr 0.05 the threshold lies above the argmax boundary: every point the argmax cascade
    broke escapes the flag too. At 0.4 it lies below: points broken at the argmax can still be
    flagged, and only the attack on the thresholded classifier hides them."""
    x, y = table
    report = advtrain.evaluate(
        model,
        x,
        y,
        eps=EPS,
        suite="quick",
        diagnostics_points=30,
        positive_class=POSITIVE,
        attack_classes=[POSITIVE],
        fpr=fpr,
    )
    figures = report.positive_metrics
    assert figures is not None
    with torch.no_grad():
        clean_scores = metrics.positive_score(model(x), POSITIVE)
    truth = (y == POSITIVE).numpy()
    clean = figures["clean"]
    assert clean["pr_auc"] == pytest.approx(average_precision_score(truth, clean_scores.numpy()))
    assert clean["roc_auc"] == pytest.approx(roc_auc_score(truth, clean_scores.numpy()))
    positive_row = report.classification["clean"]["per_class"][POSITIVE]
    assert clean["recall"] == pytest.approx(positive_row.recall)
    assert clean["precision"] == pytest.approx(positive_row.precision)
    attacked = figures["attacked"]
    assert attacked["recall"] < clean["recall"]  # fraud rows pushed to "legitimate"
    assert attacked["pr_auc"] < clean["pr_auc"] and attacked["roc_auc"] < clean["roc_auc"]
    at = figures["at_fpr"]
    assert at["fpr"] == fpr and at["clean_fpr"] <= fpr
    negatives = clean_scores[y != POSITIVE]
    assert int((negatives > at["threshold"]).sum()) <= math.floor(fpr * len(negatives))
    assert at["recall_clean"] == pytest.approx(
        float((clean_scores[y == POSITIVE] > at["threshold"]).float().mean())
    )
    # the attack works at the operating point, not at the argmax
    assert at["recall_attacked"] < at["recall_clean"]
    assert 0 < at["positives_attacked"] <= at["positives"]
    assert 0 < at["threshold_probability"] < 1
    recalls = list(at["per_attack"].values())
    assert recalls == sorted(recalls, reverse=True) and recalls[-1] == at["recall_attacked"]
    assert "dlr" not in report.losses["per_step"].values()
    assert next(iter(at["per_attack"])) == "argmax cascade"  # its adversarial points, first
    if fpr > 0.2:
        assert at["threshold"] < 0
        assert at["per_attack"]["apgd-ce"] < at["per_attack"]["argmax cascade"] - 0.2
    data = report.to_dict()
    assert set(data["positive_metrics"]) >= {"clean", "attacked", "at_fpr", "positive_class"}
    page = render_html(report)
    for key in ("clean:pr_auc", "attacked:roc_auc", "at_fpr:recall_attacked"):
        assert f'data-metric="positive:{key}"' in page
    assert 'data-metric="attack_classes"' in page


# --------------------------------------------------------------------------- feasibility
def _constraints(x: Tensor) -> FeatureConstraints:
    """Feature 0 may only decrease; rule: f2 + f3 <= the largest clean value (raw = z)."""
    d = x.shape[1]
    coefficients = torch.zeros(1, d, dtype=torch.float64)
    coefficients[0, 2] = coefficients[0, 3] = 1.0
    bound = float((x[:, 2] + x[:, 3]).max())
    return FeatureConstraints(
        offset=torch.zeros(d),
        scale=torch.ones(d),
        integer=torch.zeros(d, dtype=torch.bool),
        direction=torch.tensor([-1] + [0] * (d - 1)),
        rule_coefficients=coefficients,
        rule_bounds=torch.tensor([bound]),
        rules=(f"f2 + f3 <= {bound}",),
        names=tuple(f"f{i}" for i in range(d)),
    )


@dataclasses.dataclass(frozen=True)
class Unrepaired(ThreatModel):
    """A threat model whose projection forgets the constraints (as a careless attack would):
    its outputs break the direction of feature 0 and the rule, and the cascade must refuse
    those."""

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return ThreatModel.project(
            ThreatModel(self.norm, self.eps, self.lower, self.upper), x_adv, x
        )


@pytest.mark.parametrize("repaired", [True, False])
def test_feasibility_counts_points_and_refusals(table, model, repaired: bool) -> None:
    x, y = table
    x, y = x[:80], y[:80]  # enough points for refusals; the refused ones fire the escalations
    constraints = _constraints(x)
    kind = ThreatModel if repaired else Unrepaired
    threat = kind(norm="linf", eps=EPS, constraints=constraints)
    report = advtrain.evaluate(
        model, x, y, threat=threat, suite="quick", diagnostics_points=30, fpr=None
    )
    feasibility = report.feasibility
    assert feasibility is not None
    broken = [r for r in report.per_sample if r["broken_by"] not in (None, "clean")]
    assert feasibility["adversarial_points"] == len(broken) > 0
    assert feasibility["feasible"] == len(broken) and feasibility["feasible_share"] == 1.0
    assert feasibility["refused"] == sum(feasibility["refused_by_step"].values())
    if not repaired:
        assert feasibility["refused"] > 0  # infeasible outputs were refused, not counted
    assert feasibility["constraints"] == constraints.describe()
    page = render_html(report)
    assert 'data-metric="feasibility:feasible_share">100.00%<' in page
    assert "f2 + f3 &lt;=" in page


def test_no_feasibility_entry_without_constraints(table, model) -> None:
    x, y = table
    plain = advtrain.evaluate(model, x[:40], y[:40], eps=EPS, suite="quick", fpr=None)
    assert plain.feasibility is None
    assert "feasibility" not in render_html(plain).split("<h2>Accuracy versus eps")[0].lower()
