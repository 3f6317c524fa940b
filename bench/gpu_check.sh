#!/usr/bin/env bash
# The one prepared GPU check (issue "Scale"): GPU time is scarce, so this runs everything in one
# go, in about 8 minutes on an H100/H200-class GPU, and prints every figure:
#   (a) bench/packing.py for the quickstart MLP and Nanda's transformer: pack/sequential
#       model-steps/s and the fraction of the device's measured fp32 matmul rate, at several K;
#   (b) a real-runner study on the GPU: studies/wd_vs_frac_transformer.yaml at 9 x 9 x 1 seed and
#       5k steps (packs of 64), timed, from which the full 243-trial, 50k-step study is
#       extrapolated by model-steps.
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
"$bin/python" bench/packing.py --device "$device" --ks "$ks" --steps "$steps" | tee "$out/packing.txt"

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
