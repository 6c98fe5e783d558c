"""``python -m elastic_det.torchrun ARGS``: torchrun itself (``torch.distributed.run.main``), without the
interpreter's teardown once it is done.

A scheduler relaunches a preempted job only when every process of it is gone, and the supervisor starts
its next attempt only when torchrun has exited; torchrun's own exit spent ~0.5 s here tearing down the torch
it imported. The supervisor runs its command's torchrun through this module when that torchrun belongs to
this interpreter (see :func:`elastic_det.supervise.without_teardown`): same code, arguments, output and exit
status (0, ``SystemExit``'s code, 1 with the traceback printed for an exception such as torchrun's
``SignalException``), then ``atexit`` handlers, flushed streams and ``os._exit``.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback

from .warm_start import import_modules


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


def exit_now(code: int) -> None:
    atexit._run_exitfuncs()  # logging's flush, torch's own handlers: what the teardown would have run first
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
