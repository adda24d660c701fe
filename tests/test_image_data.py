"""A user's own images: class folders, .npz arrays (plain and MedMNIST), CIFAR's files, read
lazily; their errors; the CLI on a tiny folder; the example lesion generator.

Every set is generated here, seeded and tiny (8x8 images, a dozen per class).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import advtrain
from advtrain.cli import run
from advtrain.data import LazyInputs, load_images
from advtrain.data.cifar import DataOnlyUnpickler, read_pickle
from advtrain.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("benign", "malignant")


def write_images(
    folder: Path,
    per_class: int = 12,
    size: tuple[int, int] = (8, 8),
    grey: bool = False,
    seed: int = 0,
    suffix: str = ".png",
) -> None:
    """``per_class`` images per class: class 0 dark, class 1 bright (easy to learn)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 60 + 120 * label
            shape = size if grey else (*size, 3)
            pixels = np.clip(base + rng.integers(-40, 40, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i:03d}{suffix}")


# ---------------------------------------------------------------------- folders
def test_a_flat_rgb_folder_splits_stratified_and_seeded(tmp_path):
    write_images(tmp_path, per_class=20)
    data = load_images(tmp_path, seed=3)
    info = data.info
    assert info.kind == "image" and info.classes == CLASSES and info.shape == (3, 8, 8)
    assert info.lower == 0.0 and info.upper == 1.0 and info.default_eps == pytest.approx(8 / 255)
    assert info.positive_class is None and info.name == f"images {tmp_path}"
    assert isinstance(data.train.x, LazyInputs)
    assert (len(data.train), len(data.val), len(data.test)) == (28, 4, 8)
    for split in (data.train, data.val, data.test):  # stratified: both classes, equal shares
        assert torch.bincount(split.y).tolist() == [len(split) // 2] * 2
        assert torch.equal(split.x.labels, split.y)
    again = load_images(tmp_path, seed=3)
    assert np.array_equal(again.test.x.positions, data.test.x.positions)
    other = load_images(tmp_path, seed=4)
    assert not np.array_equal(other.test.x.positions, data.test.x.positions)
    x = data.train.x[:]
    assert x.dtype == torch.float32 and x.shape == (28, 3, 8, 8)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    # the pixels are the file's, /255, channels first
    path = data.train.x.reader.paths[int(data.train.x.positions[0])]
    expected = np.asarray(Image.open(path), dtype=np.float32).transpose(2, 0, 1) / 255
    assert torch.allclose(data.train.x[0], torch.from_numpy(expected))


def test_train_test_folders_are_used_and_val_carved_from_train(tmp_path):
    write_images(tmp_path / "train", per_class=10)
    write_images(tmp_path / "test", per_class=3, seed=1)
    data = load_images(tmp_path, val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (16, 4, 6)
    test_files = {data.test.x.reader.paths[p].parent.parent.name for p in data.test.x.positions}
    assert test_files == {"test"}
    write_images(tmp_path / "val", per_class=2, seed=2)
    data = load_images(tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 4, 6)


def test_grey_images_give_one_channel_and_mixed_give_rgb(tmp_path):
    write_images(tmp_path / "grey", grey=True)
    assert load_images(tmp_path / "grey").info.shape == (1, 8, 8)
    write_images(tmp_path / "mixed", grey=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed/benign/rgb.png")
    data = load_images(tmp_path / "mixed")
    assert data.info.shape == (3, 8, 8)
    assert data.train.x[:].shape[1:] == (3, 8, 8)


def test_image_size_resizes_and_other_sizes_are_refused_without_it(tmp_path):
    write_images(tmp_path, suffix=".jpg")
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "malignant/odd.jpg")
    with pytest.raises(DataError, match=r"odd\.jpg' is 5x7.*image_size"):
        load_images(tmp_path)
    data = load_images(tmp_path, image_size=(6, 4))
    assert data.info.shape == (3, 6, 4)
    assert data.test.x[:].shape[1:] == (3, 6, 4)
    assert advtrain.load_images is load_images


def test_reading_an_index_opens_only_those_files(tmp_path, monkeypatch):
    write_images(tmp_path)
    data = load_images(tmp_path)  # reads headers once, up front
    opened: list[str] = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    x = data.train.x
    got = x[torch.tensor([2, 0])]
    paths = x.reader.paths
    assert got.shape == (2, 3, 8, 8)
    assert opened == [str(paths[x.positions[2]]), str(paths[x.positions[0]])]
    opened.clear()
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[[1, 4]] = True
    assert torch.equal(x[mask], x[[1, 4]])
    assert len(opened) == 4
    opened.clear()
    assert x.labels.shape == (len(x),) and not opened  # labels come from the folder names
    assert sum(len(c) for c in x.chunks(5)) == len(x)


def test_a_corrupt_file_and_an_empty_class_folder_are_named(tmp_path):
    write_images(tmp_path / "bad")
    (tmp_path / "bad/malignant/broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png") as caught:
        load_images(tmp_path / "bad")
    assert "\n" not in str(caught.value)
    # a valid header whose pixel data is cut short fails when read, naming the file
    write_images(tmp_path / "cut")
    good = (tmp_path / "cut/benign/000.png").read_bytes()
    (tmp_path / "cut/benign/000.png").write_bytes(good[: len(good) // 2])
    data = load_images(tmp_path / "cut")
    with pytest.raises(DataError, match=r"000\.png"):
        for split in (data.train, data.val, data.test):
            split.x[:]
    write_images(tmp_path / "empty")
    (tmp_path / "empty/unknown").mkdir()
    (tmp_path / "empty/unknown/notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder '.*unknown' has no images"):
        load_images(tmp_path / "empty")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_images(tmp_path / "none")


# ---------------------------------------------------------------------- arrays
def test_npz_uint8_and_float_arrays(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    data = load_images(tmp_path / "u8.npz")
    assert data.info.shape == (3, 8, 8) and data.info.classes == ("0", "1", "2")
    position = int(data.test.x.positions[0])
    expected = torch.from_numpy(x[position].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.allclose(data.test.x[0], expected)
    assert torch.bincount(data.test.y).tolist() == [2, 2, 2]
    np.savez(tmp_path / "f.npz", x=x[..., 0] / 255.0, y=y, classes=np.array(["a", "b", "c"]))
    data = load_images(tmp_path / "f.npz")
    assert data.info.shape == (1, 8, 8) and data.info.classes == ("a", "b", "c")
    np.savez(tmp_path / "big.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_images(tmp_path / "big.npz")
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(DataError, match="lacks y"):
        load_images(tmp_path / "nolabels.npz")


def medmnist_arrays(rng: np.random.Generator, labels_width: int = 1) -> dict[str, np.ndarray]:
    arrays = {}
    for split, n in (("train", 24), ("val", 6), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        if labels_width == 1:
            arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, labels_width), dtype=np.uint8)
    return arrays


def test_medmnist_layout_and_its_refusals(tmp_path):
    rng = np.random.default_rng(1)
    np.savez_compressed(tmp_path / "pathmnist.npz", **medmnist_arrays(rng))
    data = load_images(tmp_path / "pathmnist.npz")
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 8)
    assert data.info.shape == (1, 8, 8) and data.test.y.tolist() == [0, 1] * 4
    np.savez(tmp_path / "chestmnist.npz", **medmnist_arrays(rng, labels_width=14))
    with pytest.raises(DataError, match=r"multi-label .* not supported"):
        load_images(tmp_path / "chestmnist.npz")
    partial = medmnist_arrays(rng)
    del partial["test_labels"]
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(DataError, match="lacks test_labels"):
        load_images(tmp_path / "partial.npz")


# ---------------------------------------------------------------------- CIFAR
def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(i % 10) for i in range(per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(per_batch)],
        }
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file)
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, file)
    return folder


def test_cifar10_python_format_from_its_root_or_folder(tmp_path):
    folder = write_cifar10(tmp_path)
    data = load_images(tmp_path, val_fraction=0.1)
    assert data.info.classes[:2] == ("class0", "class1") and data.info.shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    with (folder / "test_batch").open("rb") as file:
        raw = pickle.load(file)[b"data"]  # our own file, written above
    expected = torch.from_numpy(raw[:2].reshape(2, 3, 32, 32).astype(np.float32) / 255)
    assert torch.allclose(data.test.x[:2], expected)
    assert load_images(folder).info.classes == data.info.classes


def test_cifar100_python_and_cifar10_binary_formats(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "c100" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", 300), ("test", 100)):
        batch = {
            b"fine_labels": [i % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file)
    with (folder / "meta").open("wb") as file:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, file)
    data = load_images(folder, val_fraction=1 / 3)
    assert data.info.n_classes == 100 and (len(data.train), len(data.test)) == (200, 100)
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = (np.arange(20) % 10).astype(np.uint8)[:, None]
        pixels = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], axis=1).tofile(binary / name)
    (binary / "batches.meta.txt").write_text("\n".join(f"b{i}" for i in range(10)) + "\n\n")
    data = load_images(binary.parent)
    assert data.info.classes[9] == "b9" and len(data.test) == 20


class Payload:
    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


def test_the_cifar_unpickler_refuses_anything_but_numpy_arrays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar10(tmp_path)
    with (folder / "data_batch_3").open("wb") as file:
        pickle.dump({b"data": Payload(), b"labels": [0]}, file)
    with pytest.raises(DataError, match=r"data_batch_3.*(posix|os|nt)\.system.*refused"):
        load_images(tmp_path)
    assert not (tmp_path / "should-not-exist").exists()
    path = tmp_path / "arrays.pkl"
    arrays = {b"a": np.arange(6, dtype=np.uint8).reshape(2, 3), b"b": np.float64(0.5)}
    for protocol in (2, 4, 5):  # the numpy constructors each protocol names
        path.write_bytes(pickle.dumps({**arrays, b"s": [b"x", "y"]}, protocol=protocol))
        got = read_pickle(path)
        assert np.array_equal(got[b"a"], arrays[b"a"]) and got[b"b"] == 0.5
    assert issubclass(DataOnlyUnpickler, pickle.Unpickler)


# ---------------------------------------------------------------------- LazyInputs itself
def test_lazy_inputs_over_a_torch_style_dataset():
    class Pairs:
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            return torch.full((1, 2, 2), float(i)), i % 2

    x = LazyInputs(Pairs())
    assert x.shape == (5, 1, 2, 2) and x.dtype == torch.float32 and len(x) == 5
    assert x.labels.tolist() == [0, 1, 0, 1, 0]
    assert x[-1][0, 0, 0] == 4 and x[1:4:2][:, 0, 0, 0].tolist() == [1, 3]
    assert x[np.array([4, 0])][:, 0, 0, 0].tolist() == [4, 0]
    view = x.subset([3, 1])
    assert view[:][:, 0, 0, 0].tolist() == [3, 1] and view.labels.tolist() == [1, 1]
    with pytest.raises(IndexError):
        x[5]
    with pytest.raises(IndexError):
        x[torch.ones(3, dtype=torch.bool)]


# ---------------------------------------------------------------------- the example
def test_the_lesion_example_writes_a_loadable_set(tmp_path):
    out = tmp_path / "lesions"
    script = ROOT / "examples" / "make_lesions.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--n", "40", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = load_images(out)
    assert data.info.classes == CLASSES and data.info.shape == (3, 32, 32)
    assert len(data.train) + len(data.val) + len(data.test) == 40
    first = sorted((out / "train" / "benign").iterdir())[0].read_bytes()
    again = [sys.executable, str(script), str(tmp_path / "again"), "--n", "40", "--seed", "1"]
    subprocess.run(again, check=True, capture_output=True, timeout=120)
    assert sorted((tmp_path / "again/train/benign").iterdir())[0].read_bytes() == first


# ---------------------------------------------------------------------- the command line
def cli(capsys, *args: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = run([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_then_evaluate_a_run_on_an_image_folder(tmp_path, capsys):
    write_images(tmp_path / "data", per_class=12, size=(10, 12))
    out = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--data", tmp_path / "data", "--image-size", "8", "--epochs", "2",
        "--method", "standard", "--lr", "0.01", "--eval-steps", "2", "--batch-size", "8",
        "--augment", "crop,flip", "--out", out, "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    config = __import__("json").loads((out / "config.json").read_text())
    assert config["data"] == str(tmp_path / "data") and config["image_size"] == [8, 8]
    assert config["schema"] is None
    # a large eps breaks every point at once: the suite's later steps have nothing to attack
    rc, stdout, err = cli(capsys, "evaluate", out, "--suite", "quick", "--n", "8", "--eps", "0.5")
    assert rc == 0, err
    assert "robust accuracy 0.00%" in stdout and "n=5," in stdout  # the folder's 5 test images
    # streamed from the folder, with its state kept: the second run replays it to the same report
    again = ("evaluate", out, "--suite", "quick", "--eps", "0.5", "--resume", tmp_path / "state")
    reports = []
    for name in ("first.json", "again.json"):
        rc, _, err = cli(capsys, *again, "--json", tmp_path / name)
        assert rc == 0, err
        report = __import__("json").loads((tmp_path / name).read_text())
        for key in ("seconds", "seconds_by_stage"):
            del report["settings"][key]
        reports.append(report)
    assert reports[0] == reports[1] and any((tmp_path / "state" / "units").iterdir())
    rc, _, err = cli(capsys, *again, "--eps", "0.4")
    assert rc == 2 and "other settings" in err and err.count("\n") == 1
    adv = tmp_path / "adv.npz"
    attack = ("attack", out, "--attack", "fgsm", "--n", "4", "--out", adv, "--no-png")
    rc, _, err = cli(capsys, *attack)
    assert rc == 0, err
    assert np.load(adv)["x_adv"].shape[1:] == (3, 8, 8)


def test_schema_or_a_bad_image_size_with_images_is_one_line_exit_2(tmp_path, capsys):
    write_images(tmp_path / "data")
    schema = tmp_path / "s.toml"
    schema.write_text("label = 'y'\n")
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "data", "--schema", schema)
    assert rc == 2 and err.count("\n") == 1 and "--schema" in err
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "data", "--image-size", "0x3")
    assert rc == 2 and err.count("\n") == 1 and "image size" in err
