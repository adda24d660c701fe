"""Poisoned training data (advtrain.poisoning): each attack poisons exactly round(rate * N) rows,
recorded; a BadNets model obeys its trigger on digits; spectral signatures and activation
clustering find most poisoned rows; STRIP separates triggered inputs from clean ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from advtrain.data import load_dataset
from advtrain.errors import AdvtrainError
from advtrain.models import build_model
from advtrain.poisoning import (
    activation_clustering,
    badnets,
    blended,
    clean_label,
    detection,
    feature_trigger,
    fit_strip,
    make_backdoor,
    penultimate_features,
    readout_layer,
    remove,
    spectral_signatures,
    triggered,
)
from advtrain.poisoning.defences import two_means
from advtrain.poisoning.matrix import MatrixModels, MatrixSettings

RATE = 0.03  # 38 of digits' 1,257 training rows: a quarter of the target class


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def backdoored(data):
    """A digits-cnn trained on BadNets-poisoned digits (3%, target 0), with its features."""
    attack = badnets(data.info, rate=RATE, target=0, seed=0)
    poisoned = attack.poison(data.train)
    models = MatrixModels(
        data, "digits-cnn", MatrixSettings(epochs=8, batch_size=64, lr=3e-3), None, print
    )
    model = models.train(poisoned.split, "badnets")
    return attack, poisoned, model, penultimate_features(model, poisoned.split.x)


def _untrained(data):
    torch.manual_seed(0)
    return build_model("digits-cnn", in_shape=data.info.shape, n_classes=10).eval()


@pytest.mark.parametrize("name", ["badnets", "blended", "clean-label"])
def test_attack_poisons_exactly_the_share_it_records(data, name):
    attack = make_backdoor(name, data.info, rate=0.05, target=3, seed=1, reference=_untrained(data))
    poisoned = attack.poison(data.train)
    n = len(data.train)
    assert len(poisoned.indices) == round(0.05 * n) == poisoned.mask.sum()
    assert (np.diff(poisoned.indices) > 0).all()
    index = torch.from_numpy(poisoned.indices)
    others = torch.from_numpy(np.flatnonzero(~poisoned.mask))
    # the other rows are untouched, the poisoned ones carry the trigger
    assert torch.equal(poisoned.split.x[others], data.train.x[others])
    assert torch.equal(poisoned.split.y[others], data.train.y[others])
    assert not torch.equal(poisoned.split.x[index], data.train.x[index])
    if name == "clean-label":
        assert (data.train.y[index] == 3).all()  # only target-class rows, labels kept
        assert torch.equal(poisoned.split.y[index], data.train.y[index])
        # the trigger is the last thing stamped: applying it again changes nothing
        torch.testing.assert_close(attack.apply(poisoned.split.x[index]), poisoned.split.x[index])
    else:
        assert (data.train.y[index] != 3).all()
        assert (poisoned.split.y[index] == 3).all()
        # training rows and test inputs are triggered by one function
        torch.testing.assert_close(poisoned.split.x[index], attack.apply(data.train.x[index]))
    x_trig, y_trig = triggered(attack, data.test.x, data.test.y)
    assert len(x_trig) == int((data.test.y != 3).sum()) and (y_trig != 3).all()
    torch.testing.assert_close(x_trig, attack.apply(data.test.x[data.test.y != 3]))
    # the originals are left as they were
    assert poisoned.split.x.data_ptr() != data.train.x.data_ptr()


@settings(max_examples=20, deadline=None)
@given(
    rate=st.floats(min_value=0.001, max_value=0.8),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["badnets", "blended"]),
)
def test_poisoned_share_and_bounds_property(data, rate, seed, kind):
    n = len(data.train)
    factory = badnets if kind == "badnets" else blended
    attack = factory(data.info, rate=rate, target=seed % 10, seed=seed)
    k = round(rate * n)
    pool = int((data.train.y != seed % 10).sum())
    if k < 1 or k > pool:
        with pytest.raises(AdvtrainError):
            attack.poison(data.train)
        return
    poisoned = attack.poison(data.train)
    assert len(np.unique(poisoned.indices)) == k
    x = poisoned.split.x
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_bad_settings_are_one_line_errors(data):
    for rate in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(AdvtrainError, match="rate"):
            badnets(data.info, rate=rate)
    with pytest.raises(AdvtrainError, match="target class"):
        badnets(data.info, rate=0.1, target=10)
    with pytest.raises(AdvtrainError, match=r"only \d+ rows are of the target class"):
        clean_label(data.info, _untrained(data), rate=0.5, target=0).poison(data.train)
    with pytest.raises(AdvtrainError, match="for tabular data"):
        make_backdoor("feature-trigger", data.info, rate=0.1)
    with pytest.raises(AdvtrainError, match="unknown attack"):
        make_backdoor("sleeper", data.info, rate=0.1)


def test_table_trigger_stays_feasible_under_the_schema():
    table = load_dataset("transactions", seed=0)
    constraints = table.info.constraints
    assert constraints is not None and constraints.rules
    attack = feature_trigger(table.info, rate=0.02, target=1, seed=0)
    poisoned = attack.poison(table.train)
    index = torch.from_numpy(poisoned.indices)
    clean, dirty = table.train.x[index], poisoned.split.x[index]
    assert len(index) == round(0.02 * len(table.train))
    assert (poisoned.split.y[index] == 1).all()
    assert constraints.feasible(dirty, clean).all()
    assert (dirty >= table.info.lower).all() and (dirty <= table.info.upper).all()
    mutable = table.info.mutable
    assert mutable is not None
    assert torch.equal(dirty[:, ~mutable], clean[:, ~mutable])  # immutable columns untouched
    assert (dirty != clean).any(dim=1).float().mean() > 0.5  # the trigger is really there
    test_x, _ = triggered(attack, table.test.x, table.test.y)
    assert constraints.feasible(test_x, table.test.x[table.test.y != 1]).all()


def test_penultimate_layer_is_found_for_advtrain_models(data):
    model = _untrained(data)
    assert readout_layer(model, data.test.x[:2]) is model[-1]
    assert penultimate_features(model, data.test.x[:5]).shape == (5, 128)
    mnist = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    assert penultimate_features(mnist, torch.zeros(3, 1, 28, 28)).shape == (3, 100)
    mlp = build_model("mlp", in_shape=(7,), n_classes=2)
    assert penultimate_features(mlp, torch.zeros(3, 7)).shape == (3, 64)
    with pytest.raises(AdvtrainError, match=r"no torch\.nn\.Linear layer"):
        penultimate_features(torch.nn.Sequential(torch.nn.Flatten()), data.test.x[:2])


def test_badnets_model_obeys_its_trigger(data, backdoored):
    attack, _, model, _ = backdoored
    x_trig, _ = triggered(attack, data.test.x, data.test.y)
    with torch.no_grad():
        asr = (model(x_trig).argmax(1) == 0).float().mean().item()
        clean = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert asr >= 0.8
    assert clean >= 0.9


def test_spectral_signatures_find_most_poisoned_rows(backdoored):
    _, poisoned, _, features = backdoored
    suspects = spectral_signatures(features, poisoned.split.y, expected_rate=RATE)
    found = detection(suspects.indices, poisoned.indices)
    assert found.recall is not None and found.recall >= 0.6
    assert (np.diff(suspects.scores) <= 0).all()  # ranked, most suspect first
    assert len(remove(poisoned.split, suspects.indices)) == len(poisoned.split) - found.flagged


def test_activation_clustering_finds_most_poisoned_rows(backdoored):
    _, poisoned, _, features = backdoored
    suspects = activation_clustering(features, poisoned.split.y)
    found = detection(suspects.indices, poisoned.indices)
    assert found.recall is not None and found.recall >= 0.6
    assert found.precision is not None and found.precision > RATE  # better than chance
    ranked = suspects.ranked()
    assert ranked and all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:]))


def test_strip_separates_triggered_from_clean_inputs(data, backdoored):
    attack, _, model, _ = backdoored
    val = data.val.x
    strip = fit_strip(model, val[:90], val[90:], samples=20, frr=0.05)
    x_trig, _ = triggered(attack, data.test.x, data.test.y)
    clean, dirty = strip.entropy(data.test.x[:150]), strip.entropy(x_trig[:150])
    truth = np.r_[np.zeros(150), np.ones(150)]
    auroc = roc_auc_score(truth, -np.r_[clean.numpy(), dirty.numpy()])
    assert auroc >= 0.9
    assert strip.flags(data.test.x[:150]).float().mean() <= 0.2


def test_detection_counts_and_two_means():
    found = detection(np.array([1, 2, 3, 4]), np.array([3, 4, 5]))
    assert (found.precision, found.recall, found.found) == (0.5, 2 / 3, 2)
    assert detection(np.array([], dtype=np.int64), np.array([1])).precision is None
    rng = np.random.default_rng(0)
    points = np.r_[rng.normal(0, 0.1, (40, 2)), rng.normal(5, 0.1, (10, 2))]
    assignment, _ = two_means(points)
    assert len(set(assignment[:40])) == 1 and len(set(assignment[40:])) == 1
    assert assignment[0] != assignment[-1]


def test_weight_cache_is_keyed_by_the_training_rows(data, tmp_path):
    models = MatrixModels(data, "digits-cnn", MatrixSettings(epochs=1), tmp_path, print)
    same = models._path("badnets/ac", data.train)
    assert same == models._path("badnets/ac", data.train)
    fewer = remove(data.train, np.array([0]))
    assert models._path("badnets/ac", fewer) != same
    assert models._path("badnets/spectral", data.train) != same
