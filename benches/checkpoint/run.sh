#!/usr/bin/env bash
# Checkpoint benchmark: rsdeep save / verified load / consolidate throughput and the
# async-save stall (worker/examples/checkpoint_bench.rs), then torch.save / torch.load of
# the same tensors in Python. Figures are recorded in docs/checkpoints.md.
# Usage: benches/checkpoint/run.sh [EXTRA checkpoint_bench args, e.g. --hidden 1024]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
OUT=${OUT:-$(mktemp -d)}
cargo build --release -q -p rsdeep-worker --example checkpoint_bench
"$CARGO_TARGET_DIR/release/examples/checkpoint_bench" "$OUT" "$@"
"$RSDEEP_PYTHON" benches/checkpoint/torch_bench.py "$OUT/checkpoint-1" 3
rm -rf "$OUT"
