"""What a detector is worth on MNIST: each detector's TPR at 5% FPR on the standard suite's
examples and under the adaptive attack on classifier + detector, side by side, and the pair's
robust accuracy; ART's ``BinaryInputDetector`` (adversarial-robustness-toolbox) trained on the
same clean and adversarial images as the peer.

The classifier is advtrain's ``mnist-small`` (Wong, Rice & Kolter 2020's small CNN) trained
without a defence (cross-entropy, Adam 1e-3, batches of 128, ``--epochs``), cached under
``bench/.cache/``: the setting detectors were proposed for. The detectors are fitted on the first
``--train`` training images (the binary ones also on PGD-10 examples of them, the same examples
for ours and for ART's), their thresholds set at 5% FPR on the whole clean validation split; the
figures are on the first ``--n`` test images, in the threat model linf ``--eps``:

- the standard suite (``advtrain.evaluate``) against the classifier alone gives the
  non-adaptive examples (cached under ``bench/.cache/``, tensors only, so a rerun skips it);
- ``advtrain.detection.DetectorAwarePGD`` (``--steps``, from a random start and from the suite's
  examples, the better per point) attacks classifier and detector together;
- ART's detector, a CNN of ``mnist-small``'s shape with two outputs trained by ART's own
  ``BinaryInputDetector.fit`` (``--art-epochs``), is wrapped as an advtrain detector (score: its
  adversarial logit minus its clean one) so that it meets the same two attacks; its own decision
  (the arg-max of its two outputs) is reported too;
- for context, the classifier on squeezing's 1-bit inputs alone, under PGD with the
  straight-through gradient (BPDA): 1-bit depth is itself a preprocessing defence on MNIST.

Usage::

    .venv/bin/python bench/detectors.py                    # n 1000, eps 0.3
    .venv/bin/python bench/detectors.py --n 100 --steps 20 --train 1000 --art-epochs 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
MNIST_DIR = SHARED / "data" / "mnist"
CACHE = ROOT / "bench" / ".cache"
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402
from advtrain.attacks import PGD  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.detection import (  # noqa: E402
    BinaryDetector,
    DetectionReport,
    Detector,
    FeatureSqueezingDetector,
    evaluate_detector,
    fit_detector,
)
from advtrain.detection.evaluate import suite_examples  # noqa: E402
from advtrain.detection.squeezing import SqueezedBranch  # noqa: E402
from advtrain.models import build_model  # noqa: E402

FPR = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--eps", type=float, default=0.3, help="linf radius (default 0.3)")
    parser.add_argument("--train", type=int, default=5000, help="detector training images")
    parser.add_argument("--epochs", type=int, default=2, help="classifier epochs (default 2)")
    parser.add_argument("--steps", type=int, default=100, help="adaptive attack steps (100)")
    parser.add_argument("--art-epochs", type=int, default=5, help="ART detector epochs (5)")
    parser.add_argument("--suite", default="standard")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every figure as JSON")
    return parser.parse_args(argv)


def undefended_model(data: Any, epochs: int, seed: int) -> nn.Module:
    """mnist-small trained with cross-entropy on the training split (cached)."""
    path = CACHE / f"mnist-small-standard-e{epochs}-seed{seed}.pt"
    model = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=10)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"classifier weights from {path.relative_to(ROOT)}")
        return model.eval()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.train.x, data.train.y
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    print(f"trained mnist-small ({epochs} epochs) in {time.perf_counter() - start:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)
    return model.eval()


class ArtDetector(Detector):
    """ART's trained detector network as an advtrain detector: score = adversarial logit minus
    clean logit (differentiable), so the same adaptive attack targets it."""

    kind = "art-binary-input"

    def __init__(self, model: nn.Module, network: nn.Module) -> None:
        super().__init__(model)
        self.network = network

    def score(self, x: Tensor) -> Tensor:
        logits = self.network(x)
        return logits[:, 1] - logits[:, 0]


def art_detector(
    model: nn.Module, x: Tensor, x_adv: Tensor, epochs: int, seed: int
) -> tuple[ArtDetector, Any, float]:
    """ART's BinaryInputDetector trained on clean ``x`` and adversarial ``x_adv``."""
    from art.defences.detector.evasion import BinaryInputDetector
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(seed)
    network = build_model("mnist-small", in_shape=(1, 28, 28), n_classes=2)
    classifier = PyTorchClassifier(
        model=network,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(network.parameters(), lr=1e-3),
        input_shape=(1, 28, 28),
        nb_classes=2,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    detector = BinaryInputDetector(classifier)
    inputs = np.concatenate([x.numpy(), x_adv.numpy()]).astype(np.float32)
    labels = np.zeros((len(inputs), 2), dtype=np.float32)
    labels[: len(x), 0] = 1
    labels[len(x) :, 1] = 1
    start = time.perf_counter()
    detector.fit(inputs, labels, nb_epochs=epochs, batch_size=128)
    seconds = time.perf_counter() - start
    network.eval()
    return ArtDetector(model, network), detector, seconds


def row(name: str, f: DetectionReport, seconds: float) -> str:
    def pct(value: float | None) -> str:
        return "   -   " if value is None else f"{100 * value:6.2f}%"

    return (
        f"{name:<22} {pct(f.non_adaptive.tpr_at_fpr['5%'])} {pct(f.adaptive.tpr_at_fpr['5%'])}"
        f"   {pct(f.non_adaptive.tpr_at_fpr['1%'])} {pct(f.adaptive.tpr_at_fpr['1%'])}"
        f"   {f.non_adaptive.auroc or float('nan'):.3f}  {f.adaptive.auroc or float('nan'):.3f}"
        f"   {pct(f.non_adaptive.pair_robust_accuracy)} {pct(f.pair_robust_accuracy)}"
        f"   {pct(f.clean_flagged)}  {seconds:6.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    model = undefended_model(data, args.epochs, args.seed)
    threat = data.info.threat_model(eps=args.eps)
    x_fit, y_fit = data.train.x[: args.train], data.train.y[: args.train]
    x_val = data.val.x
    x, y = data.test.x[: args.n], data.test.y[: args.n]
    print(
        f"MNIST, undefended mnist-small, linf eps={args.eps}, {args.n} test images, detectors "
        f"fitted on {args.train} training images, thresholds at {FPR:.0%} FPR on {len(x_val)} "
        f"validation images; load average {os.getloadavg()[0]:.1f}, {args.threads} threads"
    )
    x_suite, robust, clean = suite_examples_cached(model, x, y, threat, args)

    detectors: dict[str, tuple[Detector, float]] = {}
    for kind in ("mahalanobis", "squeezing"):
        start = time.perf_counter()
        detector = fit_detector(kind, model, x_fit, y_fit, x_val, threat=threat, fpr=FPR)
        detectors[kind] = (detector, time.perf_counter() - start)
    start = time.perf_counter()
    binary = BinaryDetector(model)
    x_adv_fit = binary.examples(x_fit, y_fit, threat, seed=args.seed)
    examples_seconds = time.perf_counter() - start
    binary.fit(x_fit, y_fit, threat=threat, seed=args.seed, x_adv=x_adv_fit)
    binary.calibrate(x_val, FPR)
    detectors["binary (ours)"] = (binary, time.perf_counter() - start)
    peer, art, art_seconds = art_detector(model, x_fit, x_adv_fit, args.art_epochs, args.seed)
    peer.calibrate(x_val, FPR)
    detectors["ART BinaryInputDetector"] = (peer, art_seconds + examples_seconds)

    _, native_clean = art.detect(x.numpy())
    x_suite_native = _positives(x_suite, x, y, model)
    _, native_adv = art.detect(x_suite_native.numpy()) if len(x_suite_native) else (None, [])
    native = {
        "clean_flagged": float(np.mean(native_clean)),
        "tpr_suite": float(np.mean(native_adv)) if len(x_suite_native) else None,
    }

    figures: dict[str, Any] = {}
    lines = []
    for name, (detector, fit_seconds) in detectors.items():
        start = time.perf_counter()
        found = evaluate_detector(
            model, detector, x, y, threat, examples=x_suite, seed=args.seed, steps=args.steps
        )
        seconds = time.perf_counter() - start
        figures[name] = {**found.to_dict(), "fit_seconds": fit_seconds, "eval_seconds": seconds}
        lines.append(row(name, found, seconds))
        print(f"{name}: {found.summary()}")
    header = (
        f"{'detector':<22} {'TPR@5% FPR':^15}   {'TPR@1% FPR':^15}   {'AUROC':^12}   "
        f"{'pair robust acc':^15}   {'clean':>7}  {'eval s':>6}\n"
        f"{'':<22} {'suite':>7} {'adaptive':>7}   {'suite':>7} {'adaptive':>7}   "
        f"{'suite':>5}  {'adapt':>5}   {'suite':>7} {'worst':>7}   {'flagged':>7}"
    )
    print()
    print(header)
    print("\n".join(lines))
    print(
        f"classifier alone: robust accuracy {robust:.2%} under the {args.suite} suite (clean "
        f"{clean:.2%}); ART's own decision (arg-max): clean flagged "
        f"{native['clean_flagged']:.2%}, suite examples flagged "
        + ("-" if native["tpr_suite"] is None else f"{native['tpr_suite']:.2%}")
    )
    print(next(iter(figures.values()))["reduction"])
    squeezing = detectors["squeezing"][0]
    assert isinstance(squeezing, FeatureSqueezingDetector)
    binarized = SqueezedBranch(squeezing, 0).eval()
    start = time.perf_counter()
    x_bin = PGD(threat, steps=args.steps, restarts=2, seed=args.seed)(binarized, x, y)
    with torch.no_grad():
        robust_bin = float((binarized(x_bin).argmax(1) == y).float().mean())
    print(
        f"context: the classifier on squeezing's {squeezing.bits}-bit inputs alone (straight-"
        f"through gradient, PGD-{args.steps}, 2 restarts): robust accuracy {robust_bin:.2%} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"json": str(args.json)},
                    "classifier": {"clean_accuracy": clean, "robust_accuracy": robust},
                    "art_native": native,
                    "binarized_classifier_robust_accuracy": robust_bin,
                    "detectors": figures,
                },
                indent=2,
                default=str,
            )
        )


def _positives(x_suite: Tensor, x: Tensor, y: Tensor, model: nn.Module) -> Tensor:
    """The suite's examples of the points it broke (correct clean, wrong after)."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        wrong = model(x_suite).argmax(1) != y
    return x_suite[correct & wrong]


def suite_examples_cached(
    model: nn.Module, x: Tensor, y: Tensor, threat: Any, args: argparse.Namespace
) -> tuple[Tensor, float, float]:
    """The standard suite's example per test point (the clean input where it found none), its
    robust and clean accuracy; cached under bench/.cache (tensors only, read with
    weights_only=True) so that a rerun of the detectors skips the suite."""
    name = f"detectors-suite-{args.suite}-n{args.n}-eps{args.eps:g}-e{args.epochs}-s{args.seed}.pt"
    path = CACHE / name
    if path.exists():
        saved = torch.load(path, weights_only=True)
        print(f"the {args.suite} suite's examples from {path.relative_to(ROOT)}")
        return saved["x_adv"], float(saved["robust"]), float(saved["clean"])
    start = time.perf_counter()
    report = advtrain.evaluate(
        model, x, y, threat=threat, suite=args.suite, seed=args.seed, examples=len(x)
    )
    print(f"classifier alone: {report.summary()} ({time.perf_counter() - start:.0f} s)")
    x_suite = suite_examples(report, x)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    robust, clean = torch.tensor(report.robust_accuracy), torch.tensor(report.clean_accuracy)
    torch.save({"x_adv": x_suite, "robust": robust, "clean": clean}, tmp)
    tmp.replace(path)
    return x_suite, report.robust_accuracy, report.clean_accuracy


if __name__ == "__main__":
    main()
