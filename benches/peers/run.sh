#!/usr/bin/env bash
# ZeRO benchmark, rsdeep vs Hugging Face Trainer + DeepSpeed (docs/benchmarks.md): for
# ZeRO stages 1, 2, 3 trains the tiny Qwen2 of configs/pretrain.json (block 256, micro
# batch 4, grad accumulation 2, fp32) on 2 CPU ranks, first with rsdeep (release
# binaries), then with the peer (`deepspeed` launcher, gloo, hf_trainer_peer.py), each
# under monitor.py (launch time, first finished step, per-rank peak RSS), and prints the
# table with ratios (report.py).
# Usage: benches/peers/run.sh      (env: STEPS=30 STAGES="1 2 3" SKIP_BUILD=1 THREADS=1
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
# Same intra-op thread count for every rank of both sides: 2 ranks on 2 cores.
export OMP_NUM_THREADS="${THREADS:-1}"
export DS_ACCELERATOR=cpu DS_BUILD_OPS=0

[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN_DIR="${BIN_DIR:-$CARGO_TARGET_DIR/release}"
export RSDEEP_WORKER_BIN="$BIN_DIR/rsdeep-worker"
benches/peers/setup.sh
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

# The peer reads our DeepSpeed files unchanged except for torch_adam: DeepSpeed's own
# AdamW would JIT-compile a CPU fused Adam; torch.optim.AdamW is what rsdeep matches.
peer_config() {
  python - "$1" "$2" <<'PY'
import json, sys
config = json.load(open(f"configs/ds_config_zero{sys.argv[1]}.json"))
config["optimizer"]["params"]["torch_adam"] = True
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
}

free_port() {
  python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"
}

for stage in $STAGES; do
  out="$RUN_DIR/rsdeep-zero$stage"
  echo "== rsdeep ZeRO-$stage"
  python benches/peers/monitor.py --out "$out.json" --steps_file "$out/metrics.jsonl" \
    --worker_pattern rsdeep-worker -- \
    "$BIN_DIR/rsdeep" --device cpu --num_procs 2 --master_port 0 \
    configs/pretrain.json --deepspeed "configs/ds_config_zero$stage.json" \
    --tokenizer_name "$TOKENIZER" --train_files "$DATA" --output_dir "$out" \
    --max_steps "$STEPS" --logging_steps 1 --save_strategy no --report_to none \
    > "$out.log" 2>&1

  out="$RUN_DIR/peer-zero$stage"
  echo "== HF Trainer + DeepSpeed ZeRO-$stage"
  peer_config "$stage" "$RUN_DIR/peer_ds_zero$stage.json"
  python benches/peers/monitor.py --out "$out.json" --steps_file "$out/bench_steps.jsonl" \
    --worker_pattern hf_trainer_peer.py -- \
    deepspeed --num_gpus 2 --master_port "$(free_port)" benches/peers/hf_trainer_peer.py \
    --model_config configs/models/qwen2-tiny.json --tokenizer "$TOKENIZER" \
    --train_file "$DATA" --deepspeed "$RUN_DIR/peer_ds_zero$stage.json" \
    --output_dir "$out" --max_steps "$STEPS" > "$out.log" 2>&1
done

python benches/peers/report.py "$RUN_DIR" --stages $STAGES | tee "$RUN_DIR/table.md"
