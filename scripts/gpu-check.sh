#!/usr/bin/env bash
#! The prepared GPU check of issue 10 (`make gpu-check`): versions, GPU-marked tests, one
#! step per ZeRO stage on GPU vs CPU (bf16 tolerance), the 0.5B seq-2048 benchmark with and
#! without activation checkpointing, and the HF Trainer comparison. `--cpu-dry-run` runs the
#! same logic on CPU with a tiny model. Contract and results: docs/gpu.md.
set -uo pipefail
DRY=0; BUNDLE=""
while [ $# -gt 0 ]; do case "$1" in
  --cpu-dry-run) DRY=1;; --bundle) BUNDLE="$2"; shift;; *) echo "unknown arg $1"; exit 2;; esac; shift; done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$BUNDLE" ]; then
  source "$ROOT/scripts/env.sh"; BIN="${RSDEEP_BIN_DIR:-$CARGO_TARGET_DIR/release}"; DATA="$HOME/.cache/rsdeep/data"
  CFG="$ROOT/configs"; PY="${RSDEEP_PYTHON:-python3}"; TESTBIN=""; HF="$ROOT/benches/gpu/hf_trainer_bench.py"
else
  B=$(cd "$BUNDLE" && pwd); BIN="$B/bin"; DATA="$B/data"; CFG="$B/configs"; TESTBIN="$B/bin/worker-lib-tests"
  HF="$B/benches/gpu/hf_trainer_bench.py"; PY=/opt/torch/.venv/bin/python; [ -x "$PY" ] || PY=python3
  NCCL_DIR=$("$PY" -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))' 2>/dev/null || true)
  mkdir -p "$B/nccl"; [ -n "$NCCL_DIR" ] && ln -sf "$NCCL_DIR/libnccl.so.2" "$B/nccl/libnccl.so"
  TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
  export LD_LIBRARY_PATH="$B/nccl:$TORCH_LIB:${NCCL_DIR:-}:${LD_LIBRARY_PATH:-}"
fi
export RSDEEP_WORKER_BIN="$BIN/rsdeep-worker"
WORK=$(mktemp -d /tmp/gpu-check.XXXX); cd "$WORK"; ln -s "$CFG" configs; mkdir data; ln -s "$DATA/tokenizer-qwen" data/tokenizer-qwen
if [ -f "$DATA/pretrain-slice.jsonl" ]; then ln -s "$DATA/pretrain-slice.jsonl" data/; else head -n 400 "$DATA/pretrain.jsonl" > data/pretrain-slice.jsonl; fi
# Tiny model with the Qwen vocabulary (the bundled tokenizer is Qwen's 151k one).
"$PY" -c 'import json,sys;c=json.load(open(sys.argv[1]));c.update(vocab_size=151936,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,num_hidden_layers=2,max_window_layers=2);json.dump(c,open("tiny-qwen.json","w"))' "$CFG/models/qwen2-tiny.json"
FAIL=0; fail() { echo "FAIL: $*"; FAIL=1; }
section() { echo; echo "=== $* ==="; }

section "versions ($(date -u +%FT%TZ))"
if [ $DRY = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || fail nvidia-smi
else echo "cpu dry run: nvidia-smi skipped (needs a GPU)"; fi
"$PY" -c 'import torch;print("torch/libtorch",torch.__version__,"cuda",torch.version.cuda,"available",torch.cuda.is_available());print("nccl",torch.cuda.nccl.version() if torch.cuda.is_available() else "n/a (no CUDA)")'

section "GPU-marked tests"
if [ $DRY = 0 ] && [ -x "$TESTBIN" ]; then "$TESTBIN" --ignored --test-threads 1 nccl || fail "nccl tests"
else echo "skipped: needs CUDA + NCCL and the bundled test binary (runs with --ignored on the GPU)"; fi

DEVICE_ARGS=(--num_gpus 1); [ $DRY = 1 ] && DEVICE_ARGS=(--device cpu --num_procs 1)
last_metric() { "$PY" -c 'import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r=[x for x in rows if "loss" in x]; print(r[-1].get(sys.argv[2],"nan") if r else "nan")' "$1" "$2"; }
mkzero() { echo "{\"zero_optimization\":{\"stage\":$1},\"train_micro_batch_size_per_gpu\":\"auto\",\"gradient_accumulation_steps\":\"auto\",\"bf16\":{\"enabled\":\"auto\"}}" > ds_zero$1.json; }
one_step() { # device-args... -- stage out
  local out=$2 stage=$1; shift 2
  "$BIN/rsdeep" "$@" configs/gpu-bench.json --config_name tiny-qwen.json --block_size 128 \
    --per_device_train_batch_size 2 --max_steps 1 --deepspeed "ds_zero$stage.json" --output_dir "$out" \
    --bf16 true > "$out.log" 2>&1 || { tail -5 "$out.log"; return 1; }
}
section "one step per ZeRO stage: GPU vs CPU loss (bf16 tolerance 2e-2 relative)"
for s in 0 1 2 3; do
  mkzero $s
  one_step $s "step-dev-z$s" "${DEVICE_ARGS[@]}" || { fail "zero$s device run"; continue; }
  one_step $s "step-cpu-z$s" --device cpu --num_procs 1 || { fail "zero$s cpu run"; continue; }
  a=$(last_metric "step-dev-z$s/metrics.jsonl" loss); b=$(last_metric "step-cpu-z$s/metrics.jsonl" loss)
  "$PY" -c 'import sys,math;a,b=map(float,sys.argv[1:3]);ok=math.isfinite(a) and abs(a-b)<=2e-2*abs(b)+1e-3;print(f"zero{sys.argv[3]} device {a:.5f} cpu {b:.5f}", "OK" if ok else "MISMATCH");sys.exit(0 if ok else 1)' "$a" "$b" $s || fail "zero$s loss"
done

section "benchmark: Qwen2.5-0.5B shape, seq 2048, bf16 (tiny model, seq 128 in dry run)"
BENCH_ARGS=(); [ $DRY = 1 ] && BENCH_ARGS=(--config_name tiny-qwen.json --block_size 128 --per_device_train_batch_size 2 --max_steps 4)
MODEL=$(grep -o '"config_name": *"[^"]*"' "$CFG/gpu-bench.json" | cut -d'"' -f4); BS=4; SEQ=2048; STEPS=15
[ $DRY = 1 ] && { MODEL=tiny-qwen.json; BS=2; SEQ=128; STEPS=4; }
peak_sampler() { while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; done > "$1"; }
declare -A TPS
for gc in false true; do
  out="bench-gc-$gc"; [ $DRY = 0 ] && { peak_sampler "$out.mem" & SAMPLER=$!; }
  "$BIN/rsdeep" "${DEVICE_ARGS[@]}" configs/gpu-bench.json "${BENCH_ARGS[@]}" --gradient_checkpointing $gc \
    --output_dir "$out" > "$out.log" 2>&1 || { tail -5 "$out.log"; fail "bench gc=$gc"; }
  [ $DRY = 0 ] && { kill $SAMPLER; wait $SAMPLER 2>/dev/null; }
  peak=$( [ $DRY = 0 ] && sort -n "$out.mem" | tail -1 || echo "n/a(cpu)")
  TPS[$gc]=$(last_metric "$out/metrics.jsonl" tokens_per_second)
  echo "rsdeep gradient_checkpointing=$gc tokens/s ${TPS[$gc]} mfu% $(last_metric "$out/metrics.jsonl" mfu) peak_gpu_MiB(nvidia-smi) $peak"
done
HFDEV=cuda; [ $DRY = 1 ] && HFDEV=cpu
for gc in 0 1; do
  r=$("$PY" "$HF" --model-config "$MODEL" --batch $BS --seq $SEQ --steps $STEPS --device $HFDEV --gradient-checkpointing $gc 2>hf-$gc.log | tail -1) \
    || { tail -5 hf-$gc.log; fail "hf bench gc=$gc"; continue; }
  echo "hf-trainer gradient_checkpointing=$gc $r"
  key=false; [ $gc = 1 ] && key=true
  "$PY" -c 'import sys;h=float(sys.argv[2].split("tokens/s ")[1].split()[0]);print(f"ratio rsdeep/hf tokens/s (gc={sys.argv[3]}): {float(sys.argv[1])/h:.3f}")' "${TPS[$key]}" "$r" $key || fail "ratio"
done
echo; [ $FAIL = 0 ] && echo "GPU CHECK PASSED (dry=$DRY) in $WORK" || echo "GPU CHECK FAILED (dry=$DRY) in $WORK"
exit $FAIL
