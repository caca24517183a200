#!/usr/bin/env bash
# One machine, all its GPUs (or its CPU): one process sees every local device; no distributed setup.
#
#   launch/single_node.sh configs/mae_vitb.py runs/mae_vitb --config.data.path=DATA/femur/1.0.0
#   CUDA_VISIBLE_DEVICES=0,1 launch/single_node.sh ...        # a subset of the GPUs
#
# The mesh uses every visible device (config.mesh: data=-1, fsdp=1; set --config.mesh.fsdp=N to
# shard parameters N ways). Ctrl-C or SIGTERM saves a checkpoint; rerunning the command resumes.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CONFIG=$1 WORKDIR=$2; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "${PYTHON:-python}" -m afm_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
