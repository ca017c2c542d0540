#!/usr/bin/env bash
# Installs what building and testing rsdeep needs, when it is missing; idempotent and
# fast (a few stat calls) when everything is already there.
#
#   - a Python venv with torch==2.11.0 (libtorch for tch 0.24, CUDA 13 wheel, also runs on
#     CPU) and the Hugging Face reference packages the parity tests compare against, plus
#     DeepSpeed (its launcher is the peer users' scripts are compared under);
#   - a `libnccl.so` symlink next to pip's `libnccl.so.2` (cudarc never dlopens `.so.2`);
#   - prints the environment lines that `make` exports (see scripts/env.sh).
#
# Everything lives under $RSDEEP_HOME (default ~/.cache/rsdeep) so a fresh clone on the same
# machine (CI) reuses it.
set -euo pipefail

RSDEEP_HOME="${RSDEEP_HOME:-$HOME/.cache/rsdeep}"
VENV="$RSDEEP_HOME/venv"
PY_REQS="torch==2.11.0 transformers==5.* peft accelerate deepspeed==0.19.8 safetensors tokenizers numpy tensorboard swanlab==0.10.3 mlflow-skinny wandb gguf bitsandbytes==0.50.2"
# Every package, dependencies included, at the version in this file.
CONSTRAINTS="$(cd "$(dirname "$0")" && pwd)/python-constraints.txt"
STAMP="$VENV/.rsdeep-reqs"
WANTED="$PY_REQS $(sha256sum "$CONSTRAINTS" | cut -d' ' -f1)"

mkdir -p "$RSDEEP_HOME"

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is not on PATH; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    python3 -m venv "$VENV"
fi

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
    echo "setup: installing $PY_REQS into $VENV (first time: ~5 GB, a few minutes)"
    # shellcheck disable=SC2086
    DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" $PY_REQS
    echo "$WANTED" > "$STAMP"
fi

# AdapterHub's `adapters` pins transformers 4.57: it gets a folder of its own that the
# bottleneck-adapter parity tests put first on PYTHONPATH, over the venv's transformers 5.
ADAPTERS_REQS="adapters==1.3.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2"
ADAPTERS_DIR="$RSDEEP_HOME/adapters-py"
if [ ! -f "$ADAPTERS_DIR/.rsdeep-reqs" ] || [ "$(cat "$ADAPTERS_DIR/.rsdeep-reqs")" != "$ADAPTERS_REQS" ]; then
    echo "setup: installing $ADAPTERS_REQS into $ADAPTERS_DIR"
    rm -rf "$ADAPTERS_DIR"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$ADAPTERS_DIR" $ADAPTERS_REQS
    echo "$ADAPTERS_REQS" > "$ADAPTERS_DIR/.rsdeep-reqs"
fi

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NCCL_SO2="$SITE/nvidia/nccl/lib/libnccl.so.2"
mkdir -p "$RSDEEP_HOME/lib"
if [ -f "$NCCL_SO2" ]; then
    ln -sfn "$NCCL_SO2" "$RSDEEP_HOME/lib/libnccl.so"
fi
echo "setup: ok ($VENV)"
