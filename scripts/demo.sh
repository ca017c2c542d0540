#!/usr/bin/env bash
# The README's main command (`make demo`): the seed's pipeline on real text and a real
# pretrained model, with 2 ranks (CPU ranks when no GPU is present, GPUs otherwise):
#   1. obtain the Chinese + English corpus, the chat data, the Qwen tokenizer and
#      SmolLM2-135M-Instruct (GGUF) (scripts/fetch-data.sh, pinned and sha256-checked);
#   2. train an 8k byte-level BPE tokenizer on the corpus;
#   3. pretrain a small Qwen2 from scratch with ZeRO-2 (the seed's first stage, short);
#   4. convert SmolLM2-135M-Instruct to a Hugging Face folder (`rsdeep convert gguf`) and
#      ask it three questions;
#   5. full SFT of SmolLM2 with ZeRO-3 on a persona it does not have (scripts/persona_data.py);
#   6. LoRA of SmolLM2 with ZeRO-2 on the same persona (PEFT adapter files);
#   7. ask both tuned models the same three questions;
# then print what each stage cost, the held-out eval loss before and after tuning, and the
# answers before and after. Outputs go to $RSDEEP_DEMO_DIR (default ./output/demo).
# Expects `make release` to have built the binaries (the Makefile does).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export RSDEEP_LOG="${RSDEEP_LOG:-warn}"  # progress lines only; RSDEEP_LOG=info shows every rank's log

DEMO="${RSDEEP_DEMO_DIR:-$PWD/output/demo}"
PRETRAIN_STEPS="${RSDEEP_DEMO_PRETRAIN_STEPS:-60}"
SFT_STEPS="${RSDEEP_DEMO_SFT_STEPS:-27}"
LORA_STEPS="${RSDEEP_DEMO_LORA_STEPS:-27}"
BIN="$CARGO_TARGET_DIR/release"
DATA="$RSDEEP_HOME/data"
SMOLLM2="$DEMO/smollm2-135m-instruct"
QUESTIONS=("What is your name?" "你是谁？" "What is the capital of France?")
mkdir -p "$DEMO"
started=$(date +%s)
stage_started=$started
COSTS=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# cost NAME: records the seconds since the previous stage ended.
cost() { local now; now=$(date +%s); COSTS+=("$1:$((now - stage_started))"); stage_started=$now; }
# ask MODEL_DIR [ADAPTER_DIR] FILE: greedy answers to QUESTIONS, one per line, into FILE.
ask() {
    local model="$1" adapter="${2:-}" out="$3" extra=()
    [ -n "$adapter" ] && extra=(--adapter "$adapter")
    : > "$out"
    for q in "${QUESTIONS[@]}"; do
        a=$("$BIN/rsdeep" generate --model "$model" "${extra[@]}" --chat --prompt "$q" \
            --max_new_tokens 48 2>/dev/null | tr '\n' ' ')
        printf '%s\t%s\n' "$q" "$a" | tee -a "$out"
    done
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEVICE=(--num_gpus 2)
    say "GPUs found: training on 2 GPUs"
else
    DEVICE=(--device cpu --num_procs 2)
    say "no GPU found: training on 2 CPU ranks (TCP ring collectives)"
fi

say "1/7 data: corpus, chat data, Qwen tokenizer, SmolLM2 GGUF (pinned, sha256-checked)"
scripts/fetch-data.sh
cat "$DATA/SOURCES.txt" 2>/dev/null || true
python3 scripts/persona_data.py "$DEMO"
cost data

say "2/7 tokenizer: byte-level BPE, 8192 tokens, trained on the corpus"
if [ ! -f "$DEMO/tokenizer-8k/tokenizer.json" ]; then
    "$BIN/rsdeep" tokenizer train --files "$DATA/pretrain.jsonl" --vocab_size 8192 \
        --out "$DEMO/tokenizer-8k"
else
    echo "reusing $DEMO/tokenizer-8k"
fi
cost tokenizer

say "3/7 pretrain from scratch: Qwen2 (hidden 256, 4 layers, 7.1M params), ZeRO-2, $PRETRAIN_STEPS steps"
rm -rf "$DEMO/pretrain"
"$BIN/rsdeep" "${DEVICE[@]}" --master_port 0 configs/pretrain.json \
    --tokenizer_name "$DEMO/tokenizer-8k" --train_files "$DATA/pretrain.jsonl" \
    --output_dir "$DEMO/pretrain" --max_steps "$PRETRAIN_STEPS" --save_steps "$PRETRAIN_STEPS" \
    --logging_steps 10 --warmup_steps 10
cost pretrain

say "4/7 a real pretrained model: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings)"
"$BIN/rsdeep" convert gguf "$DATA/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOLLM2"
echo "before fine-tuning:"
ask "$SMOLLM2" "" "$DEMO/answers-before.tsv"
cost convert+ask

# tune NAME CONFIG STEPS: fine-tunes SmolLM2 on the persona into $DEMO/NAME.
tune() {
    rm -rf "$DEMO/$1"
    "$BIN/rsdeep" "${DEVICE[@]}" --master_port 0 "$2" \
        --model_name_or_path "$SMOLLM2" --train_files "$DEMO/persona_train.jsonl" \
        --eval_files "$DEMO/persona_eval.jsonl" --output_dir "$DEMO/$1" --max_steps "$3"
}

say "5/7 full SFT of SmolLM2 on a persona, ZeRO-3, $SFT_STEPS steps (held-out eval before and after)"
tune smollm2-sft configs/smollm2_sft.json "$SFT_STEPS"
cost sft

say "6/7 LoRA of SmolLM2 on the same persona (r 16, all linear layers), ZeRO-2, $LORA_STEPS steps"
tune smollm2-lora configs/smollm2_lora.json "$LORA_STEPS"
cost lora

say "7/7 the same questions after fine-tuning"
echo "full SFT:"
ask "$DEMO/smollm2-sft" "" "$DEMO/answers-sft.tsv"
echo "LoRA (base + adapter):"
ask "$SMOLLM2" "$DEMO/smollm2-lora" "$DEMO/answers-lora.tsv"
cost ask

loss_trend() { # loss_trend METRICS_JSONL [KEY] -> "first logged -> last logged"
    python3 - "$1" "${2:-loss}" <<'PY'
import json, sys
key = sys.argv[2]
rows = [json.loads(l) for l in open(sys.argv[1])]
values = [r[key] for r in rows if key in r]
if len(values) < 2:
    print(f"only {len(values)} {key} value(s) logged")
else:
    print(f"{values[0]:.3f} -> {values[-1]:.3f}")
PY
}

elapsed=$(( $(date +%s) - started ))
say "summary ($((elapsed / 60)) min $((elapsed % 60)) s)"
printf '  stage costs:'
for c in "${COSTS[@]}"; do printf ' %s %ss' "${c%%:*}" "${c##*:}"; done
echo
printf '  %-16s train loss %s\n' pretrain "$(loss_trend "$DEMO/pretrain/metrics.jsonl")"
for run in smollm2-sft smollm2-lora; do
    printf '  %-16s train loss %s; held-out eval loss %s (before -> after)\n' "$run" \
        "$(loss_trend "$DEMO/$run/metrics.jsonl")" "$(loss_trend "$DEMO/$run/metrics.jsonl" eval_loss)"
done
echo "  answers (question | before | full SFT | LoRA):"
paste "$DEMO/answers-before.tsv" "$DEMO/answers-sft.tsv" "$DEMO/answers-lora.tsv" \
    | awk -F'\t' '{printf "    %s\n      before: %s\n      SFT:    %s\n      LoRA:   %s\n", $1, $2, $4, $6}'
echo
echo "  Each output folder is a Hugging Face model (config.json, model.safetensors, tokenizer"
echo "  files) with metrics.jsonl and loss.png; smollm2-lora holds PEFT adapter files."
echo "  Load it in Python: AutoModelForCausalLM.from_pretrained(\"$DEMO/smollm2-sft\"), or"
echo "  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"$SMOLLM2\"), \"$DEMO/smollm2-lora\")."
echo "  Chat with it:  $BIN/rsdeep generate --model $SMOLLM2 --adapter $DEMO/smollm2-lora --chat --prompt '...'"
echo "  Merge it:      $BIN/rsdeep merge-lora --base $SMOLLM2 --adapter $DEMO/smollm2-lora --out $DEMO/merged"
