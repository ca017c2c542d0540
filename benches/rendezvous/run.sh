#!/usr/bin/env bash
# Rendezvous benchmark: prints (1) the time from `rsdeep` start until all 8
# local CPU selftest workers have joined, and (2) the time for 1024 in-process gRPC
# clients to join one rendezvous (goal: under 1 s). The launcher is built in release; the
# worker is whichever `rsdeep-worker` was built (debug by default: its start-up, not the
# rendezvous, dominates figure 1).
# Usage: benches/rendezvous/run.sh [--workers 8] [--clients 1024] [--connections 0]
#        (--connections 0, the default: one HTTP/2 connection per client, as real workers;
#        N > 0: the clients share N connections; --workers 0 skips figure 1)
# Recorded (quiet 2-core host, 2026-11-28): 1024 clients, one connection each, 530-551 ms.
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
