"""Our standard evaluation suite against torchattacks' AutoAttack with the paper's 100 iterations.

Same model (a released fast-adversarial MNIST checkpoint), same first ``--n`` MNIST test images,
linf eps 0.3, one run each, measured in one process. torchattacks' ``AutoAttack`` class builds its
APGD, APGD-T and FAB with torchattacks' default of 10 iterations, so the stand-in is assembled here
from the same four attacks with AutoAttack's standard settings (Croce & Hein 2020): APGD-CE and
APGD-T (9 targets) with 100 iterations, FAB-T (9 targets, 100 iterations), Square with 5,000
queries, one restart each, run as a survivor cascade (torchattacks' ``MultiAttack``).

Prints robust accuracy (lower is stronger) and seconds for both, and the ratio of times
(AutoAttack / advtrain: above 2 means advtrain takes at most half the time). Our time includes
the gradient-masking diagnostics and the robust-margin measurement that AutoAttack does not do.

With ``--nproc N`` our suite runs in N processes under torchrun (gloo), each with
``threads / N`` threads and chunks of ``n / N`` points, as ``advtrain evaluate --nproc N`` does;
its time is rank 0's from a barrier after loading to the merged report (process start-up and
loading, a few seconds, printed apart). AutoAttack runs in this process with ``--threads``.

    .venv/bin/python bench/eval_speed.py [--n 1000] [--model pgd_madry.pth] [--threads 2] \
        [--nproc 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402

EPS = 0.3


def autoattack_standard(model, seed: int):
    """torchattacks' attacks with AutoAttack's standard settings and 100 iterations."""
    import torchattacks
    from torchattacks.wrappers.multiattack import MultiAttack

    return MultiAttack(
        [
            torchattacks.APGD(
                model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=seed
            ),
            torchattacks.APGDT(
                model, norm="Linf", eps=EPS, steps=100, n_restarts=1, n_classes=10, seed=seed
            ),
            torchattacks.FAB(
                model,
                norm="Linf",
                eps=EPS,
                steps=100,
                n_restarts=1,
                multi_targeted=True,
                n_classes=10,
                seed=seed,
            ),
            torchattacks.Square(
                model, norm="Linf", eps=EPS, n_queries=5000, n_restarts=1, seed=seed
            ),
        ]
    )


def load(model_name: str, n: int):
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / model_name)
    model.eval()
    return model, data.test.x[:n], data.test.y[:n]


def run_ours(model, x, y, seed: int, batch_size: int, label: str) -> tuple[float, float]:
    """Our standard suite; prints its figures (on rank 0); returns robust accuracy and time."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    report = advtrain.evaluate(
        model, x, y, eps=EPS, suite="standard", seed=seed, batch_size=batch_size
    )
    ours = time.perf_counter() - start
    if rank == 0:
        print(
            f"advtrain standard suite{label}: robust accuracy {report.robust_accuracy:.2%}, "
            f"{ours:.1f} s",
            flush=True,
        )
        print(
            "  after each attack: "
            + ", ".join(f"{k} {v:.2%}" for k, v in report.per_attack.items())
        )
        print("  checks fired: " + (", ".join(c.name for c in report.triggered) or "none"))
        print(f"RESULT {report.robust_accuracy} {ours}", flush=True)
    return report.robust_accuracy, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--model", default="pgd_madry.pth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="points per chunk (default n / nproc)"
    )
    parser.add_argument("--skip-autoattack", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batch_size = args.batch_size or -(-args.n // args.nproc)
    if args.worker:  # one rank of --nproc, under torchrun
        import torch.distributed as dist

        dist.init_process_group("gloo")
        torch.set_num_threads(max((args.threads or torch.get_num_threads()) // args.nproc, 1))
        model, x, y = load(args.model, args.n)
        run_ours(model, x, y, args.seed, batch_size, f" ({args.nproc} processes)")
        dist.destroy_process_group()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = load(args.model, args.n)
    print(
        f"{args.model}, first {args.n} MNIST test images, linf eps {EPS}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    if args.nproc > 1:
        threads = args.threads or torch.get_num_threads()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "--",
            __file__,
            "--worker",
            "--n",
            str(args.n),
            "--model",
            args.model,
            "--seed",
            str(args.seed),
            "--threads",
            str(threads),
            "--nproc",
            str(args.nproc),
            "--batch-size",
            str(batch_size),
        ]
        start = time.perf_counter()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "OMP_NUM_THREADS": str(max(threads // args.nproc, 1))},
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(done.stderr[-3000:])
        lines = done.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT")))
        result = next(line for line in lines if line.startswith("RESULT")).split()
        robust_ours, ours = float(result[1]), float(result[2])
        print(f"  ({wall - ours:.1f} s more for starting {args.nproc} processes and loading)")
    else:
        robust_ours, ours = run_ours(model, x, y, args.seed, batch_size, "")
    if args.skip_autoattack:
        return

    attack = autoattack_standard(model, args.seed)
    start = time.perf_counter()
    x_adv = attack(x, y)
    theirs = time.perf_counter() - start
    robust = float((predict(model, x_adv) == y).float().mean())
    print(
        f"torchattacks AutoAttack (standard, 100 iterations): robust accuracy {robust:.2%}, "
        f"{theirs:.1f} s",
        flush=True,
    )
    print(
        f"time ratio AutoAttack / advtrain: {theirs / ours:.2f}x; robust accuracy "
        f"advtrain - AutoAttack: {100 * (robust_ours - robust):+.2f} points"
    )


if __name__ == "__main__":
    main()
