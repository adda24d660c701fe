"""The Square attack against torchattacks' (and ART's) on the released MNIST checkpoints.

First ``--n`` MNIST test images, linf eps 0.3, ``--n-queries`` queries (the paper's 5000),
``p_init=0.8``, margin loss, one run, seed 0 for each. Prints robust accuracy, wall and CPU
seconds, and each peer's CPU time divided by ours, measured in one run on one thread. On a shared
machine wall time is noisy; CPU time of the single-threaded process is the steadier measure.

    .venv/bin/python bench/square_compare.py [--n 1000] [--n-queries 5000] [--skip-art]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks.square import Square  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS, P_INIT = 0.3, 0.8


def ours(model, x, y, n_queries):
    attack = Square(eps=EPS, n_queries=n_queries, p_init=P_INIT, loss="margin", seed=0)
    result = attack.outcome(model, x, y)
    return result.x_adv, f"mean queries {result.queries.float().mean():.0f}"


def torchattacks_square(model, x, y, n_queries):
    import torchattacks

    attack = torchattacks.Square(
        model,
        norm="Linf",
        eps=EPS,
        n_queries=n_queries,
        p_init=P_INIT,
        n_restarts=1,
        loss="margin",
        seed=0,
    )
    return attack(x, y), ""


def art_square(model, x, y, n_queries):
    import numpy as np
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import PyTorchClassifier

    np.random.seed(0)
    classifier = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = SquareAttack(
        classifier,
        norm=np.inf,
        max_iter=n_queries,
        eps=EPS,
        p_init=P_INIT,
        nb_restarts=1,
        batch_size=1024,
        verbose=False,
    )
    return torch.from_numpy(attack.generate(x.numpy(), y.numpy())), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-queries", type=int, default=5000)
    parser.add_argument(
        "--skip-art",
        action="store_true",
        help="skip ART, which queries every point twice an iteration",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    runners = {"advtrain": ours, "torchattacks": torchattacks_square}
    if not args.skip_art:
        runners["ART"] = art_square
    print(
        f"Square linf eps={EPS}, {args.n_queries} queries, p_init={P_INIT}, margin loss, "
        f"first {args.n} MNIST test images, seed 0, 1 thread"
    )
    print(
        f"{'model':<15}{'attack':<14}{'clean':>8}{'robust':>9}{'wall s':>9}{'cpu s':>9}"
        f"{'cpu/ours':>10}  note"
    )
    for name in ("pgd_madry.pth", "fgsm.pth"):
        model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
        load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / name)
        model.eval()
        clean = float((predict(model, x) == y).float().mean())
        base = None
        for label, runner in runners.items():
            torch.manual_seed(0)
            start, cpu = time.perf_counter(), time.process_time()
            x_adv, note = runner(model, x, y, args.n_queries)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            base = cpu if base is None else base
            robust = float((predict(model, x_adv) == y).float().mean())
            linf = float((x_adv - x).abs().amax()) if len(x) else 0.0
            print(
                f"{name:<15}{label:<14}{clean:>8.2%}{robust:>9.2%}{seconds:>9.1f}{cpu:>9.1f}"
                f"{cpu / base:>10.2f}  max |delta| {linf:.3f} {note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
