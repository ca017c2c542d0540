#!/usr/bin/env bash
#! The prepared GPU check (`make gpu-check`): versions, GPU-marked tests, one step per ZeRO
#! stage on GPU vs CPU (fp32 and bf16), the 0.5B seq-2048 benchmark with and without
#! activation checkpointing against HF Trainer, the attention kernels actually launched, and
#! checkpoint save/load timings. Each figure is printed as soon as it is measured.
#! `--profile` runs only the versions and where a step's GPU time goes (kernels by name and
#! kind, rsdeep under ncu vs HF Trainer under torch.profiler).
#! `--scripts-only` runs the versions and the user-program section only (a user's HF Trainer
#! script launched by rsdeep on the device).
#! `--cpu-dry-run` runs the same logic on CPU with a tiny model. Contract and results: docs/gpu.md.
set -uo pipefail
DRY=0; BUNDLE=""; PROFILE=0; SCRIPTS_ONLY=0
while [ $# -gt 0 ]; do case "$1" in
  --cpu-dry-run) DRY=1;; --bundle) BUNDLE="$2"; shift;; --profile) PROFILE=1;; --scripts-only) SCRIPTS_ONLY=1;;
  *) echo "unknown arg $1"; exit 2;; esac; shift; done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$BUNDLE" ]; then
  source "$ROOT/scripts/env.sh"; BIN="${RSDEEP_BIN_DIR:-$CARGO_TARGET_DIR/release}"; DATA="${RSDEEP_DATA_DIR:-$RSDEEP_HOME/data}"
  CFG="$ROOT/configs"; PY="${RSDEEP_PYTHON:-python3}"; TESTBIN=""; HF="$ROOT/benches/gpu/hf_trainer_bench.py"
  SCRIPTS="$ROOT/tests/fixtures/user_scripts"
else
  B=$(cd "$BUNDLE" && pwd); BIN="$B/bin"; DATA="$B/data"; CFG="$B/configs"; TESTBIN="$B/bin/worker-lib-tests"
  HF="$B/benches/gpu/hf_trainer_bench.py"; PY=/opt/torch/.venv/bin/python; [ -x "$PY" ] || PY=python3
  SCRIPTS="$B/user_scripts"
  NCCL_DIR=$("$PY" -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))' 2>/dev/null || true)
  mkdir -p "$B/nccl"; [ -n "$NCCL_DIR" ] && ln -sf "$NCCL_DIR/libnccl.so.2" "$B/nccl/libnccl.so"
  TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
  export LD_LIBRARY_PATH="$B/nccl:$TORCH_LIB:${NCCL_DIR:-}:${LD_LIBRARY_PATH:-}"
fi
export RSDEEP_WORKER_BIN="$BIN/rsdeep-worker"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXX"); cd "$WORK"; ln -s "$CFG" configs; mkdir data
if [ -d "$DATA/tokenizer-qwen" ]; then
  ln -s "$DATA/tokenizer-qwen" data/tokenizer-qwen
  if [ -f "$DATA/pretrain-slice.jsonl" ]; then ln -s "$DATA/pretrain-slice.jsonl" data/; else head -n 400 "$DATA/pretrain.jsonl" > data/pretrain-slice.jsonl; fi
elif [ $DRY = 1 ]; then
  # No fetched data (CI): a generated corpus and a small BPE stand in; ids stay below the
  # tiny model's Qwen-size vocabulary.
  echo "cpu dry run: no data in $DATA, training a stand-in tokenizer on a generated corpus"
  "$PY" -c 'import json,random;r=random.Random(7);w="the river captain sails across a harbour garden hill door fox dog".split()
print("\n".join(json.dumps({"text":" ".join(r.choice(w) for _ in range(400))}) for _ in range(300)))' > data/pretrain-slice.jsonl
  "$BIN/rsdeep" tokenizer train --files data/pretrain-slice.jsonl --vocab_size 400 --out data/tokenizer-qwen > /dev/null \
    || { echo "FAIL: stand-in tokenizer"; exit 1; }
else echo "FAIL: no tokenizer at $DATA/tokenizer-qwen (run scripts/fetch-data.sh or scripts/gpu-bundle.sh)"; exit 1; fi
# Tiny model with the Qwen vocabulary (the bundled tokenizer is Qwen's 151k one).
"$PY" -c 'import json,sys;c=json.load(open(sys.argv[1]));c.update(vocab_size=151936,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,num_hidden_layers=2,max_window_layers=2);json.dump(c,open("tiny-qwen.json","w"))' "$CFG/models/qwen2-tiny.json"
FAIL=0; fail() { echo "FAIL: $*"; FAIL=1; }
section() { echo; echo "=== $* ==="; }

section "versions ($(date -u +%FT%TZ))"
if [ $DRY = 0 ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || fail nvidia-smi
else echo "cpu dry run: nvidia-smi skipped (needs a GPU)"; fi
"$PY" -c 'import torch;print("torch/libtorch",torch.__version__,"cuda",torch.version.cuda,"available",torch.cuda.is_available());print("nccl",torch.cuda.nccl.version() if torch.cuda.is_available() else "n/a (no CUDA)")'

MODEL=$(grep -o '"config_name": *"[^"]*"' "$CFG/gpu-bench.json" | cut -d'"' -f4); BS=4; SEQ=2048; STEPS=15
[ $DRY = 1 ] && { MODEL=tiny-qwen.json; BS=2; SEQ=128; STEPS=4; }
HFDEV=cuda; [ $DRY = 1 ] && HFDEV=cpu
# Every launch below runs under `timeout`, so one hang cannot eat the device lease.
PROF="$(dirname "$HF")/kernel_profile.py"
if [ $PROFILE = 1 ]; then
  section "profile: kernels of 3 bf16 steps of configs/gpu-bench.json, rsdeep (ncu) vs HF Trainer (torch.profiler, its 3rd step)"
  PARGS=(configs/gpu-bench.json --max_steps 3 --output_dir prof-rsdeep)
  [ $DRY = 1 ] && PARGS+=(--config_name tiny-qwen.json --block_size 128 --per_device_train_batch_size 2)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ $DRY = 0 ] && [ -n "$NCU" ]; then
    timeout 300 "$NCU" --target-processes all --metrics gpu__time_duration.sum --csv --page raw --log-file ncu-prof.csv \
      "$BIN/rsdeep" --num_gpus 1 "${PARGS[@]}" > prof-rsdeep.log 2>&1 || { tail -5 prof-rsdeep.log; fail "ncu profile"; }
    "$PY" "$PROF" ncu ncu-prof.csv 3 || fail "ncu summary"
  else echo "ncu skipped (cpu dry run or no ncu)"; fi
  timeout 240 "$PY" "$PROF" hf --model-config "$MODEL" --batch $BS --seq $SEQ --steps 3 --device $HFDEV 2> hf-prof.log \
    || { tail -5 hf-prof.log; fail "hf profile"; }
  echo; [ $FAIL = 0 ] && echo "GPU PROFILE DONE (dry=$DRY) in $WORK" || echo "GPU PROFILE FAILED (dry=$DRY) in $WORK"
  exit $FAIL
fi

# A user's own HF Trainer script (the seed's pretrain.py, tiny Qwen2) launched by rsdeep as
# `deepspeed` would launch it; no DeepSpeed on the GPU machine, so plain HF Trainer.
user_program_section() {
  section "user program: the seed's pretrain.py (HF Trainer) under rsdeep, 6 steps"
  local args=(--master_port 0 --python "$PY" "$SCRIPTS/pretrain.py" --config_name "$SCRIPTS/tiny-qwen2"
    --tokenizer_name data/tokenizer-qwen --train_files data/pretrain-slice.jsonl --per_device_train_batch_size 2
    --do_train --output_dir user-pretrain --learning_rate 1e-3 --max_steps 6 --logging_steps 1 --save_strategy no
    --block_size 128 --seed 12 --report_to none)
  if [ $DRY = 1 ]; then args=(--device cpu --num_procs 1 "${args[@]}" --use_cpu); else args=(--num_gpus 1 "${args[@]}" --bf16); fi
  timeout 300 "$BIN/rsdeep" "${args[@]}" > user-pretrain.log 2>&1 || { tail -15 user-pretrain.log; fail "user program"; return; }
  grep -c PRETRAIN_LOG user-pretrain.log | sed 's/^/PRETRAIN_LOG lines: /'
  grep -E 'PRETRAIN_LOG|started .* rank\(s\) of|device' user-pretrain.log | head -4 | cut -c1-200
  grep -q 'PRETRAIN_DONE' user-pretrain.log && echo "user program: finished" || fail "user program: no PRETRAIN_DONE"
}
if [ $SCRIPTS_ONLY = 1 ]; then
  user_program_section
  echo; [ $FAIL = 0 ] && echo "GPU SCRIPTS CHECK PASSED (dry=$DRY) in $WORK" || echo "GPU SCRIPTS CHECK FAILED (dry=$DRY) in $WORK"
  exit $FAIL
fi

section "GPU-marked tests"
if [ $DRY = 0 ] && [ -x "$TESTBIN" ]; then timeout 180 "$TESTBIN" --ignored --test-threads 1 nccl || fail "nccl tests"
else echo "skipped: needs CUDA + NCCL and the bundled test binary (runs with --ignored on the GPU)"; fi

DEVICE_ARGS=(--num_gpus 1); [ $DRY = 1 ] && DEVICE_ARGS=(--device cpu --num_procs 1)
last_metric() { "$PY" -c 'import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r=[x for x in rows if "loss" in x]; print(r[-1].get(sys.argv[2],"nan") if r else "nan")' "$1" "$2"; }
mkzero() { echo "{\"zero_optimization\":{\"stage\":$1},\"train_micro_batch_size_per_gpu\":\"auto\",\"gradient_accumulation_steps\":\"auto\",\"bf16\":{\"enabled\":\"auto\"}}" > ds_zero$1.json; }
one_step() { # stage out precision device-args...
  local stage=$1 out=$2 bf16=$3; shift 3
  timeout 120 "$BIN/rsdeep" "$@" configs/gpu-bench.json --config_name tiny-qwen.json --block_size 128 \
    --per_device_train_batch_size 2 --max_steps 2 --deepspeed "ds_zero$stage.json" --output_dir "$out" \
    --bf16 "$bf16" > "$out.log" 2>&1 || { tail -5 "$out.log"; return 1; }
}
section "two steps per ZeRO stage (the second loss follows one update): GPU vs CPU loss (fp32 within 1e-4, bf16 within 2e-2 relative)"
for s in 0 1 2 3; do
  mkzero $s
  for prec in fp32:false:1e-4 bf16:true:2e-2; do
    IFS=: read -r name bf16 tol <<< "$prec"
    one_step $s "step-dev-z$s-$name" "$bf16" "${DEVICE_ARGS[@]}" || { fail "zero$s $name device run"; continue; }
    one_step $s "step-cpu-z$s-$name" "$bf16" --device cpu --num_procs 1 || { fail "zero$s $name cpu run"; continue; }
    a=$(last_metric "step-dev-z$s-$name/metrics.jsonl" loss); b=$(last_metric "step-cpu-z$s-$name/metrics.jsonl" loss)
    "$PY" -c 'import sys,math;a,b,t=map(float,sys.argv[1:4]);ok=math.isfinite(a) and abs(a-b)<=t*abs(b);print(f"zero{sys.argv[4]} {sys.argv[5]} device {a:.6f} cpu {b:.6f} rel {abs(a-b)/abs(b):.1e}", "OK" if ok else "MISMATCH");sys.exit(0 if ok else 1)' "$a" "$b" "$tol" $s $name || fail "zero$s $name loss"
  done
done

section "benchmark: Qwen2.5-0.5B shape, seq 2048, bf16 (tiny model, seq 128 in dry run); MFU against 989 TFLOP/s dense bf16"
BENCH_ARGS=(); [ $DRY = 1 ] && BENCH_ARGS=(--config_name tiny-qwen.json --block_size 128 --per_device_train_batch_size 2 --max_steps 4)
peak_sampler() { while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1; done > "$1"; }
sampled() { # name command...: runs the command with the GPU memory sampler around it; PEAK is set
  local name=$1; shift; [ $DRY = 0 ] && { peak_sampler "$name.mem" & SAMPLER=$!; }
  "$@"; local rc=$?
  [ $DRY = 0 ] && { kill $SAMPLER; wait $SAMPLER 2>/dev/null; PEAK=$(sort -n "$name.mem" | tail -1); } || PEAK="n/a(cpu)"
  return $rc
}
declare -A TPS
for gc in false true; do
  out="bench-gc-$gc"
  sampled "$out" timeout 240 "$BIN/rsdeep" "${DEVICE_ARGS[@]}" configs/gpu-bench.json "${BENCH_ARGS[@]}" --gradient_checkpointing $gc \
    --output_dir "$out" > "$out.log" 2>&1 || { tail -5 "$out.log"; fail "bench gc=$gc"; }
  TPS[$gc]=$(last_metric "$out/metrics.jsonl" tokens_per_second)
  echo "rsdeep gradient_checkpointing=$gc tokens/s ${TPS[$gc]} mfu% $(last_metric "$out/metrics.jsonl" mfu) peak_gpu_MiB(nvidia-smi) $PEAK"
done
for gc in 0 1; do
  sampled "hf-$gc" timeout 240 "$PY" "$HF" --model-config "$MODEL" --batch $BS --seq $SEQ --steps $STEPS --device $HFDEV \
    --gradient-checkpointing $gc > "hf-$gc.out" 2> "hf-$gc.log" || { tail -5 "hf-$gc.log"; fail "hf bench gc=$gc"; continue; }
  r=$(tail -1 "hf-$gc.out")
  echo "hf-trainer gradient_checkpointing=$gc $r peak_gpu_MiB(nvidia-smi) $PEAK"
  key=false; [ $gc = 1 ] && key=true
  "$PY" -c 'import sys;h=float(sys.argv[2].split("tokens/s ")[1].split()[0]);print(f"ratio rsdeep/hf tokens/s (gc={sys.argv[3]}): {float(sys.argv[1])/h:.3f}")' "${TPS[$key]}" "$r" $key || fail "ratio"
done

section "checkpoint save/load from device memory (0.5B shape, bf16 run, fp32 masters + Adam moments)"
CK_ARGS=(--save_strategy steps --save_steps 1); [ $DRY = 1 ] && CK_ARGS+=(--config_name tiny-qwen.json --block_size 128 --per_device_train_batch_size 2)
for mode in false true; do
  out="ckpt-async-$mode"
  timeout 240 "$BIN/rsdeep" "${DEVICE_ARGS[@]}" configs/gpu-bench.json "${CK_ARGS[@]}" --max_steps 2 --async_save $mode --output_dir "$out" > "$out.log" 2>&1 \
    || { tail -5 "$out.log"; fail "checkpoint async_save=$mode"; continue; }
  grep -E 'checkpoint-[0-9]+.*(saved|async save)' "$out.log" | sed 's/^/  /'
done
timeout 240 "$BIN/rsdeep" "${DEVICE_ARGS[@]}" configs/gpu-bench.json "${CK_ARGS[@]}" --max_steps 3 --output_dir ckpt-async-false \
  --resume_from_checkpoint ckpt-async-false/checkpoint-2 > ckpt-resume.log 2>&1 || { tail -5 ckpt-resume.log; fail "checkpoint resume"; }
grep -E 'resumed from' ckpt-resume.log | sed 's/^/  /'

section "attention kernels (flash expected for bf16 causal GQA)"
if [ $DRY = 0 ]; then
  timeout 60 "$PY" "$(dirname "$HF")/sdpa_kernels.py" 2>&1 | tail -2 || fail "sdpa kernel probe"
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    # rsdeep's own worker, one bf16 step of the tiny model: kernels whose names look like attention.
    timeout 120 "$NCU" --target-processes all --kernel-name 'regex:[Ff]lash|fmha|[Aa]ttention|[Ee]fficient' --launch-count 4 \
      --section LaunchStats "$BIN/rsdeep" --num_gpus 1 configs/gpu-bench.json --config_name tiny-qwen.json --block_size 128 \
      --per_device_train_batch_size 2 --max_steps 1 --output_dir ncu-run > ncu.log 2>&1
    echo "ncu rc $?; rsdeep worker attention kernels:"
    grep -E 'Context [0-9]+, Stream' ncu.log | sed -E 's/\(.*//; s/^ +//' | sort -u | cut -c1-160
    grep -qiE 'flash.*Context|Context.*flash' ncu.log && echo "flash in rsdeep's worker: yes" \
      || { echo "flash in rsdeep's worker: no"; grep -E '==(ERROR|WARNING)==' ncu.log | head -3; }
  else echo "ncu not found: only the libtorch dispatch probe above"; fi
else
  timeout 60 "$PY" "$(dirname "$HF")/sdpa_kernels.py" --device cpu --batch 1 --heads 4 --kv-heads 2 --seq 64 --head-dim 16 | tail -2 \
    || fail "sdpa kernel probe"
  echo "cpu dry run: ncu skipped (needs a GPU)"
fi

user_program_section

echo; [ $FAIL = 0 ] && echo "GPU CHECK PASSED (dry=$DRY) in $WORK" || echo "GPU CHECK FAILED (dry=$DRY) in $WORK"
exit $FAIL
