"""Our standard evaluation suite against AutoAttack: the official one, or torchattacks' stand-in.

Models (``--model``, one name, a comma-separated list, or ``both``):

- the released fast-adversarial MNIST checkpoints (``fgsm.pth``, ``pgd_madry.pth``, files of
  ``../shared/models/fast-adversarial-mnist``; ``both`` runs the two): the first ``--n``
  (default 1000) MNIST test images, linf eps 0.3, 10 classes; the default is ``pgd_madry.pth``;
- ``preact-resnet18``: advtrain's own PreAct ResNet-18 trained with FGSM-RS at 8/255 for
  4 epochs on coloured 32×32 MNIST digits 0–4 (``bench/rgb_digits.py``; trained once, on
  ``--train`` images, and cached under ``bench/.cache/``): the first ``--n`` (default 500)
  coloured test images, linf eps 8/255, 5 classes.

Same model, same images, one run each, measured in one process, one model after the other.

The AutoAttack side:

- ``--official DIR``: the official AutoAttack (Croce & Hein 2020, github.com/fra31/auto-attack),
  imported from a local copy of its repository (``DIR`` holds its ``autoattack`` package; it is
  not a dependency of advtrain), run as its README runs it: ``AutoAttack(model, norm="Linf",
  eps=eps, version="standard", seed=seed, device=...)`` and
  ``run_standard_evaluation(x, y, bs=batch_size)``. Its standard version is APGD-CE, APGD-T over
  9 target classes, FAB-T over 9 target classes (100 iterations each, one restart) and Square
  with 5,000 queries, on the points still standing after each. With fewer than 10 classes its
  target counts are set to ``n_classes - 1`` (its code indexes 9 classes otherwise). Nothing in
  it is changed; its own log lines are printed as it runs.
- without ``--official``: torchattacks' ``AutoAttack`` class builds its APGD, APGD-T and FAB with
  torchattacks' default of 10 iterations, so the stand-in is assembled here from the same four
  attacks with AutoAttack's standard settings: APGD-CE and APGD-T (``n_classes - 1`` targets, 9
  for 10 classes) with 100 iterations, FAB-T (``n_classes - 1`` targets, 100 iterations), Square
  with 5,000 queries, one restart each, run as a survivor cascade (torchattacks' ``MultiAttack``).

Prints per model robust accuracy (lower is stronger) and seconds for both, the ratio of times
(AutoAttack / advtrain: 2 or more means advtrain takes at most half the time), and whether
advtrain's robust accuracy is no higher than AutoAttack's and its time at most half of
AutoAttack's; with several models, a summary table at the end. Our time includes the
gradient-masking diagnostics, the escalations they call for and the robust-margin measurement
that AutoAttack does not do; where it goes is printed per stage (each cascade step, the
diagnostics, each escalation step, the margins, the report), as is the time of each of
AutoAttack's four attacks, with the images each sent through the model. The stages come from
``report.settings["seconds_by_stage"]`` when the report has it, else from timing the evaluation's
own functions from outside.

With ``--nproc N`` our suite runs in N processes under torchrun (gloo), each with
``threads / N`` threads and chunks of ``n / N`` points, as ``advtrain evaluate --nproc N`` does;
its time is rank 0's from a barrier after loading to the merged report (process start-up and
loading, a few seconds, printed apart). AutoAttack runs in this process with ``--threads``.
``--device cuda`` runs both on the GPU (one process).

    git --git-dir=/path/to/auto-attack.git archive HEAD -- . \
        ':(exclude)autoattack/examples/model_test.pt' | tar -x -C bench/.cache/auto-attack
    .venv/bin/python bench/eval_speed.py --official bench/.cache/auto-attack --model both \
        --n 1000 --threads 2
    .venv/bin/python bench/eval_speed.py [--n 1000] [--model pgd_madry.pth] [--threads 2] \
        [--nproc 2]
    .venv/bin/python bench/eval_speed.py --model preact-resnet18 [--n 500] [--train 2500]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
#: The released fast-adversarial MNIST checkpoints (``--model both``).
MNIST_MODELS = ("fgsm.pth", "pgd_madry.pth")


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
    stage in model passes, which neither the machine nor its load changes.

    With ``model`` the count is a forward hook on it (for AutoAttack). Without, it is taken from
    advtrain's own count (:class:`advtrain.attacks.counting.CountedModel`, patched on the class
    while the counter is open): a hook on the model would turn off Square's window pass
    (:mod:`advtrain.attacks.window_forward` runs only on models without hooks), and a query it
    answers counts there as the full pass it stands for."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self.stages: list[str] = []
        self.forward: dict[str, int] = {}
        self.backward: dict[str, int] = {}
        self._close: Callable[[], None]
        if model is not None:
            handle = model.register_forward_hook(self._hook)
            self._close = handle.remove
            return
        from advtrain.attacks.counting import CountedModel

        forward, add = CountedModel.forward, CountedModel.add
        gradient = [False]

        def counted_forward(module: CountedModel, x: torch.Tensor) -> torch.Tensor:
            gradient.append(torch.is_grad_enabled() and x.requires_grad)
            try:
                return forward(module, x)
            finally:
                gradient.pop()

        def counted_add(module: CountedModel, points: int) -> None:
            self._add(int(points), gradient[-1])
            add(module, points)

        def restore() -> None:
            CountedModel.forward, CountedModel.add = forward, add  # type: ignore[method-assign]

        CountedModel.forward, CountedModel.add = counted_forward, counted_add  # type: ignore
        self._close = restore

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        x = inputs[0] if inputs else None
        if isinstance(x, torch.Tensor):
            self._add(len(x), torch.is_grad_enabled() and x.requires_grad)

    def _add(self, points: int, gradient: bool) -> None:
        stage = self.stages[-1] if self.stages else "other"
        table = self.backward if gradient else self.forward
        table[stage] = table.get(stage, 0) + points

    def close(self) -> None:
        self._close()


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
    counter = PassCounter()  # advtrain's own count: a hook would turn off the window pass
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


def _time_calls(
    owner: Any, attr: str, name: str, seconds: dict[str, float], counter: PassCounter
) -> None:
    """Wrap ``owner.attr`` (a bound method) so that its calls add to ``seconds[name]`` and count
    their model passes under ``name``."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        counter.stages.append(name)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            counter.stages.pop()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, attr, timed)


def run_autoattack(model, x, y, eps: float, n_classes: int, seed: int) -> tuple[float, float]:
    """The torchattacks stand-in; prints its figures and the seconds of each attack."""
    attack = autoattack_standard(model, seed, eps, n_classes)
    seconds: dict[str, float] = {}
    counter = PassCounter(model)
    for inner in attack.attacks:
        _time_calls(inner, "forward", inner.attack, seconds, counter)
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


def official_autoattack(directory: str) -> type:
    """The ``AutoAttack`` class of the official AutoAttack's repository copied at ``directory``
    (imported from there; exits with a message when it is not there)."""
    root = Path(directory).resolve()
    if not (root / "autoattack" / "autoattack.py").is_file():
        sys.exit(
            f"--official: {root} has no autoattack/autoattack.py; give the folder of a copy of "
            "github.com/fra31/auto-attack"
        )
    sys.path.insert(0, str(root))
    module = importlib.import_module("autoattack")
    found = Path(module.__file__ or "").resolve()
    if root not in found.parents:
        sys.exit(f"--official: 'autoattack' was imported from {found}, not from {root}")
    return module.AutoAttack


def run_official(
    autoattack: type, model, x, y, eps: float, n_classes: int, seed: int, batch_size: int
) -> tuple[float, float]:
    """The official AutoAttack, standard version; prints its log, its figures and the seconds
    of each of its attacks; returns robust accuracy and time."""
    attack = autoattack(
        model, norm="Linf", eps=eps, version="standard", seed=seed, device=str(x.device)
    )
    if n_classes < 10:  # its standard version indexes 9 other classes
        attack.apgd_targeted.n_target_classes = attack.fab.n_target_classes = n_classes - 1
    seconds: dict[str, float] = {}
    counter = PassCounter(model)
    for name, inner in (
        ("apgd-ce", attack.apgd),
        ("apgd-t", attack.apgd_targeted),
        ("fab-t", attack.fab),
        ("square", attack.square),
    ):
        _time_calls(inner, "perturb", name, seconds, counter)
    start = time.perf_counter()
    _, y_adv = attack.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
    theirs = time.perf_counter() - start
    counter.close()
    robust = float((y_adv.to(y.device) == y).float().mean())
    print(
        f"official AutoAttack (standard): robust accuracy {robust:.2%}, {theirs:.1f} s",
        flush=True,
    )
    print_stages("seconds by attack", seconds, theirs, counter)
    return robust, theirs


@dataclass
class Comparison:
    """One model's figures: robust accuracy and seconds of ours and of AutoAttack."""

    model: str
    n: int
    robust_ours: float
    ours: float
    robust_theirs: float = float("nan")
    theirs: float = float("nan")

    @property
    def ratio(self) -> float:
        return self.theirs / self.ours

    @property
    def no_higher(self) -> bool:
        """Our robust accuracy no higher than AutoAttack's (compared in points)."""
        return round(self.robust_ours * self.n) <= round(self.robust_theirs * self.n)

    @property
    def half_time(self) -> bool:
        return 2 * self.ours <= self.theirs

    def verdict(self, name: str) -> str:
        yes = lambda holds: "yes" if holds else "NO"  # noqa: E731
        return (
            f"{self.model}: robust accuracy advtrain {self.robust_ours:.2%}, {name} "
            f"{self.robust_theirs:.2%} ({100 * (self.robust_ours - self.robust_theirs):+.2f} "
            f"points); seconds advtrain {self.ours:.1f}, {name} {self.theirs:.1f}; time ratio "
            f"{name} / advtrain {self.ratio:.2f}x; advtrain <= {name} robust accuracy: "
            f"{yes(self.no_higher)}; advtrain <= half {name} time: {yes(self.half_time)}"
        )


def print_summary(rows: list[Comparison], name: str) -> None:
    print(f"\nsummary (advtrain standard suite against {name}):")
    print(
        f"  {'model':<16} {'n':>5} {'robust ours':>12} {'robust AA':>10} {'s ours':>8} "
        f"{'s AA':>8} {'AA/ours':>8} {'acc <=':>7} {'time <= 1/2':>12}"
    )
    for r in rows:
        print(
            f"  {r.model:<16} {r.n:>5} {r.robust_ours:>12.2%} {r.robust_theirs:>10.2%} "
            f"{r.ours:>8.1f} {r.theirs:>8.1f} {r.ratio:>7.2f}x {'yes' if r.no_higher else 'NO':>7} "
            f"{'yes' if r.half_time else 'NO':>12}"
        )


def model_names(spec: str) -> list[str]:
    """``--model``: ``both`` (the two released MNIST checkpoints) or a comma-separated list."""
    if spec == "both":
        return list(MNIST_MODELS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        sys.exit("--model: no model named")
    return names


def _worker_command(
    args: argparse.Namespace, model: str, n: int, batch_size: int, threads: int
) -> list[str]:
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
        model,
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


def _ours_in_processes(
    args: argparse.Namespace, model: str, n: int, batch_size: int
) -> tuple[float, float]:
    """Our suite under torchrun in ``--nproc`` processes; prints rank 0's output."""
    threads = args.threads or torch.get_num_threads()
    start = time.perf_counter()
    done = subprocess.run(
        _worker_command(args, model, n, batch_size, threads),
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
    robust, ours = float(result[1]), float(result[2])
    print(f"  ({wall - ours:.1f} s more for starting {args.nproc} processes and loading)")
    return robust, ours


def compare(
    args: argparse.Namespace, model_name: str, autoattack: type | None
) -> Comparison | None:
    """Ours and AutoAttack on one model; prints both and the verdict."""
    n = args.n or (500 if model_name == RESNET else 1000)
    batch_size = args.batch_size or -(-n // args.nproc)
    model, x, y, eps, n_classes = load(model_name, n, args.train, args.device)
    device = torch.device(args.device)
    model, x, y = model.to(device), x.to(device), y.to(device)
    data = "coloured 32x32 MNIST 0-4" if model_name == RESNET else "MNIST"
    print(
        f"\n{model_name}, first {len(x)} {data} test images, linf eps {eps:.4g}, {n_classes} "
        f"classes, {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    robust_ours, ours = float("nan"), float("nan")
    if args.skip_ours:
        pass
    elif args.nproc > 1:
        robust_ours, ours = _ours_in_processes(args, model_name, n, batch_size)
    else:
        robust_ours, ours = run_ours(model, x, y, eps, args.seed, batch_size, "", args.profile)
    if args.skip_autoattack:
        return None
    if autoattack is not None:
        robust, theirs = run_official(
            autoattack, model, x, y, eps, n_classes, args.seed, args.batch_size or n
        )
    else:
        robust, theirs = run_autoattack(model, x, y, eps, n_classes, args.seed)
    if args.skip_ours:
        return None
    result = Comparison(model_name, len(x), robust_ours, ours, robust, theirs)
    print(result.verdict("AutoAttack"), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=None, help="default 1000 (MNIST), 500 (ResNet)")
    parser.add_argument(
        "--model",
        default="pgd_madry.pth",
        help=f"an MNIST checkpoint, {RESNET}, a comma-separated list, or 'both' "
        f"({', '.join(MNIST_MODELS)})",
    )
    parser.add_argument(
        "--official",
        default=None,
        metavar="DIR",
        help="a copy of the official AutoAttack repository (else torchattacks' stand-in)",
    )
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
    if args.worker:  # one rank of --nproc, under torchrun
        import torch.distributed as dist

        n = args.n or (500 if args.model == RESNET else 1000)
        dist.init_process_group("gloo")
        torch.set_num_threads(max((args.threads or torch.get_num_threads()) // args.nproc, 1))
        model, x, y, eps, _ = load(args.model, n, args.train)
        batch_size = args.batch_size or -(-n // args.nproc)
        run_ours(model, x, y, eps, args.seed, batch_size, f" ({args.nproc} processes)")
        dist.destroy_process_group()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    names = model_names(args.model)
    autoattack = (
        None
        if args.official is None or args.skip_autoattack
        else (official_autoattack(args.official))
    )
    label = "the official AutoAttack" if autoattack is not None else "torchattacks' AutoAttack"
    print(f"advtrain standard suite against {label}", flush=True)
    rows = [row for name in names if (row := compare(args, name, autoattack)) is not None]
    if len(rows) > 1:
        print_summary(rows, label)


if __name__ == "__main__":
    main()
