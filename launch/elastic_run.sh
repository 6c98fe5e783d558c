#!/usr/bin/env bash
# elastic_run.sh — run torchrun under the elastic_det supervisor, with the settings every agent needs.
#
# Usage: launch/elastic_run.sh [TORCHRUN ARGS...] -m elastic_det.train [TRAIN ARGS...]
#
# Every launcher in launch/ (dist_train.sh, slurm/train.sbatch, the Kubernetes manifests) and the Docker
# image's ENTRYPOINT go through this script. It:
#   1. exports TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (with the agent's shared store, restarted workers hang
#      in init_process_group and a joining agent can deadlock the job; see DESIGN.md "Platform facts");
#   2. gives torchrun defaults through its PET_* environment variables (an explicit flag still wins):
#        PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGUSR1,SIGUSR2  forward Slurm's USR1/USR2 too, not only TERM
#        PET_SHUTDOWN_TIMEOUT=120   seconds a worker gets to finish its step and save before SIGKILL
#        PET_MAX_RESTARTS=3         worker-group restarts inside one torchrun (fast, in-place recovery)
#        PET_RDZV_CONF=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3
#                                   recover from a lost worker in ~5 s and a lost node in ~7 s, not 30-45 s
#      (--signals-to-handle needs torch >= 2.10, --shutdown-timeout torch >= 2.12: the supervisor checks);
#   3. execs `python -m elastic_det.supervise -- TORCHRUN...` (see docs/elastic.md, "Supervisor"), which
#        - checks the config, the data and the work dir before torchrun ever starts (bad input: exit 2);
#        - runs torchrun in its own process group, and starts it again while the newest committed
#          checkpoint step advances; after MAX_STALLED_ATTEMPTS attempts in a row without a new checkpoint
#          it gives up (exit 4);
#        - stops torchrun at once when a worker reports bad input (exit 2) or another writer owning the
#          work dir (exit 3): torchrun never retries those;
#        - forwards the first SIGTERM/SIGINT/SIGHUP (as SIGTERM) or SIGUSR1/SIGUSR2 to torchrun, which
#          forwards it to the workers; they finish the step, save, and stop; then it exits 143 (preempted:
#          run the same command again to resume). Later signals are not forwarded (a repeated signal aborts
#          torchrun's wait for its workers). Inside a Slurm job step (SLURM_STEP_ID set) nothing is
#          forwarded by default, because slurmstepd signals every process of the step, torchrun included;
#        - logs every attempt to WORK_DIR/supervisor/<host>-<pid>.jsonl.
#
# Exit status: 0 done; 2 bad input; 3 another writer owns the work dir; 4 no progress, gave up;
# 143 stopped by a signal after the checkpoint (run again to resume).
#
# Environment:
#   PYTHON     the Python interpreter that runs the supervisor (elastic_det and torch installed) [python3]
#   TORCHRUN   the torchrun command (default: torchrun on PATH, or "$PYTHON -m torch.distributed.run" when
#              PYTHON is set)
#   MAX_STALLED_ATTEMPTS  attempts in a row without a new checkpoint before giving up [3]
#   MIN_STALL_SECONDS     ... and only when the last new checkpoint (or the start) is this long ago [0]
#   SUPERVISE_ARGS        more supervisor options, word-split (e.g. "--backoff 5 --no-preflight")
#   ELASTIC_RUN_FORWARD   auto (forward, except inside a Slurm job step) | 1 (always) | 0 (never) [auto]
#   ELASTIC_RUN_QUIET=1   do not print the settings and the command line
set -uo pipefail

export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGUSR1,SIGUSR2}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-120}"
export PET_MAX_RESTARTS="${PET_MAX_RESTARTS:-3}"
export PET_RDZV_CONF="${PET_RDZV_CONF:-last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3}"

python=${PYTHON:-python3}
if [[ -n "${TORCHRUN:-}" ]]; then
  cmd=("$TORCHRUN")
elif [[ -n "${PYTHON:-}" ]]; then
  cmd=("$PYTHON" -m torch.distributed.run)
else
  cmd=(torchrun)
fi
cmd+=("$@")

supervise=(--max-stalled-attempts "${MAX_STALLED_ATTEMPTS:-3}" --min-stall-seconds "${MIN_STALL_SECONDS:-0}")
case "${ELASTIC_RUN_FORWARD:-auto}" in
  1) ;;
  0) supervise+=(--no-forward-signals) ;;
  auto)
    if [[ -n "${SLURM_STEP_ID:-}" ]]; then
      supervise+=(--no-forward-signals)
    fi
    ;;
  *)
    echo "elastic_run.sh: ELASTIC_RUN_FORWARD must be auto, 1 or 0" >&2
    exit 2
    ;;
esac
if [[ -n "${SUPERVISE_ARGS:-}" ]]; then
  read -r -a extra <<<"$SUPERVISE_ARGS"
  supervise+=(${extra[@]+"${extra[@]}"})
fi

if [[ "${ELASTIC_RUN_QUIET:-0}" != 1 ]]; then
  printf 'elastic_run[%d]: %s\n' "$$" "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE \
PET_SHUTDOWN_TIMEOUT=$PET_SHUTDOWN_TIMEOUT PET_MAX_RESTARTS=$PET_MAX_RESTARTS PET_RDZV_CONF=$PET_RDZV_CONF \
$python -m elastic_det.supervise ${supervise[*]} -- ${cmd[*]}" >&2
fi

exec "$python" -m elastic_det.supervise "${supervise[@]}" -- "${cmd[@]}"
