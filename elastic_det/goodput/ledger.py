"""``WORK_DIR/ledger.jsonl``: where every second of an attempt went, for ``python -m elastic_det.report``.

An *attempt* is one life of the rank-0 process (a torchrun restart or a relaunch starts a new one). Rank 0
appends one JSON object per line through :class:`~elastic_det.run_files.RunFiles`, so on an object store
the ledger is mirrored locally and uploaded at every checkpoint and at exit, like ``metrics.jsonl``. Every
record has ``kind``, ``attempt`` (a random id), ``time`` (unix wall clock at the end of what it
describes) and ``host``:

=============  ==========================================================================================
kind           extra fields
=============  ==========================================================================================
process_start  the process's own start time (from ``/proc``; under warm start its client's); ``pid``,
               ``restart_count``, ``world_size``, ``launch_time`` (``ELASTIC_DET_LAUNCH_TIME`` set by the
               launcher, first round only), ``warm_start`` (forked ready by the warm server), ``format``
imports_done   training code entered (imports and config done)
dist_ready     process group ready (rendezvous done)
restore_done   ``step`` the attempt starts at, ``load_seconds`` of the checkpoint load (0 fresh)
train_start    the training loop starts; ``step``, ``max_steps``
first_step     the first step of this attempt completed; ``step``
steps          ``first``, ``last``: global steps ``first+1..last`` completed, ``seconds`` of their
               productive time (wall time between step ends, less checkpoint and evaluation time)
checkpoint     ``step``, ``seconds`` the loop was blocked, ``committed`` (true, false; absent with
               ``pending: true`` when handed to the async saver)
saved          an async save finished: ``step``, ``seconds`` it took in the background, ``committed``
eval           ``step``, ``seconds``
end            ``how`` (done, preempted, failed), ``last_step``, ``signal``, ``error``
=============  ==========================================================================================

``steps`` records are aggregated: one every ``flush_seconds`` (10 s) and one before every checkpoint and
evaluation, so a week-long run writes a few MB and a committed step never falls inside a record. On a
SIGKILL the ``end`` record (and up to ``flush_seconds`` of steps) is missing; the report copes.

The API, called by the trainer (all ranks may call it; only rank 0's ``RunFiles`` writes)::

    ledger = Ledger(files, world_size=info.world_size)       # writes process_start
    ledger.mark("dist_ready", time=t)                        # one-off phases, time defaults to now
    ledger.mark("restore_done", step=s, load_seconds=x)
    ledger.loop_start(step, max_steps)                       # GoodputHook.before_run
    ledger.step_done(step)                                   # GoodputHook.after_step, every step
    with ledger.checkpoint(step, reason=r) as record:        # around a save, blocking part
        ...; record.committed = True                         # (or ledger.saved as the on_saved callback)
    with ledger.evaluation(step): ...                        # around an evaluation
    ledger.end("done" | "preempted" | "failed", last_step=s, signal=..., error=...)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..engine.events import Event
from ..engine.run_files import RunFiles
from ..process import is_warm_child, process_start_time
from ..records import ATTEMPT_ENDS as END_HOWS
from ..records import LEDGER, ledger_record
from ..records import LEDGER_MARKS as MARKS

FORMAT = 1
LAUNCH_TIME_ENV = "ELASTIC_DET_LAUNCH_TIME"


def launch_time(restart_count: int) -> float | None:
    """The launcher's start (``ELASTIC_DET_LAUNCH_TIME``); only for the first round of workers, since a
    torchrun restart inherits the variable of the original launch."""
    value = os.environ.get(LAUNCH_TIME_ENV)
    if restart_count or not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@dataclass
class CheckpointRecord:
    """Set ``committed`` inside ``with ledger.checkpoint(step)`` (left None: async, the manifest tells)."""

    committed: bool | None = None


class Ledger:
    def __init__(self, files: RunFiles, *, world_size: int | None = None, attempt_id: str | None = None,
                 process_start: float | None = None, flush_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.files = files
        self.attempt = attempt_id or secrets.token_hex(4)
        self.host = socket.gethostname()
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._ended = False
        self._last = 0.0  # end of the last step (or of the loop start, a checkpoint, an evaluation)
        self._excluded = 0.0  # checkpoint/evaluation seconds since _last
        self._pending_first: int | None = None
        self._pending_last = 0
        self._pending_seconds = 0.0
        self._last_flush = 0.0
        self._first_step_seen = False
        self._open: tuple[int, CheckpointRecord] | None = None  # the checkpoint being timed
        self._started = 0.0  # start of the checkpoint or evaluation being timed
        self._signal: str | None = None  # the preemption signal, once one stopped the run
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        start = process_start if process_start is not None else process_start_time()
        self.mark("process_start", time=start if start is not None else clock(), pid=os.getpid(),
                  restart_count=restarts, world_size=world_size, launch_time=launch_time(restarts),
                  warm_start=is_warm_child(), format=FORMAT)

    def __call__(self, event: Event) -> None:
        """The ledger as a writer of the run's event stream (``engine.events``)."""
        kind, step, fields = event.kind, event.step, event.fields
        if kind in ("imports_done", "dist_ready"):
            self.mark(kind, time=event.time)
        elif kind == "restore_done":
            self.mark(kind, time=event.time, step=step, **fields)
        elif kind == "loop_start":
            self.loop_start(step, fields.get("max_steps"))
        elif kind == "step":
            self.step_done(step)
        elif kind in ("eval_start", "checkpoint_start"):
            self._begin()
            if kind == "checkpoint_start":
                self._open = (step, CheckpointRecord())
        elif kind == "eval_end":
            self._finish("eval", step, {})
        elif kind == "checkpoint_end":
            record = self._open[1] if self._open is not None and self._open[0] == step else CheckpointRecord()
            self._open = None
            committed = record.committed if record.committed is not None else fields.get("committed")
            extra: dict[str, Any] = {"reason": fields.get("reason"), "committed": committed}
            if committed is None:
                extra["pending"] = True  # async: the commit is seen in a ``saved`` record or the manifest
            self._finish("checkpoint", step, extra)
        elif kind in ("checkpoint", "checkpoint_failed"):
            self.saved(step, fields.get("reason", ""), fields.get("seconds", 0.0), kind == "checkpoint")
        elif kind == "preempt":
            self._signal = fields.get("signal")
        elif kind == "run_end":
            how = fields.get("how", "failed")
            self.end(how, last_step=step, signal=(self._signal or "peer") if how == "preempted" else None,
                     error=fields.get("error"))

    def _write(self, kind: str, when: float | None = None, **fields: Any) -> None:
        record = ledger_record(kind, self.attempt, self.clock() if when is None else when, self.host, fields)
        self.files.append_line(LEDGER, json.dumps(record))

    def mark(self, phase: str, time: float | None = None, **fields: Any) -> None:
        """A one-off phase of the attempt (one of ``MARKS``), at ``time`` (default: now)."""
        if phase not in MARKS:
            raise ValueError(f"unknown ledger phase {phase!r} (one of {', '.join(MARKS)})")
        self._write(phase, time, **fields)

    def loop_start(self, step: int, max_steps: int | None = None) -> None:
        now = self.clock()
        self._last = self._last_flush = now
        self._excluded = 0.0
        self._pending_last = step
        self._write("train_start", now, step=step, max_steps=max_steps)

    def step_done(self, step: int) -> None:
        """Global step ``step`` (steps completed) is done; its time runs from the previous step's end."""
        now = self.clock()
        if self._pending_first is None:
            self._pending_first = self._pending_last
        self._pending_seconds += max(now - self._last - self._excluded, 0.0)
        self._pending_last = step
        self._last, self._excluded = now, 0.0
        if not self._first_step_seen:
            self._first_step_seen = True
            self._write("first_step", now, step=step)
        if now - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the steps done since the last ``steps`` record (nothing when there are none)."""
        self._last_flush = self.clock()
        if self._pending_first is None or self._pending_last == self._pending_first:
            return
        self._write("steps", self._last, first=self._pending_first, last=self._pending_last,
                    seconds=round(self._pending_seconds, 4))
        self._pending_first, self._pending_seconds = None, 0.0

    @contextmanager
    def checkpoint(self, step: int, **fields: Any) -> Iterator[CheckpointRecord]:
        """Time a save that blocks the loop; an exception inside records ``committed: false``."""
        record = CheckpointRecord()
        with self._timed("checkpoint", step, fields) as extra:
            self._open = (step, record)
            try:
                yield record
            except BaseException:
                record.committed = False
                raise
            finally:
                self._open = None
                extra["committed"] = record.committed
                if record.committed is None:
                    extra["pending"] = True  # async: the commit is seen in a ``saved`` record or the manifest

    def saved(self, step: int, reason: str, seconds: float, committed: bool) -> None:
        """The outcome of a save (``CheckpointHook(on_saved=ledger.saved)``): inside ``with checkpoint(step)``
        it sets that record's ``committed``; an async save finishing later gets a ``saved`` record."""
        current = self._open
        if current is not None and current[0] == step:
            current[1].committed = committed
        else:
            self._write("saved", step=step, reason=reason, seconds=round(seconds, 4), committed=committed)

    @contextmanager
    def evaluation(self, step: int) -> Iterator[None]:
        with self._timed("eval", step, {}):
            yield

    @contextmanager
    def _timed(self, kind: str, step: int, fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
        self._begin()
        extra = dict(fields)
        try:
            yield extra
        finally:
            self._finish(kind, step, extra)

    def _begin(self) -> None:
        self.flush()  # the steps before it are on record even if a kill lands inside
        self._started = self.clock()

    def _finish(self, kind: str, step: int, extra: dict[str, Any]) -> None:
        end = self.clock()
        self._excluded += end - self._started
        self._write(kind, end, step=step, seconds=round(end - self._started, 4), **extra)

    def end(self, how: str, last_step: int, signal: str | None = None, error: str | None = None) -> None:
        """How the attempt ended (once; later calls are ignored)."""
        if how not in END_HOWS:
            raise ValueError(f"unknown attempt end {how!r} (one of {', '.join(END_HOWS)})")
        if self._ended:
            return
        self._ended = True
        self.flush()
        self._write("end", how=how, last_step=last_step, signal=signal, error=error)
