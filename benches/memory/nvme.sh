#!/usr/bin/env bash
# NVMe optimizer offload (ZeRO-Infinity's `offload_optimizer.device: "nvme"`) against the
# same run without it: per-rank peak RSS (VmHWM, benches/peers/monitor.py) and mean step
# time of the ~50M-parameter Qwen2 (configs/models/qwen2-50m.json, fp32, ZeRO-3, 2 CPU
# ranks, micro batch 1, block 256), runs alternating (docs/benchmarks.md).
# Usage: benches/memory/nvme.sh   (env: STEPS=8 PAIRS=2 NVME_PATH=<dir> SKIP_BUILD=1)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-8}"
PAIRS="${PAIRS:-2}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/nvme-$(date -u +%Y%m%dT%H%M%S)"
NVME_PATH="${NVME_PATH:-$RUN_DIR/nvme}"
DATA="$HOME/.cache/rsdeep/data/pretrain.jsonl"
TOKENIZER="$BENCH_DIR/tokenizer-8k"
export OMP_NUM_THREADS="${THREADS:-1}"

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
export RSDEEP_WORKER_BIN="$CARGO_TARGET_DIR/release/rsdeep-worker"
[ -f "$DATA" ] || scripts/fetch-data.sh
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  "$RSDEEP_WORKER_BIN" tokenizer train --files "$DATA" --vocab_size 8192 --out "$TOKENIZER"
fi
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

run() { # name, extra overrides...
  local out="$RUN_DIR/$1"; shift
  python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
    --worker_pattern rsdeep-worker -- \
    "$CARGO_TARGET_DIR/release/rsdeep" --device cpu --num_procs 2 --master_port 0 \
    configs/pretrain.json --deepspeed configs/ds_config_zero3.json \
    --config_name configs/models/qwen2-50m.json \
    --tokenizer_name "$TOKENIZER" --train_files "$DATA" --output_dir "$out" \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --block_size 256 \
    --max_steps "$STEPS" --logging_steps 1 --save_strategy no --report_to none "$@" \
    > "$out.log" 2>&1
}

for pair in $(seq 1 "$PAIRS"); do
  echo "== pair $pair: in memory, then nvme"
  run "memory-$pair"
  run "nvme-$pair" --deepspeed.zero_optimization.offload_optimizer.device nvme \
    --deepspeed.zero_optimization.offload_optimizer.nvme_path "$NVME_PATH"
done
python benches/memory/nvme_report.py "$RUN_DIR" | tee "$RUN_DIR/table.md"
