#!/usr/bin/env bash
# Collective benchmark: 2 ranks of rsdeep's TCP ring, then 2 ranks of torch.distributed
# gloo, over loopback, 1 KiB .. 256 MiB; prints one table (GB/s, nccl-tests algbw/busbw
# definitions) with the busbw ratio per size. Results are recorded in docs/comm-bench.md.
# Usage: benches/comm/run.sh [MIN_BYTES MAX_BYTES BUDGET_BYTES]   (env: EXTRA_ARGS for
# rsdeep-comm-bench, e.g. "--chunk-bytes 262144 --check"; SKIP_BUILD=1 to reuse the binary)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
MIN=${1:-1024}; MAX=${2:-268435456}; BUDGET=${3:-33554432}
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep-worker --bin rsdeep-comm-bench
BENCH="$CARGO_TARGET_DIR/release/rsdeep-comm-bench"
free_port() { "$RSDEEP_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ADDRS="127.0.0.1:$(free_port),127.0.0.1:$(free_port)"
common=(--world 2 --addrs "$ADDRS" --min-bytes "$MIN" --max-bytes "$MAX" --budget-bytes "$BUDGET")
"$BENCH" --rank 1 "${common[@]}" ${EXTRA_ARGS:-} > "$OUT/rsdeep.1.tsv" &
"$BENCH" --rank 0 "${common[@]}" ${EXTRA_ARGS:-} > "$OUT/rsdeep.tsv"
wait
PORT=$(free_port)
"$RSDEEP_PYTHON" benches/comm/gloo_bench.py 1 2 "$PORT" "$MIN" "$MAX" "$BUDGET" > "$OUT/gloo.1.tsv" &
"$RSDEEP_PYTHON" benches/comm/gloo_bench.py 0 2 "$PORT" "$MIN" "$MAX" "$BUDGET" > "$OUT/gloo.tsv"
wait
"$RSDEEP_PYTHON" benches/comm/report.py "$OUT/rsdeep.tsv" "$OUT/gloo.tsv"
