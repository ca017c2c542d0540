#!/usr/bin/env bash
# Bench-only setup for the ZeRO peer benchmark (docs/benchmarks.md); idempotent.
# Installs DeepSpeed into the project venv (not needed by any test), pre-builds the one
# JIT op DeepSpeed's CPU accelerator loads at start (the shared-memory allreduce,
# cached under ~/.cache/torch_extensions) so that no benchmark launch pays a compile,
# trains the 8k BPE tokenizer both sides use, and installs matplotlib for curve.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
DATA="$HOME/.cache/rsdeep/data/pretrain.jsonl"
mkdir -p "$BENCH_DIR"

if ! python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 pip install -q deepspeed
fi
# curve.py draws the loss-curve overlay with matplotlib.
python -c "import matplotlib" 2>/dev/null || pip install -q matplotlib
DS_ACCELERATOR=cpu python -c "
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load()
print('deepspeed shm comm op ready')" 2>&1 | tail -1

[ -f "$DATA" ] || scripts/fetch-data.sh
if [ ! -f "$BENCH_DIR/tokenizer-8k/tokenizer.json" ]; then
  "$CARGO_TARGET_DIR/release/rsdeep-worker" tokenizer train --files "$DATA" \
    --vocab_size 8192 --out "$BENCH_DIR/tokenizer-8k"
fi
