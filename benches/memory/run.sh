#!/usr/bin/env bash
# Per-rank peak RSS of rsdeep for ZeRO stages 0-3 on the ~50M-parameter Qwen2
# (configs/models/qwen2-50m.json, fp32 training) at world sizes 2 and 4 on CPU ranks
# (docs/benchmarks.md). Each run trains a few steps (micro batch 1, block 256, no
# accumulation: activations stay small, so the figures show the model states ZeRO
# partitions); benches/peers/monitor.py samples each worker's VmHWM; report.py prints it
# next to what `rsdeep estimate-memory` predicts for the same run.
# Usage: benches/memory/run.sh   (env: STEPS=2 WORLDS="2 4" STAGES="0 1 2 3" SKIP_BUILD=1
#        MODEL_CONFIG=configs/models/qwen2-50m.json BLOCK=256 MICRO=1 BIN_DIR=<folder with
#        rsdeep and rsdeep-worker>, default the release target dir)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-2}"
WORLDS="${WORLDS:-2 4}"
STAGES="${STAGES:-0 1 2 3}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/memory-$(date -u +%Y%m%dT%H%M%S)"
DATA="$HOME/.cache/rsdeep/data/pretrain.jsonl"
TOKENIZER="$BENCH_DIR/tokenizer-8k"
MODEL_CONFIG="${MODEL_CONFIG:-configs/models/qwen2-50m.json}"
BLOCK="${BLOCK:-256}" MICRO="${MICRO:-1}"
export OMP_NUM_THREADS="${THREADS:-1}"

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN_DIR="${BIN_DIR:-$CARGO_TARGET_DIR/release}"
export RSDEEP_WORKER_BIN="$BIN_DIR/rsdeep-worker"
[ -f "$DATA" ] || scripts/fetch-data.sh
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  "$RSDEEP_WORKER_BIN" tokenizer train --files "$DATA" --vocab_size 8192 --out "$TOKENIZER"
fi
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

for world in $WORLDS; do
  "$BIN_DIR/rsdeep" estimate-memory --model "$MODEL_CONFIG" --num_gpus "$world" \
    --micro_batch "$MICRO" --seq_len "$BLOCK" --dtype fp32 > "$RUN_DIR/estimate-w$world.txt"
  for stage in $STAGES; do
    if [ "$stage" = 0 ]; then ds=benches/memory/ds_config_zero0.json; else ds="configs/ds_config_zero$stage.json"; fi
    out="$RUN_DIR/w${world}-zero$stage"
    echo "== world $world ZeRO-$stage"
    python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
      --worker_pattern rsdeep-worker -- \
      "$BIN_DIR/rsdeep" --device cpu --num_procs "$world" --master_port 0 \
      configs/pretrain.json --deepspeed "$ds" --config_name "$MODEL_CONFIG" \
      --tokenizer_name "$TOKENIZER" --train_files "$DATA" --output_dir "$out" \
      --block_size "$BLOCK" --per_device_train_batch_size "$MICRO" --gradient_accumulation_steps 1 \
      --max_steps "$STEPS" --logging_steps 1 --save_strategy no --report_to none \
      > "$out.log" 2>&1
  done
done

python benches/memory/report.py "$RUN_DIR" | tee "$RUN_DIR/table.md"
