"""Preemption signals only set a flag; the runner acts on it at the next step boundary.

SIGTERM (Kubernetes, torchrun shutdown), SIGINT, SIGUSR1 and SIGUSR2 (Slurm ``--signal``). Doing the save
inside the handler would race with the step and with other ranks; instead all ranks agree on the flag with
a collective after each step and save from the main loop. A second signal changes nothing.

A stop signal can also reach a rank that will never get to that boundary: a peer is gone and the rank
sits in a collective (DDP's all-reduce in the backward, the agreement itself) that cannot complete. That
is what torchrun does after a worker dies: it SIGTERMs the survivors. Python runs signal handlers only
between bytecodes, so the handler would not run before the collective gives up (the process-group
timeout, minutes). A watchdog thread therefore hears every signal through ``signal.set_wakeup_fd`` at
once; if the main thread is inside a *watched* region (a step's compute, a small collective: see
``watch``) and stays there longer than the deadline after the signal, the rank is stuck. It then logs
one line (the step, and the last committed checkpoint, which stays the newest) and exits with
``PEER_LOST_EXIT_CODE`` without saving. Saves, evaluation and start-up are not watched: a healthy
preemption still finishes its step and saves, however long that takes (the grace period bounds it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from .events import Event

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

PEER_LOST_EXIT_CODE = 1
"""Exit code of a rank that stops because a peer is gone: a failure of the job's infrastructure, not bad
input (2) and not a completed preemption (143, which promises a checkpoint at the step reached)."""

MIN_DEADLINE_S = 2.0
"""A stuck rank is one still inside a watched region this long after a stop signal (at least)."""
DEADLINE_STEPS = 3.0
"""... or this many median step times, when that is longer."""
FIRST_STEP_DEADLINE_S = 10.0
"""Before any step time is known (the first step of an attempt is slow: allocations, DDP set-up)."""


class PreemptionFlag:
    def __init__(self, min_deadline: float = MIN_DEADLINE_S, deadline_steps: float = DEADLINE_STEPS,
                 first_step_deadline: float = FIRST_STEP_DEADLINE_S) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.min_deadline = min_deadline
        self.deadline_steps = deadline_steps
        self.first_step_deadline = first_step_deadline
        self.checkpoint_step: int | None = None  # newest checkpoint this rank knows of (rank 0: committed)
        self.checkpoint_committed = False  # True when checkpoint_step is known committed (rank 0, restore)
        self._step_times: deque[float] = deque(maxlen=20)
        self._watched: tuple[str, float] | None = None  # (what, monotonic time it was entered)
        self._last_region = ""  # the last watched region entered: where a collective's error came from
        self._last_step = ""  # the last step region entered ("step 12")
        self._signal_at: float | None = None  # monotonic time the first stop signal arrived
        self._stopping = threading.Lock()

    def install(self, watchdog: bool = True) -> None:
        """Install the handlers (main thread only) and, with ``watchdog``, the stuck-rank watchdog."""
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
        if watchdog:
            self._start_watchdog()

    def _handle(self, signum: int, frame) -> None:
        self._arrived(signal.Signals(signum).name)

    def _arrived(self, name: str) -> None:
        if not self._event.is_set():
            self.signal_name = name
            self._signal_at = time.monotonic()
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    # ------------------------------------------------------------------------------------------------
    # What the watchdog needs to know: where the main thread is, how long a step takes, the checkpoint

    @contextlib.contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Mark a region of the main thread that must end soon after a stop signal (a step's compute, a
        small collective). Regions may nest; the innermost one names the stop line."""
        outer = self._watched
        self._watched = (what, time.monotonic())
        self._last_region = what
        if what.startswith("step "):
            self._last_step = what
        try:
            yield
        finally:
            self._watched = outer

    def note_step_time(self, seconds: float) -> None:
        self._step_times.append(seconds)

    def note_checkpoint(self, step: int, committed: bool) -> None:
        """The newest checkpoint: ``committed`` on rank 0 after its commit (and on every rank after a
        restore); other ranks only know that rank 0 was asked to save at ``step``."""
        if self.checkpoint_step is None or step >= self.checkpoint_step:
            self.checkpoint_step, self.checkpoint_committed = step, committed

    def record_checkpoints(self, is_main: bool) -> Callable[[Event], None]:
        """A writer of the event stream that keeps ``note_checkpoint`` current: the restored step, each
        commit (rank 0), each save rank 0 was asked for (the other ranks)."""
        def writer(event: Event) -> None:
            if event.kind == "loop_start" and event.step > 0:  # resumed from a committed checkpoint
                self.note_checkpoint(event.step, committed=True)
            elif event.kind == "checkpoint":
                self.note_checkpoint(event.step, committed=True)
            elif event.kind == "checkpoint_start" and not is_main:
                self.note_checkpoint(event.step, committed=False)
        return writer

    def where(self, region: str | None = None) -> str:
        """Where the main thread is (or was last), for the stop line: "step 12", or "step 12 (an all-reduce
        of flags after it)", or "start-up"."""
        region = region if region is not None else self._last_region
        if not region:
            return "start-up"
        if region == self._last_step or not self._last_step:
            return region
        return f"{self._last_step} ({region} after it)"

    def step_time(self) -> float | None:
        """The median of the recent step times, None before the first."""
        return statistics.median(self._step_times) if self._step_times else None

    def deadline(self) -> float:
        """Seconds a watched region may last after a stop signal before the rank counts as stuck."""
        median = self.step_time()
        if median is None:
            return max(self.min_deadline, self.first_step_deadline)
        return max(self.min_deadline, self.deadline_steps * median)

    # ------------------------------------------------------------------------------------------------
    # Stopping without a checkpoint

    def stop_peer_lost(self, where: str, detail: str = "") -> None:
        """Log the one line that says why, flush, and exit now with ``PEER_LOST_EXIT_CODE`` (no save: the
        state may be mid-step; the newest committed checkpoint stays the one to resume from)."""
        with self._stopping:  # the watchdog and the main thread may both get here: one line, one exit
            if self.checkpoint_step is None:
                last = "no checkpoint was committed yet"
            elif self.checkpoint_committed:
                last = f"last committed checkpoint is step {self.checkpoint_step}"
            else:
                last = f"last checkpoint (rank 0 commits it) is step {self.checkpoint_step}"
            log.error("peer lost during %s%s; stopping without saving, %s", where,
                      f" ({detail})" if detail else "", last)
            _flush_logs()
            os._exit(PEER_LOST_EXIT_CODE)

    # ------------------------------------------------------------------------------------------------
    # The watchdog thread

    def _start_watchdog(self) -> None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no watchdog (the flag still works)
            reader.close()
            writer.close()
            return
        self._wakeup = (reader, writer)  # keep both ends open for the life of the process
        threading.Thread(target=self._watchdog, args=(reader,), name="stop-watchdog", daemon=True).start()

    def _watchdog(self, reader: socket.socket) -> None:
        numbers = {int(s) for s in PREEMPTION_SIGNALS}
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            got = [b for b in data if b in numbers]
            if got:
                # Only the time: the main thread's handler names the signal (signals sent together reach
                # threads in any order; its handlers run in signal-number order, as they always have).
                heard = signal.Signals(got[0]).name
                if self._signal_at is None:
                    self._signal_at = time.monotonic()
                break
        while True:  # a stop signal arrived: the main thread must leave any watched region in time
            watched, signal_at = self._watched, self._signal_at
            if watched is not None and signal_at is not None:
                what, entered = watched
                waited = time.monotonic() - max(entered, signal_at)
                if waited >= self.deadline():
                    name = self.signal_name or heard
                    self.stop_peer_lost(self.where(what), f"{name} arrived and it did not finish within "
                                                          f"{waited:.1f} s: a collective whose peer is gone")
            time.sleep(0.05)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
