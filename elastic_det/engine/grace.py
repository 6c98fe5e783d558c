"""Does a preemption fit in the grace period the launcher asked for?

After a stop signal the trainer finishes its step and saves; the launcher SIGKILLs it when the grace
period runs out. A save that does not fit loses everything since the previous checkpoint, silently. The
launchers know the grace they ask for and export it; the trainer knows how long its saves take. This
module compares the two and words the warning:

* ``ELASTIC_DET_GRACE_SECONDS``: exported by the launchers (Slurm ``--signal`` lead time, Kubernetes
  ``terminationGracePeriodSeconds``);
* ``PET_SHUTDOWN_TIMEOUT``: torchrun's ``--shutdown-timeout`` as its environment variable (what
  ``launch/elastic_run.sh`` sets); torchrun hands its environment to the workers.

When both are set the smaller one wins (the first launcher to give up decides). A preemption needs one
step (the one in flight) plus one synchronous save.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from ..records import read_tail
from .events import Event

log = logging.getLogger(__name__)

GRACE_ENV = "ELASTIC_DET_GRACE_SECONDS"
TORCHRUN_ENV = "PET_SHUTDOWN_TIMEOUT"

ASSUMED_BYTES_PER_SECOND = {"local": 300e6, "remote": 50e6}
"""Write rates for an estimate before any save was timed: well below what was measured here (local disk
~750 MB/s with fsync, a moto S3 server ~65 MB/s), so an estimate errs towards warning."""


@dataclass(frozen=True)
class Grace:
    seconds: float
    source: str  # the environment variable it came from


def grace_from_env(environ: Mapping[str, str] | None = None) -> Grace | None:
    """The grace period the launchers exported (the smaller of the two variables), or None."""
    environ = os.environ if environ is None else environ
    found = []
    for name in (GRACE_ENV, TORCHRUN_ENV):
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(f"Environment variable {name}={raw!r} is not a positive number of seconds. It "
                              "tells the trainer how long a preemption may take (the launcher's grace period); "
                              "set it to the launcher's grace in seconds, or unset it.")
        found.append(Grace(seconds, name))
    return min(found, key=lambda g: g.seconds, default=None)


def needed_seconds(save_seconds: float, step_seconds: float | None) -> float:
    """What a preemption takes: the step in flight, then a synchronous save."""
    return save_seconds + (step_seconds or 0.0)


def shortfall(grace: Grace, save_seconds: float, step_seconds: float | None, what: str) -> str | None:
    """The warning when a step plus a save of ``save_seconds`` do not fit in ``grace`` (else None).
    ``what`` says where the save time comes from, e.g. "the checkpoint at step 400 took"."""
    needed = needed_seconds(save_seconds, step_seconds)
    if needed <= grace.seconds:
        return None
    step = f"a step takes {step_seconds:.2f} s" if step_seconds else "the step in flight is not timed yet"
    return (f"The grace period of {grace.seconds:g} s ({grace.source}) is shorter than a preemption needs: "
            f"{what} {save_seconds:.2f} s and {step} ({needed:.2f} s in all). A preemption would be killed "
            "before its checkpoint commits and lose the work since the previous one. Give the launcher a "
            "longer grace (torchrun --shutdown-timeout, Kubernetes terminationGracePeriodSeconds, Slurm "
            "--signal lead time) or make the save faster (a smaller state, a faster store).")


def estimate_save_seconds(state_bytes: int, remote: bool) -> float:
    """A save's duration before any was timed, from the state's size (see ``ASSUMED_BYTES_PER_SECOND``)."""
    return state_bytes / ASSUMED_BYTES_PER_SECOND["remote" if remote else "local"]


def history(metrics_path: str, tail_bytes: int = 256 * 1024) -> tuple[float | None, float | None]:
    """(slowest of the last three checkpoint saves, median step time of the last train records) from the
    end of a ``metrics.jsonl``; None where the file has none. Reads only its tail: the file can be long."""
    saves: list[float] = []
    steps: list[float] = []
    for record in read_tail(metrics_path, tail_bytes):
        if record.get("event") == "checkpoint" and isinstance(record.get("seconds"), (int, float)):
            saves.append(float(record["seconds"]))
        elif record.get("mode") == "train" and isinstance(record.get("step_time"), (int, float)):
            steps.append(float(record["step_time"]))
    return (max(saves[-3:]) if saves else None), (statistics.median(steps[-20:]) if steps else None)


class GraceMonitor:
    """Warns at start and after a save that does not fit. After a save it warns the first time and then
    only when a save is at least 10% slower than the slowest one already reported, so a slow store shows
    as a trend in the log, not as a line at every interval. The warning at start does not count: its
    figure is an estimate or an older run's."""

    def __init__(self, grace: Grace | None) -> None:
        self.grace = grace
        self._reported = 0.0

    def at_start(self, save_seconds: float, step_seconds: float | None, source: str) -> str | None:
        if self.grace is None:
            return None
        message = shortfall(self.grace, save_seconds, step_seconds, source)
        if message is not None:  # the first measured save that does not fit is reported all the same
            log.warning("%s", message)
        return message

    def after_save(self, step: int, save_seconds: float, step_seconds: float | None) -> str | None:
        if self.grace is None or save_seconds < self._reported * 1.1:
            return None
        message = shortfall(self.grace, save_seconds, step_seconds, f"the checkpoint at step {step} took")
        if message is not None:
            self._reported = save_seconds
            log.warning("%s", message)
        return message


def start_figures(metrics_path: str, model_state_bytes: int, remote: bool) -> tuple[float, float | None, str]:
    """(save seconds, step seconds, where the save figure comes from) for the warning at start: the run's
    recent saves from ``metrics.jsonl`` when it has any, else an estimate from the state's size (the model
    and an optimizer state of twice its size, as AdamW keeps)."""
    save_seconds, step_seconds = history(metrics_path)
    if save_seconds is not None:
        return save_seconds, step_seconds, "recent checkpoints of this run took up to"
    nbytes = 3 * model_state_bytes
    estimate = estimate_save_seconds(nbytes, remote)
    rate = ASSUMED_BYTES_PER_SECOND["remote" if remote else "local"]
    return estimate, step_seconds, (f"a checkpoint of about {nbytes / 1e6:.0f} MB at an assumed "
                                    f"{rate / 1e6:.0f} MB/s (no save timed yet) takes about")


class GraceWriter:
    """The grace check as a writer of the event stream (rank 0): the warning at the loop's start, from the
    run's recent saves or an estimate, and after each committed checkpoint that does not fit."""

    def __init__(self, monitor: GraceMonitor, metrics_path: str, remote: bool,
                 model_state_bytes: Callable[[], int], step_seconds: Callable[[], float | None]) -> None:
        self.monitor = monitor
        self.metrics_path = metrics_path
        self.remote = remote
        self.model_state_bytes = model_state_bytes
        self.step_seconds = step_seconds

    def __call__(self, event: Event) -> None:
        if self.monitor.grace is None:
            return
        if event.kind == "loop_start":
            self.monitor.at_start(*start_figures(self.metrics_path, self.model_state_bytes(), self.remote))
        elif event.kind == "checkpoint":
            self.monitor.after_save(event.step, event.fields["seconds"], self.step_seconds())
