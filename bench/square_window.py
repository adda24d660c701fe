"""Square with and without the window forward pass, and torchattacks' Square, on one CNN.

The window pass (``advtrain/attacks/window_forward.py``) recomputes only the feature-map patches
a proposal's window reaches, and moves the output of the head's first linear layer by the change
of the last patch. Its logits equal the model's up to float rounding (about 1e-6 relative), so a
search with it can part from one without it where two losses tie to that precision: the robust
accuracies are compared, not the points. The model is ``mnist-large`` (Madry et al.'s CNN)
standard-trained here for one epoch on the first ``--train`` MNIST training images (seed 0), or
``--model mnist-small --weights FILE`` (a fast-adversarial checkpoint).

Linf ``--eps``, ``--n-queries`` queries, seed 0, first ``--n`` MNIST test images, ``--threads``
threads, the three runs interleaved ``--repeats`` times in this process. Prints robust accuracy
and seconds.

    .venv/bin/python bench/square_window.py [--model mnist-large] [--n 200] [--n-queries 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks.square import Square  # noqa: E402
from advtrain.attacks.square_forward import FullQueries, WindowQueries  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402


def train_one_epoch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for index in torch.randperm(len(x)).split(100):
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mnist-large", choices=["mnist-small", "mnist-large"])
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model = build_model(args.model, in_shape=(1, 28, 28), n_classes=10)
    if args.weights:
        load_weights_into(model, args.weights)
        model.eval()
    else:
        train_one_epoch(model, data.train.x[: args.train], data.train.y[: args.train])
    x, y = data.test.x[: args.n], data.test.y[: args.n]

    def advtrain_square(window: bool) -> torch.Tensor:
        forward = WindowQueries() if window else FullQueries()
        return Square(eps=args.eps, n_queries=args.n_queries, seed=0, forward=forward)(model, x, y)

    def torchattacks_square() -> torch.Tensor:
        import torchattacks

        return torchattacks.Square(
            model, norm="Linf", eps=args.eps, n_queries=args.n_queries, n_restarts=1, seed=0
        )(x, y)

    runs = {
        "advtrain, window pass": lambda: advtrain_square(True),
        "advtrain, full pass": lambda: advtrain_square(False),
    }
    if not args.skip_peer:
        runs["torchattacks"] = torchattacks_square
    clean = float((predict(model, x) == y).float().mean())
    print(
        f"Square linf eps={args.eps}, {args.n_queries} queries, {args.model}, first {args.n} "
        f"MNIST test images (clean {clean:.2%}), {args.threads} threads"
    )
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            x_adv = run()
            times[name].append(time.perf_counter() - start)
            robust = float((predict(model, x_adv) == y).float().mean())
            print(f"  {name:<24} robust {robust:7.2%}  {times[name][-1]:7.1f} s", flush=True)
    best = {name: min(t) for name, t in times.items()}
    base = best["advtrain, window pass"]
    print(
        "best of each: "
        + ", ".join(f"{name} {t:.1f} s ({t / base:.2f}x)" for name, t in best.items())
    )


if __name__ == "__main__":
    main()
