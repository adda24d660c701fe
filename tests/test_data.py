"""Tests of advtrain.data: datasets, splits and bounds, and MNIST's files and downloads."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays
from sklearn.datasets import load_breast_cancer

from advtrain.data import DATASETS, Dataset, DatasetInfo, Split, download_mnist, load_dataset
from advtrain.data.fraud import FRAUD_IMMUTABLE, fraud_table
from advtrain.data.idx import parse_idx
from advtrain.data.mnist import MNIST_FILES
from advtrain.errors import AdvtrainError, DataError, UnknownNameError
from advtrain.threat import ThreatModel

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
SMALL = ("digits", "breast-cancer", "fraud")
LABELS = "t10k-labels-idx1-ubyte.gz"  # the smallest MNIST file: cheap to corrupt and serve


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's settings, and a fallback to the public mirror can never go online."""
    monkeypatch.delenv("ADVTRAIN_DATA", raising=False)
    monkeypatch.setenv("ADVTRAIN_MNIST_MIRROR", f"http://127.0.0.1:{_closed_port()}/")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The shared directory with the four original MNIST files."""
    if not all((SHARED_MNIST / name).is_file() for name in MNIST_FILES):
        message = f"shared MNIST files not found in {SHARED_MNIST}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_MNIST


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.requested.append(self.path)
        super().do_GET()


@pytest.fixture
def serve() -> Iterator[Callable[[Path], tuple[str, list[str]]]]:
    """Start local HTTP servers of directories: ``serve(dir) -> (base_url, requested_paths)``."""
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(directory: Path) -> tuple[str, list[str]]:
        requested: list[str] = []
        handler = type("Handler", (_QuietHandler,), {"requested": requested})
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
        )
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/", requested

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def mnist_mirror(serve: Callable[[Path], tuple[str, list[str]]], mnist_dir: Path) -> str:
    """Base URL of a local mirror serving the shared MNIST files."""
    return serve(mnist_dir)[0]


# ---------------------------------------------------------------------------------- helpers
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _link_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if name not in skip:
            (target / name).symlink_to(source / name)


def _corrupt_copy(source: Path, target: Path, offset: int = 100) -> None:
    """Flip one byte of the uncompressed payload and compress again (still a valid IDX file)."""
    data = bytearray(gzip.decompress(source.read_bytes()))
    data[offset] ^= 0x01
    target.write_bytes(gzip.compress(bytes(data)))


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _all_splits(data: Dataset) -> tuple[Split, Split, Split]:
    return data.train, data.val, data.test


def _check_stratified(data: Dataset, fractions: dict[str, float], slack: int = 2) -> None:
    """Each split holds its fraction of every class, to within ``slack`` rows."""
    labels = torch.cat([s.y for s in _all_splits(data)])
    totals = torch.bincount(labels, minlength=data.info.n_classes)
    for split_name, fraction in fractions.items():
        counts = torch.bincount(getattr(data, split_name).y, minlength=data.info.n_classes)
        expected = totals.double() * fraction
        assert ((counts.double() - expected).abs() <= slack).all(), (split_name, counts, expected)


# ---------------------------------------------------------------------------------- registry
def test_dataset_names() -> None:
    assert DATASETS == ("mnist", "digits", "breast-cancer", "fraud", "transactions")


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("cifar")
    message = str(info.value)
    assert "cifar" in message and "\n" not in message
    for name in DATASETS:
        assert name in message
    assert isinstance(info.value, AdvtrainError)


@pytest.mark.parametrize(
    ("val", "test"),
    [(0.0, 0.2), (0.1, 0.0), (-0.1, 0.2), (0.5, 0.5), (0.7, 0.4), (float("nan"), 0.2)],
)
def test_bad_fractions_are_rejected(val: float, test: float) -> None:
    with pytest.raises(AdvtrainError) as info:
        load_dataset("digits", val_fraction=val, test_fraction=test)
    assert "fraction" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- small sets
@pytest.mark.parametrize("name", SMALL)
def test_small_dataset_shapes_dtypes_labels_bounds(name: str) -> None:
    data = load_dataset(name)
    info = data.info
    assert info.name == name
    assert info.n_classes == len(info.classes) >= 2
    lower = torch.as_tensor(info.lower)
    upper = torch.as_tensor(info.upper)
    for split in _all_splits(data):
        assert len(split) == split.x.shape[0] == split.y.shape[0] > 0
        assert tuple(split.x.shape[1:]) == info.shape
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert int(split.y.min()) >= 0 and int(split.y.max()) < info.n_classes
        assert bool(torch.isfinite(split.x).all())
        assert bool((split.x >= lower).all()) and bool((split.x <= upper).all())
        assert set(split.y.tolist()) == set(range(info.n_classes))  # every class in every split
    if info.kind == "tabular":
        assert isinstance(info.lower, torch.Tensor) and isinstance(info.upper, torch.Tensor)
        assert info.lower.shape == info.upper.shape == info.shape
        assert info.lower.dtype == info.upper.dtype == torch.float32
        assert info.feature_names is not None and len(info.feature_names) == info.shape[0]


@pytest.mark.parametrize("name", SMALL)
def test_small_dataset_fractions_and_stratification(name: str) -> None:
    data = load_dataset(name, val_fraction=0.15, test_fraction=0.25)
    total = sum(len(s) for s in _all_splits(data))
    assert abs(len(data.test) - 0.25 * total) <= 1
    assert abs(len(data.val) - 0.15 * total) <= 1
    _check_stratified(data, {"train": 0.6, "val": 0.15, "test": 0.25})


@pytest.mark.parametrize("name", SMALL)
def test_seed_determinism(name: str) -> None:
    first, again, other = (load_dataset(name, seed=s) for s in (3, 3, 4))
    for a, b in zip(_all_splits(first), _all_splits(again), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert len(first.train) == len(other.train)
    assert not torch.equal(first.train.x, other.train.x)
    assert not torch.equal(first.test.x, other.test.x)


def test_digits() -> None:
    data = load_dataset("digits")
    info = data.info
    assert sum(len(s) for s in _all_splits(data)) == 1797
    assert info.kind == "image" and info.shape == (1, 8, 8)
    assert info.lower == 0.0 and info.upper == 1.0 and info.mutable is None
    assert info.classes == tuple(str(d) for d in range(10))
    assert info.default_eps == pytest.approx(0.2) and info.positive_class is None
    x = torch.cat([s.x for s in _all_splits(data)])
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    levels = torch.unique(x * 16)  # 0..16 divided by 16, nothing else
    assert torch.allclose(levels, levels.round()) and len(levels) == 17


def test_breast_cancer() -> None:
    data = load_dataset("breast-cancer")
    info = data.info
    sk = load_breast_cancer()
    assert info.kind == "tabular" and info.shape == (30,)
    assert info.classes == ("malignant", "benign") == tuple(sk.target_names)
    assert info.feature_names == tuple(sk.feature_names)
    assert info.positive_class == 0 and info.mutable is None
    assert info.default_eps == pytest.approx(0.05)
    assert torch.equal(info.lower, torch.zeros(30)) and torch.equal(info.upper, torch.ones(30))
    assert sum(len(s) for s in _all_splits(data)) == 569
    # Scaled with the training split's own range: it spans exactly [0, 1] in every feature.
    assert torch.equal(data.train.x.amin(dim=0), torch.zeros(30))
    assert torch.equal(data.train.x.amax(dim=0), torch.ones(30))


def test_tabular_scaling_uses_training_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outlier in a held-out row leaves the training split untouched and is clipped to 1."""
    import advtrain.data.tabular as tabular

    original = load_breast_cancer()
    baseline = load_dataset("breast-cancer", seed=2)
    for row in range(20):
        bunch = load_breast_cancer()
        bunch.data = original.data.copy()
        bunch.data[row, 0] = 1e6
        monkeypatch.setattr(tabular, "load_breast_cancer", lambda bunch=bunch: bunch)
        changed = load_dataset("breast-cancer", seed=2)
        if torch.equal(changed.train.x, baseline.train.x):
            break  # the outlier row is held out and did not influence the scaling
        assert float(changed.train.x[:, 0].max()) == 1.0
    else:
        pytest.fail("every outlier changed the training split: scaling leaks held-out rows")
    held_out = torch.cat([changed.val.x, changed.test.x])
    before = torch.cat([baseline.val.x, baseline.test.x])
    differs = (held_out != before).any(dim=1)
    assert int(differs.sum()) == 1  # only the outlier row changed ...
    assert float(held_out[differs][0, 0]) == 1.0  # ... and it was clipped into the bounds


def test_fraud() -> None:
    data = load_dataset("fraud")
    info = data.info
    assert info.kind == "tabular" and info.classes == ("legit", "fraud")
    assert info.positive_class == 1 and info.default_eps == pytest.approx(0.05)
    assert info.shape == (len(info.feature_names),) and len(info.feature_names) >= 10
    assert len(set(info.feature_names)) == len(info.feature_names)
    labels = torch.cat([s.y for s in _all_splits(data)])
    assert len(labels) == 20_000
    assert 0.015 <= float(labels.double().mean()) <= 0.03
    for split in _all_splits(data):
        assert abs(float(split.y.double().mean()) - float(labels.double().mean())) < 0.003
    assert info.mutable is not None
    assert info.mutable.dtype == torch.bool and info.mutable.shape == info.shape
    immutable = {n for n, m in zip(info.feature_names, info.mutable.tolist(), strict=True) if not m}
    assert len(immutable) >= 3 and immutable == set(FRAUD_IMMUTABLE)
    assert {"customer_age", "account_age_days"} <= immutable
    assert "amount" in info.feature_names and "amount" not in immutable


def test_fraud_table_is_fixed_whatever_the_split_seed() -> None:
    x1, y1 = fraud_table()
    x2, y2 = fraud_table()
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    a, b = load_dataset("fraud", seed=0), load_dataset("fraud", seed=1)
    assert int(torch.cat([s.y for s in _all_splits(a)]).sum()) == int(y1.sum())
    assert int(torch.cat([s.y for s in _all_splits(b)]).sum()) == int(y1.sum())


# ---------------------------------------------------------------------------------- containers
@pytest.mark.parametrize("name", SMALL)
def test_threat_model_from_info(name: str) -> None:
    data = load_dataset(name)
    info = data.info
    threat = info.threat_model()
    assert isinstance(threat, ThreatModel)
    assert threat.norm == "linf" and threat.eps == pytest.approx(info.default_eps)
    for bound in ("lower", "upper"):
        expected = torch.as_tensor(getattr(info, bound), dtype=torch.float32)
        assert torch.equal(torch.as_tensor(getattr(threat, bound)), expected)
    if info.mutable is None:
        assert threat.mask is None
    else:
        assert threat.mask is not None and torch.equal(threat.mask, info.mutable)
    threat.validate(data.test.x)  # the data lies inside the threat model's bounds
    other = info.threat_model("l2", eps=0.5)
    assert other.norm == "l2" and other.eps == 0.5


def test_fraud_threat_model_keeps_immutable_features_fixed() -> None:
    data = load_dataset("fraud")
    threat = data.info.threat_model(eps=0.2)
    assert threat.mask is not None
    names = data.info.feature_names
    for feature in FRAUD_IMMUTABLE:
        assert not bool(threat.mask[names.index(feature)])
    x = data.test.x[:64]
    start = threat.random_start(x, torch.Generator().manual_seed(0))
    moved = (start != x).any(dim=0)
    assert not bool(moved[~threat.mask].any())
    assert bool(moved[threat.mask].all())


def test_containers() -> None:
    data = load_dataset("digits")
    assert data.info.n_classes == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.info.name = "other"  # type: ignore[misc]
    assert "n=" in repr(data.train)
    with pytest.raises(DataError):
        Split(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64))
    assert isinstance(data.info, DatasetInfo)


# ---------------------------------------------------------------------------------- IDX
@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_idx_round_trip(array: np.ndarray) -> None:
    decoded = parse_idx(_idx_bytes(array), ndim=array.ndim)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, array)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4, "magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x08\x01\x00\x00", "header truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 4, "size mismatch"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 6, "size mismatch"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 1, 1) + b"\x00", "dimensions"),
    ],
)
def test_idx_rejects_bad_data(data: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        parse_idx(data, "some.idx", ndim=1)


# ---------------------------------------------------------------------------------- MNIST
def test_mnist_from_shared_dir(mnist_dir: Path) -> None:
    data = load_dataset("mnist", data_dir=mnist_dir)
    info = data.info
    assert info.name == "mnist" and info.kind == "image" and info.shape == (1, 28, 28)
    assert info.lower == 0.0 and info.upper == 1.0 and info.mutable is None
    assert info.n_classes == 10 and info.default_eps == pytest.approx(0.3)
    assert len(data.train) == 54_000 and len(data.val) == 6_000 and len(data.test) == 10_000
    for split in _all_splits(data):
        assert tuple(split.x.shape[1:]) == (1, 28, 28)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert float(split.x.min()) == 0.0 and float(split.x.max()) == 1.0
        assert set(split.y.tolist()) == set(range(10))
    assert int(data.test.y[0]) == 7 and data.test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert float(data.test.x.mean()) == pytest.approx(0.1325, abs=1e-3)  # unnormalised pixels
    totals = torch.bincount(torch.cat([data.train.y, data.val.y]), minlength=10).double()
    val_counts = torch.bincount(data.val.y, minlength=10).double()
    assert ((val_counts - 0.1 * totals).abs() <= 1).all()  # stratified by class


def test_mnist_split_options(mnist_dir: Path) -> None:
    a = load_dataset("mnist", data_dir=mnist_dir, val_fraction=0.2, test_fraction=0.5, seed=1)
    b = load_dataset("mnist", data_dir=mnist_dir, val_fraction=0.2, seed=1)
    c = load_dataset("mnist", data_dir=mnist_dir, val_fraction=0.2, seed=2)
    assert len(a.val) == 12_000 and len(a.train) == 48_000 and len(a.test) == 10_000
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.y, c.val.y)


def test_mnist_in_subdirectory_and_env_var(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _link_files(mnist_dir, tmp_path / "mnist")
    assert len(load_dataset("mnist", data_dir=tmp_path, download=False).test) == 10_000
    monkeypatch.setenv("ADVTRAIN_DATA", str(tmp_path))
    assert len(load_dataset("mnist", download=False).test) == 10_000
    monkeypatch.setenv("ADVTRAIN_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("mnist")
    assert "nowhere" in str(info.value)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("mnist", data_dir=tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "absent").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("mnist", data_dir=tmp_path / "file")


def test_no_files_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "download" in message and str(tmp_path) in message and LABELS in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("HOME", str(tmp_path))  # the default cache directory is under it
    with pytest.raises(DataError, match="download") as info:
        load_dataset("mnist", download=False)
    assert str(tmp_path / ".cache" / "advtrain") in str(info.value)


def test_checksum_mismatch(mnist_dir: Path, tmp_path: Path) -> None:
    _link_files(mnist_dir, tmp_path, skip=(LABELS,))
    _corrupt_copy(mnist_dir / LABELS, tmp_path / LABELS)
    parse_idx(gzip.decompress((tmp_path / LABELS).read_bytes()), ndim=1)  # still valid IDX
    with pytest.raises(DataError, match="checksum") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert LABELS in str(info.value) and "\n" not in str(info.value)


def test_truncated_and_non_gzip_files(mnist_dir: Path, tmp_path: Path) -> None:
    _link_files(mnist_dir, tmp_path, skip=(LABELS,))
    archive = (mnist_dir / LABELS).read_bytes()
    (tmp_path / LABELS).write_bytes(archive[: len(archive) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert LABELS in str(info.value) and "\n" not in str(info.value)
    (tmp_path / LABELS).write_bytes(gzip.decompress(archive))  # the raw IDX, not compressed
    with pytest.raises(DataError, match="gzip") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert LABELS in str(info.value)
    (tmp_path / LABELS).write_bytes(b"")
    with pytest.raises(DataError, match=LABELS):
        load_dataset("mnist", data_dir=tmp_path)


def test_changed_file_is_verified_again(mnist_dir: Path, tmp_path: Path) -> None:
    """The per-process cache must not hide a file that was replaced by a corrupt one."""
    _link_files(mnist_dir, tmp_path, skip=(LABELS,))
    (tmp_path / LABELS).write_bytes((mnist_dir / LABELS).read_bytes())
    assert len(load_dataset("mnist", data_dir=tmp_path).test) == 10_000
    _corrupt_copy(mnist_dir / LABELS, tmp_path / LABELS, offset=5000)
    with pytest.raises(DataError, match="checksum"):
        load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------------------------- downloads
def test_download_from_mirror(mnist_dir: Path, mnist_mirror: str, tmp_path: Path) -> None:
    data = load_dataset("mnist", data_dir=tmp_path, mirror=mnist_mirror)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(MNIST_FILES)
    for name in MNIST_FILES:
        assert (tmp_path / name).read_bytes() == (mnist_dir / name).read_bytes()
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    assert int(data.test.y[0]) == 7
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0


def test_download_only_missing_files(
    mnist_dir: Path, serve: Callable[[Path], tuple[str, list[str]]], tmp_path: Path
) -> None:
    url, requested = serve(mnist_dir)
    _link_files(mnist_dir, tmp_path / "data", skip=(LABELS,))
    assert download_mnist(tmp_path / "data", mirror=url.rstrip("/")) == tmp_path / "data"
    assert requested == [f"/{LABELS}"]
    digest = hashlib.sha256(gzip.decompress((tmp_path / "data" / LABELS).read_bytes()))
    assert digest.hexdigest() == MNIST_FILES[LABELS][0]
    created = download_mnist(tmp_path / "new" / "dir", mirror=url)
    assert sorted(p.name for p in created.iterdir()) == sorted(MNIST_FILES)


@pytest.mark.parametrize("damage", ["checksum", "truncated"])
def test_corrupt_download_leaves_nothing(
    damage: str,
    mnist_dir: Path,
    serve: Callable[[Path], tuple[str, list[str]]],
    tmp_path: Path,
) -> None:
    served = tmp_path / "mirror"
    served.mkdir()
    if damage == "checksum":
        _corrupt_copy(mnist_dir / LABELS, served / LABELS)
    else:
        archive = (mnist_dir / LABELS).read_bytes()
        (served / LABELS).write_bytes(archive[:-100])
    url, _ = serve(served)
    target = tmp_path / "data"
    _link_files(mnist_dir, target, skip=(LABELS,))
    with pytest.raises(DataError, match=damage) as info:
        load_dataset("mnist", data_dir=target, mirror=url)
    assert url + LABELS in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in target.iterdir()) == sorted(set(MNIST_FILES) - {LABELS})


def test_download_http_error(
    serve: Callable[[Path], tuple[str, list[str]]], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    url, _ = serve(empty)
    target = tmp_path / "data"
    target.mkdir()
    with pytest.raises(DataError, match="404") as info:
        load_dataset("mnist", data_dir=target, mirror=url)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list(target.iterdir()) == []


def test_download_connection_refused(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/mnist/"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, mirror=url)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_mirror_env_var_and_default_cache_dir(
    serve: Callable[[Path], tuple[str, list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    url, requested = serve(empty)
    monkeypatch.setenv("ADVTRAIN_MNIST_MIRROR", url)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(DataError, match="404") as info:
        load_dataset("mnist")
    assert url in str(info.value) and len(requested) == 1
    cache = tmp_path / "home" / ".cache" / "advtrain"
    assert cache.is_dir() and list(cache.iterdir()) == []  # created, and no partial file left
