"""Adversarial-input detectors (advtrain.detection): thresholds at the target FPR, save/load,
corrupt files, differentiable scores, the adaptive attack against the pair, and its outputs
inside the threat model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from advtrain.attacks import PGD
from advtrain.checkpoint import sidecar_path
from advtrain.detection import (
    DetectorAwarePGD,
    auroc,
    evaluate_detector,
    fit_detector,
    load_detector,
    median_filter,
    save_detector,
)
from advtrain.errors import AdvtrainError

KINDS = ("mahalanobis", "squeezing", "binary")


@pytest.fixture(scope="module")
def threat(digits):
    return digits.info.threat_model()


@pytest.fixture(scope="module")
def fitted(digits, digits_model, threat):
    """One fitted detector of each kind (the binary one on 400 training points, 3 PGD steps)."""
    x, y, x_val = digits.train.x, digits.train.y, digits.val.x
    out = {}
    for kind in KINDS:
        n = 400 if kind == "binary" else len(x)
        extra = {"bits": 3} if kind == "squeezing" else {}
        detector = fit_detector(
            kind, digits_model, x[:n], y[:n], x_val, threat=threat, fpr=0.1, **extra
        )
        out[kind] = detector
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_gives_the_target_fpr_on_clean_validation_data(kind, fitted, digits):
    detector = fitted[kind]
    flagged = detector.flagged(detector.scores(digits.val.x)).float().mean().item()
    assert detector.target_fpr == 0.1
    assert 0.1 - 2 / len(digits.val.x) <= flagged <= 0.1 + 1e-6
    on_test = detector.flagged(detector.scores(digits.test.x)).float().mean().item()
    assert abs(on_test - 0.1) < 0.07  # a held-out clean split lands near it


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_identical_scores(kind, fitted, digits, digits_model, tmp_path):
    detector = fitted[kind]
    path = save_detector(detector, tmp_path / f"{kind}.safetensors")
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["kind"] == kind and meta["calibration"]["threshold"] == detector.threshold
    loaded = load_detector(path, digits_model, probe=digits.test.x[:2])
    x = digits.test.x[:50]
    assert torch.equal(loaded.scores(x), detector.scores(x))
    assert loaded.threshold == detector.threshold and loaded.describe() == detector.describe()


@pytest.mark.parametrize("damage", ["flip", "truncate", "no-sidecar", "not-a-detector", "shape"])
def test_a_corrupt_detector_file_is_one_line_advtrain_error(damage, fitted, digits_model, tmp_path):
    path = save_detector(fitted["mahalanobis"], tmp_path / "d.safetensors")
    side = sidecar_path(path)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "no-sidecar":
        side.unlink()
    elif damage == "not-a-detector":
        meta = json.loads(side.read_text())
        del meta["detector_format"]
        side.write_text(json.dumps(meta))
    else:  # the sidecar promises other shapes than the file holds
        meta = json.loads(side.read_text())
        meta["settings"]["dim"] = 7
        side.write_text(json.dumps(meta))
    with pytest.raises(AdvtrainError) as caught:
        load_detector(path, digits_model)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_detector_fitted_to_another_model_is_refused(fitted, digits, tmp_path):
    path = save_detector(fitted["binary"], tmp_path / "b.safetensors")
    other = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    with pytest.raises(AdvtrainError, match="does not fit"):
        load_detector(path, other, probe=digits.test.x[:2])


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_differentiable(kind, fitted, digits):
    x = digits.test.x[:8].clone().requires_grad_(True)
    fitted[kind].score(x).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("size", [2, 3])
def test_median_filter_is_scipys(size):
    x = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(size))
    expected = ndimage.median_filter(x.numpy(), size=(1, 1, size, size))
    np.testing.assert_array_equal(median_filter(x, size).numpy(), expected)


def test_auroc_counts_ties_half():
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.0]), torch.tensor([])) is None


def test_the_adaptive_attack_lowers_the_detection_rate(fitted, digits, digits_model, threat):
    """On a tiny model, examples made knowing the detector is there are flagged far less often
    than PGD's examples made against the classifier alone."""
    detector = fitted["mahalanobis"]
    x, y = digits.test.x[:60], digits.test.y[:60]
    x_pgd = PGD(threat, steps=20, seed=0)(digits_model, x, y)
    figures = evaluate_detector(
        digits_model, detector, x, y, threat, examples=x_pgd, steps=30, seed=0
    )
    assert figures.non_adaptive.n_adversarial > 20 and figures.adaptive.n_adversarial > 20
    rate_plain = figures.non_adaptive.flagged_at_threshold
    rate_adaptive = figures.adaptive.flagged_at_threshold
    assert rate_plain is not None and rate_adaptive is not None
    assert rate_adaptive < rate_plain
    assert figures.pair_robust_accuracy <= figures.non_adaptive.pair_robust_accuracy
    assert "eps=0.1" in figures.reduction and "Tramèr" in figures.summary()
    assert json.loads(json.dumps(figures.to_dict()))["adaptive"]["tpr_at_fpr"].keys() == {
        "1%",
        "5%",
    }


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    eps=st.floats(0.01, 0.5),
    norm=st.sampled_from(["linf", "l2"]),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_adaptive_outputs_stay_in_the_threat_model(
    fitted, digits, digits_model, eps, norm, kind, seed
):
    threat = digits.info.threat_model(norm=norm, eps=eps)
    x, y = digits.test.x[:6], digits.test.y[:6]
    attack = DetectorAwarePGD(threat, detector=fitted[kind], steps=3, seed=seed)
    x_adv = attack(digits_model, x, y)
    assert bool(threat.contains(x_adv, x).all())
    refined = attack.refine(digits_model, x, y, torch.rand_like(x))
    assert bool(threat.contains(refined.x_adv, x).all())


def test_the_adaptive_attack_refuses_another_classifier(fitted, digits, threat):
    from advtrain.models import build_model

    other = build_model("digits-cnn", in_shape=digits.info.shape, n_classes=10)
    attack = DetectorAwarePGD(threat, detector=fitted["mahalanobis"], steps=2)
    with pytest.raises(AdvtrainError, match="watches"):
        attack(other, digits.test.x[:2], digits.test.y[:2])


def test_concurrent_threads_score_their_own_inputs(fitted, digits):
    """The feature hook keeps the calling thread's pass: a served model scores concurrent
    requests of different sizes apart."""
    import threading

    detector = fitted["mahalanobis"]
    batches = [digits.test.x[i : i + 1 + i % 5] for i in range(0, 80, 5)]
    expected = [detector.scores(b) for b in batches]
    got: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(5):
            got[i] = detector.scores(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, scores in enumerate(expected):
        assert torch.equal(got[i], scores)
