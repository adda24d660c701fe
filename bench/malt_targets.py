"""APGD-T's targets by logit order against MALT's linearised distance, and how many of them.

MALT (Melamed, Yehudai & Shamir, NeurIPS 2024) ranks the target classes of a targeted attack by
the linearised distance ``|z_y - z_t| / ||grad (z_y - z_t)||_1`` instead of by logit.
For each released fast-adversarial MNIST checkpoint (``../shared/models/fast-adversarial-mnist``),
first ``--n`` test images, linf eps 0.3, in one process:

1. APGD-CE as the standard suite runs it (100 iterations, seeded from its step name), once;
2. on its survivors, each APGD-T variant (``--variants``, ``ORDER:TARGETS``), back to back,
   timed, with the images it sent through the model (forward+backward, forward only);
3. FAB-T (3 targets, logit order, as the suite's) and Square (5,000 queries) once, on the points
   that survived APGD-CE and at least one variant: a variant's final robust accuracy counts the
   points that survived it and these two attacks, which is the standard suite's cascade up to
   the diagnostics and escalations;
4. FAB-T over 3 targets by logit order and by MALT's, each on every APGD-CE survivor: the
   points each breaks within eps, seconds.

Prints per model and variant: robust accuracy after APGD-T, final robust accuracy, seconds and
model passes of APGD-T. Lower accuracy is stronger; a variant is only worth having if its final
accuracy is no higher than ``logits:9``'s.

    .venv/bin/python bench/malt_targets.py [--n 500] [--threads 2] \
        [--models fgsm.pth,pgd_madry.pth] [--variants logits:9,malt:9,malt:5,malt:3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_speed import PassCounter, load

from advtrain.attacks import APGD, APGDT, FABT, Square
from advtrain.evaluation import predict
from advtrain.evaluation.shards import step_seed
from advtrain.threat import ThreatModel


def broken(model: torch.nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return predict(model, x_adv) != y


def compare(model_name: str, n: int, variants: list[tuple[str, int]], seed: int) -> None:
    model, x, y, eps, _ = load(model_name, n)
    threat = ThreatModel(norm="linf", eps=eps)
    standing = predict(model, x) == y
    print(f"{model_name}: first {n} MNIST test images, clean {float(standing.float().mean()):.1%}")
    index = standing.nonzero().squeeze(1)
    apgd = APGD(threat, seed=step_seed(seed, "apgd-ce"))
    start = time.perf_counter()
    standing[index[broken(model, apgd(model, x[index], y[index]), y[index])]] = False
    print(f"  apgd-ce: {float(standing.float().mean()):.1%} in {time.perf_counter() - start:.1f} s")
    index = standing.nonzero().squeeze(1)
    survived: dict[tuple[str, int], torch.Tensor] = {}
    seconds: dict[tuple[str, int], float] = {}
    passes: dict[tuple[str, int], tuple[int, int]] = {}
    for order, targets in variants:
        attack = APGDT(
            threat, n_targets=targets, target_order=order, seed=step_seed(seed, "apgd-t")
        )
        counter = PassCounter(model)
        start = time.perf_counter()
        x_adv = attack(model, x[index], y[index])
        seconds[order, targets] = time.perf_counter() - start
        counter.close()
        passes[order, targets] = (sum(counter.backward.values()), sum(counter.forward.values()))
        survived[order, targets] = ~broken(model, x_adv, y[index])
    union = torch.stack(list(survived.values())).any(dim=0)
    rest = index[union]
    start = time.perf_counter()
    fab = FABT(threat, n_targets=3, seed=step_seed(seed, "fab-t"))
    after = ~broken(model, fab(model, x[rest], y[rest]), y[rest])
    square = Square(threat, n_queries=5000, seed=step_seed(seed, "square"))
    keep = rest[after]
    after[after.clone()] = ~broken(model, square(model, x[keep], y[keep]), y[keep])
    final_standing = torch.zeros(len(x), dtype=torch.bool)
    final_standing[rest] = after
    print(f"  fab-t + square on {len(rest)} points: {time.perf_counter() - start:.1f} s")
    print(
        f"  {'apgd-t':<10} {'after apgd-t':>12} {'final':>8} {'seconds':>8} "
        f"{'fwd+bwd images':>15} {'fwd images':>11}"
    )
    for key, alive in survived.items():
        robust = float(alive.sum()) / n
        final = float((final_standing[index] & alive).sum()) / n
        backward, forward = passes[key]
        print(
            f"  {key[0] + ':' + str(key[1]):<10} {robust:>12.1%} {final:>8.1%} "
            f"{seconds[key]:>8.1f} {backward:>15,} {forward:>11,}",
            flush=True,
        )
    for order in ("logits", "malt"):
        fab = FABT(threat, n_targets=3, target_order=order, seed=step_seed(seed, "fab-t"))
        start = time.perf_counter()
        fab_broken = int(broken(model, fab(model, x[index], y[index]), y[index]).sum())
        print(
            f"  fab-t over 3 targets by {order}: breaks {fab_broken} of {len(index)} APGD-CE "
            f"survivors, {time.perf_counter() - start:.1f} s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="fgsm.pth,pgd_madry.pth")
    parser.add_argument("--variants", default="logits:9,malt:9,malt:5,malt:3,logits:5,logits:3")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",")]
    for name in args.models.split(","):
        compare(name, args.n, variants, args.seed)


if __name__ == "__main__":
    main()
