"""Constrained attacks on a fraud table: advtrain against ART, counting only feasible rows.

The generated ``transactions`` table (the default tabular example: integer, binary, categorical,
immutable and direction-bound columns, and linear rules between columns), linf eps 0.05 in the
scaled feature space, seed 0. The attacker moves the fraud rows the model catches towards
"legitimate" (``--attack-classes 1``). A row counts as broken only when the adversarial row is
misclassified AND lies in the threat model: the ball, the bounds, the immutable columns, and every
constraint of the schema (integers, one-hot, directions, rules) - ``ThreatModel.contains``.

1. An MLP trained by advtrain (``--method``, default standard training, balanced classes: the
   model a fraud team has before hardening it). Ours: the standard suite with the
   table's constraints (two classes: CE and margin losses). ART 1.20: ``ProjectedGradientDescent``
   with its ``mask`` (ART's only way to restrict features), in two set-ups: (a) the mutable columns
   (ART has no integers, categories, directions or rules, so its rows often break them); (b) the
   strongest set-up that is feasible by construction: only the mutable continuous columns that no
   rule and no direction involves. ART's feasibility is printed too.
2. An XGBoost model on the same table (trained on the raw units, as a fraud team trains it). Ours:
   the black-box evaluation (feature search, HopSkipJump, transfer from an MLP surrogate). ART:
   ``HopSkipJump`` (linf) through a ``BlackBoxClassifier``, with the mutable mask; its
   minimum-norm outputs count when they fall inside the ball and satisfy every constraint.

Times are wall seconds on this machine in this one run, one thread; ratios are ART's time over
ours (the whole suite, and for PGD also our APGD-CE alone, the same work as ART's PGD).

    .venv/bin/python bench/tabular_compare.py [--eps 0.05] [--epochs 10] [--method standard]
        [--skip-mlp] [--skip-trees]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from advtrain import TrainConfig, Trainer, evaluate  # noqa: E402
from advtrain.attacks.apgd import APGD  # noqa: E402
from advtrain.data import load_dataset  # noqa: E402
from advtrain.evaluation import evaluate_black_box, predict  # noqa: E402
from advtrain.models import build_model, load_tree_model  # noqa: E402
from advtrain.training import fit_surrogate  # noqa: E402

FRAUD = 1


def count(model, threat, x, y, x_adv):
    """Rows broken (misclassified) and feasible, rows broken whatever their feasibility, and the
    share of changed rows that are feasible."""
    with torch.no_grad():
        wrong = predict(model, x_adv) != y
    inside = threat.contains(x_adv, x)
    changed = (x_adv != x).any(dim=1)
    feasible_share = float(inside[changed].float().mean()) if bool(changed.any()) else 1.0
    return int((wrong & inside).sum()), int(wrong.sum()), feasible_share


def art_pgd(model, threat, x, y, mask, eps):
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(x.shape[1],),
        nb_classes=2,
        clip_values=(0.0, 1.0),
    )
    attack = ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=eps,
        eps_step=eps / 4,
        max_iter=100,
        num_random_init=5,
        batch_size=1000,
        verbose=False,
    )
    np.random.seed(0)
    start = time.perf_counter()
    x_adv = attack.generate(x.numpy(), y.numpy(), mask=mask.float().numpy())
    return torch.as_tensor(x_adv, dtype=torch.float32), time.perf_counter() - start


def art_hsj(tree, threat, x, y, mask):
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    def scores(z):
        with torch.no_grad():
            return tree(torch.as_tensor(z, dtype=torch.float32)).exp().numpy()

    classifier = BlackBoxClassifier(
        scores, input_shape=(x.shape[1],), nb_classes=2, clip_values=(0.0, 1.0)
    )
    attack = HopSkipJump(
        classifier, norm=np.inf, max_iter=20, max_eval=1000, init_eval=100, verbose=False
    )
    np.random.seed(0)
    start = time.perf_counter()
    x_adv = attack.generate(x.numpy(), y.numpy(), mask=mask.float().numpy())
    return torch.as_tensor(x_adv, dtype=torch.float32), time.perf_counter() - start


def caught_fraud(model, x, y):
    """The fraud rows the model classifies correctly: the rows an attacker wants to move."""
    keep = (y == FRAUD) & (predict(model, x) == y)
    return x[keep], y[keep]


def report_line(name, broken, total, feasible_share, seconds, ours_seconds=None):
    ratio = "" if ours_seconds is None else f"   time ratio {seconds / ours_seconds:5.2f}x"
    return (
        f"{name:<44} broken & feasible {broken:4d}/{total:<4d}  feasible share of changed rows "
        f"{feasible_share:7.2%}   {seconds:7.1f} s{ratio}"
    )


def white_box(data, threat, args):
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=data.info.shape, n_classes=2)
    config = TrainConfig(
        dataset="transactions",
        model="mlp",
        method=args.method,
        epochs=args.epochs,
        eps=args.eps,
        class_weight="balanced",
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        Trainer(model, data, config, out, progress=False).fit()
    model.eval()
    x, y = caught_fraud(model, data.test.x, data.test.y)
    print(
        f"MLP ({args.method} training, balanced, {args.epochs} epochs): {len(x)} caught fraud "
        "rows of the test split"
    )

    start = time.perf_counter()
    report = evaluate(model, x, y, threat=threat, n_classes=2, seed=0, positive_class=None)
    ours_seconds = time.perf_counter() - start
    ours_broken = round((report.clean_accuracy - report.robust_accuracy) * len(x))
    feasibility = report.feasibility or {}
    share = feasibility.get("share")
    print(
        report_line(
            "advtrain standard suite (constrained)",
            ours_broken,
            len(x),
            1.0 if share is None else share,
            ours_seconds,
        )
    )
    print(f"    refused as outside the threat model: {feasibility.get('refused', 0)}")
    start = time.perf_counter()
    x_adv = APGD(threat, steps=100, restarts=5, seed=0)(model, x, y)
    apgd_seconds = time.perf_counter() - start
    broken, _, share = count(model, threat, x, y, x_adv)
    print(
        report_line(
            "advtrain APGD-CE 100 x5 alone (constrained)", broken, len(x), share, apgd_seconds
        )
    )
    mutable = data.info.mutable
    for name, mask in (
        ("ART PGD-100 x5, mask = mutable columns", mutable),
        ("ART PGD-100 x5, mask = free continuous only", free_columns(data)),
    ):
        x_adv, seconds = art_pgd(model, threat, x, y, mask, args.eps)
        broken, raw, share = count(model, threat, x, y, x_adv)
        print(report_line(name, broken, len(x), share, seconds, ours_seconds))
        print(f"    time ratio against our APGD-CE alone: {seconds / apgd_seconds:.2f}x")
        print(f"    misclassified whatever the constraints: {raw}")
    return model


def free_columns(data):
    """Mutable continuous coordinates that no rule, integer, one-hot group or direction touches:
    ART's PGD cannot break a constraint there."""
    constraints = data.info.constraints
    free = data.info.mutable.clone()
    free &= ~constraints.integer
    free &= constraints.direction == 0
    free &= (constraints.coefficients != 0).sum(dim=0) == 0
    for start, stop in constraints.groups:
        free[start:stop] = False
    return free


def trees(data, threat, args):
    import xgboost

    encoding = data.info.encoding
    constraints = data.info.constraints
    booster = xgboost.XGBClassifier(
        n_estimators=200, max_depth=4, learning_rate=0.1, random_state=0, n_jobs=1
    )
    positives = float((data.train.y == FRAUD).sum())
    booster.set_params(scale_pos_weight=(len(data.train.y) - positives) / positives)
    booster.fit(encoding.raw_numeric(data.train.x), data.train.y.numpy())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "xgb.json"
        booster.save_model(path)
        tree = load_tree_model(
            path, offset=constraints.offset, scale=constraints.scale, n_classes=2
        )
    x, y = caught_fraud(tree, data.test.x, data.test.y)
    print(f"\nXGBoost (200 trees, depth 4): {len(x)} caught fraud rows of the test split")
    start = time.perf_counter()
    torch.manual_seed(0)
    surrogate = build_model("mlp", in_shape=data.info.shape, n_classes=2)
    fit_surrogate(surrogate, data.train.x, predict(tree, data.train.x), seed=0)
    report = evaluate_black_box(tree, x, y, threat, surrogate=surrogate, seed=0)
    ours_seconds = time.perf_counter() - start
    ours_broken = round((report.clean_accuracy - report.robust_accuracy) * len(x))
    share = (report.feasibility or {}).get("share")
    print(
        report_line(
            "advtrain black-box (search, HSJ, transfer)",
            ours_broken,
            len(x),
            1.0 if share is None else share,
            ours_seconds,
        )
    )
    print("    after each step: " + ", ".join(f"{k} {v:.2%}" for k, v in report.per_attack.items()))
    x_adv, seconds = art_hsj(tree, threat, x, y, data.info.mutable)
    broken, raw, share = count(tree, threat, x, y, x_adv)
    print(
        report_line(
            "ART HopSkipJump (linf), mask = mutable", broken, len(x), share, seconds, ours_seconds
        )
    )
    print(f"    misclassified whatever the ball and constraints: {raw}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--method", default="standard", help="advtrain training method of the MLP")
    parser.add_argument("--skip-trees", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("transactions", seed=0)
    threat = data.info.threat_model(eps=args.eps)
    print(
        f"transactions: {len(data.train)} train / {len(data.test)} test rows, "
        f"{data.info.shape[0]} encoded features; linf eps {args.eps}; "
        f"{len(data.info.constraints.rules)} rules"
    )
    if not args.skip_mlp:
        white_box(data, threat, args)
    if not args.skip_trees:
        trees(data, threat, args)


if __name__ == "__main__":
    main()
