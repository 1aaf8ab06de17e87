#!/usr/bin/env bash
# Trainer processes on this node under torchrun (c10d rendezvous), all from one config:
#   launch/torchrun.sh CONFIG [section.key=value ...]
# One node: NPROC_PER_NODE processes (default: one per GPU, or 2 on CPU). Several nodes: run it on every trainer node
# with the same NNODES, RDZV_ENDPOINT=<head node>:<port> and RDZV_ID (launch/slurm.sbatch does this for SLURM).
# Rollout engines: started by the trainer itself unless the config lists running ones in rollout.addresses; on GPUs
# they need GPUs of their own on the first node, so leave some there (NPROC_PER_NODE below the GPU count; see
# docs/rollout.md, "Placement"), or run colocated on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
# On SIGTERM (SLURM pre-emption, a scheduler's stop) torchrun forwards it to the trainers, which finish their step
# and save, and SIGKILLs those still running after this many seconds (torch's default, 30 s, can cut a save short).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-170}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29500}
RDZV_ID=${RDZV_ID:-megaapo-$$}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
  -m megaapo.train "$@"
