"""Our standard evaluation suite against torchattacks' AutoAttack with the paper's 100 iterations.

Two models:

- the default, a released fast-adversarial MNIST checkpoint (``--model pgd_madry.pth``, a file
  of ``../shared/models/fast-adversarial-mnist``): the first ``--n`` (default 1000) MNIST test
  images, linf eps 0.3, 10 classes;
- ``--model preact-resnet18``: advtrain's own PreAct ResNet-18 trained with FGSM-RS at 8/255 for
  4 epochs on coloured 32×32 MNIST digits 0–4 (``bench/rgb_digits.py``; trained once, on
  ``--train`` images, and cached under ``bench/.cache/``): the first ``--n`` (default 500)
  coloured test images, linf eps 8/255, 5 classes.

Same model, same images, one run each, measured in one process. torchattacks' ``AutoAttack``
class builds its APGD, APGD-T and FAB with torchattacks' default of 10 iterations, so the
stand-in is assembled here from the same four attacks with AutoAttack's standard settings
(Croce & Hein 2020): APGD-CE and APGD-T (``n_classes - 1`` targets, 9 for 10 classes) with 100
iterations, FAB-T (``n_classes - 1`` targets, 100 iterations), Square with 5,000 queries, one
restart each, run as a survivor cascade (torchattacks' ``MultiAttack``).

Prints robust accuracy (lower is stronger) and seconds for both, and the ratio of times
(AutoAttack / advtrain: above 2 means advtrain takes at most half the time). Our time includes
the gradient-masking diagnostics, the escalations they call for and the robust-margin
measurement that AutoAttack does not do; where it goes is printed per stage (each cascade step,
the diagnostics, each escalation step, the margins, the report), as is the time of each of
AutoAttack's four attacks. The stages come from ``report.settings["seconds_by_stage"]`` when the
report has it, else from timing the evaluation's own functions from outside.

With ``--nproc N`` our suite runs in N processes under torchrun (gloo), each with
``threads / N`` threads and chunks of ``n / N`` points, as ``advtrain evaluate --nproc N`` does;
its time is rank 0's from a barrier after loading to the merged report (process start-up and
loading, a few seconds, printed apart). AutoAttack runs in this process with ``--threads``.
``--device cuda`` runs both on the GPU (one process).

    .venv/bin/python bench/eval_speed.py [--n 1000] [--model pgd_madry.pth] [--threads 2] \
        [--nproc 2]
    .venv/bin/python bench/eval_speed.py --model preact-resnet18 [--n 500] [--train 2500]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import advtrain  # noqa: E402
from advtrain.checkpoint import load_weights_into  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import predict  # noqa: E402
from advtrain.models import build_model  # noqa: E402

MNIST_EPS = 0.3
RESNET = "preact-resnet18"


def autoattack_standard(model, seed: int, eps: float, n_classes: int):
    """torchattacks' attacks with AutoAttack's standard settings and 100 iterations."""
    import torchattacks
    from torchattacks.wrappers.multiattack import MultiAttack

    return MultiAttack(
        [
            torchattacks.APGD(
                model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed
            ),
            torchattacks.APGDT(
                model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=seed
            ),
            torchattacks.FAB(
                model,
                norm="Linf",
                eps=eps,
                steps=100,
                n_restarts=1,
                multi_targeted=True,
                n_classes=n_classes,
                seed=seed,
            ),
            torchattacks.Square(
                model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed
            ),
        ]
    )


def load(model_name: str, n: int, train: int = 2500, device: str = "auto"):
    """The model (eval mode), the first ``n`` test images and labels, eps and the class count.
    The ResNet is trained on ``device`` when it is not in the cache yet."""
    if model_name == RESNET:
        from rgb_digits import EPS, rgb_digits, rgb_resnet

        model, _ = rgb_resnet(n_train=train, device=device)
        test = rgb_digits(n_train=0, n_val=0, n_test=n).test
        return model, test.x[:n], test.y[:n], EPS, 5
    data = load_dataset("mnist", data_dir=SHARED / "data" / "mnist", download=False)
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    load_weights_into(model, SHARED / "models" / "fast-adversarial-mnist" / model_name)
    model.eval()
    return model, data.test.x[:n], data.test.y[:n], MNIST_EPS, 10


# ---------------------------------------------------------------------- where our time goes
class PassCounter:
    """Images through ``model``'s forward, per stage (the innermost of ``stages``), split into
    those with an input gradient to come (forward + backward) and plain forwards: the cost of a
    stage in model passes, which neither the machine nor its load changes."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stages: list[str] = []
        self.forward: dict[str, int] = {}
        self.backward: dict[str, int] = {}
        self._handle = model.register_forward_hook(self._count)

    def _count(self, module: Any, inputs: Any, output: Any) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor):
            return
        stage = self.stages[-1] if self.stages else "other"
        table = self.backward if torch.is_grad_enabled() and x.requires_grad else self.forward
        table[stage] = table.get(stage, 0) + len(x)

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def stage_timer(counter: PassCounter) -> Iterator[dict[str, float]]:
    """Seconds per stage of ``advtrain.evaluate``, by timing its own functions from outside:
    each cascade step (``Cascade.run`` outside the escalations), the diagnostics, each
    escalation step, the robust margins (``Cascade.measure``), the report; ``other`` is the
    rest (clean predictions, model checks). ``counter`` counts the model passes of the same
    stages. Restores the functions on exit."""
    from advtrain.evaluation import cascade, run_checks, suite

    seconds: dict[str, float] = {}
    inside = counter.stages

    def timed(name: Callable[..., str], original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            label = name(*args, **kwargs)
            outer = inside[-1] if inside else None
            inside.append(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                inside.pop()
                if outer in (None, "escalations"):
                    seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    def run_label(state: Any, step: Any, model: Any, label: str | None = None, **_: Any) -> str:
        name = label or step.name
        return f"escalation: {name}" if "escalations" in inside else name

    patches = [
        (run_checks, "_diagnostics", timed(lambda *a, **k: "diagnostics", run_checks._diagnostics)),
        (suite, "escalate", timed(lambda *a, **k: "escalations", suite.escalate)),
        (suite, "_report", timed(lambda *a, **k: "report", suite._report)),
        (cascade.Cascade, "run", timed(run_label, cascade.Cascade.run)),
        (cascade.Cascade, "measure", timed(lambda *a, **k: "margins", cascade.Cascade.measure)),
    ]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, replacement in patches:
        setattr(owner, attr, replacement)
    try:
        yield seconds
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
        # the escalation steps are counted on their own; "escalations" keeps only the rest
        steps = sum(v for k, v in seconds.items() if k.startswith("escalation: "))
        if "escalations" in seconds:
            rest = max(seconds.pop("escalations") - steps, 0.0)
            seconds["escalations (checks, bookkeeping)"] = rest


def print_stages(
    title: str, seconds: dict[str, float], total: float, counter: PassCounter | None = None
) -> None:
    """One row per stage: seconds, share, and (with ``counter``) the images the model saw with
    a backward pass and without."""
    print(f"  {title}:" + ("   (images: forward+backward / forward only)" if counter else ""))
    rows = dict(seconds)
    if counter is not None:
        for stage in (*counter.forward, *counter.backward):
            rows.setdefault(stage, 0.0)
    rows["other"] = max(total - sum(v for k, v in rows.items() if k != "other"), 0.0)
    for name, spent in rows.items():
        line = f"    {name:<44} {spent:8.1f} s  {spent / max(total, 1e-9):6.1%}"
        if counter is not None:
            line += f"  {counter.backward.get(name, 0):>9,} / {counter.forward.get(name, 0):>9,}"
        print(line)


def run_ours(
    model, x, y, eps: float, seed: int, batch_size: int, label: str, profile: str | None = None
) -> tuple[float, float]:
    """Our standard suite; prints its figures (on rank 0); returns robust accuracy and time."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.barrier()
    profiler = None
    if profile and rank == 0:
        import cProfile

        profiler = cProfile.Profile()
    counter = PassCounter(model)
    with stage_timer(counter) as measured:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        report = advtrain.evaluate(
            model, x, y, eps=eps, suite="standard", seed=seed, batch_size=batch_size
        )
        if profiler is not None:
            profiler.disable()
        ours = time.perf_counter() - start
    counter.close()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    if rank == 0:
        print(
            f"advtrain standard suite{label}: clean accuracy {report.clean_accuracy:.2%}, "
            f"robust accuracy {report.robust_accuracy:.2%}, {ours:.1f} s",
            flush=True,
        )
        print(
            "  after each attack: "
            + ", ".join(f"{k} {v:.2%}" for k, v in report.per_attack.items())
        )
        print("  checks fired: " + (", ".join(c.name for c in report.triggered) or "none"))
        for escalation in report.escalations:
            print(
                f"  escalation ({escalation.reason}): {escalation.action}: "
                f"{escalation.robust_before:.2%} -> {escalation.robust_after:.2%}"
            )
        print_stages("seconds by stage (timed from outside)", measured, ours, counter)
        reported = report.settings.get("seconds_by_stage")
        if reported:
            print_stages("seconds by stage (report.settings)", dict(reported), ours)
        print(f"RESULT {report.robust_accuracy} {ours}", flush=True)
    return report.robust_accuracy, ours


def run_autoattack(model, x, y, eps: float, n_classes: int, seed: int) -> tuple[float, float]:
    """The torchattacks stand-in; prints its figures and the seconds of each attack."""
    attack = autoattack_standard(model, seed, eps, n_classes)
    seconds: dict[str, float] = {}
    counter = PassCounter(model)
    for inner in attack.attacks:
        forward = inner.forward

        def timed(*args: Any, _forward: Any = forward, _name: str = inner.attack, **kw: Any) -> Any:
            counter.stages.append(_name)
            start = time.perf_counter()
            try:
                return _forward(*args, **kw)
            finally:
                counter.stages.pop()
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start

        inner.forward = timed
    start = time.perf_counter()
    x_adv = attack(x, y)
    theirs = time.perf_counter() - start
    counter.close()
    robust = float((predict(model, x_adv) == y.to(x_adv.device)).float().mean())
    print(
        f"torchattacks AutoAttack (standard, 100 iterations): robust accuracy {robust:.2%}, "
        f"{theirs:.1f} s",
        flush=True,
    )
    print_stages("seconds by attack", seconds, theirs, counter)
    return robust, theirs


def _worker_command(args: argparse.Namespace, n: int, batch_size: int, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "--",
        __file__,
        "--worker",
        "--n",
        str(n),
        "--model",
        args.model,
        "--train",
        str(args.train),
        "--seed",
        str(args.seed),
        "--threads",
        str(threads),
        "--nproc",
        str(args.nproc),
        "--batch-size",
        str(batch_size),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=None, help="default 1000 (MNIST), 500 (ResNet)")
    parser.add_argument("--model", default="pgd_madry.pth", help=f"an MNIST checkpoint or {RESNET}")
    parser.add_argument("--train", type=int, default=2500, help=f"{RESNET}: training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="points per chunk (default n / nproc)"
    )
    parser.add_argument("--skip-autoattack", action="store_true")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--profile", default=None, help="write cProfile stats of our run here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.n or (500 if args.model == RESNET else 1000)
    batch_size = args.batch_size or -(-n // args.nproc)
    if args.worker:  # one rank of --nproc, under torchrun
        import torch.distributed as dist

        dist.init_process_group("gloo")
        torch.set_num_threads(max((args.threads or torch.get_num_threads()) // args.nproc, 1))
        model, x, y, eps, _ = load(args.model, n, args.train)
        run_ours(model, x, y, eps, args.seed, batch_size, f" ({args.nproc} processes)")
        dist.destroy_process_group()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y, eps, n_classes = load(args.model, n, args.train, args.device)
    device = torch.device(args.device)
    model, x, y = model.to(device), x.to(device), y.to(device)
    data = "coloured 32x32 MNIST 0-4" if args.model == RESNET else "MNIST"
    print(
        f"{args.model}, first {len(x)} {data} test images, linf eps {eps:.4g}, {n_classes} "
        f"classes, {device}, {torch.get_num_threads()} threads",
        flush=True,
    )

    robust_ours, ours = float("nan"), float("nan")
    if args.skip_ours:
        pass
    elif args.nproc > 1:
        threads = args.threads or torch.get_num_threads()
        start = time.perf_counter()
        done = subprocess.run(
            _worker_command(args, n, batch_size, threads),
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
        robust_ours, ours = run_ours(model, x, y, eps, args.seed, batch_size, "", args.profile)
    if args.skip_autoattack:
        return

    robust, theirs = run_autoattack(model, x, y, eps, n_classes, args.seed)
    if not args.skip_ours:
        print(
            f"time ratio AutoAttack / advtrain: {theirs / ours:.2f}x; robust accuracy "
            f"advtrain - AutoAttack: {100 * (robust_ours - robust):+.2f} points"
        )


if __name__ == "__main__":
    main()
