#!/usr/bin/env bash
# The CUDA paths that have never run on a GPU, and the benchmarks on one; about 8 minutes.
#
# On this machine, once, before the device run (copies what the device machine lacks into
# bench/.cache/device/, which `run` must carry; about 14 MB):
#     bash bench/gpu_check.sh --prepare
# There (the device tool's `run`, carry ["bench/.cache/device"]):
#     bash bench/gpu_check.sh
# A dry run of every step on this machine's CPU, with tiny sizes (checks the script itself):
#     bash bench/gpu_check.sh --cpu
# Some steps only (a rerun): their names after the options, e.g.
#     bash bench/gpu_check.sh eval-speed-resnet compile
# Logs and summary.txt go to $OUT (the device tool's folder that comes back), else /tmp/gpu_check.
#
# bench/.cache/device/ holds: site/torchattacks (the peer library, pure Python; the device image has
# no copy), shared/data/mnist and shared/models/fast-adversarial-mnist (the ../shared beside the
# checkout does not travel). The PreAct ResNet-18 of bench/rgb_digits.py (45 MB) is not carried:
# eval-speed-resnet trains it there first (FGSM-RS, 4 epochs, 10,000 images, bf16 autocast and
# channels-last by the trainer's CUDA defaults; seconds on a GPU), and prints its accuracy.
# The device image's python3 has torch with CUDA and every dependency of advtrain; nothing is
# installed there: the package runs from the tree (PYTHONPATH).
# Every step runs under its own timeout and prints PASS, FAIL or SKIP; one failure stops nothing.
set -u
cd "$(dirname "$0")/.."
CACHE=bench/.cache/device

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p "$CACHE/site" "$CACHE/shared/data" "$CACHE/shared/models"
    site=$(.venv/bin/python -c "import torchattacks, os; print(os.path.dirname(torchattacks.__file__))")
    rm -rf "$CACHE/site/torchattacks" && cp -r "$site" "$CACHE/site/torchattacks"
    find "$CACHE/site" -name __pycache__ -prune -exec rm -rf {} +
    cp -r ../shared/data/mnist "$CACHE/shared/data/"
    cp -r ../shared/models/fast-adversarial-mnist "$CACHE/shared/models/"
    du -sh "$CACHE"
    echo "carry: [\"$CACHE\"]"
    exit 0
fi

DEVICE=cuda
PY=${PYTHON:-python3}
SMALL=0
SCALE=1  # the time limits' multiplier: the CPU dry run is slower (and shares its cores)
if [ "${1:-}" = "--cpu" ]; then
    DEVICE=cpu
    PY=${PYTHON:-.venv/bin/python}
    SMALL=1
    SCALE=${SCALE_CPU:-6}
    BUDGET=${BUDGET:-3600}
    shift
fi
ONLY=" $* "  # step names to run (a rerun of some); none: every step
export PYTHONPATH="$PWD:$PWD/$CACHE/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ -d "$CACHE/shared" ] && export ADVTRAIN_SHARED="$PWD/$CACHE/shared"
OUTDIR=${OUT:-/tmp/gpu_check}  # two files come back: gpu_check.log (every step) and summary.txt
LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
: >"$OUTDIR/gpu_check.log"

# The whole run stays under BUDGET seconds: each step's limit is cut to what is left, and a
# step with less than 20 s left is skipped.
BUDGET=${BUDGET:-480}

# step NAME SECONDS COMMAND...: run it under a timeout, log it, one PASS/FAIL line
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then
        return
    fi
    local left=$((BUDGET - SECONDS))
    if [ $left -lt 20 ]; then
        echo "SKIP $name (the ${BUDGET} s budget is spent)" | tee -a "$SUMMARY"
        return
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$LOGS/$name.log" start=$SECONDS
    echo "=== $name (limit ${limit} s)"
    timeout --signal=KILL "$limit" "$@" >"$log" 2>&1
    local rc=$?
    cat "$log"
    { echo "=== $name"; cat "$log"; } >>"$OUTDIR/gpu_check.log"
    local verdict
    if grep -q '^SKIP ' "$log"; then
        verdict="SKIP"
    elif [ $rc -eq 0 ] && ! grep -q '^FAIL ' "$log"; then
        verdict="PASS"
    elif [ $rc -eq 137 ] && grep -q '^PASS ' "$log" && ! grep -q '^FAIL ' "$log"; then
        verdict="PASS (but did not exit: killed at the time limit)"
    elif [ $rc -eq 137 ]; then
        verdict="FAIL (timed out)"
    else
        verdict="FAIL (exit $rc)"
    fi
    echo "$verdict $name ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
}

check() {  # check NAME SECONDS: one check of bench/gpu_checks.py
    step "$1" "$2" "$PY" bench/gpu_checks.py "$1" --device "$DEVICE"
}

check env 60
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
check amp 60
check channels-last 45
check ddp-nccl 45
check sync-bn 30
check no-sync 60
check compile 75
if [ $SMALL = 1 ]; then
    step throughput 60 "$PY" bench/throughput.py --device "$DEVICE" --batch 4 --batches 1 \
        --warmup 1 --methods standard fgsm-rs
    step eval-speed-resnet 300 "$PY" bench/eval_speed.py --device "$DEVICE" \
        --model preact-resnet18 --train 64 --n 3 --skip-autoattack
    step eval-speed-mnist 120 "$PY" bench/eval_speed.py --device "$DEVICE" --n 10
else
    step throughput 45 "$PY" bench/throughput.py --device cuda
    step eval-speed-resnet 240 "$PY" bench/eval_speed.py --device cuda \
        --model preact-resnet18 --train 10000 --n 500
    # the official AutoAttack, where its copy travels too (carry bench/.cache/auto-attack)
    [ -d bench/.cache/auto-attack/autoattack ] && step eval-speed-resnet-official 300 "$PY" \
        bench/eval_speed.py --device cuda --model preact-resnet18 --train 10000 --n 500 \
        --official bench/.cache/auto-attack
    step eval-speed-mnist 60 "$PY" bench/eval_speed.py --device cuda
fi

echo "=== summary"
cat "$SUMMARY"
