#!/usr/bin/env bash
# Run one stage under torchrun, on one node or several (c10d rendezvous).
#   launch/torchrun.sh <nproc-per-node> <stage> [hydra overrides...]
# Multi-node: set NNODES, and MASTER_ADDR (a reachable address of node 0) and MASTER_PORT on every
# node; each node runs the same command. RDZV_ID names the job (default: the stage).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <nproc-per-node> <stage> [key=value ...]" >&2; exit 2
fi
NPROC=$1; STAGE=$2; shift 2
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR to node 0's address for a multi-node run}"
  exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-$STAGE}" \
    -m megatron_prune "$STAGE" "$@"
fi
exec torchrun --standalone --nproc-per-node="$NPROC" -m megatron_prune "$STAGE" "$@"
