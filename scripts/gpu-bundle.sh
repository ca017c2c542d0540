#!/usr/bin/env bash
#! Assembles .gpu-bundle/: stripped release binaries, the worker lib test binary, the Qwen
#! tokenizer, a data slice, configs and the check scripts, for `scripts/gpu-check.sh` on a
#! GPU machine that has no cargo. Contract: docs/gpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
B=.gpu-bundle
rm -rf "$B" && mkdir -p "$B/bin" "$B/data" "$B/configs" "$B/scripts" "$B/benches"
cargo build --release -p rsdeep --bin rsdeep -p rsdeep-worker --bin rsdeep-worker
TEST_BIN=$(cargo test --release -p rsdeep-worker --lib --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["lib"]: print(m["executable"])' | tail -1)
for exe in rsdeep rsdeep-worker; do strip -o "$B/bin/$exe" "$CARGO_TARGET_DIR/release/$exe"; done
[ -n "$TEST_BIN" ] && strip -o "$B/bin/worker-lib-tests" "$TEST_BIN"
cp -r ~/.cache/rsdeep/data/tokenizer-qwen "$B/data/"
head -n 400 ~/.cache/rsdeep/data/pretrain.jsonl > "$B/data/pretrain-slice.jsonl"
cp -r configs/models configs/ds_config_zero*.json configs/gpu-bench.json "$B/configs/"
cp scripts/gpu-check.sh "$B/scripts/" && cp -r benches/gpu "$B/benches/"
cp -r tests/fixtures/user_scripts "$B/user_scripts"
du -sh "$B" "$B"/*/* | sort -h | tail -8
echo 'Device run (from the repo root):'
echo "  run carry=[\".gpu-bundle\"] command=\"bash .gpu-bundle/scripts/gpu-check.sh --bundle .gpu-bundle\" timeout_s=540"
