"""The supervisor (elastic_det.supervise, issue 8): the one place that decides whether to start torchrun again.

- Units (fast): the supervisor runs a stand-in COMMAND (a small Python script that commits fake checkpoint
  manifests, exits as told, reports final codes through ELASTIC_DET_EXIT_DIR, records the signals it gets):
  exit classification, stall counting and the give-up code, progress resetting the count, a final code
  stopping the command, signals forwarded once to the command's own process group, the attempt log (local
  and S3), the torch floor, and the worker side of the exit-status channel.
- End to end (slow), under the real supervisor and the real torchrun:
  - the long life: two supervised agents as two nodes; a seeded chaos loop plays the scheduler with
    preemptions (SIGTERM to a node's supervisor, restarted after its 143) and hard kills (a worker, or a
    whole node's process tree, restarted), several of them of the node hosting the rendezvous store; the
    run finishes at max_steps, every resume is at a committed step, and both nodes end 0;
  - giving up with exit 4 when no attempt can commit (the S3 endpoint goes away after the first commit);
  - a bad config: exit 2 from the pre-flight, torchrun started zero times;
  - a bad input only the workers find (a corrupt --resume checkpoint): exit 2 through the exit dir, and
    torchrun did not restart its workers.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    PYTHON,
    REPO,
    alive,
    base_env,
    children,
    cmdline,
    events,
    fast_overrides,
    free_port,
    is_torchrun,
    read_jsonl,
    torchrun_cmd,
    train_steps,
    wait_for,
)

from elastic_det.checkpoint.manifest import Manifest
from elastic_det.errors import NO_PROGRESS_EXIT_CODE, PREEMPTED_EXIT_CODE
from elastic_det.launch import exit_status
from elastic_det.launch.checks import (
    TORCH_FLOOR,
    TORCHVISION_FLOOR,
    UnsupportedTorchError,
    check_torch,
    committed_step,
    find_train_args,
    progress_store,
)
from elastic_det.launch.supervisor import Options, Supervisor, default_stop_timeout, parse_cli
from elastic_det.launch.torchrun import without_teardown
from elastic_det.storage import WorkDir

ELASTIC_RUN = REPO / "launch" / "elastic_run.sh"

# ----------------------------------------------------------------------------------------------------------
# A stand-in COMMAND. Its plan (plan.json in its dir) has one entry per attempt (the last one repeats):
#   clear: true   delete the work dir's checkpoints first
#   commit: N     commit step N in the work dir: a data object and its manifest (what discovery lists)
#   final: N      report final exit code N through ELASTIC_DET_EXIT_DIR (as train.py does) and wait
#   wait: true    wait for a signal, "save" for 0.3 s (recording any further signal), then exit
#   deaf: true    ignore SIGTERM (the supervisor must SIGKILL it)
#   exit: N       the exit code [0; with final: N]
# It appends "pid pgid" to runs.txt when it starts and each signal's name to signals.txt.

STANDIN = """
import json, os, shutil, signal, sys, time
here, work, repo = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, repo)
from pathlib import Path
from elastic_det.launch import exit_status  # a light import: no torch, so the stand-in starts fast
plan = json.load(open(os.path.join(here, "plan.json")))
with open(os.path.join(here, "runs.txt"), "a") as f:
    f.write(f"{os.getpid()} {os.getpgid(0)}\\n")
with open(os.path.join(here, "launch.txt"), "a") as f:
    f.write(os.environ.get("ELASTIC_DET_LAUNCH_TIME", "-") + "\\n")
n = len(open(os.path.join(here, "runs.txt")).read().split()) // 2 - 1
step = plan[min(n, len(plan) - 1)]
got = []

def handler(signum, frame):
    got.append(signum)
    with open(os.path.join(here, "signals.txt"), "a") as f:
        f.write(signal.Signals(signum).name + "\\n")

for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, handler)
if step.get("deaf"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if step.get("clear"):
    shutil.rmtree(os.path.join(work, "checkpoints"))
if "commit" in step:
    d = os.path.join(work, "checkpoints", "step-%08d" % step["commit"])
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "state-0.pt"), "wb").write(b"x")
    open(os.path.join(d, "manifest.json"), "w").write(step["manifest"])
if "final" in step:
    exit_status.write(Path(os.environ[exit_status.EXIT_DIR_ENV]), "0", step["final"], "bad input: culprit.yaml")
    step.setdefault("exit", step["final"])
if step.get("wait") or "final" in step:
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
sys.exit(step.get("exit", 0))
"""


class Standin:
    def __init__(self, tmp_path: Path, plan: list[dict]):
        self.dir = tmp_path / "standin"
        self.dir.mkdir()
        self.work = tmp_path / "work"
        for entry in plan:
            if "commit" in entry:
                entry["manifest"] = Manifest(step=entry["commit"], data="state-0.pt", size=1, sha256="0" * 64).to_json()
        (self.dir / "plan.json").write_text(json.dumps(plan))
        (self.dir / "standin.py").write_text(STANDIN)
        self.command = [PYTHON, str(self.dir / "standin.py"), str(self.dir), str(self.work), str(REPO)]

    def runs(self) -> list[tuple[int, int]]:
        path = self.dir / "runs.txt"
        words = path.read_text().split() if path.exists() else []
        return [(int(words[i]), int(words[i + 1])) for i in range(0, len(words), 2)]

    def signals(self) -> list[str]:
        path = self.dir / "signals.txt"
        return path.read_text().split() if path.exists() else []


def supervise_in_process(standin: Standin, **options) -> tuple[int, list[dict]]:
    options.setdefault("backoff_s", 0.05)
    options.setdefault("poll_s", 0.05)
    supervisor = Supervisor(Options(work_dir=str(standin.work), **options), standin.command)
    code = supervisor.run()
    return code, attempt_log(standin.work)


def attempt_log(work_dir: Path) -> list[dict]:
    records = []
    for path in sorted((work_dir / "supervisor").glob("*.jsonl")):
        records += read_jsonl(path)
    return records


def ends(records: list[dict]) -> list[tuple]:
    return [(r["exit_code"], r["committed_step"], r["steps_gained"], r["decision"]) for r in records
            if r["event"] == "attempt_end"]


# ----------------------------------------------------------------------------------------------------------
# Exit classification, stall counting, giving up


@pytest.mark.parametrize("code, decision", [(0, "done"), (2, "final"), (3, "final")])
def test_done_and_final_codes_end_the_first_attempt(tmp_path, code, decision):
    standin = Standin(tmp_path, [{"commit": 4, "exit": code}])
    result, log = supervise_in_process(standin)
    assert result == code
    assert ends(log) == [(code, 4, 4, decision)]
    assert len(standin.runs()) == 1


@pytest.mark.parametrize("code", [1, 75, 143, 137])
def test_gives_up_after_k_attempts_in_a_row_without_a_commit(tmp_path, capfd, code):
    standin = Standin(tmp_path, [{"exit": code}])
    result, log = supervise_in_process(standin, max_stalled_attempts=3)
    assert result == NO_PROGRESS_EXIT_CODE == 4
    assert ends(log) == [(code, 0, 0, "retry"), (code, 0, 0, "retry"), (code, 0, 0, "give_up")]
    assert [r["attempt"] for r in log if r["event"] == "attempt_start"] == [1, 2, 3]
    err = capfd.readouterr().err
    assert f"3 attempts in a row committed no new checkpoint to {standin.work}" in err
    assert f"the last one exited {code}" in err


def test_min_stall_seconds_keeps_retrying_until_that_long_without_progress(tmp_path):
    """A rendezvous host being replaced makes every attempt fail fast: K attempts alone must not end the job."""
    standin = Standin(tmp_path, [{"exit": 1}])
    start = time.monotonic()
    result, log = supervise_in_process(standin, max_stalled_attempts=2, min_stall_s=1.5)
    assert result == NO_PROGRESS_EXIT_CODE
    assert time.monotonic() - start >= 1.5
    decisions = [d for *_, d in ends(log)]
    assert len(decisions) > 2 and decisions[-1] == "give_up" and set(decisions[:-1]) == {"retry"}


def test_the_first_attempt_counts_from_the_launch_later_ones_from_their_own_start(tmp_path, monkeypatch):
    """ELASTIC_DET_LAUNCH_TIME for the goodput ledger: the launcher's value (else the supervisor's start)
    for the first attempt, so that the pre-flight counts as start-up; each retry's own start after that."""
    standin = Standin(tmp_path, [{"exit": 1}, {"exit": 1}, {"exit": 0}])
    monkeypatch.setenv("ELASTIC_DET_LAUNCH_TIME", "1700000000.5")
    before = time.time()
    assert supervise_in_process(standin)[0] == 0
    first, *later = [float(v) for v in (standin.dir / "launch.txt").read_text().split()]
    assert first == 1700000000.5 and len(later) == 2 and all(before <= t <= time.time() for t in later)
    monkeypatch.delenv("ELASTIC_DET_LAUNCH_TIME")
    (standin.dir / "launch.txt").unlink()
    (standin.dir / "runs.txt").unlink()
    assert supervise_in_process(standin)[0] == 0
    first, *later = [float(v) for v in (standin.dir / "launch.txt").read_text().split()]
    assert first < before <= later[0]  # this (test) process's start, before the test began


def test_progress_resets_the_stall_count(tmp_path):
    """Five failures in a row are retried while each one commits; then K=2 without a commit give up."""
    plan = [{"commit": 2, "exit": 1}, {"commit": 4, "exit": 143}, {"commit": 6, "exit": 75},
            {"commit": 8, "exit": 1}, {"commit": 10, "exit": 137}, {"exit": 1}]
    standin = Standin(tmp_path, plan)
    result, log = supervise_in_process(standin, max_stalled_attempts=2)
    assert result == 4
    assert ends(log) == [(1, 2, 2, "retry"), (143, 4, 2, "retry"), (75, 6, 2, "retry"), (1, 8, 2, "retry"),
                         (137, 10, 2, "retry"), (1, 10, 0, "retry"), (1, 10, 0, "give_up")]


def test_progress_is_a_step_newer_than_any_seen_before(tmp_path):
    """A step that is not newer than one already seen (e.g. after the newest was deleted) is no progress."""
    plan = [{"commit": 6, "exit": 1}, {"clear": True, "commit": 4, "exit": 1}, {"commit": 5, "exit": 1},
            {"commit": 5, "exit": 1}]
    standin = Standin(tmp_path, plan)
    result, log = supervise_in_process(standin, max_stalled_attempts=3)
    assert result == 4
    assert ends(log) == [(1, 6, 6, "retry"), (1, 4, -2, "retry"), (1, 5, 1, "retry"), (1, 5, 0, "give_up")]


def test_a_final_code_reported_by_a_worker_stops_the_command_at_once(tmp_path, capfd):
    standin = Standin(tmp_path, [{"final": 2}])
    start = time.monotonic()
    result, log = supervise_in_process(standin, stop_timeout_s=30)
    assert result == 2
    assert time.monotonic() - start < 20  # not the stand-in's 60 s hang, not the stop timeout
    assert ends(log) == [(2, 0, 0, "final")]
    ((pid, _),) = standin.runs()
    assert not alive(pid)
    assert standin.signals() == ["SIGTERM"]
    err = capfd.readouterr().err
    assert err.count("bad input: culprit.yaml") == 1
    assert "final exit code 2" in err


def test_a_command_deaf_to_sigterm_is_killed_after_the_stop_timeout(tmp_path):
    standin = Standin(tmp_path, [{"final": 3, "deaf": True}])
    start = time.monotonic()
    result, log = supervise_in_process(standin, stop_timeout_s=1.0)
    assert result == 3
    assert 1.0 <= time.monotonic() - start < 20
    assert ends(log) == [(128 + signal.SIGKILL, 0, 0, "final")]


def test_the_exit_status_channel_from_the_worker_side(tmp_path):
    """report(): nothing for retryable codes or without a supervisor; a final code is written atomically,
    then the worker waits for the stop signal (so torchrun never sees it fail and never restarts it)."""
    script = ("import sys, time; from elastic_det.launch import exit_status; t = time.monotonic(); "
              "exit_status.report(int(sys.argv[1]), 'bad: x'); print(round(time.monotonic() - t, 2))")
    env = base_env(tmp_path, **{exit_status.EXIT_DIR_ENV: str(tmp_path), "RANK": "3"})
    quick = subprocess.run([PYTHON, "-c", script, "75"], env=env, capture_output=True, text=True, timeout=60)
    assert quick.returncode == 0 and not list(tmp_path.glob("rank-*"))
    proc = subprocess.Popen([PYTHON, "-c", script, "2"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "rank-3.json").exists(), 60, "the exit-status file")
        assert exit_status.read_final(tmp_path) == (2, "bad: x")
        assert proc.poll() is None  # lingering until told to stop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert float(proc.stdout.read()) < exit_status.LINGER_S
    finally:
        proc.kill()
        proc.wait()
    (tmp_path / "rank-0.json").write_text("{not json")  # a torn or foreign file is skipped
    assert exit_status.read_final(tmp_path) == (2, "bad: x")


# ----------------------------------------------------------------------------------------------------------
# Signals: the supervisor as a process, the stand-in as its COMMAND


def start_supervisor(procs, standin: Standin, tmp_path: Path, *options: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "supervisor.log"
    cmd = [PYTHON, "-m", "elastic_det.supervise", "--work-dir", str(standin.work), "--backoff", "0.05",
           *options, "--", *standin.command]
    return procs.start(cmd, base_env(tmp_path), log), log


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


@pytest.mark.parametrize("sig, forwarded", [
    (signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGTERM"), (signal.SIGHUP, "SIGTERM"),
    (signal.SIGUSR1, "SIGUSR1"), (signal.SIGUSR2, "SIGUSR2"),
])
def test_the_first_signal_is_forwarded_once_and_ends_in_143(procs, tmp_path, sig, forwarded):
    standin = Standin(tmp_path, [{"commit": 3, "wait": True, "exit": 1}])  # torchrun exits 1 after a signal
    proc, log = start_supervisor(procs, standin, tmp_path)
    wait_for(standin.runs, 60, "the command to start")
    ((pid, pgid),) = standin.runs()
    assert pgid == pid != os.getpgid(proc.pid)  # its own process group
    proc.send_signal(sig)
    wait_for(standin.signals, 10, "the forwarded signal")
    proc.send_signal(sig)  # repeated while the command "saves": not forwarded (it would abort torchrun's wait)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == PREEMPTED_EXIT_CODE, tail(log)
    assert standin.signals() == [forwarded]
    assert len(standin.runs()) == 1  # no further attempt
    assert ends(attempt_log(standin.work)) == [(1, 3, 3, "preempted")]
    assert "not forwarding it" in log.read_text()


def test_ctrl_c_to_the_whole_terminal_group_reaches_the_command_once(procs, tmp_path):
    """A terminal's Ctrl-C signals the foreground process group: the supervisor's. torchrun, in its own
    group, gets one SIGTERM from the supervisor and not the SIGINT too."""
    standin = Standin(tmp_path, [{"wait": True, "exit": 1}])
    proc, log = start_supervisor(procs, standin, tmp_path)
    wait_for(standin.runs, 60, "the command to start")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == PREEMPTED_EXIT_CODE, tail(log)
    assert standin.signals() == ["SIGTERM"]


def test_without_forwarding_the_supervisor_waits_for_the_scheduler_signalled_command(procs, tmp_path):
    """--no-forward-signals (inside a Slurm step, slurmstepd signals every process itself)."""
    standin = Standin(tmp_path, [{"wait": True, "exit": 1}])
    proc, log = start_supervisor(procs, standin, tmp_path, "--no-forward-signals")
    wait_for(standin.runs, 60, "the command to start")
    ((pid, _),) = standin.runs()
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "not forwarding" in log.read_text(), 10, "the supervisor to note the signal")
    assert standin.signals() == []
    os.kill(pid, signal.SIGUSR1)  # slurmstepd
    assert proc.wait(timeout=30) == PREEMPTED_EXIT_CODE, tail(log)
    assert standin.signals() == ["SIGUSR1"]


def test_a_killed_supervisor_leaves_no_command_behind(procs, tmp_path):
    """SIGKILL of the supervisor alone (e.g. the OOM killer): torchrun, in its own session, gets SIGTERM from
    the kernel (parent-death signal), saves and stops instead of training on unsupervised."""
    standin = Standin(tmp_path, [{"wait": True, "exit": 1}])
    proc, log = start_supervisor(procs, standin, tmp_path)
    wait_for(standin.runs, 60, "the command to start")
    ((pid, _),) = standin.runs()
    proc.kill()
    wait_for(lambda: not alive(pid), 30, "the command to stop")
    assert standin.signals()[:1] == ["SIGTERM"] and set(standin.signals()) == {"SIGTERM"}


def test_a_signal_during_the_backoff_stops_without_another_attempt(procs, tmp_path):
    standin = Standin(tmp_path, [{"exit": 1}])
    proc, log = start_supervisor(procs, standin, tmp_path, "--backoff", "60")
    wait_for(lambda: "retry" in log.read_text(), 60, "the first attempt to fail")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == PREEMPTED_EXIT_CODE, tail(log)
    assert len(standin.runs()) == 1


def test_elastic_run_retries_a_torchrun_failure_and_gives_up_without_progress(procs, tmp_path):
    """launch/elastic_run.sh execs the supervisor: torchrun's 1 is retried, never passed on as 1."""
    standin = Standin(tmp_path, [{"exit": 1}])
    fake = tmp_path / "torchrun"
    fake.write_text(f"#!/bin/sh\nexec {PYTHON} {' '.join(standin.command[1:])} \"$@\"\n")
    fake.chmod(0o755)
    env = base_env(tmp_path, TORCHRUN=str(fake), PYTHON=PYTHON, MAX_STALLED_ATTEMPTS="2",
                   SUPERVISE_ARGS=f"--backoff 0.05 --work-dir {standin.work}")
    log = tmp_path / "run.log"
    proc = procs.start([str(ELASTIC_RUN), "--standalone", "x.py"], env, log)
    assert proc.wait(timeout=60) == NO_PROGRESS_EXIT_CODE, tail(log)
    assert len(standin.runs()) == 2
    record = attempt_log(standin.work)[0]
    assert set(record) == {"event", "time", "attempt", "committed_step", "host"}  # nothing from the environment


# ----------------------------------------------------------------------------------------------------------
# Small parts


def test_find_train_args():
    args = ["cfg.yaml", "--work-dir", "w"]
    assert find_train_args(["torchrun", "--nnodes=1:2", "-m", "elastic_det.train", *args]) == args
    assert find_train_args([PYTHON, "-m", "torch.distributed.run", "--module", "elastic_det.train", *args]) == args
    assert find_train_args(["python", "-m", "elastic_det.train"]) == []
    assert find_train_args(["torchrun", "--no-python", "elastic-det-train", *args]) == args
    assert find_train_args(["torchrun", "x.py", "elastic_det.train"]) is None
    assert default_stop_timeout(["torchrun", "--shutdown-timeout", "90", "-m", "elastic_det.train"]) == 120
    assert default_stop_timeout(["torchrun", "--shutdown-timeout=10", "x.py"]) == 40


def test_cli_needs_a_command():
    opts, command = parse_cli(["--max-stalled-attempts", "5", "--no-preflight", "--", "torchrun", "--", "x"])
    assert (opts.max_stalled_attempts, opts.preflight, command) == (5, False, ["torchrun", "--", "x"])
    for argv in ([], ["--max-stalled-attempts", "2"], ["--max-stalled-attempts", "0", "--", "x"]):
        with pytest.raises(SystemExit) as e:
            parse_cli(argv)
        assert e.value.code == 2


def test_torch_floor():
    check_torch("2.12.0")
    check_torch("2.14.1+cu130")
    with pytest.raises(UnsupportedTorchError) as e:
        check_torch("2.11.0")
    assert "torch 2.11.0 is installed" in str(e.value) and ">= 2.12" in str(e.value)
    assert e.value.exit_code == 2
    deps = (REPO / "pyproject.toml").read_text()
    assert f'"torch>={TORCH_FLOOR[0]}.{TORCH_FLOOR[1]}"' in deps
    assert f'"torchvision>={TORCHVISION_FLOOR[0]}.{TORCHVISION_FLOOR[1]}"' in deps


def test_an_old_torch_stops_before_the_command(tmp_path):
    """The installed torch distribution's version is read (without importing torch): an environment whose
    first torch on the path is 2.9.1 stops before the command runs."""
    standin = Standin(tmp_path, [{"exit": 0}])
    old = tmp_path / "old-site" / "torch-2.9.1.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.1\n")
    env = base_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(old.parent), env.get("PYTHONPATH")]))
    result = subprocess.run([PYTHON, "-m", "elastic_det.supervise", "--work-dir", str(standin.work), "--",
                             *standin.command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "torch 2.9.1 is installed" in result.stderr and "torch>=2.12" in result.stderr
    assert standin.runs() == []


PREFLIGHT_PROBE = """import json, sys
from elastic_det.launch.supervisor import Supervisor, parse_cli
from elastic_det.launch.checks import check_torch, committed_step, progress_store, resolve
options, command = parse_cli(sys.argv[1:])
check_torch()
target = resolve(command, options.work_dir, options.preflight)
print(json.dumps({"step": committed_step(progress_store(target.work_dir)),
                  "loaded": sorted(m for m in ("torch", "torchvision", "aiohttp", "botocore") if m in sys.modules)}))
"""


def test_the_preflight_and_progress_check_import_neither_torch_nor_the_s3_stack(tmp_path):
    """What the supervisor does before each torchrun start stays off torch's import (seconds, and on the
    critical path of every relaunch): config, dataset indexes, work dir probe and the manifest listing."""
    work_dir, cache = tmp_path / "work", tmp_path / "cache"
    command = torchrun_cmd(1, ["--work-dir", str(work_dir), "--cfg-options", *fast_overrides(cache)])
    result = subprocess.run([PYTHON, "-c", PREFLIGHT_PROBE, "--", *command], env=base_env(cache),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"step": 0, "loaded": []}
    assert list(cache.glob("shapes-*/annotations/train.json"))  # the dataset was built (and so checked)


def test_committed_step_reads_manifests_only(tmp_path):
    store = progress_store(WorkDir(str(tmp_path)))
    assert committed_step(store) == 0
    step5, step7 = tmp_path / "checkpoints" / "step-00000005", tmp_path / "checkpoints" / "step-00000007"
    step5.mkdir(parents=True)
    step7.mkdir()
    (step7 / "state-0.pt").write_bytes(b"data, never committed")  # no manifest: killed mid-write
    (step5 / "state-0.pt").write_bytes(b"x")
    (step5 / "manifest.json").write_text(Manifest(step=5, data="state-0.pt", size=1, sha256="0" * 64).to_json())
    assert committed_step(store) == 5  # the data is not read (its sha256 is wrong)
    assert committed_step(None) is None


def test_the_attempt_log_on_s3_is_rewritten_whole(s3_bucket, tmp_path):
    standin = Standin(tmp_path, [{"exit": 1}, {"exit": 0}])
    supervisor = Supervisor(Options(work_dir=f"{s3_bucket}/run", backoff_s=0.05, poll_s=0.05), standin.command)
    assert supervisor.run() == 0
    wd = WorkDir(f"{s3_bucket}/run")
    (name,) = wd.listdir("supervisor")
    lines = [json.loads(line) for line in wd.read_bytes(f"supervisor/{name}").decode().splitlines()]
    assert [(r["event"], r.get("decision")) for r in lines] == [
        ("attempt_start", None), ("attempt_end", "retry"), ("attempt_start", None), ("attempt_end", "done")]


# ----------------------------------------------------------------------------------------------------------
# End to end: the real supervisor, the real torchrun, the real trainer

TORCHRUN_FLAGS = ["--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2", "--shutdown-timeout=30"]


def supervised(torchrun: list[str], *options: str) -> list[str]:
    return [PYTHON, "-m", "elastic_det.supervise", "--backoff", "0.5", "--max-backoff", "2", *options, "--",
            *torchrun]


def committed(work_dir: Path) -> set[int]:
    return {int(p.parent.name.split("-")[1]) for p in (work_dir / "checkpoints").glob("step-*/manifest.json")}


def listener(port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` listens on 127.0.0.1:``port`` (the agent hosting the c10d rendezvous store)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        if any(link == f"socket:[{inode}]" for inode in inodes for link in links):
            return pid
    return None


class Node:
    """One "node" of the job: its supervisor (which runs the torchrun agent, which runs the worker)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], procs, log_dir: Path):
        self.name, self.command, self.env, self.procs, self.log_dir = name, command, env, procs, log_dir
        self.starts = 0
        self.exits: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.log = self.log_dir / f"{self.name}-{self.starts}.log"
        self.proc = self.procs.start(self.command, self.env, self.log)

    def tree(self) -> list[int]:
        return [self.proc.pid, *self.procs.remember(self.proc)] if self.proc.poll() is None else []

    def workers(self) -> list[int]:
        """The processes torchrun started and, under warm start, the trainers the warm server forked for
        them (its children): a killed worker is either."""
        tree = self.tree()
        clients = [p for p in tree[1:] if "elastic_det.train" in cmdline(p) and not is_torchrun(p)]
        servers = [p for p in children(self.proc.pid) if "elastic_det.warm_start" in cmdline(p)] if tree else []
        return clients + [p for server in servers for p in children(server) if alive(p)]

    def finished(self) -> int | None:
        """The exit code once this supervisor instance has exited (recorded once)."""
        rc = self.proc.poll()
        if rc is not None and len(self.exits) < self.starts:
            self.exits.append(rc)
        return rc


N_FAULTS = 12
MAX_STEPS = 60
MAX_RESTARTS = 2


@pytest.mark.slow
@pytest.mark.timeout(1500)  # about 3 minutes on 2 idle cores; a machine shared with other work takes longer
def test_a_long_life_of_preemptions_and_hard_kills_under_the_supervisor(procs, tmp_path):
    started = time.monotonic()
    seed = int(os.environ.get("ELASTIC_DET_CHAOS_SEED", "20261201"))
    print(f"chaos seed {seed} (set ELASTIC_DET_CHAOS_SEED to replay)")
    rng = random.Random(seed)
    work_dir, cache, port = tmp_path / "work", tmp_path / "cache", free_port()
    train_args = ["--work-dir", str(work_dir), "--cfg-options",
                  *fast_overrides(cache, "model.norm=group_norm", "checkpoint.interval=2",
                                  f"train.max_steps={MAX_STEPS}")]
    torchrun = torchrun_cmd(1, train_args, max_restarts=MAX_RESTARTS, extra=TORCHRUN_FLAGS, nnodes="1:2",
                            rdzv_port=port, run_id="longlife")
    env = base_env(cache)
    nodes = [Node(name, supervised(torchrun), env, procs, tmp_path) for name in ("a", "b")]
    seen: set[int] = set()
    faults: list[tuple[str, str, bool, int]] = []  # (kind, node, hosted the store, step before the fault)
    # A mix of every kind, shuffled by the seed; every third fault at least aims at the store's host.
    kinds = ["preempt", "kill_worker", "kill_node"] * (N_FAULTS // 3)
    rng.shuffle(kinds)

    def watch() -> int:
        seen.update(committed(work_dir))
        for node in nodes:
            rc = node.finished()
            assert rc in (None, 0), f"node {node.name} exited {rc} by itself:\n{tail(node.log)}"
        steps = train_steps(work_dir)
        return max(steps, default=0)

    def host() -> Node | None:
        pids = {pid: node for node in nodes for pid in node.tree()}
        pid = listener(port, list(pids))
        return pids.get(pid)

    last = 0
    deadline = time.monotonic() + 1000
    while len(faults) < N_FAULTS:
        assert time.monotonic() < deadline, f"only {len(faults)} faults by the deadline: {faults}"
        goal = last + rng.randint(1, 3)  # progress since the last fault, then a random moment in a step
        wait_for(lambda goal=goal: watch() >= goal, 180, f"training to pass step {goal}", interval=0.05)
        assert watch() < MAX_STEPS, f"training finished after only {len(faults)} faults; lower the step gaps"
        end = time.monotonic() + rng.uniform(0, 0.4)
        wait_for(lambda end=end: watch() >= 0 and time.monotonic() >= end, 5, "the fault moment", interval=0.02)
        kind = kinds[len(faults)]
        hosting = host()
        if len(faults) % 3 == 0 and hosting is not None:
            target = hosting
        else:
            target = rng.choice(nodes)
        if kind == "kill_worker" and not target.workers():
            kind = "kill_node"  # its agent is between worker groups: lose the whole node instead
        step = watch()
        faults.append((kind, target.name, target is hosting, step))
        print(f"fault {len(faults)}: {kind} node {target.name} (store host: {target is hosting}) at step {step}")
        if kind == "preempt":  # the scheduler's SIGTERM to the node's main process
            target.proc.send_signal(signal.SIGTERM)
            rc = target.proc.wait(timeout=120)
            target.finished()
            assert rc in (PREEMPTED_EXIT_CODE, 0), f"preempted node {target.name} exited {rc}:\n{tail(target.log)}"
            if rc == 0:
                break
            target.start()
        elif kind == "kill_worker":
            os.kill(rng.choice(target.workers()), signal.SIGKILL)
        else:  # the node is lost: its whole process tree, at once
            for pid in target.tree():
                os.kill(pid, signal.SIGKILL)
            target.proc.wait(timeout=30)
            target.finished()
            target.start()
        last = step

    for node in nodes:
        try:
            node.proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {node.name} still running:\n{tail(node.log)}")
        node.finished()
        watch()
    print("faults:", faults)
    print("exits per node:", {n.name: n.exits for n in nodes})

    # The "Job" succeeded: each node's last supervisor ended 0, after the run reached max_steps.
    assert [n.exits[-1] for n in nodes] == [0, 0], [tail(n.log) for n in nodes]
    assert (work_dir / "checkpoints" / f"step-{MAX_STEPS:08d}" / "manifest.json").exists()
    assert events(work_dir, "done") and events(work_dir, "done")[-1]["step"] == MAX_STEPS
    # The faults: enough, of every kind, several of the store's host.
    assert len(faults) >= N_FAULTS
    assert {k for k, *_ in faults} == {"preempt", "kill_worker", "kill_node"}
    assert sum(1 for _, _, hosted, _ in faults if hosted) >= 3
    # Every resume at a committed step; more restarts than any one torchrun's budget.
    seen.update(e["step"] for e in events(work_dir, "checkpoint"))
    resumes = events(work_dir, "resume")
    assert resumes and all(r["step"] in seen for r in resumes), (resumes, sorted(seen))
    assert len(resumes) > MAX_RESTARTS
    attempts = [r for r in attempt_log(work_dir) if r["event"] == "attempt_start"]
    assert len(attempts) > MAX_RESTARTS
    assert sum(n.starts for n in nodes) > 2
    # Every attempt's training process was forked ready by its node's warm server.
    starts = [r for r in read_jsonl(work_dir / "ledger.jsonl") if r.get("kind") == "process_start"]
    assert len(starts) > MAX_RESTARTS and all(r["warm_start"] for r in starts), starts
    print(f"{len(resumes)} resumes, {len(attempts)} supervised torchrun attempts, "
          f"{sum(n.starts for n in nodes)} supervisor starts, {time.monotonic() - started:.0f} s")


MARKER = """import os, sys
with open(sys.argv[1], "a") as f:
    f.write("started\\n")
os.execv(sys.argv[2], sys.argv[2:])
"""


@pytest.mark.parametrize("bad, culprit", [("train.max_stepz=3", "max_stepz"),
                                          ("data.type=voc", "data.root")])
def test_bad_input_stops_in_the_preflight_and_torchrun_never_starts(procs, tmp_path, bad, culprit):
    work_dir, cache = tmp_path / "work", tmp_path / "cache"
    marker_py, marker = tmp_path / "marker.py", tmp_path / "torchrun-started"
    marker_py.write_text(MARKER)
    torchrun = torchrun_cmd(1, ["--work-dir", str(work_dir), "--cfg-options", *fast_overrides(cache, bad)],
                            max_restarts=3, extra=TORCHRUN_FLAGS)
    log = tmp_path / "supervisor.log"
    proc = procs.start(supervised([PYTHON, str(marker_py), str(marker), *torchrun]), base_env(cache), log)
    assert proc.wait(timeout=180) == 2, tail(log)
    assert not marker.exists()  # torchrun was started zero times
    assert culprit in log.read_text()
    records = attempt_log(work_dir)
    assert [(r["event"], r["exit_code"], r["decision"]) for r in records] == [("preflight", 2, "final")]


@pytest.mark.slow
def test_bad_input_found_by_the_workers_stops_torchrun_without_a_restart(procs, tmp_path):
    """A corrupt --resume checkpoint: every worker reports exit 2 through the exit dir; the supervisor
    stops torchrun before it restarts the workers (it has --max-restarts 3) and exits 2 at once."""
    work_dir, cache, torchrun_logs = tmp_path / "work", tmp_path / "cache", tmp_path / "torchrun-logs"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"this is not a checkpoint")
    train_args = ["--work-dir", str(work_dir), "--resume", str(broken), "--cfg-options", *fast_overrides(cache)]
    torchrun = torchrun_cmd(2, train_args, max_restarts=3,
                            extra=[*TORCHRUN_FLAGS, "--log-dir", str(torchrun_logs)])
    log = tmp_path / "supervisor.log"
    proc = procs.start(supervised(torchrun), base_env(cache), log)
    assert proc.wait(timeout=300) == 2, tail(log)
    text = log.read_text()
    assert text.count("a worker stopped with final exit code 2") == 1, tail(log)
    assert "broken.pt" in text
    assert ends(attempt_log(work_dir)) == [(1, 0, 0, "final")]  # torchrun: 1 after the supervisor's SIGTERM
    # torchrun keeps one attempt_<restart count> log dir per worker group it started: only the first.
    assert sorted(p.name for p in torchrun_logs.glob("*/attempt_*")) == ["attempt_0"]


@pytest.mark.slow
def test_the_supervisor_gives_up_when_no_attempt_can_commit(procs, tmp_path):
    """The S3 endpoint goes away after the first commit: saves, probes and listings fail as outages
    (retryable), so attempts go on failing without a new commit, and the supervisor gives up with 4."""
    from s3 import MotoServer, s3_env

    cache = tmp_path / "cache"
    server = MotoServer.start()
    try:
        bucket = server.create_bucket()
        work = f"s3://{bucket}/run"
        train_args = ["--work-dir", work, "--cfg-options",
                      *fast_overrides(cache, "checkpoint.interval=2", "train.max_steps=1000")]
        torchrun = torchrun_cmd(1, train_args, max_restarts=0, extra=TORCHRUN_FLAGS)
        log = tmp_path / "supervisor.log"
        proc = procs.start(supervised(torchrun, "--max-stalled-attempts", "2"),
                           base_env(cache, **s3_env(server.endpoint)), log)
        client = server.client()

        def first_commit() -> bool:
            listing = client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/")
            return any(o["Key"].endswith("/manifest.json") for o in listing.get("Contents", []))

        wait_for(lambda: proc.poll() is not None or first_commit(), 300, "the first commit", interval=0.2)
        assert proc.poll() is None, tail(log)
        server.stop()  # the endpoint is gone: connection refused from now on
        assert proc.wait(timeout=600) == NO_PROGRESS_EXIT_CODE, tail(log)
    finally:
        server.stop()
    text = log.read_text()
    assert f"giving up: 2 attempts in a row committed no new checkpoint to {work}" in text
    assert "attempt 2 ended" in text and "attempt 3" not in text
    assert "warning: cannot write the attempt log" in text  # the log lives in the lost bucket too


def test_torchrun_of_this_interpreter_runs_without_its_teardown(tmp_path, monkeypatch):
    """Only torchrun's own console script for this Python is replaced; a stand-in or another Python's is
    run as given."""
    entry = "import sys\nfrom torch.distributed.run import main\nsys.exit(main())\n"
    scripts = {"ours": f"#!{PYTHON}\n{entry}", "foreign": f"#!/usr/bin/env python3\n{entry}",
               "standin": f"#!{PYTHON}\nimport sys\nprint(sys.argv)\n"}
    for name, text in scripts.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "torchrun").write_text(text)
        (tmp_path / name / "torchrun").chmod(0o755)
    ours, foreign, standin = (tmp_path / name / "torchrun" for name in scripts)
    args = ["--nproc-per-node", "2", "-m", "elastic_det.train"]
    wrapped = [PYTHON, "-m", "elastic_det.torchrun", *args]
    assert without_teardown([str(ours), *args]) == wrapped
    assert without_teardown([str(foreign), *args]) == [str(foreign), *args]
    assert without_teardown([str(standin), *args]) == [str(standin), *args]
    assert without_teardown([PYTHON, "-m", "torch.distributed.run", *args]) == wrapped
    assert without_teardown(["/bin/sh", "-c", "torchrun"]) == ["/bin/sh", "-c", "torchrun"]
    monkeypatch.setenv("PATH", str(ours.parent))
    assert without_teardown(["torchrun", *args]) == wrapped


WORKER = "import sys; print('worker ran', flush=True); sys.exit(int(sys.argv[1]))"


@pytest.mark.parametrize("worker_exit", [0, 3])
def test_elastic_det_torchrun_exits_as_torchrun_does(tmp_path, worker_exit):
    """Same exit status and the same failure report as torch.distributed.run, for a worker that succeeds
    and one that fails (torchrun raises ChildFailedError: exit 1 and its traceback)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    results = {}
    for module in ("torch.distributed.run", "elastic_det.torchrun"):
        cmd = [PYTHON, "-m", module, "--standalone", "--nproc-per-node=1", "--monitor-interval=0.1",
               str(worker), str(worker_exit)]
        results[module] = subprocess.run(cmd, env=base_env(tmp_path), capture_output=True, text=True, timeout=120)
    plain, ours = results.values()
    assert ours.returncode == plain.returncode == (0 if worker_exit == 0 else 1), ours.stderr
    assert "worker ran" in ours.stdout
    assert ("ChildFailedError" in ours.stderr) == ("ChildFailedError" in plain.stderr) == (worker_exit != 0)
