"""The warm-start server: one per node, started by the supervisor (``python -m elastic_det.warm_start
SOCKET``). It imports torch, torchvision and the trainer once, then forks a ready trainer for every client
(see ``warm_client`` for the whole protocol). It never runs a tensor operation, so its children start from
the same state as a forked data-loader worker."""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable

from ..process import die_with_parent, import_modules
from .warm_wire import SERVER_PID_ENV, SOCKET_ENV, receive

PRELOAD = ("torch", "torchvision", "elastic_det.engine.trainer", "elastic_det.train")


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
        message, fds = receive(conn)
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m elastic_det.warm_start SOCKET_PATH", file=sys.stderr)
        return 2
    return serve(args[0])
