#!/usr/bin/env bash
# The data benchmark: rsdeep vs Python `tokenizers` batch-encode throughput on the demo
# corpus (as a ratio), and the data pipeline's time per training step (docs/data.md).
# Usage: benches/data/run.sh [extra data_bench flags, e.g. --step_ms 160 --micro_batch 8]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
scripts/fetch-data.sh
DATA="$RSDEEP_HOME/data"
# Dependencies (tokenizers, rayon) are optimised in the dev profile (opt-level 2), which
# avoids a second libtorch C++ build for --release; the worker's own code is unoptimised,
# so the per-step figure is an upper bound.
cargo run -q -p rsdeep-worker --example data_bench -- \
    --tokenizer "$DATA/tokenizer-qwen" --corpus "$DATA/pretrain.jsonl" --sft "$DATA/sft.jsonl" "$@"
