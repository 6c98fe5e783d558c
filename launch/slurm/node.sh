#!/usr/bin/env bash
# node.sh — one Slurm task of train.sbatch: this node's torchrun agent, under the supervisor.
#
# Usage (train.sbatch runs it through srun, one task per node):
#   launch/slurm/node.sh RDZV_CONF [TORCHRUN ARGS...] -m elastic_det.train [TRAIN ARGS...]
#
# It tells torchrun explicitly whether this agent hosts the c10d rendezvous store: `is_host=1` on the
# first node of the job step (SLURM_NODEID 0, the node train.sbatch names in --rdzv-endpoint), `is_host=0`
# everywhere else, and `is_host=0` on every node when RDZV_EXTERNAL=1 (train.sbatch with STORE_HOST: the
# store runs on a host outside the job). Without it torchrun guesses by matching the endpoint's host name against this machine's
# names and addresses, which fails on multi-homed nodes (the name resolves to an address of another
# interface): no agent hosts the store, or two try to.
set -uo pipefail

if (($# < 1)); then
  echo "node.sh: usage: node.sh RDZV_CONF [TORCHRUN ARGS...]" >&2
  exit 2
fi
rdzv_conf=$1
shift

if [[ -z "${SLURM_NODEID:-}" ]]; then
  echo "node.sh: SLURM_NODEID is not set; run it through srun (train.sbatch does)" >&2
  exit 2
fi
if [[ "$SLURM_NODEID" == 0 && "${RDZV_EXTERNAL:-0}" != 1 ]]; then is_host=1; else is_host=0; fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "$here/../elastic_run.sh" "--rdzv-conf=$rdzv_conf,is_host=$is_host" "$@"
