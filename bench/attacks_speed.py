"""Time of advtrain's PGD, APGD, CW-L2 and Square against torchattacks, ART and foolbox.

Same model (the released ``pgd_madry.pth`` MNIST checkpoint, or ``--model fgsm.pth``), same
images, same budget, measured in one run, interleaved, median of ``--repeats``. Each row prints
seconds and the ratio ``peer / advtrain`` (above 1: advtrain is faster), with the attack's robust
accuracy (PGD/APGD/Square, linf eps 0.3) or success rate and median L2 (CW-L2, unbounded) so that
a fast but weak attack cannot hide.

Budgets (the same for every library):
- PGD: 40 steps of 0.01, one random start (Madry et al.'s MNIST attack);
- APGD-CE: 100 iterations (the paper's), one restart; foolbox has no APGD;
- CW-L2: ``--cw-search`` binary-search steps x ``--cw-steps`` Adam steps, lr 0.01, c0 1e-3 (ART,
  foolbox). torchattacks' CW has no binary search: it runs ``--cw-steps`` steps at c = 1, and we
  compare it with ours at one search step with c = 1 on a row of its own;
- Square: ``--square-queries`` queries, p_init 0.8, margin loss; foolbox has no Square.

    .venv/bin/python bench/attacks_speed.py [--n 1000] [--repeats 3] [--only pgd apgd cw square]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from advtrain.attacks import make_attack  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402
from advtrain.threat import lp_norm  # noqa: E402

EPS = 0.3
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _art_classifier(model):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )


def _art(attack) -> Runner:
    return lambda x, y: torch.from_numpy(attack.generate(x.numpy(), y.numpy()))


def _foolbox(model, attack, eps) -> Runner:
    import foolbox

    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))

    def run(x, y):
        _, clipped, _ = attack(fmodel, x, y, epsilons=eps)
        return clipped

    return run


def contenders(model, args) -> dict[str, dict[str, Runner]]:
    """attack family -> {library: function (x, y) -> x_adv}, all with the same budget."""
    import foolbox
    import torchattacks
    from art.attacks.evasion import (
        AutoProjectedGradientDescent,
        CarliniL2Method,
        ProjectedGradientDescent,
        SquareAttack,
    )

    classifier = _art_classifier(model)

    def ours(name, **options) -> Runner:
        attack = make_attack(name, **options)
        return lambda x, y: attack(model, x, y)

    def ta(attack) -> Runner:
        return lambda x, y: attack(x, y)

    steps, search = args.cw_steps, args.cw_search
    return {
        "PGD": {
            "advtrain": ours("pgd", eps=EPS, steps=40, step_size=0.01, seed=0),
            "torchattacks": ta(torchattacks.PGD(model, eps=EPS, alpha=0.01, steps=40)),
            "ART": _art(
                ProjectedGradientDescent(
                    classifier,
                    eps=EPS,
                    eps_step=0.01,
                    max_iter=40,
                    num_random_init=1,
                    batch_size=len_or(args),
                    verbose=False,
                )
            ),
            "foolbox": _foolbox(model, foolbox.attacks.LinfPGD(abs_stepsize=0.01, steps=40), EPS),
        },
        "APGD-CE": {
            "advtrain": ours("apgd-ce", eps=EPS, steps=100, seed=0),
            "torchattacks": ta(torchattacks.APGD(model, eps=EPS, steps=100, loss="ce", seed=0)),
            "ART": _art(
                AutoProjectedGradientDescent(
                    classifier,
                    eps=EPS,
                    eps_step=2 * EPS,
                    max_iter=100,
                    nb_random_init=1,
                    batch_size=len_or(args),
                    loss_type="cross_entropy",
                    verbose=False,
                )
            ),
        },
        f"CW-L2 ({search}x{steps})": {
            "advtrain": ours("cw-l2", binary_search_steps=search, steps=steps, seed=0),
            "ART": _art(
                CarliniL2Method(
                    classifier,
                    confidence=0.0,
                    learning_rate=0.01,
                    binary_search_steps=search,
                    max_iter=steps,
                    initial_const=1e-3,
                    batch_size=len_or(args),
                    verbose=False,
                )
            ),
            "foolbox": _foolbox(
                model,
                foolbox.attacks.L2CarliniWagnerAttack(
                    binary_search_steps=search,
                    steps=steps,
                    stepsize=0.01,
                    initial_const=1e-3,
                    abort_early=True,
                ),
                None,
            ),
        },
        f"CW-L2 (c=1, {steps})": {
            "advtrain": ours(
                "cw-l2", binary_search_steps=1, steps=steps, initial_const=1.0, seed=0
            ),
            "torchattacks": ta(torchattacks.CW(model, c=1, kappa=0, steps=steps, lr=0.01)),
        },
        "Square": {
            "advtrain": ours("square", eps=EPS, n_queries=args.square_queries, p_init=0.8, seed=0),
            "torchattacks": ta(
                torchattacks.Square(
                    model,
                    norm="Linf",
                    eps=EPS,
                    n_queries=args.square_queries,
                    p_init=0.8,
                    n_restarts=1,
                    loss="margin",
                    seed=0,
                )
            ),
            "ART": _art(
                SquareAttack(
                    classifier,
                    norm="inf",
                    eps=EPS,
                    max_iter=args.square_queries,
                    p_init=0.8,
                    nb_restarts=1,
                    batch_size=len_or(args),
                    verbose=False,
                )
            ),
        },
    }


def len_or(args) -> int:
    return args.n


def quality(family: str, model, x, y, x_adv) -> str:
    """Robust accuracy (bounded attacks) or success and median L2 (CW-L2)."""
    correct = predict(model, x_adv) == y
    if family.startswith("CW"):
        fooled = ~correct
        norms = lp_norm(x_adv - x, "l2")[fooled]
        median = float(norms.median()) if len(norms) else float("nan")
        return f"success {fooled.float().mean():.1%}, median L2 {median:.3f}"
    return f"robust acc {correct.float().mean():.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default="pgd_madry.pth")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["pgd", "apgd", "cw", "square"])
    parser.add_argument("--cw-steps", type=int, default=100)
    parser.add_argument("--cw-search", type=int, default=5)
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / args.model)
    model.eval()
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    keep = predict(model, x) == y  # attack the points the model gets right, like every library
    x, y = x[keep], y[keep]
    print(
        f"{args.model}: {len(x)} correctly classified of the first {args.n} MNIST test images; "
        f"{torch.get_num_threads()} threads; median of {args.repeats}; ratio = peer / advtrain"
    )
    families = contenders(model, args)
    wanted = {"pgd": "PGD", "apgd": "APGD", "cw": "CW", "square": "Square"}
    for family, runners in families.items():
        if not any(family.startswith(wanted[w]) for w in args.only):
            continue
        times: dict[str, list[float]] = {name: [] for name in runners}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, run in runners.items():  # interleaved, so load drifts hit everyone alike
                torch.manual_seed(0)
                start = time.perf_counter()
                outputs[name] = run(x, y)
                times[name].append(time.perf_counter() - start)
        ours = statistics.median(times["advtrain"])
        print(f"\n{family}")
        for name in runners:
            seconds = statistics.median(times[name])
            print(
                f"  {name:<13}{seconds:>8.2f} s  {seconds / ours:>5.2f}x   "
                f"{quality(family, model, x, y, outputs[name])}",
                flush=True,
            )


if __name__ == "__main__":
    main()
