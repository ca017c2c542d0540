#!/usr/bin/env bash
# Soak test of the launcher (documented in docs/security.md): N short CPU
# training launches in a row (`rsdeep --device cpu --num_procs 2`, a tiny Qwen2 with
# save_steps), each with a random `--max_restarts` 0-2; a random subset is killed at a
# random moment (SIGKILL of one worker, or SIGTERM/SIGKILL of the launcher), and some
# launches restart an earlier output_dir with `--resume_from_checkpoint latest`.
# After every launch: no process of its job id is left, its rendezvous port is no longer
# listening, and every checkpoint of its output_dir is complete (manifest present, every
# file's size and sha256 as listed). At the end every output_dir's latest checkpoint is
# loaded (`rsdeep consolidate`). Prints a summary; exits 1 if any check failed.
#
#   scripts/soak.sh [--launches 100] [--work DIR] [--seed N] [--steps 30]
set -uo pipefail

LAUNCHES=100
WORK=""
SEED=$$
STEPS=30
while [ $# -gt 0 ]; do
  case "$1" in
    --launches) LAUNCHES="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    *) echo "usage: $0 [--launches N] [--work DIR] [--seed N] [--steps N]" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=/dev/null
source "$ROOT/scripts/env.sh"
RANDOM=$SEED
WORK="${WORK:-$(mktemp -d /tmp/rsdeep-soak.XXXXXX)}"
mkdir -p "$WORK/bin" "$WORK/runs"
echo "soak: $LAUNCHES launches, seed $SEED, work dir $WORK"

# Private copies of the binaries: a rebuild during the soak does not change what runs.
BUILT="$CARGO_TARGET_DIR/debug"
for b in rsdeep rsdeep-worker; do
  [ -x "$BUILT/$b" ] || { echo "soak: $BUILT/$b missing: run cargo build --workspace" >&2; exit 2; }
  cp "$BUILT/$b" "$WORK/bin/$b"
done
RSDEEP="$WORK/bin/rsdeep"

# Fixture: a learnable corpus, a 300-token BPE tokenizer, a tiny Qwen2 config.
python3 - "$WORK/corpus.jsonl" <<'EOF'
import json, sys
subjects = ["the quick brown fox", "a lazy dog", "the old captain", "my small cat", "the river"]
verbs = ["jumps over", "sleeps near", "sails across", "watches", "runs past"]
objects = ["the fence", "the harbour", "a sunny garden", "the mountain", "an open door"]
with open(sys.argv[1], "w") as f:
    for i in range(300):
        text = f"{subjects[i % 5]} {verbs[(i // 5) % 5]} {objects[(i // 25) % 5]}."
        f.write(json.dumps({"text": text}) + "\n")
EOF
cat > "$WORK/model.json" <<'EOF'
{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32,
 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
 "rope_theta": 10000.0, "vocab_size": 320, "tie_word_embeddings": false,
 "initializer_range": 0.02, "hidden_act": "silu", "torch_dtype": "float32"}
EOF
"$RSDEEP" tokenizer train --files "$WORK/corpus.jsonl" --vocab_size 300 --out "$WORK/tok" \
  > "$WORK/tokenizer.log" 2>&1 || { echo "soak: tokenizer training failed ($WORK/tokenizer.log)" >&2; exit 2; }

# train.json for output dir $1 with ZeRO stage $2.
write_config() {
  cat > "$1/train.json" <<EOF
{"task": "pretrain", "config_name": "$WORK/model.json", "tokenizer_name": "$WORK/tok",
 "train_files": ["$WORK/corpus.jsonl"], "block_size": 16, "per_device_train_batch_size": 2,
 "gradient_accumulation_steps": 1, "learning_rate": 3e-3, "max_steps": $STEPS,
 "logging_steps": 1, "save_steps": 3, "save_total_limit": 2, "seed": 7,
 "output_dir": "$1/out",
 "deepspeed": {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
   "train_batch_size": "auto", "zero_optimization": {"stage": $2}}}
EOF
}

# Pids whose environment carries RSDEEP_JOB_ID=$1.
job_pids() {
  local pid
  for env in /proc/[0-9]*/environ; do
    pid="${env#/proc/}"; pid="${pid%/environ}"
    if { tr '\0' '\n' < "$env"; } 2>/dev/null | grep -qx "RSDEEP_JOB_ID=$1"; then echo "$pid"; fi
  done
}

# The job's worker pids (children of the launcher running rsdeep-worker).
worker_pids() {
  local launcher="$1" pid
  for pid in $(pgrep -P "$launcher" 2>/dev/null); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "rsdeep-worker" ] && echo "$pid"
  done
}

# Checks every checkpoint-N of output dir $1: manifest, sizes and sha256 of listed files.
verify_checkpoints() {
  python3 - "$1" <<'EOF'
import hashlib, json, os, re, sys
out = sys.argv[1]
if not os.path.isdir(out):
    sys.exit(0)
bad = []
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name)
    if re.fullmatch(r"checkpoint-\d+\.tmp", name):
        print(f"note: {path}: an interrupted save's temporary folder (never read)", file=sys.stderr)
        continue
    if not re.fullmatch(r"checkpoint-\d+", name) or not os.path.isdir(path):
        continue
    try:
        manifest = json.load(open(os.path.join(path, "manifest.json")))
    except Exception as e:
        bad.append(f"{path}: no readable manifest.json ({e})")
        continue
    for rel, entry in manifest["files"].items():
        f = os.path.join(path, rel)
        try:
            data = open(f, "rb").read()
        except OSError as e:
            bad.append(f"{f}: missing ({e})"); continue
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            bad.append(f"{f}: size/sha256 differ from the manifest")
latest = os.path.join(out, "latest")
if os.path.exists(latest):
    target = os.path.join(out, open(latest).read().strip())
    if not os.path.isfile(os.path.join(target, "manifest.json")):
        bad.append(f"{latest} names {target}, which is not a complete checkpoint")
for b in bad:
    print(b)
sys.exit(1 if bad else 0)
EOF
}

FAILURES=0
fail() { echo "soak: FAIL launch $1: $2"; FAILURES=$((FAILURES + 1)); }
declare -A OUTCOMES=()
LIFE_TENTHS=50 # how long an undisturbed launch lives, measured on launch 1
RESUMABLE=()   # run dirs whose out/ has a complete latest checkpoint
START=$(date +%s)

for i in $(seq 1 "$LAUNCHES"); do
  restarts=$((RANDOM % 3))
  run="" resume=()
  if [ ${#RESUMABLE[@]} -gt 0 ] && [ $((RANDOM % 4)) -eq 0 ]; then
    run="${RESUMABLE[$((RANDOM % ${#RESUMABLE[@]}))]}"
    resume=(--resume_from_checkpoint latest)
  else
    run="$WORK/runs/$i"; mkdir -p "$run"; write_config "$run" $((RANDOM % 4))
  fi
  job="soak$(printf '%03d' "$i")$RANDOM"
  RSDEEP_JOB_ID="$job" RSDEEP_TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
    OMP_NUM_THREADS=1 RSDEEP_LOG=warn "$RSDEEP" --device cpu --num_procs 2 --master_port 0 \
    --max_restarts "$restarts" --grace_period 5 "$run/train.json" "${resume[@]}" \
    > "$run/launch-$i.log" 2>&1 &
  launcher=$!
  action="none"
  launched=$(date +%s%N)
  case $(( i == 1 ? 9 : RANDOM % 10 )) in
    0|1|2) action="kill-worker" ;;
    3) action="term-launcher" ;;
    4) action="kill-launcher" ;;
  esac
  if [ "$action" != none ]; then
    # A random moment of an undisturbed launch's life (start-up, join, steps, saves).
    delay=$((RANDOM % LIFE_TENTHS))
    sleep "$((delay / 10)).$((delay % 10))"
    case "$action" in
      kill-worker)
        victims=($(worker_pids "$launcher"))
        if [ ${#victims[@]} -gt 0 ]; then kill -KILL "${victims[$((RANDOM % ${#victims[@]}))]}" 2>/dev/null
        else action="none(ended)"; fi ;;
      term-launcher) kill -TERM "$launcher" 2>/dev/null || action="none(ended)" ;;
      kill-launcher) kill -KILL "$launcher" 2>/dev/null || action="none(ended)" ;;
    esac
  fi
  timeout 300 tail --pid="$launcher" -f /dev/null; wait "$launcher" 2>/dev/null; code=$?
  if [ "$i" -eq 1 ]; then LIFE_TENTHS=$(( ($(date +%s%N) - launched) / 100000000 + 5 )); fi
  OUTCOMES["$action/exit$code"]=$(( ${OUTCOMES["$action/exit$code"]:-0} + 1 ))
  # No process of the job may survive its launcher (PDEATHSIG / process groups): 10 s grace.
  left=""
  for _ in $(seq 1 20); do left="$(job_pids "$job")"; [ -z "$left" ] && break; sleep 0.5; done
  if [ -n "$left" ]; then
    fail "$i" "orphans of job $job: $(echo $left)"
    kill -KILL $left 2>/dev/null
  fi
  port="$(grep -so 'rendezvous 127.0.0.1:[0-9]*' "$run/launch-$i.log" | head -1 | cut -d: -f2)"
  if [ -n "$port" ] && ss -ltnH "sport = :$port" | grep -q .; then
    fail "$i" "rendezvous port $port still listening: $(ss -ltnpH "sport = :$port")"
  fi
  if ! problems="$(verify_checkpoints "$run/out" 2>>"$WORK/notes")"; then fail "$i" "$problems"; fi
  if [ "$action" = none ] && [ "$code" -ne 0 ]; then
    fail "$i" "an undisturbed launch exited $code ($run/launch-$i.log)"
  fi
  if [ -f "$run/out/latest" ] && [[ " ${RESUMABLE[*]} " != *" $run "* ]]; then RESUMABLE+=("$run"); fi
  printf 'soak: launch %3d %-14s restarts=%d %-8s exit=%-3s %s\n' "$i" "$action" "$restarts" \
    "${resume:+resume}" "$code" "$run"
done

# Every output_dir's latest checkpoint must load.
loaded=0
for run in "$WORK"/runs/*; do
  [ -f "$run/out/latest" ] || continue
  ckpt="$run/out/$(cat "$run/out/latest")"
  if "$RSDEEP" consolidate "$ckpt" "$run/consolidated" > "$run/consolidate.log" 2>&1 \
     && [ -f "$run/consolidated/model.safetensors" ]; then
    loaded=$((loaded + 1))
  else
    fail "final" "latest checkpoint $ckpt does not load ($run/consolidate.log)"
  fi
done
survivors="$(pgrep -f "$WORK/bin/" || true)"
[ -z "$survivors" ] || fail final "processes of the soak binaries still running: $(echo $survivors)"

echo "soak: summary after $(( $(date +%s) - START )) s (seed $SEED, $LAUNCHES launches)"
for key in $(printf '%s\n' "${!OUTCOMES[@]}" | sort); do
  printf 'soak:   %-26s %d\n' "$key" "${OUTCOMES[$key]}"
done
echo "soak:   output dirs with a latest checkpoint loaded by consolidate: $loaded"
echo "soak:   interrupted-save temporary folders left (checkpoint-N.tmp): $(sort -u "$WORK/notes" 2>/dev/null | grep -c 'temporary folder')"
echo "soak:   failed checks: $FAILURES"
[ "$FAILURES" -eq 0 ]
