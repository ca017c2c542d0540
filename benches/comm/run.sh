#!/usr/bin/env bash
# Collective benchmark: 2 ranks of rsdeep's TCP ring, then 2 ranks of torch.distributed
# gloo, over loopback, 1 KiB .. 256 MiB; prints one table (GB/s, nccl-tests algbw/busbw
# definitions) with the busbw ratio per size. Results are recorded in docs/comm-bench.md.
# Usage: benches/comm/run.sh [MIN_BYTES MAX_BYTES BUDGET_BYTES]   (env: EXTRA_ARGS for
# rsdeep-comm-bench, e.g. "--chunk-bytes 262144 --check"; SKIP_BUILD=1 to reuse the binary;
# INTERLEAVE=1 runs both implementations size by size, alternating which goes first, so
# that load changes on a shared host hit both alike; it costs a process start per size)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
MIN=${1:-1024}; MAX=${2:-268435456}; BUDGET=${3:-33554432}
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep-worker --bin rsdeep-comm-bench
BENCH="$CARGO_TARGET_DIR/release/rsdeep-comm-bench"
free_port() { "$RSDEEP_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run_ours() { # MIN MAX: one pair of rsdeep ranks, appending to rsdeep.tsv
    local addrs="127.0.0.1:$(free_port),127.0.0.1:$(free_port)"
    local common=(--world 2 --addrs "$addrs" --min-bytes "$1" --max-bytes "$2" --budget-bytes "$BUDGET")
    "$BENCH" --rank 1 "${common[@]}" ${EXTRA_ARGS:-} >> "$OUT/rsdeep.1.tsv" &
    "$BENCH" --rank 0 "${common[@]}" ${EXTRA_ARGS:-} >> "$OUT/rsdeep.tsv"
    wait
}
run_gloo() { # MIN MAX: one pair of gloo ranks, appending to gloo.tsv
    local port; port=$(free_port)
    "$RSDEEP_PYTHON" benches/comm/gloo_bench.py 1 2 "$port" "$1" "$2" "$BUDGET" >> "$OUT/gloo.1.tsv" &
    "$RSDEEP_PYTHON" benches/comm/gloo_bench.py 0 2 "$port" "$1" "$2" "$BUDGET" >> "$OUT/gloo.tsv"
    wait
}
if [ -n "${INTERLEAVE:-}" ]; then
    size=$MIN; turn=0
    while [ "$size" -le "$MAX" ]; do
        if [ $((turn % 2)) -eq 0 ]; then run_ours "$size" "$size"; run_gloo "$size" "$size"
        else run_gloo "$size" "$size"; run_ours "$size" "$size"; fi
        size=$((size * 2)); turn=$((turn + 1))
    done
else
    run_ours "$MIN" "$MAX"
    run_gloo "$MIN" "$MAX"
fi
"$RSDEEP_PYTHON" benches/comm/report.py "$OUT/rsdeep.tsv" "$OUT/gloo.tsv"
