#!/usr/bin/env bash
# Rendezvous benchmark (issue 2): prints (1) the time from `rsdeep` start until all 8
# local CPU selftest workers have joined, and (2) the time for 1024 in-process gRPC
# clients to join one rendezvous (goal: under 1 s). The launcher is built in release; the
# worker is whichever `rsdeep-worker` was built (debug by default: its start-up, not the
# rendezvous, dominates figure 1).
# Usage: benches/rendezvous/run.sh [--workers 8] [--clients 1024] [--connections 16]
#        (env: SKIP_BUILD=1 to reuse the binaries, WORKER=path/to/rsdeep-worker)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release -q -p rsdeep
  cargo build -q -p rsdeep-worker
fi
export RSDEEP_WORKER_BIN="${WORKER:-$CARGO_TARGET_DIR/debug/rsdeep-worker}"
cd "$(mktemp -d)"
"$CARGO_TARGET_DIR/release/rsdeep" bench-rendezvous "$@"
