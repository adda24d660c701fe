#!/usr/bin/env bash
# Fast adversarial training on MNIST (Wong, Rice & Kolter 2020), then the authors' evaluation:
# PGD-50 with 10 restarts, step 0.01, linf eps 0.3, on the full MNIST test set, for our model and
# for the authors' released fgsm.pth, in the same run; then both under the standard suite. Not a test: a 2-core CPU takes tens of minutes.
#
#   bash bench/mnist_fgsm_rs.sh [METHOD] [EPOCHS] [extra train flags...]
#   bash bench/mnist_fgsm_rs.sh                 # fgsm-rs, 10 epochs (the paper's recipe)
#   SKIP_RELEASED=1 bash bench/mnist_fgsm_rs.sh pgd 10 --warmup-epochs 3   # our model only
#   SKIP_RELEASED=1 bash bench/mnist_fgsm_rs.sh trades 10 --method-option beta=1
#
# The recipe of the paper's MNIST script: batch 100, Adam with the one-cycle ("cyclic") learning
# rate peaking at 5e-3, FGSM step 1.25 * eps from a uniform random start (fgsm-rs's default).
# advtrain adds two defaults for fgsm-rs: an eps ramp over the first tenth of the epochs and a
# weight average (decay 0.995) as the model it validates and keeps; pass --warmup-epochs 0
# --ema-decay 0 for the script's recipe exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-fgsm-rs}
EPOCHS=${2:-10}
shift $(( $# > 2 ? 2 : $# ))
BIN=.venv/bin
DATA=${ADVTRAIN_DATA:-../shared/data/mnist}
RELEASED=../shared/models/fast-adversarial-mnist/fgsm.pth
OUT=runs/mnist-$METHOD
EVAL=(--suite pgd --steps 50 --restarts 10 --step-size 0.01 --eps 0.3 --norm linf --seed 0)

start=$(date +%s)
$BIN/advtrain train --dataset mnist --data-dir "$DATA" --model mnist-small --method "$METHOD" \
    --eps 0.3 --epochs "$EPOCHS" --batch-size 100 --lr 5e-3 --schedule onecycle --quiet \
    --out "$OUT" "$@"
trained=$(date +%s)
echo "== $METHOD training: $((trained - start)) s wall time"
echo "== ours ($OUT), PGD-50 x 10 restarts, full test set:"
$BIN/advtrain evaluate "$OUT" --data-dir "$DATA" "${EVAL[@]}" --json "$OUT/pgd50x10.json"
if [[ -z "${SKIP_RELEASED:-}" ]]; then
    echo "== released fgsm.pth, same evaluation:"
    $BIN/advtrain evaluate --model mnist-small --weights "$RELEASED" --dataset mnist --data-dir "$DATA" \
        "${EVAL[@]}" --json "$OUT/released-pgd50x10.json"
fi
echo "== standard suite (cascade + diagnostics), first 1000 test images:"
$BIN/advtrain evaluate "$OUT" --data-dir "$DATA" --n 1000 --eps 0.3 --seed 0 --json "$OUT/standard.json"
if [[ -z "${SKIP_RELEASED:-}" ]]; then
    $BIN/advtrain evaluate --model mnist-small --weights "$RELEASED" --dataset mnist --data-dir "$DATA" \
        --n 1000 --eps 0.3 --seed 0 --json "$OUT/released-standard.json"
fi
echo "== total $(( $(date +%s) - start )) s"
