"""The backdoor matrix on MNIST with ``mnist-small`` at 1% poisoning, beside BackdoorBench's
figures, and the training-set defences beside ART's on the same poisoned data.

Run: ``.venv/bin/python bench/backdoor_mnist.py`` (``--epochs``, ``--strip-inputs``,
``--retrain``). MNIST is read from ``../shared/data/mnist`` (``ADVTRAIN_SHARED`` to change),
without download. Every model's weights are cached under ``bench/.cache/backdoor/`` and read
back on a rerun with the same recipe, so a rerun costs the detection and STRIP only.

Printed:

1. the matrix (:func:`advtrain.poisoning.run_matrix`): BadNets, Blended and clean-label
   against no defence, spectral signatures, activation clustering and STRIP, with C-Acc, ASR,
   R-Acc and detection precision/recall, and the wall time on this machine's cores (with the
   load average, since the cores are shared);
2. beside BackdoorBench's README figures for PreAct-ResNet18 on CIFAR-10 at 1% poisoning
   (BadNets ASR 95.03% without defence, 86.23% after AC, 92.41% after spectral, 1.27% after
   Neural Cleanse; Blended 99.92% after Neural Cleanse): a different dataset and model, and
   their defences see the target class (ours do not), so the comparison is of tendencies;
3. ART 1.20.1's ``SpectralSignatureDefense`` and ``ActivationDefence`` run on the same poisoned
   training rows with the same poisoned model: detection precision/recall and time against
   ours, as ratios (measured in this one process, one after the other; ``ac`` is ours with
   FastICA as Chen et al., ``ac-pca`` ours with PCA as ART's default, both against ART's
   PCA; our times include taking the features). ART reads the
   activations of its classifier's last layer (for this Sequential: the logits) where ours read
   the penultimate layer; its spectral cut is ``1.5 * expected_pp_poison`` of each class, set
   here to ``rate * n_classes`` so that it removes as many rows per class as ours.

The matrix and the comparison are also written to ``bench/.cache/backdoor/matrix.json``,
``matrix.html`` and ``art.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADVTRAIN_SHARED", ROOT.parent / "shared"))
MNIST_DIR = SHARED / "data" / "mnist"
CACHE = ROOT / "bench" / ".cache" / "backdoor"
sys.path.insert(0, str(ROOT))

from advtrain.data import load_dataset  # noqa: E402
from advtrain.poisoning import (  # noqa: E402
    MatrixSettings,
    activation_clustering,
    detection,
    make_backdoor,
    penultimate_features,
    run_matrix,
    spectral_signatures,
)
from advtrain.poisoning.matrix import MatrixModels  # noqa: E402

#: BackdoorBench's README, PreAct-ResNet18 on CIFAR-10 at 1% poisoning: ASR by defence.
BACKDOORBENCH_ASR = {
    ("badnets", "none"): 0.9503,
    ("badnets", "ac"): 0.8623,
    ("badnets", "spectral"): 0.9241,
    ("badnets", "nc"): 0.0127,
    ("blended", "nc"): 0.9992,
}
ATTACKS = ("badnets", "blended", "clean-label")
DEFENCES = ("none", "spectral", "ac", "strip")


def pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.2%}"


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def art_peer(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, rate: float, n_classes: int
) -> dict:
    """ART's two detectors on ``(x, y)`` with ``model``: flagged rows and seconds each."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=x.shape[1:],
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    one_hot = np.eye(n_classes, dtype=np.float32)[y]
    out = {"layer": classifier.layer_names[-1] if classifier.layer_names else None}
    start = time.perf_counter()
    spectral = SpectralSignatureDefense(
        classifier, x, one_hot, expected_pp_poison=min(rate * n_classes, 0.33), eps_multiplier=1.5
    )
    _, is_clean = spectral.detect_poison()
    out["spectral"] = (np.flatnonzero(np.asarray(is_clean) == 0), time.perf_counter() - start)
    start = time.perf_counter()
    ac = ActivationDefence(classifier, x, one_hot)
    _, is_clean = ac.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA")
    out["ac"] = (np.flatnonzero(np.asarray(is_clean) == 0), time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rate", type=float, default=0.01)
    parser.add_argument("--strip-inputs", type=int, default=500)
    parser.add_argument("--strip-samples", type=int, default=100)
    parser.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, {load()}", flush=True)
    data = load_dataset("mnist", data_dir=MNIST_DIR, download=False)
    settings = MatrixSettings(
        epochs=args.epochs,
        batch_size=128,
        lr=1e-3,
        strip_samples=args.strip_samples,
        strip_inputs=args.strip_inputs,
    )
    CACHE.mkdir(parents=True, exist_ok=True)
    weights = CACHE / "weights"
    if args.retrain:
        for path in weights.glob("*.pt"):
            path.unlink()
    start = time.perf_counter()
    matrix = run_matrix(
        data,
        "mnist-small",
        ATTACKS,
        DEFENCES,
        rate=args.rate,
        target=0,
        settings=settings,
        weights_dir=weights,
        log=lambda line: print(f"  {line}", flush=True),
    )
    wall = time.perf_counter() - start
    (CACHE / "matrix.json").write_text(json.dumps(matrix.to_dict(), indent=2))
    (CACHE / "matrix.html").write_text(matrix.to_html())
    print(f"\nmatrix wall time {wall:.0f} s ({load()})")
    print(f"clean model: C-Acc {pct(matrix.baseline['clean_accuracy'])}")
    head = ("attack", "defence", "C-Acc", "ASR", "R-Acc", "prec", "recall", "flagged")
    print("{:<12} {:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}  BackdoorBench ASR".format(*head))
    for c in matrix.cells:
        bb = BACKDOORBENCH_ASR.get((c.attack, c.defence))
        figures = (c.clean_accuracy, c.attack_success_rate, c.robust_accuracy)
        figures += (c.detection_precision, c.detection_recall)
        shown = " ".join(f"{pct(v):>7}" for v in figures)
        flagged = "-" if c.flagged is None else str(c.flagged)
        print(f"{c.attack:<12} {c.defence:<9} {shown} {flagged:>7}  {pct(bb) if bb else ''}")
    print(
        "BackdoorBench (PreAct-ResNet18, CIFAR-10, 1%): Neural Cleanse BadNets ASR 1.27%, "
        "Blended 99.92% (not run here: Neural Cleanse is not implemented)"
    )

    # ART on the same poisoned rows, with the same poisoned model
    models = MatrixModels(data, "mnist-small", settings, weights, lambda line: None)
    clean = models.train(data.train, "clean")
    print(f"\nART 1.20.1 against ours on the same poisoned training rows ({load()})")
    head = ("attack", "defence", "ours P/R", "ART P/R", "ours s", "ART s", "ART/ours time")
    print("{:<12} {:<9} {:>15} {:>15} {:>7} {:>7} {:>13}".format(*head))
    report = {}
    for name in ATTACKS:
        backdoor = make_backdoor(name, data.info, rate=args.rate, target=0, seed=0, reference=clean)
        poisoned = backdoor.poison(data.train)
        model = models.train(poisoned.split, f"{name}/none")
        x, y = poisoned.split.x, poisoned.split.y
        assert isinstance(x, torch.Tensor)
        t0 = time.perf_counter()
        feats = penultimate_features(model, x)
        t_feat = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_spec = spectral_signatures(feats, y, expected_rate=args.rate)
        t_spec = time.perf_counter() - t0 + t_feat
        t0 = time.perf_counter()
        ours_ac = activation_clustering(feats, y)
        t_ac = time.perf_counter() - t0 + t_feat
        t0 = time.perf_counter()
        ours_pca = activation_clustering(feats, y, reduce="pca")
        t_pca = time.perf_counter() - t0 + t_feat
        art = art_peer(model, x.numpy(), y.numpy(), args.rate, data.info.n_classes)
        runs = (
            ("spectral", "spectral", ours_spec.indices, t_spec),
            ("ac", "ac", ours_ac.indices, t_ac),
            ("ac-pca", "ac", ours_pca.indices, t_pca),
        )
        for defence, peer, ours, t_ours in runs:
            mine = detection(ours, poisoned.indices)
            flagged, t_art = art[peer]
            theirs = detection(flagged, poisoned.indices)
            print(
                f"{name:<12} {defence:<9} {pct(mine.precision):>7}/{pct(mine.recall):<7} "
                f"{pct(theirs.precision):>7}/{pct(theirs.recall):<7} {t_ours:>7.1f} {t_art:>7.1f} "
                f"{t_art / t_ours:>12.2f}x"
            )
            report[f"{name}/{defence}"] = {
                "ours": {**mine.to_dict(), "seconds": t_ours},
                "art": {**theirs.to_dict(), "seconds": t_art, "layer": art["layer"]},
            }
    (CACHE / "art.json").write_text(json.dumps(report, indent=2))
    print(
        f"\nART read layer {art['layer']!r}; total {time.perf_counter() - start:.0f} s ({load()})"
    )


if __name__ == "__main__":
    main()
