"""The CUDA paths that the CPU machines never run, one check per call, for ``bench/gpu_check.sh``.

Each check prints ``PASS <name>: ...`` or ``FAIL <name>: ...`` (or ``SKIP``) and exits 0 on a
pass, 1 on a failure. ``--device cpu`` runs the same code on the CPU (the dry run that keeps
the script free of typos; AMP, channels-last and nccl are then skipped or run in their CPU form).

    python3 bench/gpu_checks.py amp|channels-last|compile|ddp-nccl|sync-bn|no-sync|env \
        [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402

CHECKS: dict[str, Callable[[torch.device], str]] = {}


def check(name: str) -> Callable[[Callable[[torch.device], str]], Callable[[torch.device], str]]:
    def register(function: Callable[[torch.device], str]) -> Callable[[torch.device], str]:
        CHECKS[name] = function
        return function

    return register


class Skip(Exception):
    """The check does not apply on this device."""


def _digits():
    return load_dataset("digits", seed=0)


def _head(split, n: int):
    return replace(split, x=split.x[:n], y=split.y[:n])


def _bar(device: torch.device, accuracy: float) -> float:
    """The test accuracy a short run must reach: on CUDA only (the CPU dry run trains on a few
    rows)."""
    return accuracy if device.type == "cuda" else 0.0


def _train(device: torch.device, epochs: int = 3, **options) -> tuple[float, float, object]:
    """Train digits-cnn-bn with PGD on sklearn's digits; (seconds, test clean accuracy, trainer)."""
    data = _digits()
    if device.type != "cuda":  # the dry run: the same code, one short epoch, no accuracy bar
        epochs, data = 1, replace(data, train=_head(data.train, 256), test=_head(data.test, 64))
    model = advtrain.build_model("digits-cnn-bn", in_shape=data.info.shape, n_classes=10)
    config = advtrain.TrainConfig(
        dataset="digits",
        model="digits-cnn-bn",
        method="pgd",
        attack_steps=3,
        epochs=epochs,
        device=str(device),
        **options,
    )
    start = time.perf_counter()
    trainer = advtrain.Trainer(model, data, config)
    result = trainer.fit()
    return time.perf_counter() - start, result.test_clean_accuracy, trainer


@check("env")
def env(device: torch.device) -> str:
    if device.type != "cuda":
        return f"torch {torch.__version__}, CPU only"
    if not torch.cuda.is_available():
        raise AssertionError("torch.cuda.is_available() is False")
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
        f"bf16 {torch.cuda.is_bf16_supported()}, {torch.cuda.device_count()} GPU(s)"
    )


@check("amp")
def amp(device: torch.device) -> str:
    if device.type != "cuda":
        raise Skip("AMP runs on CUDA only (amp auto is off on the CPU)")
    parts = []
    for mode, dtype in (
        ("auto", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
    ):
        seconds, accuracy, trainer = _train(device, amp=mode, channels_last="off")
        assert trainer.amp_dtype == dtype, f"amp {mode}: autocast dtype {trainer.amp_dtype}"
        assert (trainer.scaler is not None) == (dtype == torch.float16), f"amp {mode}: scaler"
        assert accuracy > _bar(device, 0.8), f"amp {mode}: test clean accuracy {accuracy:.2%}"
        parts.append(f"{mode} {accuracy:.1%} in {seconds:.1f} s")
    return "; ".join(parts)


@check("channels-last")
def channels_last(device: torch.device) -> str:
    seconds, accuracy, trainer = _train(device, channels_last="on", amp="off")
    assert trainer.channels_last, "channels_last on did not convert"
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last), "weights not NHWC"
    assert accuracy > _bar(device, 0.8), f"test clean accuracy {accuracy:.2%}"
    # an attack on NHWC inputs of an NHWC model
    data = _digits()
    x = data.test.x[:64].to(device).contiguous(memory_format=torch.channels_last)
    y = data.test.y[:64].to(device)
    x_adv = advtrain.PGD(eps=0.1, steps=5)(trainer.model, x, y)
    assert x_adv.shape == x.shape and bool(torch.isfinite(x_adv).all()), "PGD on NHWC input"
    auto = _train(device, epochs=1)[2]
    expected = device.type == "cuda"
    assert auto.channels_last == expected, f"channels_last auto: {auto.channels_last}"
    return f"trained {accuracy:.1%} in {seconds:.1f} s; auto is {'on' if expected else 'off'}"


@check("compile")
def compile_(device: torch.device) -> str:
    seconds, accuracy, trainer = _train(device, compile="inductor", epochs=2)
    assert trainer.runtime.train_model is not trainer.model, "the training model is not compiled"
    assert accuracy > _bar(device, 0.7), f"test clean accuracy {accuracy:.2%}"
    return f"inductor: {accuracy:.1%} after 2 epochs, {seconds:.1f} s (compilation included)"


def _world_of_one(device: torch.device) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)


@check("ddp-nccl")
def ddp_nccl(device: torch.device) -> str:
    """nccl with one process: the collectives advtrain calls, and a training run in the group."""
    import torch.distributed as dist

    from advtrain import distributed

    _world_of_one(device)
    try:
        assert dist.get_backend() == ("nccl" if device.type == "cuda" else "gloo")
        model = torch.nn.Linear(4, 3).to(device)
        model(torch.ones(2, 4, device=device)).sum().backward()
        before = [p.grad.clone() for p in model.parameters()]
        distributed.sum_gradients(model)
        after = [p.grad for p in model.parameters()]
        assert all(torch.allclose(a, b) for a, b in zip(before, after)), "sum_gradients changed"
        assert distributed.sum_over_ranks([1.5, 2.0], device) == [1.5, 2.0]
        assert distributed.from_rank_zero([3.0], device) == [3.0]
        distributed.barrier()
        seconds, accuracy, trainer = _train(device, epochs=2)
        assert trainer.world == 1 and accuracy > _bar(device, 0.7), f"accuracy {accuracy:.2%}"
        return (
            f"{dist.get_backend()} world 1: collectives and a run ({accuracy:.1%}, {seconds:.1f} s)"
        )
    finally:
        dist.destroy_process_group()


@check("sync-bn")
def sync_bn(device: torch.device) -> str:
    """SyncBatchNorm (CUDA) or AllRanksBatchNorm (CPU) in a process group of one: the converted
    model trains and matches plain BatchNorm's forward."""
    from advtrain import distributed

    _world_of_one(device)
    try:
        torch.manual_seed(0)
        plain = advtrain.build_model("preact-resnet18", in_shape=(3, 32, 32), n_classes=5)
        plain = plain.to(device).train()
        synced = distributed.synchronise_batchnorm(
            advtrain.build_model("preact-resnet18", in_shape=(3, 32, 32), n_classes=5), device
        ).to(device)
        synced.load_state_dict(plain.state_dict())
        kinds = {type(m).__name__ for m in synced.modules() if "BatchNorm" in type(m).__name__}
        x = torch.rand(16, 3, 32, 32, device=device)
        out_plain, out_synced = plain(x), synced.train()(x)
        assert torch.allclose(out_plain, out_synced, atol=1e-4, rtol=1e-3), "outputs differ"
        out_synced.sum().backward()
        grads = [p.grad for p in synced.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), "gradients"
        return f"{', '.join(sorted(kinds))}: forward equals BatchNorm's, backward finite"
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


@check("no-sync")
def no_sync(device: torch.device) -> str:
    """The attacks' loops on the device: results as on the CPU (within a point or two) and few
    host synchronisations (torch.cuda.set_sync_debug_mode counts them on CUDA)."""
    from advtrain.attacks import APGD, APGDT, FABT, PGD, Square

    torch.manual_seed(0)
    data = _digits()
    _, _, trainer = _train(device, epochs=2)
    model = trainer.model.cpu().eval()  # trained where it runs, attacked on both
    n = 200 if device.type == "cuda" else 20
    x, y = data.test.x[:n], data.test.y[:n]
    eps = 0.1
    attacks = {
        "pgd": PGD(eps=eps, steps=50, seed=0),
        "apgd-ce": APGD(eps=eps, seed=0),
        "apgd-t": APGDT(eps=eps, n_targets=3, seed=0),
        "fab-t": FABT(eps=eps, n_targets=3, seed=0),
        "square": Square(eps=eps, n_queries=500, seed=0),
    }
    lines, failed = [], []
    for name, attack in attacks.items():
        cpu_acc = float((advtrain.predict(model, attack(model, x, y)) == y).float().mean())
        dev_model = model.to(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            start = time.perf_counter()
            x_adv = attack(dev_model, x.to(device), y.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(0)
            seconds = time.perf_counter() - start
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        dev_acc = float((advtrain.predict(dev_model, x_adv) == y.to(device)).float().mean())
        model = dev_model.cpu()
        ok = abs(dev_acc - cpu_acc) <= 0.02
        lines.append(
            f"{name} {device.type} {dev_acc:.1%} vs cpu {cpu_acc:.1%}, {syncs} syncs, "
            f"{seconds:.2f} s"
        )
        if not ok:
            failed.append(name)
    print("\n".join("    " + line for line in lines))
    assert not failed, f"robust accuracy differs from the CPU's by more than 2 points: {failed}"
    return "; ".join(f"{n} ok" for n in attacks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    try:
        detail = CHECKS[args.check](device)
    except Skip as skipped:
        print(f"SKIP {args.check}: {skipped}", flush=True)
        return
    except Exception as error:  # one line per failure, whatever it is
        message = str(error).splitlines()[0] if str(error) else ""
        print(f"FAIL {args.check}: {type(error).__name__}: {message[:300]}", flush=True)
        sys.stderr.flush()
        os._exit(1)
    print(f"PASS {args.check}: {detail} ({time.perf_counter() - start:.0f} s)", flush=True)
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: a process group's threads can hang it


if __name__ == "__main__":
    main()
