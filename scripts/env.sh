# Sourced by the Makefile and scripts: the environment rsdeep builds and runs with.
# tch finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH); cudarc finds NCCL
# through the libnccl.so symlink made by scripts/setup.sh.
export RSDEEP_HOME="${RSDEEP_HOME:-$HOME/.cache/rsdeep}"
export VIRTUAL_ENV="$RSDEEP_HOME/venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$RSDEEP_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$RSDEEP_HOME/target}"
export RSDEEP_PYTHON="$VIRTUAL_ENV/bin/python"
# AdapterHub's adapters with its transformers 4.57, for the bottleneck parity tests.
export RSDEEP_ADAPTERS_PYTHONPATH="$RSDEEP_HOME/adapters-py"
# Tests never reach the Hugging Face Hub: on CPUs with AVX512-BF16, importing bitsandbytes
# (which transformers' Trainer does) asks the Hub for a CPU kernel, which hangs where the
# Hub's address is dropped rather than refused.
export HF_HUB_OFFLINE=1
