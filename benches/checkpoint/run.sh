#!/usr/bin/env bash
# Checkpoint benchmark (figures recorded in docs/checkpoints.md):
# 1. rsdeep save / verified load / consolidate throughput and the async-save training
#    stall (worker/examples/checkpoint_bench.rs), then torch.save / torch.load of the
#    same tensors in Python (torch_bench.py);
# 2. peak RSS of `rsdeep consolidate` on a ~50M-parameter checkpoint
#    (configs/models/qwen2-50m.json, 2 ranks, stage 3) and on a tiny one (the process
#    baseline: libtorch and the binary), against the largest tensor and the model size
#    (consolidate_memory.py).
# Usage: benches/checkpoint/run.sh [EXTRA checkpoint_bench args, e.g. --hidden 1024]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
OUT=${OUT:-$(mktemp -d)}
trap 'rm -rf "$OUT"' EXIT
cargo build --release -q -p rsdeep-worker --example checkpoint_bench --bin rsdeep-worker
cargo build --release -q -p rsdeep --bin rsdeep
BENCH="$CARGO_TARGET_DIR/release/examples/checkpoint_bench"
RSDEEP="$CARGO_TARGET_DIR/release/rsdeep"

echo "== throughput and async stall"
"$BENCH" "$OUT/throughput" "$@"
"$RSDEEP_PYTHON" benches/checkpoint/torch_bench.py "$OUT/throughput/checkpoint-1" 3
rm -rf "$OUT/throughput"

echo "== consolidate peak memory"
"$RSDEEP_PYTHON" - "$OUT/tiny.json" <<'PY'
import json, sys
config = json.load(open("configs/models/qwen2-50m.json"))
config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, vocab_size=256,
              num_attention_heads=4, num_key_value_heads=2)
json.dump(config, open(sys.argv[1], "w"))
PY
for model in tiny:"$OUT/tiny.json" qwen2-50m:configs/models/qwen2-50m.json; do
  name=${model%%:*}
  "$BENCH" "$OUT/$name" --make-only --model-config "${model#*:}" --world 2 --stage 3 >/dev/null
  for dtype in fp32 bf16; do
    echo "-- $name $dtype"
    "$RSDEEP_PYTHON" benches/checkpoint/consolidate_memory.py "$OUT/$name/checkpoint-1" "$OUT/$name-$dtype" \
      -- "$RSDEEP" consolidate "$OUT/$name/checkpoint-1" "$OUT/$name-$dtype" --dtype "$dtype"
    rm -rf "$OUT/$name-$dtype"
  done
  rm -rf "$OUT/$name"
done
