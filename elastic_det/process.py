"""Process facts and process exits that every layer needs: start time, liveness, dying with the parent,
exiting without teardown, and whether this process is a warm-start child.

The lowest layer (standard library and psutil only): the engine, the launch stack and the goodput stack
all import it, so none of them has to import another for these few helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os
import signal
import sys

import psutil

WARM_SOCKET_ENV = "ELASTIC_DET_WARM_START"  # the warm server's socket path, set by the supervisor
PROCESS_START_ENV = "ELASTIC_DET_PROCESS_START"  # in a warm child: when its client (the real worker) started

_PR_SET_PDEATHSIG = 1
try:  # loaded here, at import, not in a forked child that calls prctl before exec
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


def process_start_time() -> float | None:
    """Wall-clock time this process started: its client's start in a warm child; None where unknown."""
    inherited = os.environ.get(PROCESS_START_ENV)
    if inherited:
        with contextlib.suppress(ValueError):
            return float(inherited)
    try:
        return psutil.Process().create_time()
    except psutil.Error:
        return None


def is_warm_child() -> bool:
    """True in a process the warm server forked (its parent is the server, not torchrun)."""
    return PROCESS_START_ENV in os.environ and WARM_SOCKET_ENV in os.environ


def is_running(pid: int) -> bool:
    """Alive and not a zombie: a child that exited stays a zombie until it is reaped, which must not count."""
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    The one implementation for every child that must not outlive its parent: torchrun and the warm server
    under the supervisor (SIGTERM: they save and stop, as after a preemption), and the data-loader workers
    (SIGKILL, see ``engine.dist``). Safe in a ``preexec_fn`` and in an at-fork hook: libc was loaded at import.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def exit_now(code: int) -> None:
    """Exit with ``code`` (a negative one: die of that signal) without the interpreter's teardown.

    For processes that imported torch and have closed their files and waited for their children: tearing
    torch's modules and libraries down took 0.5-1 s here (4 s loaded), and whoever comes next waits for it
    (torchrun before restarting a worker, the supervisor before its next attempt, a scheduler before a
    relaunch). Only the standard streams are flushed.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def import_modules(names: tuple[str, ...]) -> None:
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
