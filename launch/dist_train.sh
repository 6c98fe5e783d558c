#!/usr/bin/env bash
# dist_train.sh — train on one machine with NPROC workers under torchrun, preemption-safe.
#
# Usage: launch/dist_train.sh CONFIG NPROC [TRAIN ARGS...]
#   CONFIG      a config file, or "default" for the embedded default config
#   NPROC       workers on this machine (GPUs, or processes on CPU); "gpu" = one per visible GPU
#   TRAIN ARGS  passed to `python -m elastic_det.train`, e.g. --work-dir s3://bucket/run --cfg-options k=v
#
# Examples:
#   launch/dist_train.sh configs/bccd/fcos_tiny_bccd.yaml 8 --work-dir work_dirs/bccd
#   PYTHON=.venv/bin/python launch/dist_train.sh default 2 --cfg-options train.max_steps=100
#
# What it sets up (through launch/elastic_run.sh and the supervisor, python -m elastic_det.supervise):
#   - a pre-flight: the config, the data and the work dir are checked before torchrun starts.
#   - c10d rendezvous: `--standalone` (a store on a free loopback port, a fresh rendezvous id) by default;
#     with RDZV_ENDPOINT set, c10d on that host:port instead, so that more agents can join (NNODES=1:2).
#   - restarts: a failed worker restarts the worker group (up to MAX_RESTARTS times inside torchrun); when
#     torchrun itself fails, the supervisor starts it again as long as new checkpoints get committed. The
#     trainer resumes from the newest checkpoint by itself.
#   - signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 (and SIGHUP, as SIGTERM) sent to this script reach every
#     worker once; the workers finish the current step, save a checkpoint and stop, and this script exits
#     143. Run the same command again and training resumes from that checkpoint (`--resume auto`).
#   - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (restarts hang without it, see DESIGN.md).
#
# Exit status: 0 done; 2 bad input (config, data, checkpoint: a one-paragraph error names it; never
# retried); 3 another writer owns the work dir; 4 gave up: MAX_STALLED_ATTEMPTS torchrun attempts in a row
# committed no checkpoint; 143 stopped by a signal after the preemption checkpoint (run again to resume).
#
# Environment overrides (defaults in brackets):
#   PYTHON            Python interpreter to run torchrun with [python3]; TORCHRUN overrides the whole command
#   NNODES            number of nodes, N or MIN:MAX [1]; more than one needs RDZV_ENDPOINT
#   RDZV_ENDPOINT     host:port of the c10d rendezvous store (hosted by the agent on that host) [standalone]
#   RDZV_ID           rendezvous id shared by all agents of one job [elastic_det]
#   RDZV_CONF         rendezvous options [last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3]
#   MAX_RESTARTS      worker-group restarts inside one torchrun [3]
#   MAX_STALLED_ATTEMPTS  torchrun attempts in a row without a new checkpoint before giving up [3]
#   SHUTDOWN_TIMEOUT  seconds a worker gets after a signal to finish its step and save, before SIGKILL [120];
#                     must exceed one training step plus one checkpoint save
#   TORCHRUN_ARGS     extra torchrun flags, word-split (e.g. "--log-dir /tmp/tr --tee 3")
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

if (($# < 2)); then
  usage
fi
config=$1
nproc=$2
shift 2
case "$config" in
  -h | --help) usage ;;
esac
if ! [[ "$nproc" =~ ^([1-9][0-9]*|gpu|cpu|auto)$ ]]; then
  echo "dist_train.sh: NPROC must be a positive number (or gpu/cpu/auto), got '$nproc'" >&2
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${PYTHON:=python3}"
export PYTHON
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-120}
RDZV_CONF=${RDZV_CONF:-last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3}

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=${RDZV_ID:-elastic_det}")
elif [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)
else
  echo "dist_train.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port (the store host) and RDZV_ID" >&2
  exit 2
fi

train_args=()
if [[ "$config" != default ]]; then
  train_args+=("$config")
fi
train_args+=("$@")

extra=()
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
  read -r -a extra <<<"$TORCHRUN_ARGS"
fi

exec "$here/elastic_run.sh" \
  "--nnodes=$NNODES" \
  "--nproc-per-node=$nproc" \
  "${rdzv[@]}" \
  "--rdzv-conf=$RDZV_CONF" \
  "--max-restarts=$MAX_RESTARTS" \
  --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2 \
  "--shutdown-timeout=$SHUTDOWN_TIMEOUT" \
  ${extra[@]+"${extra[@]}"} \
  -m elastic_det.train ${train_args[@]+"${train_args[@]}"}
