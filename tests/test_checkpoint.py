"""Checkpoints: safetensors + sidecar round trips, corruption, unsafe pickles, atomic writes."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import advtrain.util as util
from advtrain.checkpoint import (
    load_checkpoint,
    load_state_dict,
    load_weights_into,
    save_checkpoint,
    sidecar_path,
)
from advtrain.errors import AdvtrainError, CheckpointError
from advtrain.util import atomic_write_bytes, atomic_write_json, atomic_write_text


class Arbitrary:
    """A class that weights_only unpickling must refuse."""

    def __init__(self) -> None:
        self.payload = 42


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def assert_one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and len(message) < 400, message
    return message


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_round_trip_with_sidecar(tmp_path: Path) -> None:
    net = small_net()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, net.state_dict(), {"model": "mlp", "epochs": 3, "eps": 0.3})
    assert sidecar_path(path) == tmp_path / "model.json"
    state, meta = load_checkpoint(path)
    assert state.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value)
    assert meta["model"] == "mlp" and meta["epochs"] == 3 and meta["eps"] == 0.3
    assert meta["format"] == "advtrain-checkpoint" and meta["version"] == 1
    import hashlib

    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    text = sidecar_path(path).read_text()
    assert text.endswith("}\n") and json.loads(text) == meta
    assert list(json.loads(text)) == sorted(meta)  # sorted keys


def test_save_makes_tensors_contiguous_cpu_and_unshared(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "tied": base, "t": base.t(), "half": base[1:]}
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, state, {})
    loaded, _ = load_checkpoint(path)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_reserved_meta_keys_describe_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {"sha256": "forged", "version": 99})
    _, meta = load_checkpoint(path)  # would fail the hash check if the forged value won
    assert meta["version"] == 1


def test_missing_sidecar_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {"x": 1})
    sidecar_path(path).unlink()
    state, meta = load_checkpoint(path)
    assert meta == {} and "0.weight" in state


def test_flipped_byte_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as exc:
        load_checkpoint(path)
    assert_one_line(exc)


@pytest.mark.parametrize("keep_sidecar", [True, False])
def test_truncated_file_is_corrupt(tmp_path: Path, keep_sidecar: bool) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {})
    path.write_bytes(path.read_bytes()[:-10])
    if not keep_sidecar:
        sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as exc:
        load_state_dict(path)
    assert_one_line(exc)


def test_sidecar_not_json(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {})
    sidecar_path(path).write_text('{"format": "advtrain-checkpoint",')
    with pytest.raises(CheckpointError, match="not valid JSON") as exc:
        load_checkpoint(path)
    assert_one_line(exc)


def test_missing_file(tmp_path: Path) -> None:
    for name in ("nope.safetensors", "nope.pth"):
        with pytest.raises(CheckpointError, match="not found") as exc:
            load_state_dict(tmp_path / name)
        assert_one_line(exc)


def test_save_refuses_other_suffix_and_bad_meta(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "m.pt", small_net().state_dict(), {})
    with pytest.raises(AdvtrainError, match="JSON"):
        save_checkpoint(tmp_path / "m.safetensors", small_net().state_dict(), {"bad": object()})
    assert list(tmp_path.iterdir()) == []  # nothing written when the metadata cannot be


def test_plain_pth_state_dict(tmp_path: Path) -> None:
    net = small_net()
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    state = load_state_dict(path)
    assert isinstance(state, dict) and state.keys() == net.state_dict().keys()


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(small_net(), path)
    with pytest.raises(CheckpointError, match="not a plain state dict") as exc:
        load_state_dict(path)
    assert "Sequential" in assert_one_line(exc)


def test_pickled_arbitrary_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save({"weight": Arbitrary()}, path)
    with pytest.raises(CheckpointError, match="not a plain state dict") as exc:
        load_state_dict(path)
    assert "Arbitrary" in assert_one_line(exc)


@pytest.mark.parametrize(
    "obj, why",
    [
        ([torch.zeros(2)], "list"),
        ({"w": 3}, "int"),
        ({"state_dict": {"w": "x"}}, "not a plain state dict"),
    ],
)
def test_non_state_dict_pickles_are_refused(tmp_path: Path, obj: object, why: str) -> None:
    path = tmp_path / "x.bin"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a plain state dict") as exc:
        load_state_dict(path)
    assert why in assert_one_line(exc)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", b"PK\x03\x04 truncated zip"])
def test_garbage_pth_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "g.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        load_state_dict(path)
    assert str(path) in assert_one_line(exc)


def test_module_prefix_is_stripped(tmp_path: Path) -> None:
    net = small_net()
    wrapped = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
    torch.save(wrapped, tmp_path / "dp.pth")
    assert load_state_dict(tmp_path / "dp.pth").keys() == net.state_dict().keys()
    save_checkpoint(tmp_path / "dp.safetensors", wrapped, {})
    assert load_state_dict(tmp_path / "dp.safetensors").keys() == net.state_dict().keys()
    partly = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    torch.save(partly, tmp_path / "partly.pth")
    assert load_state_dict(tmp_path / "partly.pth").keys() == partly.keys()


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, key: str) -> None:
    net = small_net()
    torch.save({key: net.state_dict(), "epoch": 7}, tmp_path / "w.pt")
    target = small_net()
    for p in target.parameters():
        nn.init.zeros_(p)
    load_weights_into(target, tmp_path / "w.pt")
    for a, b in zip(target.parameters(), net.parameters()):
        assert torch.equal(a, b)


def test_two_wrapped_state_dicts_are_ambiguous(tmp_path: Path) -> None:
    sd = small_net().state_dict()
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="several"):
        load_state_dict(tmp_path / "w.pt")


def test_key_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    state = small_net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    save_checkpoint(path, state, {})
    with pytest.raises(CheckpointError) as exc:
        load_weights_into(small_net(), path)
    message = assert_one_line(exc)
    assert "missing keys 2.bias" in message and "unexpected keys extra.weight" in message
    load_weights_into(small_net(), path, strict=False)  # non-strict ignores key differences


def test_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict(), path)
    for strict in (True, False):
        with pytest.raises(CheckpointError, match="shape mismatch") as exc:
            load_weights_into(small_net(), path, strict=strict)
        assert "0.weight (5, 3) vs (4, 3)" in assert_one_line(exc)


def test_many_missing_keys_are_abbreviated(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, path)
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    with pytest.raises(CheckpointError, match=r"\(\+6 more\)") as exc:
        load_weights_into(big, path)
    assert_one_line(exc)


def test_atomic_write_keeps_old_file_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "report.json"
    atomic_write_json(path, {"old": True})

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(util.os, "replace", broken_replace)
    with pytest.raises(AdvtrainError, match="disk on fire") as exc:
        atomic_write_json(path, {"new": True})
    assert_one_line(exc)
    assert json.loads(path.read_text()) == {"old": True}
    assert no_temp_files(tmp_path)


def test_atomic_write_cleans_up_when_write_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old")

    def broken_fsync(fd: int) -> None:
        raise KeyboardInterrupt  # not an OSError: must still clean up and propagate unchanged

    monkeypatch.setattr(util.os, "fsync", broken_fsync)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert no_temp_files(tmp_path)


def test_checkpoint_save_failure_keeps_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, small_net().state_dict(), {"run": 1})
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    monkeypatch.setattr(util.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(AdvtrainError):
        save_checkpoint(path, {"w": torch.ones(3)}, {"run": 2})
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert no_temp_files(tmp_path)


def test_atomic_writes_content_and_mode(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "b.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "b.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    umask = os.umask(0o022)
    os.umask(umask)
    assert (
        tmp_path / "a.txt"
    ).stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600
    os.chmod(tmp_path / "a.txt", 0o640)
    atomic_write_text(tmp_path / "a.txt", "again")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert no_temp_files(tmp_path)


def test_atomic_write_into_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AdvtrainError, match="cannot write") as exc:
        atomic_write_text(tmp_path / "no" / "such" / "file.txt", "x")
    assert_one_line(exc)
