"""Training throughput of the adversarial methods against a plain forward+backward loop.

PreAct ResNet-18 on CIFAR-shaped random data (3 x 32 x 32 in [0, 1], 10 classes; random data is
enough for throughput). For each method, the batches per second of ``advtrain``'s own batch loss
(``make_method``) followed by the optimiser step, as the trainer runs it; and the same model
trained by the plainest loop: ``loss = CE(model(x), y); loss.backward(); opt.step()``.

A method should cost no more than its count of forward+backward passes predicts, measured in
plain-loop steps:

- ``standard``: 1;  ``fgsm-rs``: 2 (one step for the input gradient, one to train);
- ``pgd`` with 7 steps: 8;
- ``trades`` with 10 steps: 12 1/3 (10 ascent steps, the clean and adversarial forwards trained
  through one backward, counted as 2, and a no-grad forward of the clean batch, counted as 1/3).

Attack steps only need the input gradient (the parameters are frozen), so they may come in under
the count. The ratio printed is measured / predicted: at most 1.10 is the goal.

    .venv/bin/python bench/throughput.py                  # CPU: batch 16, 3 timed steps
    .venv/bin/python bench/throughput.py --device cuda    # GPU: batch 256, bf16, channels_last
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain.models import build_model  # noqa: E402
from advtrain.threat import ThreatModel  # noqa: E402
from advtrain.training.methods import Method, make_method  # noqa: E402

SHAPE, CLASSES, EPS = (3, 32, 32), 10, 8 / 255
#: method -> (options, predicted cost in plain-loop steps)
METHODS = {
    "standard": ({}, 1.0),
    "fgsm-rs": ({}, 2.0),
    "pgd": ({"steps": 7}, 8.0),
    "trades": ({"steps": 10}, 12 + 1 / 3),
}


def _setup(device: torch.device, channels_last: bool, seed: int):
    torch.manual_seed(seed)
    model = build_model("preact-resnet18", in_shape=SHAPE, n_classes=CLASSES).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, optimizer


def _time(step, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds per batch of ``step()``, after ``warmup`` untimed batches."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (3 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 16)
    batches = args.batches or (20 if cuda else 3)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *SHAPE, generator=generator).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    threat = ThreatModel(norm="linf", eps=EPS)

    model, optimizer = _setup(device, cuda, 0)

    def plain() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    base = _time(plain, batches, args.warmup, device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"PreAct ResNet-18, batch {batch}, {name}; plain forward+backward loop: "
        f"{batch / base:.1f} images/s ({base * 1000:.0f} ms per batch)"
    )
    print(
        f"{'method':10} {'images/s':>9} {'ms/batch':>9} {'passes':>7} {'predicted':>9} {'ratio':>6}"
    )
    for method in args.methods:
        options, predicted = METHODS[method]
        model, optimizer = _setup(device, cuda, 0)
        training = make_method(method, threat, **options)

        def step(
            model: torch.nn.Module = model,
            optimizer: torch.optim.Optimizer = optimizer,
            training: Method = training,
        ) -> None:
            with autocast():
                loss, _ = training.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seconds = _time(step, batches, args.warmup, device)
        passes = seconds / base
        print(
            f"{method:10} {batch / seconds:9.1f} {seconds * 1000:9.0f} {passes:7.2f} "
            f"{predicted:9.2f} {passes / predicted:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
