#!/usr/bin/env bash
# The README's main command (`make demo`): the seed's whole pipeline on real text with
# 2 ranks (CPU ranks when no GPU is present, GPUs otherwise):
#   1. obtain the Chinese + English corpus, the chat data and the Qwen tokenizer
#      (scripts/fetch-data.sh, pinned and sha256-checked);
#   2. train an 8k byte-level BPE tokenizer on the corpus (a 150k vocabulary would dwarf
#      a tiny model);
#   3. pretrain a small Qwen2 from scratch with ZeRO-2;
#   4. SFT it on the chat data with ZeRO-3;
#   5. LoRA-tune it (PEFT adapter files) and chat with the tuned model;
# then print a summary. Outputs go to $RSDEEP_DEMO_DIR (default ./output/demo).
# Expects `make release` to have built the binaries (the Makefile does).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export RSDEEP_LOG="${RSDEEP_LOG:-warn}"  # progress lines only; RSDEEP_LOG=info shows every rank's log

DEMO="${RSDEEP_DEMO_DIR:-$PWD/output/demo}"
PRETRAIN_STEPS="${RSDEEP_DEMO_PRETRAIN_STEPS:-120}"
SFT_STEPS="${RSDEEP_DEMO_SFT_STEPS:-40}"
LORA_STEPS="${RSDEEP_DEMO_LORA_STEPS:-80}"
BIN="$CARGO_TARGET_DIR/release"
DATA="$RSDEEP_HOME/data"
mkdir -p "$DEMO"
started=$(date +%s)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    DEVICE=(--num_gpus 2)
    say "GPUs found: training on 2 GPUs"
else
    DEVICE=(--device cpu --num_procs 2)
    say "no GPU found: training on 2 CPU ranks (TCP ring collectives)"
fi

say "1/6 data: corpus, chat data, Qwen tokenizer (pinned, sha256-checked)"
scripts/fetch-data.sh
cat "$DATA/SOURCES.txt" 2>/dev/null || true

say "2/6 tokenizer: byte-level BPE, 8192 tokens, trained on the corpus"
if [ ! -f "$DEMO/tokenizer-8k/tokenizer.json" ]; then
    "$BIN/rsdeep" tokenizer train --files "$DATA/pretrain.jsonl" --vocab_size 8192 \
        --out "$DEMO/tokenizer-8k"
else
    echo "reusing $DEMO/tokenizer-8k"
fi

say "3/6 pretrain: Qwen2 (hidden 256, 4 layers, 7.1M params), ZeRO-2, $PRETRAIN_STEPS steps"
rm -rf "$DEMO/pretrain"
"$BIN/rsdeep" "${DEVICE[@]}" --master_port 0 configs/pretrain.json \
    --tokenizer_name "$DEMO/tokenizer-8k" --train_files "$DATA/pretrain.jsonl" \
    --output_dir "$DEMO/pretrain" --max_steps "$PRETRAIN_STEPS" --save_steps "$PRETRAIN_STEPS" \
    --logging_steps 10 --warmup_steps 10

say "4/6 SFT on the chat data, ZeRO-3, $SFT_STEPS steps"
rm -rf "$DEMO/sft"
"$BIN/rsdeep" "${DEVICE[@]}" --master_port 0 configs/sft.json \
    --model_name_or_path "$DEMO/pretrain" --tokenizer_name "$DEMO/tokenizer-8k" \
    --train_files "$DATA/sft.jsonl" --output_dir "$DEMO/sft" --max_steps "$SFT_STEPS" \
    --save_steps "$SFT_STEPS" --logging_steps 5 --max_seq_length 256

say "5/6 LoRA (r 16, all linear layers, lr 2e-3) on the SFT model, ZeRO-1, $LORA_STEPS steps"
# configs/lora.json uses seed 34, so the LoRA stage does not replay the SFT stage's batches
# (seed 12). Every 40th chat (70 of 2800, spread over the file's topics) is held out: the
# eval loss on that fixed set (every 10 steps) shows the learning without the
# batch-to-batch noise of the training loss.
rm -rf "$DEMO/lora"
awk 'NR % 40 != 0' "$DATA/sft.jsonl" > "$DEMO/lora-train.jsonl"
awk 'NR % 40 == 0' "$DATA/sft.jsonl" > "$DEMO/lora-eval.jsonl"
"$BIN/rsdeep" "${DEVICE[@]}" --master_port 0 configs/lora.json \
    --model_name_or_path "$DEMO/sft" --tokenizer_name "$DEMO/tokenizer-8k" \
    --train_files "$DEMO/lora-train.jsonl" --eval_files "$DEMO/lora-eval.jsonl" \
    --eval_strategy steps --eval_steps 10 --output_dir "$DEMO/lora" --max_steps "$LORA_STEPS" \
    --save_steps "$LORA_STEPS" --logging_steps 5 --max_seq_length 256

say "6/6 chat with the LoRA-tuned model"
PROMPT="${RSDEEP_DEMO_PROMPT:-你好，请介绍一下三国演义。}"
echo "user: $PROMPT"
printf 'assistant: '
"$BIN/rsdeep" generate --model "$DEMO/sft" --adapter "$DEMO/lora" --chat --prompt "$PROMPT" \
    --max_new_tokens 48 --temperature 0.7 --top_p 0.9 --seed 1

loss_trend() { # loss_trend METRICS_JSONL [KEY] -> "mean of first 3 logged -> mean of last 3"
    python3 - "$1" "${2:-loss}" <<'PY'
import json, sys
key = sys.argv[2]
rows = [json.loads(l) for l in open(sys.argv[1])]
losses = [r[key] for r in rows if key in r]
if len(losses) < 2:
    print(f"only {len(losses)} {key} value(s) logged")
else:
    n = min(3, len(losses) // 2)
    first, last = losses[:n], losses[-n:]
    print(f"{sum(first) / n:.3f} -> {sum(last) / n:.3f} (mean of first {n} -> last {n} logged)")
PY
}

elapsed=$(( $(date +%s) - started ))
say "summary ($((elapsed / 60)) min $((elapsed % 60)) s)"
printf '  %-10s train loss %s\n' pretrain "$(loss_trend "$DEMO/pretrain/metrics.jsonl")"
printf '  %-10s train loss %s\n' sft "$(loss_trend "$DEMO/sft/metrics.jsonl")"
printf '  %-10s train loss %s\n' lora "$(loss_trend "$DEMO/lora/metrics.jsonl")"
printf '  %-10s eval loss  %s\n' "" "$(loss_trend "$DEMO/lora/metrics.jsonl" eval_loss), 70 held-out chats"
printf '  outputs: %s, %s, %s (PEFT adapter)\n' "$DEMO/pretrain" "$DEMO/sft" "$DEMO/lora"
echo
echo "  Each output folder is a Hugging Face model (config.json, model.safetensors, tokenizer"
echo "  files) with checkpoint-N/ folders, metrics.jsonl, TensorBoard events in runs/ and loss.png."
echo "  Load it in Python: AutoModelForCausalLM.from_pretrained(\"$DEMO/sft\"), then"
echo "  PeftModel.from_pretrained(model, \"$DEMO/lora\") for the adapter."
echo "  Chat with it:  $BIN/rsdeep generate --model $DEMO/sft --adapter $DEMO/lora --chat --prompt '...'"
echo "  Merge it:      $BIN/rsdeep merge-lora --base $DEMO/sft --adapter $DEMO/lora --out $DEMO/merged"
