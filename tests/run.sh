#!/usr/bin/env bash
# Install everything and run the whole test suite (what CI runs):  bash tests/run.sh
# Extra arguments go to pytest, e.g.  bash tests/run.sh -k layout
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
export WANDB_MODE=offline WANDB_SILENT=true
python3 -m pytest tests -q --durations=15 "$@"
