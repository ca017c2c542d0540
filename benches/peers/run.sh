#!/usr/bin/env bash
# ZeRO benchmark, rsdeep vs Hugging Face Trainer + DeepSpeed (docs/benchmarks.md): for
# ZeRO stages 1, 2, 3 trains the tiny Qwen2 of configs/pretrain.json (block 256, micro
# batch 4, grad accumulation 2, fp32) on 2 CPU ranks, first with rsdeep (release
# binaries), then with the peer (`deepspeed` launcher, gloo, hf_trainer_peer.py), each
# under monitor.py (launch time, first finished step, per-rank peak RSS), and prints the
# table with ratios (report.py). Then the loss curve: both sides start from one initial
# safetensors file (the peer being the seed's pretrain.py under `deepspeed`, ZeRO stage
# CURVE_STAGE of the seed's config), and curve.py prints both curves step by step, their
# largest deviation, and overlays them in RUN_DIR/curve/loss_curve.png.
# Usage: benches/peers/run.sh      (env: STEPS=30 STAGES="1 2 3" CURVE_STAGE=2 CURVE_ONLY=1
#        NO_CURVE=1 SKIP_BUILD=1 THREADS=1 MODEL_CONFIG=configs/models/qwen2-tiny.json
#        BLOCK=256 MICRO=4 GA=2 WARMUP=5 PEER_ADAM=torch — e.g. the real SmolLM2 shape:
#        MODEL_CONFIG=configs/models/smollm2-135m.json BLOCK=512 MICRO=2 GA=4 NO_CURVE=1
#        PEER_ADAM=fused: the peer uses DeepSpeed's own fused CPU Adam (built once here,
#        before any timed launch) instead of torch.optim.AdamW;
#        BIN_DIR=<folder with rsdeep and rsdeep-worker>, default the release target dir;
#        point it at a private copy when others rebuild the shared target meanwhile)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-30}"
STAGES="${STAGES:-1 2 3}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/peers-$(date -u +%Y%m%dT%H%M%S)"
DATA="$HOME/.cache/rsdeep/data/pretrain.jsonl"
TOKENIZER="$BENCH_DIR/tokenizer-8k"
MODEL_CONFIG="${MODEL_CONFIG:-configs/models/qwen2-tiny.json}"
BLOCK="${BLOCK:-256}" MICRO="${MICRO:-4}" GA="${GA:-2}" WARMUP="${WARMUP:-5}"
PEER_ADAM="${PEER_ADAM:-torch}"
# Same intra-op thread count for every rank of both sides: 2 ranks on 2 cores.
export OMP_NUM_THREADS="${THREADS:-1}"
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN_DIR="${BIN_DIR:-$CARGO_TARGET_DIR/release}"
export RSDEEP_WORKER_BIN="$BIN_DIR/rsdeep-worker"
benches/peers/setup.sh
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

# The peer reads our DeepSpeed files unchanged except, with PEER_ADAM=torch, for
# torch_adam: torch.optim.AdamW is what rsdeep matches step by step. With PEER_ADAM=fused
# DeepSpeed picks its own fused CPU Adam, JIT-compiled once here so no launch pays it.
peer_config() {
  python - "$1" "$2" "$PEER_ADAM" <<'PY'
import json, sys
config = json.load(open(f"configs/ds_config_zero{sys.argv[1]}.json"))
config["optimizer"]["params"]["torch_adam"] = sys.argv[3] == "torch"
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
}
if [ "$PEER_ADAM" = fused ]; then
  python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('FusedAdamBuilder').load()"
fi

free_port() {
  python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}

for stage in $([ -n "${CURVE_ONLY:-}" ] || echo "$STAGES"); do
  out="$RUN_DIR/rsdeep-zero$stage"
  echo "== rsdeep ZeRO-$stage"
  python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
    --worker_pattern rsdeep-worker -- \
    "$BIN_DIR/rsdeep" --device cpu --num_procs 2 --master_port 0 \
    configs/pretrain.json --deepspeed "configs/ds_config_zero$stage.json" \
    --config_name "$MODEL_CONFIG" --block_size "$BLOCK" --per_device_train_batch_size "$MICRO" \
    --gradient_accumulation_steps "$GA" \
    --tokenizer_name "$TOKENIZER" --train_files "$DATA" --output_dir "$out" \
    --max_steps "$STEPS" --logging_steps 1 --save_strategy no --report_to none \
    > "$out.log" 2>&1

  out="$RUN_DIR/peer-zero$stage"
  echo "== HF Trainer + DeepSpeed ZeRO-$stage"
  peer_config "$stage" "$RUN_DIR/peer_ds_zero$stage.json"
  python benches/peers/monitor.py --out "$out.json" --steps_file "$out/bench_steps.jsonl" \
    --worker_pattern hf_trainer_peer.py -- \
    deepspeed --num_gpus 2 --master_port "$(free_port)" benches/peers/hf_trainer_peer.py \
    --model_config "$MODEL_CONFIG" --tokenizer "$TOKENIZER" \
    --block_size "$BLOCK" --micro_batch "$MICRO" --grad_accum "$GA" \
    --train_file "$DATA" --deepspeed "$RUN_DIR/peer_ds_zero$stage.json" \
    --output_dir "$out" --max_steps "$STEPS" > "$out.log" 2>&1
done

[ -n "${CURVE_ONLY:-}" ] || python benches/peers/report.py "$RUN_DIR" --stages $STAGES \
  --tokens_per_step $((2 * MICRO * GA * BLOCK)) --warmup "$WARMUP" | tee "$RUN_DIR/table.md"
[ -z "${NO_CURVE:-}" ] || exit 0

# The loss curve. The seed's pretrain.py groups blocks per 40000-document map batch.
CURVE_STAGE="${CURVE_STAGE:-2}"
curve="$RUN_DIR/curve"
mkdir -p "$curve"
python - "$CURVE_STAGE" "$curve/ds_config.json" <<'PY'
import json, sys
config = json.load(open("configs/ds_config_zero2.json"))
config["zero_optimization"]["stage"] = int(sys.argv[1])
config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
cp configs/models/qwen2-tiny.json "$curve/config.json"
python tests/fixtures/parity/weights.py init "$curve" "$curve/init" 7
common=(--model_name_or_path "$curve/init" --tokenizer_name "$TOKENIZER" --train_files "$DATA"
  --block_size 256 --per_device_train_batch_size 4 --gradient_accumulation_steps 2
  --learning_rate 1e-3 --weight_decay 0.01 --warmup_steps 5 --max_steps "$STEPS"
  --logging_steps 1 --save_strategy no --seed 12 --report_to none
  --deepspeed "$curve/ds_config.json")
echo "== loss curve: HF Trainer + DeepSpeed (pretrain.py), ZeRO-$CURVE_STAGE"
deepspeed --num_gpus 2 --master_port "$(free_port)" tests/fixtures/user_scripts/pretrain.py \
  "${common[@]}" --use_cpu --do_train --output_dir "$curve/hf" > "$curve/hf.log" 2>&1
echo "== loss curve: rsdeep, ZeRO-$CURVE_STAGE"
"$BIN_DIR/rsdeep" --device cpu --num_procs 2 --master_port 0 configs/pretrain.json \
  "${common[@]}" --group_texts_batch_size 40000 --output_dir "$curve/rsdeep" \
  > "$curve/rsdeep.log" 2>&1
python benches/peers/curve.py "$curve/hf" "$curve/rsdeep" "$curve/loss_curve.png" \
  --title "ZeRO-$CURVE_STAGE, 2 CPU ranks, fp32: HF Trainer + DeepSpeed vs rsdeep" | tee "$curve/curve.md"
