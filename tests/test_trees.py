"""Tree ensembles as black-box models: each safe format loaded (scores equal to the library's own
predictions), pickles and untrusted types refused, and the black-box evaluation of a small
XGBoost model (robust accuracy at most clean accuracy, every counted point inside the threat
model, every counted point feasible under a table's constraints)."""

from __future__ import annotations

import pathlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from advtrain.errors import AdvtrainError, DataError
from advtrain.evaluation.black_box import BLACK_BOX_NOTE, evaluate_black_box
from advtrain.feasibility import FeatureConstraints
from advtrain.models import TreeEnsemble, load_tree_model
from advtrain.models.trees import PICKLE_SUFFIXES
from advtrain.threat import ThreatModel

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
skops_io = pytest.importorskip("skops.io")

torch.set_num_threads(1)


def toy_table(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five features in [0, 1), a binary and a three-class label."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 5))
    binary = ((x[:, 0] + x[:, 1] - x[:, 2]) > 0.5).astype(np.int64)
    three = np.minimum((x[:, 0] * 3).astype(np.int64), 2)
    return x, binary, three


def xgboost_model(x: np.ndarray, y: np.ndarray, rounds: int = 20) -> object:
    params = {"max_depth": 3, "nthread": 1, "seed": 0}
    if y.max() > 1:
        params.update(objective="multi:softprob", num_class=int(y.max()) + 1)
    else:
        params["objective"] = "binary:logistic"
    return xgb.train(params, xgb.DMatrix(x, label=y), rounds)


def fraud_table(n: int = 400, seed: int = 0):
    """Encoded rows of a small transactions table, its constraints, and raw rows and labels.

    Columns: amount (continuous, 0..1000), avg_amount (continuous, immutable), tx_1h (integer
    0..10), tx_24h (integer 0..20), verified (binary, may only increase) and a channel of three
    categories (one-hot). Rules: ``amount <= 2 * avg_amount + 100`` and ``tx_1h <= tx_24h``.
    """
    rng = np.random.default_rng(seed)
    avg = rng.uniform(0, 450, n)
    amount = rng.uniform(0, 1, n) * np.minimum(1000, 2 * avg + 100)
    tx_24h = rng.integers(0, 21, n)
    tx_1h = np.array([rng.integers(0, min(10, t) + 1) for t in tx_24h])
    verified = rng.integers(0, 2, n)
    channel = rng.integers(0, 3, n)
    raw = np.column_stack([amount, avg, tx_1h, tx_24h, verified, np.eye(3)[channel]])
    score = amount / 1000 + tx_1h / 10 - avg / 1000 - 0.3 * verified + 0.2 * (channel == 2)
    y = (score > 0.35).astype(np.int64)
    offset = np.zeros(8)
    scale = np.array([1000.0, 1000.0, 10.0, 20.0, 1.0, 1.0, 1.0, 1.0])
    coefficients = np.zeros((2, 8))
    coefficients[0, [0, 1]] = [1.0, -2.0]
    coefficients[1, [2, 3]] = [1.0, -1.0]
    constraints = FeatureConstraints(
        offset=torch.tensor(offset),
        scale=torch.tensor(scale),
        integer=torch.tensor([False, False, True, True, True, True, True, True]),
        direction=torch.tensor([0, 0, 0, 0, 1, 0, 0, 0]),
        groups=((5, 8),),
        rule_coefficients=torch.tensor(coefficients),
        rule_bounds=torch.tensor([100.0, 0.0]),
        rules=("amount <= 2 * avg_amount + 100", "tx_1h <= tx_24h"),
        names=("amount", "avg_amount", "tx_1h", "tx_24h", "verified", "c=a", "c=b", "c=c"),
    )
    z = torch.tensor((raw - offset) / scale, dtype=torch.float32)
    return z, torch.tensor(y), constraints, raw


def as_rows(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def rounded(x: np.ndarray) -> np.ndarray:
    """``x`` as the model sees it through float32 rows (a split may fall between the two)."""
    return x.astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".json", ".ubj"])
@pytest.mark.parametrize("classes", [2, 3])
def test_xgboost_file_scores_match_its_predict(tmp_path: Path, suffix: str, classes: int) -> None:
    x, binary, three = toy_table()
    booster = xgboost_model(x, binary if classes == 2 else three)
    path = tmp_path / f"model{suffix}"
    booster.save_model(str(path))
    model = load_tree_model(path)
    assert isinstance(model, TreeEnsemble) and model.black_box and model.kind == "xgboost"
    z = as_rows(x).requires_grad_(True)
    scores = model(z)
    assert scores.dtype == torch.float32 and scores.shape == (len(x), classes)
    assert not scores.requires_grad  # no autograd graph through the booster
    expected = booster.predict(xgb.DMatrix(x.astype(np.float32)))
    if classes == 2:
        expected = np.column_stack([1 - expected, expected])
    np.testing.assert_allclose(scores.exp().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("objective", ["binary", "multiclass", "multiclassova"])
def test_lightgbm_text_scores_match_its_predict(tmp_path: Path, objective: str) -> None:
    x, binary, three = toy_table()
    params = {"objective": objective, "verbose": -1, "num_threads": 1, "seed": 0}
    label = binary
    if objective != "binary":
        params["num_class"] = 3
        label = three
    booster = lgb.train(params, lgb.Dataset(x, label=label), 10)
    path = tmp_path / "model.txt"
    booster.save_model(str(path))
    model = load_tree_model(path, n_classes=2 if objective == "binary" else 3)
    assert model.kind == "lightgbm"
    expected = booster.predict(rounded(x))
    if objective == "binary":
        expected = np.column_stack([1 - expected, expected])
    np.testing.assert_allclose(model(as_rows(x)).exp().numpy(), expected, atol=1e-5)


def test_skops_scores_match_predict_proba(tmp_path: Path) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, binary, three = toy_table()
    for i, (estimator, label) in enumerate(
        [
            (RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0), binary),
            (HistGradientBoostingClassifier(max_iter=5, random_state=0), three),
            (make_pipeline(StandardScaler(), LogisticRegression()), binary),
        ]
    ):
        estimator.fit(x, label)
        path = tmp_path / f"model{i}.skops"
        skops_io.dump(estimator, path)
        model = load_tree_model(path)
        assert model.kind == "sklearn" and model.n_classes == len(np.unique(label))
        np.testing.assert_allclose(
            model(as_rows(x)).exp().numpy(), estimator.predict_proba(rounded(x)), atol=1e-5
        )


def test_offset_and_scale_map_encoded_rows_to_the_raw_ones(tmp_path: Path) -> None:
    x, binary, _ = toy_table()
    offset, scale = np.arange(5.0) * 10, np.array([1.0, 50.0, 200.0, 3.0, 0.5])
    raw = offset + scale * x.astype(np.float32)  # what the team trained on
    booster = xgboost_model(raw, binary)
    path = tmp_path / "model.json"
    booster.save_model(str(path))
    model = load_tree_model(path, offset=offset, scale=torch.tensor(scale))
    expected = booster.predict(xgb.DMatrix(raw))
    np.testing.assert_allclose(model(as_rows(x))[:, 1].exp().numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------------- refusals
class _Touch:
    """Unpickling this creates a marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickles_are_refused_unopened(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "opened"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(DataError, match="never unpickled") as caught:
        load_tree_model(path)
    message = str(caught.value)
    assert "\n" not in message and ".json" in message and ".txt" in message and ".skops" in message
    assert not marker.exists()


def test_untrusted_skops_types_are_refused_by_name(tmp_path: Path) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    x, binary, _ = toy_table()
    path = tmp_path / "knn.skops"
    skops_io.dump(KNeighborsClassifier(n_neighbors=3).fit(x, binary), path)
    with pytest.raises(DataError, match=r"refusing to load knn\.skops.*KDTree"):
        load_tree_model(path)


@pytest.mark.parametrize("name", ["bad.json", "bad.ubj", "bad.txt", "bad.skops"])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"{not a model\n\x00\x01 at all")
    with pytest.raises(DataError, match=name.replace(".", r"\.")) as caught:
        load_tree_model(path)
    assert "\n" not in str(caught.value)


def test_bad_paths_counts_and_objectives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, _, three = toy_table()
    with pytest.raises(DataError, match="does not exist"):
        load_tree_model(tmp_path / "missing.json")
    with pytest.raises(DataError, match=r"unknown tree model format 'model\.onnx'"):
        load_tree_model(tmp_path / "model.onnx")
    path = tmp_path / "model.json"
    xgboost_model(x, three, rounds=2).save_model(str(path))
    with pytest.raises(DataError, match="has 3 classes, the data 2"):
        load_tree_model(path, n_classes=2)
    model = load_tree_model(path)
    with pytest.raises(AdvtrainError, match="takes 5 features, got rows of 7"):
        model(torch.zeros(2, 7))
    with pytest.raises(AdvtrainError, match="takes 5 features, but offset has 3 values"):
        load_tree_model(path, offset=[0.0, 1.0, 2.0])
    regressor = tmp_path / "regressor.json"
    xgb.train(
        {"objective": "reg:squarederror", "nthread": 1}, xgb.DMatrix(x, label=x[:, 0]), 2
    ).save_model(str(regressor))
    with pytest.raises(DataError, match=r"not a classifier.*reg:squarederror"):
        load_tree_model(regressor)
    monkeypatch.setitem(sys.modules, "xgboost", None)  # as if the extra were not installed
    with pytest.raises(AdvtrainError, match=r"pip install advtrain\[trees\]"):
        load_tree_model(path)


# ---------------------------------------------------------------------- black-box evaluation
def test_black_box_evaluation_of_an_xgboost_model(tmp_path: Path) -> None:
    x, binary, _ = toy_table(400)
    path = tmp_path / "model.json"
    xgboost_model(x[:300], binary[:300]).save_model(str(path))
    model = load_tree_model(path)
    z, y = as_rows(x[300:360]), torch.tensor(binary[300:360])
    torch.manual_seed(0)
    surrogate = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=1e-2)
    train_z, train_y = as_rows(x[:300]), torch.tensor(binary[:300])
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(surrogate(train_z), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    threat = ThreatModel(norm="linf", eps=0.08)
    report = evaluate_black_box(
        model, z, y, threat, surrogate=surrogate, queries=200, batch_size=32, positive_class=1
    )
    assert list(report.per_attack) == ["feature-search", "hop-skip-jump", "transfer"]
    assert report.robust_accuracy <= report.clean_accuracy
    assert report.robust_accuracy < report.clean_accuracy  # the attacks broke something
    assert report.settings["bound"] == "upper" and report.settings["note"] == BLACK_BOX_NOTE
    assert "upper bound" in BLACK_BOX_NOTE
    broken = [s["index"] for s in report.per_sample if s["broken_by"] not in (None, "clean")]
    assert broken
    clean_pred = model(z).argmax(1)
    assert all(bool(clean_pred[i] == y[i]) for i in broken)  # only correct points attacked
    adversarial = [s for s in report.per_sample if s["index"] in broken]
    assert all(s["adv_pred"] != s["label"] for s in adversarial)
    assert report.positive_metrics is not None
    assert report.to_dict()["settings"]["suite"] == "black-box"
    assert report.losses["per_step"] == {
        "feature-search": "cw",
        "hop-skip-jump": "labels only",
        "transfer": "ce on the surrogate",
    }
    report.to_json(tmp_path / "report.json")
    assert "black-box" in report.to_html(tmp_path / "report.html").read_text()
    # the examples kept are the broken points first: inside the ball and misclassified
    shown = report.examples
    count = min(len(broken), len(shown["x"]))
    assert bool(threat.contains(shown["x_adv"][:count], shown["x"][:count]).all())
    assert bool((model(shown["x_adv"][:count]).argmax(1) != shown["y"][:count]).all())


def test_black_box_evaluation_counts_only_feasible_rows(tmp_path: Path) -> None:
    z, y, constraints, raw = fraud_table()
    path = tmp_path / "fraud.json"
    xgboost_model(raw[:300], y[:300].numpy()).save_model(str(path))
    model = load_tree_model(path, offset=constraints.offset, scale=constraints.scale)
    mask = torch.ones(8, dtype=torch.bool)
    mask[1] = False  # the 30-day average is history: the attacker cannot change it
    threat = ThreatModel(norm="linf", eps=0.15, mask=mask, constraints=constraints)
    test_z, test_y = z[300:], y[300:]
    assert bool(constraints.feasible(test_z, test_z).all())
    report = evaluate_black_box(
        model, test_z, test_y, threat, queries=150, batch_size=50, examples=len(test_z)
    )
    assert report.robust_accuracy <= report.clean_accuracy
    broken = [s["index"] for s in report.per_sample if s["broken_by"] not in (None, "clean")]
    assert broken, "the constrained attacks broke nothing: the test shows nothing"
    assert report.feasibility is not None and report.feasibility["feasible_share"] == 1.0
    assert report.feasibility["adversarial_points"] == len(broken)
    assert report.feasibility["constraints"]["rules"] == list(constraints.rules)
    # every counted row (the examples hold the broken rows first, then the others) is feasible,
    # inside the threat model and misclassified by the trees
    x_adv, x = report.examples["x_adv"][: len(broken)], report.examples["x"][: len(broken)]
    assert bool(constraints.feasible(x_adv, x).all())
    assert bool(threat.contains(x_adv, x).all())
    assert bool((model(x_adv).argmax(1) != report.examples["y"][: len(broken)]).all())
    raw_adv = constraints.to_raw(x_adv)
    integers = raw_adv[:, 2:5]
    assert bool(((integers - integers.round()).abs() < 1e-4).all())  # float32 storage aside
    assert bool((raw_adv[:, 2] <= raw_adv[:, 3] + 1e-4).all())  # tx_1h <= tx_24h


def test_black_box_attack_classes_and_refusals(tmp_path: Path) -> None:
    x, binary, _ = toy_table(360)
    path = tmp_path / "model.json"
    xgboost_model(x[:300], binary[:300]).save_model(str(path))
    model = load_tree_model(path)
    z, y = as_rows(x[300:]), torch.tensor(binary[300:])
    threat = ThreatModel(norm="l2", eps=0.15)
    report = evaluate_black_box(model, z, y, threat, queries=60, attack_classes=[1])
    assert report.attack_classes == [1] and report.settings["norm"] == "l2"
    for sample in report.per_sample:
        assert sample["attacked"] == (sample["label"] == 1)
        if sample["label"] == 0:  # never attacked: keeps its clean prediction
            assert sample["broken_by"] in (None, "clean")
            assert sample["adv_pred"] == sample["clean_pred"]
    assert any(s["broken_by"] not in (None, "clean") for s in report.per_sample)
    with pytest.raises(AdvtrainError, match="finite linf or l2 threat model, got l1"):
        evaluate_black_box(model, z, y, ThreatModel(norm="l1", eps=1.0))
    with pytest.raises(AdvtrainError, match="attack_classes: 4 is not a class"):
        evaluate_black_box(model, z, y, threat, attack_classes=[4])


@pytest.mark.parametrize("kind", ["lightgbm", "skops"])
def test_lightgbm_and_sklearn_models_are_attacked_too(tmp_path: Path, kind: str) -> None:
    """Every format goes through the same black-box search: LightGBM's text model and a
    scikit-learn forest saved with skops lose accuracy to it, inside the threat model."""
    from advtrain.attacks import FeatureSearch

    x, binary, _ = toy_table(400)
    if kind == "lightgbm":
        path = tmp_path / "model.txt"
        train = lgb.Dataset(x[:300], label=binary[:300])
        params = {"objective": "binary", "num_threads": 1, "seed": 0, "verbose": -1}
        lgb.train(params, train, num_boost_round=30).save_model(str(path))
    else:
        from sklearn.ensemble import RandomForestClassifier

        path = tmp_path / "model.skops"
        forest = RandomForestClassifier(n_estimators=30, max_depth=5, random_state=0, n_jobs=1)
        skops_io.dump(forest.fit(x[:300], binary[:300]), path)
    model = load_tree_model(path)
    z, y = as_rows(x[300:]), torch.tensor(binary[300:])
    threat = ThreatModel(norm="linf", eps=0.1)
    x_adv = FeatureSearch(threat, n_queries=200, seed=0)(model, z, y)
    assert bool(threat.contains(x_adv, z).all())
    clean = float((model(z).argmax(1) == y).float().mean())
    attacked = float((model(x_adv).argmax(1) == y).float().mean())
    assert attacked < clean - 0.1
