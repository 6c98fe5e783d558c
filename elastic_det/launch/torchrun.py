"""``python -m elastic_det.torchrun ARGS``: torchrun itself (``torch.distributed.run.main``), without the
interpreter's teardown once it is done.

A scheduler relaunches a preempted job only when every process of it is gone, and the supervisor starts
its next attempt only when torchrun has exited; torchrun's own exit spent ~0.5 s here tearing down the torch
it imported. The supervisor runs its command's torchrun through this module when that torchrun belongs to
this interpreter (:func:`without_teardown`): same code, arguments, output and exit
status (0, ``SystemExit``'s code, 1 with the traceback printed for an exception such as torchrun's
``SignalException``), then ``atexit`` handlers, flushed streams and ``os._exit``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import traceback

from ..process import exit_now, import_modules


def main(argv: list[str]) -> int:
    import_modules(("torch.distributed.run",))  # with the garbage collector paused: ~25% faster
    from torch.distributed.run import main as torchrun_main

    sys.argv = ["torchrun", *argv]
    try:
        torchrun_main(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as Python reports it
        return 1
    except KeyboardInterrupt:
        return -signal.SIGINT  # as Python does: die of SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def without_teardown(command: list[str]) -> list[str]:
    """COMMAND with its torchrun run through :mod:`elastic_det.torchrun` (torchrun minus the ~0.5 s teardown
    at its exit) when that torchrun is this interpreter's: ``torchrun`` whose script starts with this
    Python, or this Python ``-m torch.distributed.run``. Any other command is returned unchanged."""
    head = shutil.which(command[0]) if command else None
    if head is None:
        return command
    if len(command) > 2 and command[1:3] == ["-m", "torch.distributed.run"] and _same_file(head, sys.executable):
        return [sys.executable, "-m", "elastic_det.torchrun", *command[3:]]
    if os.path.basename(head) == "torchrun" and _is_torchrun_script(head):
        return [sys.executable, "-m", "elastic_det.torchrun", *command[1:]]
    return command


def _is_torchrun_script(path: str) -> bool:
    """Whether ``path`` is torchrun's console script for this interpreter: its ``#!`` line names this
    Python (not ``/usr/bin/env python``: not known for sure) and it runs ``torch.distributed.run``'s main."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    first, _, body = head.partition(b"\n")
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    return (len(words) == 1 and _same_file(words[0], sys.executable)
            and b"from torch.distributed.run import main" in body)


def _same_file(a: str, b: str) -> bool:
    try:
        return bool(a and b) and os.path.samefile(a, b)
    except OSError:
        return False


def run_and_exit(argv: list[str]) -> None:
    """``main(argv)``, then the atexit handlers (logging's flush, torch's own), then exit without teardown."""
    code = main(argv)
    atexit._run_exitfuncs()
    exit_now(code)
