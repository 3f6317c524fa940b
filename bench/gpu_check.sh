#!/usr/bin/env bash
# The one prepared GPU check (issue "Scale"): GPU time is scarce, so this runs everything in one
# go, in about 8 minutes on an H100/H200-class GPU, and prints every figure:
#   (a) bench/packing.py for the quickstart MLP and Nanda's transformer: pack/sequential
#       model-steps/s and the fraction of the device's measured fp32 matmul rate, at several K;
#       with the pack size `resources.pack: auto` chooses, and Nanda's transformer again with TF32
#       (train.matmul_precision: high);
#   (b) a real-runner study on the GPU: studies/wd_vs_frac_transformer.yaml at 9 x 9 x 1 seed and
#       5k steps (packs of 64), timed, from which the full 243-trial, 50k-step study is
#       extrapolated by model-steps;
#   (c) if under 5 minutes have gone: the same study at 4 x 4 x 3 seeds, 3k steps, with
#       matmul_precision highest and then high, compared trial for trial and cell for cell.
#
#   bash bench/gpu_check.sh                        # on a GPU machine, after `make setup`
#   bash bench/gpu_check.sh --device cpu --quick   # a dry run of every step on a CPU (minutes)
#
# Output goes to $OUT/gpu_check (the device tool's folder) or /tmp/gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
    esac
done
case "$device" in cpu | cuda) ;; *) echo "gpu_check.sh: --device: cpu or cuda, not $device" >&2; exit 2 ;; esac

bin=.venv/bin
[ -x "$bin/python" ] || { echo "gpu_check.sh: no $bin/python: run make setup first" >&2; exit 2; }
out="${OUT:-/tmp}/gpu_check"
mkdir -p "$out"

if [ "$quick" = 1 ]; then
    ks=1,4 steps=5,1 points=2 max_steps=200 gpu_share=0
else
    ks=1,16,64,256 steps=300,100 points=9 max_steps=5000 gpu_share=0.25
fi

echo "== device"
"$bin/python" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

echo "== (a) packing: pack/sequential and fraction of the fp32 matmul rate"
"$bin/python" bench/packing.py --device "$device" --ks "$ks" --steps "$steps" --auto | tee "$out/packing.txt"
echo "== (a) with TF32: Nanda's transformer, matmul_precision high"
"$bin/python" bench/packing.py --device "$device" --ks "$ks" --steps "$steps" --models transformer \
    --matmul-precision high | tee "$out/packing-tf32.txt"

echo "== (b) wd_vs_frac_transformer: ${points} x ${points} x 1 seed, ${max_steps} steps, real runner"
rm -rf "$out/study"
start=$(date +%s)
"$bin/grokstudy" run studies/wd_vs_frac_transformer.yaml --out "$out/study" --format png \
    --set search.seeds=1 \
    --set "search.space.optimizer.weight_decay.points=$points" \
    --set "search.space.data.fraction.points=$points" \
    --set "train.max_steps=$max_steps" \
    --set "train.device=$device" \
    --set "resources.gpu=$gpu_share" | tee "$out/study.txt"
wall=$(($(date +%s) - start))

echo "== figures"
"$bin/python" - "$out/study" "$wall" "$max_steps" <<'EOF'
import sys

import pyarrow.parquet as pq

study, wall, budget = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = pq.read_table(f"{study}/trials.parquet").to_pylist()
steps = sum(r["steps"] for r in rows)
full = 243 * 50_000  # the full study's trials x max_steps: an upper bound (early stops train less)
print(f"study: {len(rows)} trials, {steps:,} model-steps in {wall:.0f} s wall ({steps / wall:,.0f} model-steps/s)")
print(f"extrapolated: the full study's at most {full:,} model-steps at this rate: {full / (steps / wall) / 60:.1f} min")
EOF

if [ "$quick" = 1 ]; then
    side=2 seeds=2 tf32_steps=20
else
    side=4 seeds=3 tf32_steps=3000
fi
if [ "$quick" = 0 ] && [ "$SECONDS" -gt 300 ]; then
    echo "== (c) TF32 against fp32: skipped, ${SECONDS} s gone (over 5 minutes)"
    exit 0
fi
echo "== (c) TF32 against fp32: ${side} x ${side} x ${seeds} seeds, ${tf32_steps} steps, each precision"
for precision in highest high; do
    rm -rf "$out/tf32-$precision"
    "$bin/grokstudy" run studies/wd_vs_frac_transformer.yaml --out "$out/tf32-$precision" --format png \
        --set "name=tf32-$precision" \
        --set "search.seeds=$seeds" \
        --set "search.space.optimizer.weight_decay.points=$side" \
        --set "search.space.data.fraction.points=$side" \
        --set "train.max_steps=$tf32_steps" \
        --set "train.device=$device" \
        --set "train.matmul_precision=$precision" \
        --set "resources.gpu=$gpu_share" > "$out/tf32-$precision.txt"
done
"$bin/python" - "$out/tf32-highest" "$out/tf32-high" <<'EOF'
import sys
from collections import Counter

import pyarrow.parquet as pq


def phases(study):
    rows = pq.read_table(f"{study}/trials.parquet").to_pylist()
    return {(r["optimizer.weight_decay"], r["data.fraction"], r["train.seed"]): r["phase"] for r in rows}


def majority(by_trial, cell):
    return Counter(v for k, v in by_trial.items() if k[:2] == cell).most_common(1)[0][0]


fp32, tf32 = phases(sys.argv[1]), phases(sys.argv[2])
same = sum(fp32[k] == tf32.get(k) for k in fp32)
cells = {k[:2] for k in fp32}
cells_same = sum(majority(fp32, c) == majority(tf32, c) for c in cells)
for k in sorted(fp32):
    if fp32[k] != tf32.get(k):
        print(f"  differs: wd {k[0]:.3g}, fraction {k[1]:.3g}, seed {k[2]}: {fp32[k]} (fp32), {tf32.get(k)} (TF32)")
print(f"TF32 against fp32: {same} of {len(fp32)} trials, {cells_same} of {len(cells)} cells (majority of seeds) in the same phase")
EOF
