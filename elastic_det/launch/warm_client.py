"""Warm start: a per-node process that has imported torch, torchvision and the trainer once, and forks a
ready worker for each training process torchrun starts.

A torchrun restart (a worker crashed, a peer was lost) or a relaunch starts every worker again, and each one
used to spend ~3.5 s of its start-up importing torch, torchvision (which imports torch._dynamo) and
elastic_det before doing anything useful: the largest phase of a restart. The supervisor starts one warm
server per node next to torchrun (``python -m elastic_det.warm_start SOCKET``) and exports
``ELASTIC_DET_WARM_START``; ``python -m elastic_det.train`` started by torchrun is then only a thin client:

* it connects to the server's Unix socket and passes its argv, environment, working directory and its
  stdin/stdout/stderr (``SCM_RIGHTS``); the server forks a child that takes them over, in a session of its
  own, and runs ``elastic_det.train.main`` exactly as the client would have;
* the client stays as the process torchrun knows: it forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2
  to the child and exits with the child's exit code (or dies of the same signal);
* when the client dies (torchrun SIGKILLs its workers' process groups) the child's end of the connection
  closes and a watchdog thread in the child kills it at once; when the torchrun agent dies, the client
  notices its re-parenting within a second and kills the child (what the trainer's own parent watchdog does
  without warm start);
* anything that goes wrong before the child runs (no server, a server that died or never came up) makes
  the client run the trainer itself, in its own process, as without warm start.

The server never runs a tensor operation, so its children start from the same state as a forked
data-loader worker; each child applies torchrun's ``OMP_NUM_THREADS`` itself, since the thread pool of the
server was sized by the supervisor's environment. This module imports only the standard library: the
client must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time

from ..process import PROCESS_START_ENV, is_running, process_start_time
from .warm_wire import SERVER_PID_ENV, SOCKET_ENV, read_line, send

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
READY_TIMEOUT_S = 120.0  # how long a client waits for a server that is still importing


def handoff(target: str, argv: list[str], extra_path: str | None = None) -> int | None:
    """Run ``target`` ("module:function", called with ``argv``) in a child of the warm server and return
    its exit code; None when there is no warm server to use (the caller runs ``target`` itself).
    ``extra_path`` is put at the front of the child's ``sys.path`` (for a target outside the package)."""
    path = os.environ.get(SOCKET_ENV)
    if not path or PROCESS_START_ENV in os.environ:
        return None
    started = process_start_time()
    conn = _connect(path, _server_pid())
    if conn is None:
        return None
    request = {"target": target, "argv": argv, "cwd": os.getcwd(), "path": extra_path,
               "unbuffered": bool(getattr(sys.stdout, "write_through", False)),  # torchrun runs ``python -u``
               "env": {**os.environ, PROCESS_START_ENV: f"{started or time.time():.3f}"}}
    try:
        send(conn, json.dumps(request).encode(), fds=[0, 1, 2])
        child = int(read_line(conn, deadline=time.monotonic() + 30).split()[1])
    except (OSError, ValueError, IndexError, TimeoutError) as e:
        print(f"elastic_det.warm_start: the warm server did not take the worker ({e}); starting it here",
              file=sys.stderr, flush=True)
        conn.close()
        return None
    return _wait_for_child(conn, child)


def _server_pid() -> int | None:
    try:
        return int(os.environ.get(SERVER_PID_ENV, ""))
    except ValueError:
        return None


def _connect(path: str, server_pid: int | None) -> socket.socket | None:
    """A connection to the server, waiting while it still imports; None when it is not coming."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
        except OSError:
            conn.close()
            return None
        if server_pid is not None and not is_running(server_pid) or time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _wait_for_child(conn: socket.socket, child: int) -> int:
    """Forward signals to ``child`` until the server reports how it ended; that exit code."""
    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    # as the trainer's own parent watchdog (dist.start_parent_watchdog): only a torchrun agent is watched
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    parent = os.getppid()
    conn.settimeout(1.0)
    buffer = b""
    while b"\n" not in buffer:
        try:
            chunk = conn.recv(64)
        except TimeoutError:
            if under_torchrun and os.getppid() != parent:  # the agent is gone: nobody supervises this worker
                print("elastic_det.warm_start: the torchrun agent is gone; stopping the worker",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                return 1
            continue
        if not chunk:
            print("elastic_det.warm_start: the warm server went away before the worker ended",
                  file=sys.stderr, flush=True)
            return 1
        buffer += chunk
    how, value = buffer.split(b"\n", 1)[0].decode().split()
    if how == "signal":  # die of the same signal, as torchrun would have seen it without warm start
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), int(value))
        return 128 + int(value)
    return int(value)
