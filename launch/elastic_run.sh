#!/usr/bin/env bash
# elastic_run.sh — run torchrun so that preemption ends in a checkpoint and a retryable exit code.
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
#        PET_MAX_RESTARTS=3         worker-group restarts before torchrun gives up
#        PET_RDZV_CONF=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3
#                                   recover from a lost worker in ~5 s and a lost node in ~7 s, not 30-45 s
#   3. runs torchrun as a child and, when this script gets SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (SIGHUP is
#      sent on as SIGTERM), forwards the first one to torchrun, which forwards it to the workers; they
#      finish the current step, save, and exit 143. Later signals are not forwarded: a signal that reaches
#      torchrun while it is already shutting down aborts its wait for the workers (measured on 2.14.1: it
#      survives one repeat, not two). Inside a Slurm job step (SLURM_STEP_ID set) nothing is forwarded by
#      default, because slurmstepd signals every process of the step, torchrun included, itself;
#   4. exits 143 (elastic_det.errors.PREEMPTED_EXIT_CODE) when it got such a signal and torchrun then
#      failed. torchrun itself exits 1, with a SignalException traceback, whenever it is stopped by a
#      signal, whatever its workers returned, and 1 reads as a permanent failure to Kubeflow's ExitCode
#      restart policy and to a Kubernetes podFailurePolicy; 143 reads as "preempted, run me again".
#      Any other exit status of torchrun is passed on unchanged: 0 done, 1 failed. torchrun reports a
#      failed worker group as 1 whatever the workers' codes, so bad input (workers exit 2) also ends
#      in 1, after --max-restarts quick retries.
#
# Environment:
#   TORCHRUN   the torchrun command (default: torchrun on PATH, or "$PYTHON -m torch.distributed.run" when
#              PYTHON is set)
#   PYTHON     the Python interpreter whose torch to use (optional)
#   ELASTIC_RUN_FORWARD  auto (forward, except inside a Slurm job step) | 1 (always) | 0 (never) [auto]
#   ELASTIC_RUN_QUIET=1  do not print the command line
set -uo pipefail

export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGUSR1,SIGUSR2}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-120}"
export PET_MAX_RESTARTS="${PET_MAX_RESTARTS:-3}"
export PET_RDZV_CONF="${PET_RDZV_CONF:-last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3}"

if [[ -n "${TORCHRUN:-}" ]]; then
  cmd=("$TORCHRUN")
elif [[ -n "${PYTHON:-}" ]]; then
  cmd=("$PYTHON" -m torch.distributed.run)
else
  cmd=(torchrun)
fi
cmd+=("$@")

case "${ELASTIC_RUN_FORWARD:-auto}" in
  1) forward_signals=1 ;;
  0) forward_signals=0 ;;
  auto) if [[ -n "${SLURM_STEP_ID:-}" ]]; then forward_signals=0; else forward_signals=1; fi ;;
  *)
    echo "elastic_run.sh: ELASTIC_RUN_FORWARD must be auto, 1 or 0" >&2
    exit 2
    ;;
esac

child=""
received=""  # the first signal this script got (the one forwarded, if forwarding)

log() { printf 'elastic_run[%d]: %s\n' "$$" "$*" >&2; }

# shellcheck disable=SC2317  # invoked from the traps below
forward() {
  local sig=$1 got=$2
  if [[ -n "$received" ]]; then
    log "got SIG$got; already stopping after SIG$received, not forwarding it"
    return
  fi
  received=$sig
  if ((!forward_signals)); then
    log "got SIG$got; torchrun got it from slurmstepd too (Slurm job step), waiting for it to stop"
  elif [[ -n "$child" ]]; then
    log "got SIG$got; forwarding SIG$sig to torchrun (pid $child)"
    kill -s "$sig" "$child" 2>/dev/null || true
  fi
}

trap 'forward TERM TERM' TERM
trap 'forward INT INT' INT
trap 'forward USR1 USR1' USR1
trap 'forward USR2 USR2' USR2
trap 'forward TERM HUP' HUP

if [[ "${ELASTIC_RUN_QUIET:-0}" != 1 ]]; then
  log "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE" \
      "PET_SHUTDOWN_TIMEOUT=$PET_SHUTDOWN_TIMEOUT PET_MAX_RESTARTS=$PET_MAX_RESTARTS" \
      "PET_RDZV_CONF=$PET_RDZV_CONF ${cmd[*]}"
fi

"${cmd[@]}" &
child=$!
if [[ -n "$received" ]] && ((forward_signals)); then  # a signal arrived before torchrun started
  kill -s "$received" "$child" 2>/dev/null || true
fi

# `wait` returns early (status > 128) whenever a trapped signal arrives; wait again until torchrun is gone.
while :; do
  rc=0
  wait "$child" || rc=$?
  if ! kill -0 "$child" 2>/dev/null; then
    break
  fi
done
if ((rc > 128)); then
  # The last wait may have been cut short by a signal just before torchrun exited: ask again for its
  # status (bash remembers it; an old bash answers 127, and then the interrupted status stands).
  rc2=0
  wait "$child" 2>/dev/null || rc2=$?
  if ((rc2 != 127)); then rc=$rc2; fi
fi

if [[ -n "$received" && $rc -ne 0 ]]; then
  log "torchrun exited $rc after SIG$received; exiting 143 (preempted: run the same command to resume)"
  exit 143
fi
exit "$rc"
