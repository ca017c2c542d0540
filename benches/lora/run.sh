#!/usr/bin/env bash
# Full SFT against LoRA, DoRA and QLoRA on real multi-rank runs (docs/benchmarks.md §3):
# the real SmolLM2-135M-Instruct (converted from the pinned GGUF by `rsdeep convert
# gguf`), the same chat data and batches, 2 CPU ranks, ZeRO-2 and ZeRO-3. Each run trains
# STEPS steps from configs/smollm2_{sft,lora}.json (adapters on every linear); DoRA adds
# use_dora, QLoRA load_in_4bit with NF4 and double quantization. benches/peers/monitor.py
# samples each worker's VmHWM and CPU time; report.py prints per-rank peak RSS,
# tokens/s, the frozen base bytes per rank each worker reports, and the ratios to full
# SFT and to LoRA.
# Usage: benches/lora/run.sh   (env: STEPS=8 STAGES="2 3" METHODS="sft lora dora qlora"
# WORLD=2 SKIP_BUILD=1 THREADS=1 CHECKPOINTING=true: activation checkpointing for every
# method, as peft's prepare_model_for_kbit_training turns on for QLoRA)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-8}"
STAGES="${STAGES:-2 3}"
WORLD="${WORLD:-2}"
METHODS="${METHODS:-sft lora dora qlora}"
CHECKPOINTING="${CHECKPOINTING:-true}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/peft-$(date -u +%Y%m%dT%H%M%S)"
DATA="$HOME/.cache/rsdeep/data"
MODEL="$BENCH_DIR/smollm2-135m-instruct"
export OMP_NUM_THREADS="${THREADS:-1}"
export RSDEEP_LOG="${RSDEEP_LOG:-warn}"

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN="$CARGO_TARGET_DIR/release"
export RSDEEP_WORKER_BIN="$BIN/rsdeep-worker"
[ -f "$DATA/sft.jsonl" ] || scripts/fetch-data.sh
if [ ! -f "$MODEL/model.safetensors" ]; then
  scripts/fetch-model.sh
  "$BIN/rsdeep" convert gguf "$DATA/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"
fi
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

# The demo's configs without their evaluation (and their data paths, given below).
for task in sft lora; do
  python3 -c 'import json, sys; c = json.load(open(sys.argv[1])); [c.pop(k, None) for k in ("eval_files", "eval_on_start")]; c["deepspeed"] = "ds.json"; json.dump(c, open(sys.argv[2], "w"), indent=1)' \
    "configs/smollm2_$task.json" "$RUN_DIR/$task.json"
done

# The overrides each method adds to its train.json.
method_args() {
  case "$1" in
    sft) echo "" ;;
    lora) echo "" ;;
    dora) echo "--use_dora true" ;;
    qlora) echo "--load_in_4bit true --bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant true" ;;
    *) echo "unknown method $1 (sft, lora, dora, qlora)" >&2; exit 2 ;;
  esac
}

for stage in $STAGES; do
  for method in $METHODS; do
    config="$RUN_DIR/lora.json"
    [ "$method" = sft ] && config="$RUN_DIR/sft.json"
    out="$RUN_DIR/zero$stage-$method"
    echo "== ZeRO-$stage $method ($STEPS steps, world $WORLD)"
    # shellcheck disable=SC2046
    python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
      --worker_pattern rsdeep-worker -- \
      "$BIN/rsdeep" --device cpu --num_procs "$WORLD" --master_port 0 "$config" \
      --deepspeed "$PWD/configs/ds_config_zero$stage.json" --model_name_or_path "$MODEL" \
      --train_files "$DATA/sft.jsonl" --output_dir "$out" --seed 12 --per_device_train_batch_size 2 \
      --gradient_accumulation_steps 1 --max_seq_length 256 --max_steps "$STEPS" \
      --warmup_steps 0 --logging_steps 1 --save_strategy no --report_to none \
      --gradient_checkpointing "$CHECKPOINTING" \
      $(method_args "$method") > "$out.log" 2>&1
  done
done

python benches/lora/report.py "$RUN_DIR" | tee "$RUN_DIR/table.md"
