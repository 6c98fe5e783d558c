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
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable

SOCKET_ENV = "ELASTIC_DET_WARM_START"  # the server's socket path, set by the supervisor
SERVER_PID_ENV = "ELASTIC_DET_WARM_START_PID"  # the server's PID: a client stops waiting when it is gone
PROCESS_START_ENV = "ELASTIC_DET_PROCESS_START"  # in a warm child: when its client (the real worker) started
PRELOAD = ("torch", "torchvision", "elastic_det.trainer", "elastic_det.train")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
READY_TIMEOUT_S = 120.0  # how long a client waits for a server that is still importing
_HEADER = struct.Struct("!I")
_PR_SET_PDEATHSIG = 1
try:  # loaded here, not in the forked child that calls prctl
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - no C library to ask
    _LIBC = None


def process_start_time() -> float | None:
    """Wall-clock time this process started: its client's start in a warm child, else from ``/proc``
    (10 ms resolution); None where unknown."""
    inherited = os.environ.get(PROCESS_START_ENV)
    if inherited:
        with contextlib.suppress(ValueError):
            return float(inherited)
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def is_warm_child() -> bool:
    """True in a process the warm server forked (its parent is the server, not torchrun)."""
    return PROCESS_START_ENV in os.environ and SOCKET_ENV in os.environ


# ----------------------------------------------------------------------------------------------------------
# client: the process torchrun started


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
        _send(conn, json.dumps(request).encode(), fds=[0, 1, 2])
        child = int(_read_line(conn, deadline=time.monotonic() + 30).split()[1])
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
        if server_pid is not None and not _alive(server_pid) or time.monotonic() > deadline:
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


def _alive(pid: int) -> bool:
    """Running: a server that exited stays a zombie until the supervisor reaps it, which must not keep
    its clients waiting for the whole deadline."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


# ----------------------------------------------------------------------------------------------------------
# server


def import_modules(names: tuple[str, ...] = PRELOAD) -> None:
    """Import ``names`` with the cyclic garbage collector paused: importing torch, torchvision and the
    trainer allocates ~600k objects, and the collections that triggers find next to nothing (the imports
    took 2.2 instead of 2.9 s here). The collector runs again afterwards if it ran before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        if enabled:
            gc.enable()


def serve(path: str, preload: tuple[str, ...] = PRELOAD) -> int:
    """Import ``preload``, then fork a child for every client until SIGTERM/SIGINT. The socket appears at
    ``path`` only once the imports are done, so a client that can connect gets a warm child.

    The collector stays off in the server and what it imported is frozen (``gc.freeze``) before each fork,
    Python's recipe for forking servers: the children's collections skip those objects instead of touching
    (and so copying) every page that holds them, and each child turns its collector on.
    """
    gc.disable()
    import_modules(preload)
    # Python >= 3.12 warns on every fork of a process with more than one thread; the other thread here is
    # one torch starts at import and that data-loader workers are forked beside as well.
    warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA
        print("elastic_det.warm_start: CUDA was initialised while importing; not serving (the workers start "
              "cold)", file=sys.stderr, flush=True)
        return 1
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}.tmp"
    listener.bind(staging)
    listener.listen(64)
    os.rename(staging, path)
    clients: dict[int, socket.socket] = {}  # child PID -> its client's connection
    stopping: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda s, f: None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, f: stopping.append(s))
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # Slurm signals every process of the step: not for us
        signal.signal(sig, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        while not stopping:
            for key, _ in selector.select(timeout=1.0):
                if key.fileobj is listener:
                    _accept(listener, clients, closing=[listener, selector, wake_r, wake_w])
                else:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        os.read(wake_r, 512)
            _reap(clients)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        listener.close()
    return 0


def _accept(listener: socket.socket, clients: dict[int, socket.socket], closing: list) -> None:
    conn, _ = listener.accept()
    try:
        conn.settimeout(10.0)
        message, fds = _receive(conn)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"{len(fds)} file descriptors instead of stdin, stdout and stderr")
    except (OSError, ValueError) as e:
        print(f"elastic_det.warm_start: bad request ({e})", file=sys.stderr, flush=True)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    try:
        pid = os.fork()
    except OSError as e:  # out of memory or processes: this client starts the trainer itself
        print(f"elastic_det.warm_start: cannot fork a worker ({e})", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    if pid == 0:
        _run_child(conn, fds, request, [*closing, *clients.values()])
    for fd in fds:
        os.close(fd)
    try:
        conn.sendall(f"pid {pid}\n".encode())
    except OSError:
        pass  # the client is gone; the child's watchdog sees the closed connection and stops it
    clients[pid] = conn


def _reap(clients: dict[int, socket.socket]) -> None:
    while clients:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = clients.pop(pid, None)
        if conn is None:
            continue
        if os.WIFSIGNALED(status):
            report = f"signal {os.WTERMSIG(status)}"
        else:
            report = f"exit {os.waitstatus_to_exitcode(status)}"
        with contextlib.suppress(OSError):
            conn.sendall(f"{report}\n".encode())
        conn.close()


def _run_child(conn: socket.socket, fds: list[int], request: dict, inherited: list) -> None:
    """In the forked child: become the client's worker and never return into the server loop."""
    code = 1
    gc.enable()
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for thing in inherited:  # other clients' connections must close when those clients die
            with contextlib.suppress(OSError):
                thing.close() if hasattr(thing, "close") else os.close(thing)
        os.setsid()
        for target_fd, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target_fd)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        sys.stdout.reconfigure(line_buffering=True, write_through=bool(request.get("unbuffered")))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [sys.argv[0], *request["argv"]]
        if request.get("path"):
            sys.path.insert(0, request["path"])
        _apply_thread_count()
        _watch_client(conn)
        module, function = request["target"].split(":")
        result = getattr(importlib.import_module(module), function)(request["argv"])
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):  # told by the child itself: the client needs no living server
            conn.sendall(f"exit {code}\n".encode())
        os._exit(code)


def _apply_thread_count() -> None:
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))


def _watch_client(conn: socket.socket) -> None:
    """Kill this process the moment its client's connection closes (torchrun killed the client)."""
    def watch() -> None:
        conn.settimeout(None)
        with contextlib.suppress(OSError):
            while conn.recv(64):
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="warm-start-client-watch", daemon=True).start()


# ----------------------------------------------------------------------------------------------------------
# the wire: length-prefixed JSON, the client's stdio descriptors with the first packet


def _send(conn: socket.socket, payload: bytes, fds: list[int]) -> None:
    data = _HEADER.pack(len(payload)) + payload
    sent = socket.send_fds(conn, [data], fds)
    if sent < len(data):
        conn.sendall(data[sent:])


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while len(data) < _HEADER.size:
        more = conn.recv(1 << 16)
        if not more:
            raise OSError("connection closed in the header")
        data += more
    (length,) = _HEADER.unpack_from(data)
    while len(data) < _HEADER.size + length:
        more = conn.recv(1 << 16)
        if not more:
            raise OSError("connection closed in the request")
        data += more
    return data[_HEADER.size:_HEADER.size + length], list(fds)


def _read_line(conn: socket.socket, deadline: float) -> str:
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    buffer = b""
    while b"\n" not in buffer:
        chunk = conn.recv(64)
        if not chunk:
            raise OSError("the server closed the connection")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


def start_server(directory: str, log: Callable[[str], None] | None = None,
                 env: dict[str, str] | None = None) -> tuple[object, dict[str, str]]:
    """Start ``python -m elastic_det.warm_start`` with its socket in ``directory`` (and ``env``, default this
    process's environment): the process (a Popen, killed by the caller by PID) and the environment its
    clients need."""
    import subprocess

    path = os.path.join(directory, "warm.sock")
    proc = subprocess.Popen([sys.executable, "-m", "elastic_det.warm_start", path], start_new_session=True,
                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, env=env)
    if log is not None:
        log(f"warm start: server pid {proc.pid} importing torch and the trainer for the workers ({path})")
    return proc, {SOCKET_ENV: path, SERVER_PID_ENV: str(proc.pid)}


def die_with_parent() -> None:
    """In a child before exec (Linux; a ``preexec_fn``): get SIGTERM when the parent dies. The supervisor
    gives it to torchrun (which then saves and stops, like after a preemption, instead of training on
    unsupervised) and to the warm server."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m elastic_det.warm_start SOCKET_PATH", file=sys.stderr)
        return 2
    return serve(args[0])


if __name__ == "__main__":
    from .exit_status import exit_now

    exit_now(main())  # the supervisor waits for this process before it exits
