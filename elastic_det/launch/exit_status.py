"""The per-attempt exit-status channel between the workers and ``elastic_det.supervise``.

torchrun reports 1 for any failed worker group, whatever the workers returned, and restarts the group
``--max-restarts`` times first; so a worker's "bad input, do not retry" (exit 2) would surface late and as
a retryable failure. The supervisor therefore sets ``ELASTIC_DET_EXIT_DIR`` (a fresh local directory per
attempt); a worker that stops with a final code writes ``rank-<RANK>.json`` there
(``{"exit_code": N, "message": "..."}``) and then waits a few seconds for the supervisor to stop torchrun,
so that torchrun never sees the failed worker and never restarts the group.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

from ..errors import FINAL_EXIT_CODES

EXIT_DIR_ENV = "ELASTIC_DET_EXIT_DIR"
LINGER_S = 10.0
"""How long a worker that reported a final code waits for the supervisor to stop torchrun (it polls every
half second, so it normally takes well under a second); after that the worker exits anyway."""

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def report(exit_code: int, message: str, linger_s: float = LINGER_S) -> None:
    """Tell the supervisor (if one watches) that this process stops with the final ``exit_code``.

    Does nothing for retryable codes or when ``ELASTIC_DET_EXIT_DIR`` is unset. Never raises: the error
    being reported matters more than the report.
    """
    directory = os.environ.get(EXIT_DIR_ENV)
    if not directory or exit_code not in FINAL_EXIT_CODES:
        return
    rank = os.environ.get("RANK", "0")
    try:
        write(Path(directory), rank, exit_code, message)
    except OSError:
        return
    _linger(linger_s)


def write(directory: Path, rank: str, exit_code: int, message: str) -> Path:
    """Write ``rank-<rank>.json`` atomically (temp file + rename: a reader never sees half of it)."""
    final = directory / f"rank-{rank}.json"
    tmp = directory / f".rank-{rank}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"exit_code": exit_code, "message": message}))
    os.replace(tmp, final)
    return final


def read_final(directory: str | Path) -> tuple[int, str] | None:
    """The first final ``(exit_code, message)`` reported in ``directory`` (by rank order), or None."""
    directory = Path(directory)
    try:
        names = sorted(p for p in os.listdir(directory) if p.startswith("rank-") and p.endswith(".json"))
    except OSError:
        return None
    for name in names:
        try:
            record = json.loads((directory / name).read_text())
            code, message = int(record["exit_code"]), str(record.get("message", ""))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if code in FINAL_EXIT_CODES:
            return code, message
    return None


def _linger(linger_s: float) -> None:
    """Wait until a stop signal arrives (torchrun forwarding the supervisor's SIGTERM), the parent is gone,
    or ``linger_s`` passed. Only in the main thread: signal handlers cannot be installed elsewhere."""
    if linger_s <= 0 or threading.current_thread() is not threading.main_thread():
        return
    stop = threading.Event()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: stop.set())
    parent = os.getppid()
    deadline = time.monotonic() + linger_s
    while not stop.is_set() and os.getppid() == parent and time.monotonic() < deadline:
        stop.wait(0.1)
