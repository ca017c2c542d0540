#!/usr/bin/env bash
# A tracker that hangs or dies mid-run must not slow training (docs/benchmarks.md §8):
# the tiny Qwen2 of configs/pretrain.json on 2 CPU ranks (ZeRO-2, a log line per step),
# ROUNDS times each, interleaved: without trackers; with `report_to swanlab` whose
# sidecar never reads (RSDEEP_TRACKER_PYTHON is a stub that sleeps: its input pipe and
# rsdeep's queue fill, then steps are dropped); and with a sidecar that reads 5 lines and
# exits (a crashed tracker). Prints each run's mean step time over steps 5..STEPS, the
# ratio to the runs without trackers, and checks metrics.jsonl holds every step.
# Usage: benches/trackers/stall.sh   (env: STEPS=40 ROUNDS=2 SKIP_BUILD=1 BIN_DIR=...)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
STEPS="${STEPS:-40}"
ROUNDS="${ROUNDS:-2}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/rsdeep/bench}"
RUN_DIR="$BENCH_DIR/trackers-$(date -u +%Y%m%dT%H%M%S)"
DATA="$HOME/.cache/rsdeep/data/pretrain.jsonl"
TOKENIZER="$BENCH_DIR/tokenizer-8k"
export OMP_NUM_THREADS=1
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -q -p rsdeep -p rsdeep-worker
BIN_DIR="${BIN_DIR:-$CARGO_TARGET_DIR/release}"
export RSDEEP_WORKER_BIN="$BIN_DIR/rsdeep-worker"
benches/peers/setup.sh >/dev/null
mkdir -p "$RUN_DIR"
echo "results in $RUN_DIR"

# The stubs stand in for the sidecar's Python (they ignore the script they are given).
printf '#!/bin/sh\nexec sleep 100000\n' > "$RUN_DIR/stalled-python"
printf '#!/bin/sh\nhead -n 5 >/dev/null\nexit 1\n' > "$RUN_DIR/crashing-python"
chmod +x "$RUN_DIR/stalled-python" "$RUN_DIR/crashing-python"

run() { # name, report_to, tracker python
  local out="$RUN_DIR/$1"
  RSDEEP_TRACKER_PYTHON="$3" "$BIN_DIR/rsdeep" --device cpu --num_procs 2 --master_port 0 \
    configs/pretrain.json --deepspeed configs/ds_config_zero2.json \
    --config_name configs/models/qwen2-tiny.json --block_size 256 \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \
    --tokenizer_name "$TOKENIZER" --train_files "$DATA" --output_dir "$out" \
    --max_steps "$STEPS" --logging_steps 1 --save_strategy no --report_to "$2" \
    > "$out.log" 2>&1
}

for round in $(seq "$ROUNDS"); do
  echo "== round $round"
  run "none-$round" none python3
  run "stalled-$round" swanlab "$RUN_DIR/stalled-python"
  run "crashed-$round" swanlab "$RUN_DIR/crashing-python"
done

python - "$RUN_DIR" "$STEPS" <<'PY'
import json, sys, glob, os
run_dir, steps = sys.argv[1], int(sys.argv[2])
def mean_step(out):
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), f"{out}: steps missing"
    t = {r["step"]: r["elapsed_s"] for r in rows}
    return (t[steps] - t[5]) / (steps - 5)
by_kind = {}
for out in sorted(glob.glob(f"{run_dir}/*-[0-9]*")):
    if os.path.isdir(out):
        kind = os.path.basename(out).rsplit("-", 1)[0]
        by_kind.setdefault(kind, []).append(mean_step(out))
base = sum(by_kind["none"]) / len(by_kind["none"])
print("| sidecar | mean step (ms), each run | mean | ratio to none |")
print("|---|---|---:|---:|")
for kind in ["none", "stalled", "crashed"]:
    values = by_kind[kind]
    mean = sum(values) / len(values)
    each = ", ".join(f"{v * 1000:.1f}" for v in values)
    print(f"| {kind} | {each} | {mean * 1000:.1f} | {mean / base:.3f} |")
PY
grep -h "tracker" "$RUN_DIR"/stalled-1.log "$RUN_DIR"/crashed-1.log | sort | uniq -c | head
