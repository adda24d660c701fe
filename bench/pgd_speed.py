"""PGD-40 speed: advtrain against torchattacks, ART and foolbox, measured in one run.

Same model (the fast-adversarial paper's MNIST CNN, ``pgd_madry.pth``), the first 1,000 MNIST test
images, linf eps 0.3, step 0.01, 40 steps, one random start, all images in one batch. Each library
runs ``--repeats`` times, interleaved, and the median time counts. Robust accuracy is printed too,
so that a fast attack that is weaker would show.

    .venv/bin/python bench/pgd_speed.py [--n 1000] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks import PGD  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS, STEP, STEPS = 0.3, 0.01, 40
Runner = Callable[[nn.Module, Tensor, Tensor], Tensor]


def advtrain_pgd(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return PGD(eps=EPS, step_size=STEP, steps=STEPS)(model, x, y)


def torchattacks_pgd(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    import torchattacks

    return torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)(x, y)


def art_pgd(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )
    attack = ProjectedGradientDescentPyTorch(
        classifier,
        norm=np.inf,
        eps=EPS,
        eps_step=STEP,
        max_iter=STEPS,
        num_random_init=1,
        batch_size=len(x),
        verbose=False,
    )
    adv = attack.generate(x.cpu().numpy(), y.cpu().numpy())
    return torch.from_numpy(adv).to(x.device)


def foolbox_pgd(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    attack = foolbox.attacks.LinfPGD(abs_stepsize=STEP, steps=STEPS, random_start=True)
    _, clipped, _ = attack(fmodel, x, y, epsilons=EPS)
    return clipped


RUNNERS: dict[str, Runner] = {
    "advtrain": advtrain_pgd,
    "torchattacks": torchattacks_pgd,
    "ART": art_pgd,
    "foolbox": foolbox_pgd,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    x, y = data.test.x[: args.n].to(device), data.test.y[: args.n].to(device)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / "pgd_madry.pth")
    model = model.to(device).eval()

    available = {}
    for name, runner in RUNNERS.items():
        try:
            runner(model, x[:8], y[:8])  # warm-up, and a check that the library is installed
            available[name] = runner
        except ImportError as exc:
            print(f"{name}: not installed ({exc}); skipped")

    times: dict[str, list[float]] = {name: [] for name in available}
    accuracy: dict[str, list[float]] = {name: [] for name in available}
    for repeat in range(args.repeats):
        for name, runner in available.items():
            torch.manual_seed(repeat)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            x_adv = runner(model, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            with torch.no_grad():
                accuracy[name].append(float((model(x_adv).argmax(1) == y).float().mean()))

    ours = statistics.median(times["advtrain"])
    print(
        f"PGD-{STEPS} linf eps={EPS} step={STEP}, {args.n} MNIST test images, pgd_madry.pth, "
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'library':<14}{'seconds':>9}{'time / advtrain':>17}{'robust acc':>12}")
    for name in available:
        median = statistics.median(times[name])
        mean_accuracy = statistics.mean(accuracy[name])
        print(f"{name:<14}{median:>9.3f}{median / ours:>16.2f}x{mean_accuracy:>12.2%}")
    fastest_peer = min((statistics.median(t), n) for n, t in times.items() if n != "advtrain")
    ratio, peer = fastest_peer[0] / ours, fastest_peer[1]
    print(f"advtrain is {ratio:.2f}x the speed of the fastest peer ({peer})")


if __name__ == "__main__":
    main()
