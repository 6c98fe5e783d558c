"""Warm start (elastic_det/warm_start.py): a real server process (``python -m elastic_det.warm_start``, which
imports torch and the trainer) and real client processes. What a worker's client passes over (arguments,
environment, directory, stdio), what comes back (exit codes, signals), and that no process is left behind
when either side dies."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, alive, base_env, children, cmdline, events, fast_overrides, read_jsonl, train_steps, wait_for

from elastic_det.launch.warm_server import start_server
from elastic_det.launch.warm_wire import SERVER_PID_ENV, SOCKET_ENV

TESTS = Path(__file__).resolve().parent
CLIENT = ("import sys; from elastic_det.launch.warm_client import handoff; "
          "code = handoff(sys.argv[1], sys.argv[2:], extra_path=" + repr(str(TESTS)) + "); "
          "print('no warm server' if code is None else '', file=sys.stderr, flush=True); "
          "sys.exit(99 if code is None else code)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One warm server for the module, ready (its socket exists), stopped by PID at the end."""
    directory = tmp_path_factory.mktemp("warm")
    # a block-buffered stdout, as the supervisor's usually is (its output goes to a file or a pipe)
    plain = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc, env = start_server(str(directory), env=plain)
    try:
        wait_for(lambda: os.path.exists(env[SOCKET_ENV]) or proc.poll() is not None, 120, "the warm server")
        assert proc.poll() is None, "the warm server exited while importing"
        yield proc, env
    finally:
        proc.terminate()
        proc.wait(30)


def client(env: dict[str, str], target: str, *args: str, cwd: Path = REPO, **popen) -> subprocess.Popen:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", CLIENT, target, *args], env=full, cwd=cwd,
                            start_new_session=True, **popen)


def test_the_child_gets_the_clients_arguments_environment_directory_and_stdio(server, tmp_path):
    _, env = server
    started = time.time()
    proc = client({**env, "WARM_TEST_MARKER": "from the client"}, "warm_targets:report", "7", "--flag",
                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err
    got = json.loads(out)
    assert got["argv"] == ["7", "--flag"] and got["cwd"] == str(tmp_path) and got["marker"] == "from the client"
    assert got["pid"] != proc.pid and got["sid"] == got["pid"]  # a forked child, in a session of its own
    assert got["torch_loaded"]  # imported by the server before the fork, not by the child
    # the server's imports frozen out of the child's collections (gc.freeze), its collector on again
    assert got["gc_enabled"] and got["gc_frozen"] > 100_000
    assert started - 1 <= got["start"] <= time.time()  # the client's start, not the fork's
    assert "to stderr" in err and "no warm server" not in err


def test_a_client_started_with_python_u_gets_an_unbuffered_child(server, tmp_path):
    """torchrun starts workers with ``python -u``: their output must reach the log as it is written."""
    _, env = server
    pid_file = tmp_path / "pid"
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-u", "-c", CLIENT, "warm_targets:print_and_hang", str(pid_file)],
                            env=full, stdout=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid")
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline() == b"printed, not flushed\n"
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_to_the_client_reaches_the_child_and_its_code_comes_back(server, tmp_path):
    _, env = server
    pid_file = tmp_path / "pid"
    proc = client(env, "warm_targets:wait_for_sigterm", str(pid_file))
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    wait_for(lambda: not alive(child), 10, "the child to end")


def test_a_child_killed_by_a_signal_kills_its_client_with_the_same_signal(server, tmp_path):
    _, env = server
    pid_file = tmp_path / "pid"
    proc = client(env, "warm_targets:hang", str(pid_file))
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid"))
    os.kill(child, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL  # torchrun sees what it would have seen without warm start


def test_a_killed_client_takes_its_child_with_it(server, tmp_path):
    _, env = server
    pid_file = tmp_path / "pid"
    proc = client(env, "warm_targets:hang", str(pid_file))
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid"))
    proc.kill()  # what torchrun does to a worker's process group after its shutdown timeout
    proc.wait(10)
    started = time.monotonic()
    wait_for(lambda: not alive(child), 10, "the child to die with its client")
    assert time.monotonic() - started < 2


def test_without_a_live_server_the_client_runs_the_target_itself(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    env = {SOCKET_ENV: str(tmp_path / "warm.sock"), SERVER_PID_ENV: str(dead.pid)}
    started = time.monotonic()
    proc = client(env, "warm_targets:report", "0", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 99 and "no warm server" in err  # handoff said None: the caller runs it
    assert time.monotonic() - started < 10


def test_a_server_that_died_sends_its_clients_cold_at_once(tmp_path):
    """A server that died while importing stays a zombie until its parent waits for it: its clients must
    see that it is gone and start cold at once, not wait for the socket until the deadline."""
    proc, env = start_server(str(tmp_path))
    try:
        proc.kill()  # not waited for: a zombie, as under a supervisor busy with its pre-flight
        wait_for(lambda: not alive(proc.pid), 10, "the server to die")
        started = time.monotonic()
        worker = client(env, "warm_targets:report", "0", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        text=True)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 99 and "no warm server" in err, err
        assert time.monotonic() - started < 10  # READY_TIMEOUT_S is 120 s
    finally:
        proc.wait()


def test_a_stopped_server_removes_its_socket_and_leaves_running_children_alone(tmp_path):
    proc, env = start_server(str(tmp_path))
    try:
        wait_for(lambda: os.path.exists(env[SOCKET_ENV]) or proc.poll() is not None, 120, "the warm server")
        pid_file = tmp_path / "pid"
        worker = client(env, "warm_targets:wait_for_sigterm", str(pid_file))
        child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid"))
        proc.send_signal(signal.SIGUSR1)  # Slurm signals every process of its step: ignored by the server
        proc.terminate()
        assert proc.wait(30) == 0 and not os.path.exists(env[SOCKET_ENV])
        assert alive(child)  # a training worker outlives the server; it reports its own exit code
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_client_whose_agent_died_stops_its_child(server, tmp_path):
    """torchrun's agent SIGKILLed: its workers' clients are re-parented; each kills its child within ~1 s."""
    _, env = server
    pid_file = tmp_path / "pid"
    full = {**os.environ, **env, "PYTHONPATH": str(REPO), "LOCAL_RANK": "0"}  # as torchrun sets it
    agent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
                              "print(p.pid, flush=True); p.wait()", sys.executable, "-c", CLIENT,
                              "warm_targets:hang", str(pid_file)], env=full, stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    client_pid = int(agent.stdout.readline())
    child = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60, "the child's pid"))
    agent.kill()
    agent.wait()
    wait_for(lambda: not alive(child) and not alive(client_pid), 10, "the orphaned worker to stop")


@pytest.mark.slow
def test_under_a_killed_supervisor_the_warm_worker_saves_and_nothing_is_left(procs, tmp_path):
    """The supervisor's own process SIGKILLed (OOM killer): its command (the client) gets SIGTERM from the
    kernel and passes it to the warm trainer, which saves and stops; the warm server stops too."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    cmd = [sys.executable, "-m", "elastic_det.supervise", "--", sys.executable, "-m", "elastic_det.train",
           "--work-dir", str(work), "--cfg-options", *fast_overrides(cache, "train.max_steps=100000")]
    supervisor = procs.start(cmd, base_env(cache), tmp_path / "supervisor.log")
    wait_for(lambda: train_steps(work), 180, "training to start")
    tree = procs.remember(supervisor)
    server = next(p for p in children(supervisor.pid) if "elastic_det.warm_start" in cmdline(p))
    trainer = next(p for p in children(server))
    supervisor.kill()
    wait_for(lambda: not any(alive(p) for p in tree), 60, "every process of the supervisor's tree to stop")
    (preempt,) = events(work, "preempt")
    assert (work / "checkpoints" / f"step-{preempt['step']:08d}" / "manifest.json").exists()
    starts = [r for r in read_jsonl(work / "ledger.jsonl") if r["kind"] == "process_start"]
    assert [r["warm_start"] for r in starts] == [True] and trainer in tree
