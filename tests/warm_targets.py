"""Targets a warm child runs in tests/test_warm_start.py (found through the request's ``extra_path``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def report(argv: list[str]) -> int:
    """Print what the child got (arguments, environment, directory, start time, the garbage collector's
    state), then exit argv[0]."""
    import gc

    from elastic_det.process import process_start_time

    print(json.dumps({"argv": argv, "cwd": os.getcwd(), "marker": os.environ.get("WARM_TEST_MARKER"),
                      "pid": os.getpid(), "sid": os.getsid(0), "start": process_start_time(),
                      "torch_loaded": "torch" in sys.modules, "gc_enabled": gc.isenabled(),
                      "gc_frozen": gc.get_freeze_count()}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    return int(argv[0])


def wait_for_sigterm(argv: list[str]) -> int:
    """Write this PID to argv[0], then exit 143 on SIGTERM (as the trainer does after its save)."""
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    Path(argv[0]).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        signal.pause() if hasattr(signal, "pause") else time.sleep(0.1)
    return 143 if got else 1


def hang(argv: list[str]) -> int:
    """Write this PID to argv[0] and wait to be killed."""
    Path(argv[0]).write_text(str(os.getpid()))
    time.sleep(120)
    return 0


def print_and_hang(argv: list[str]) -> int:
    """Print a line without flushing, then wait to be killed: only an unbuffered stdout shows it."""
    print("printed, not flushed")
    Path(argv[0]).write_text(str(os.getpid()))
    time.sleep(120)
    return 0
