#!/usr/bin/env bash
# LoRA against full SFT on real multi-rank runs (docs/benchmarks.md §3): the same
# ~50M-parameter Qwen2 (configs/models/qwen2-50m.json, random init from the same seed),
# the same chat data and batches, 2 CPU ranks, ZeRO-2 (and ZeRO-3 by default). Each run
# trains STEPS steps; benches/peers/monitor.py samples each worker's VmHWM and CPU time;
# report.py prints per-rank peak RSS, tokens/s from metrics.jsonl and the ratios LoRA/full.
# Usage: benches/lora/run.sh   (env: STEPS=12 STAGES="2 3" TASKS="sft lora" WORLD=2
# SKIP_BUILD=1 THREADS=1)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-12}"
STAGES="${STAGES:-2 3}"
WORLD="${WORLD:-2}"
TASKS="${TASKS:-sft lora}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/lora-$(date -u +%Y%m%dT%H%M%S)"
DATA="$HOME/.cache/rsdeep/data"
TOKENIZER="$BENCH_DIR/tokenizer-8k"
export OMP_NUM_THREADS="${THREADS:-1}"
export RSDEEP_LOG="${RSDEEP_LOG:-warn}"

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN="$CARGO_TARGET_DIR/release"
export RSDEEP_WORKER_BIN="$BIN/rsdeep-worker"
[ -f "$DATA/sft.jsonl" ] || scripts/fetch-data.sh
if [ ! -f "$TOKENIZER/tokenizer.json" ]; then
  "$BIN/rsdeep" tokenizer train --files "$DATA/pretrain.jsonl" --vocab_size 8192 --out "$TOKENIZER"
fi
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

# configs/{sft,lora}.json start from a pretrained folder; here both start from the same
# random init of the 50M config, so drop model_name_or_path from copies of them.
for task in sft lora; do
  python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); c.pop("model_name_or_path"); json.dump(c, open(sys.argv[2], "w"), indent=1)' \
    "configs/$task.json" "$RUN_DIR/$task.json"
done

for stage in $STAGES; do
  for task in $TASKS; do
    out="$RUN_DIR/zero$stage-$task"
    echo "== ZeRO-$stage $task ($STEPS steps, world $WORLD)"
    python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
      --worker_pattern rsdeep-worker -- \
      "$BIN/rsdeep" --device cpu --num_procs "$WORLD" --master_port 0 \
      "$RUN_DIR/$task.json" --deepspeed "configs/ds_config_zero$stage.json" \
      --config_name configs/models/qwen2-50m.json --tokenizer_name "$TOKENIZER" \
      --train_files "$DATA/sft.jsonl" --output_dir "$out" --seed 12 \
      --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --max_seq_length 256 \
      --max_steps "$STEPS" --warmup_steps 0 --logging_steps 1 --save_strategy no \
      --report_to none > "$out.log" 2>&1
  done
done

python benches/lora/report.py "$RUN_DIR" | tee "$RUN_DIR/table.md"
