"""When to save, and what stops the run when saving goes wrong; the save itself is ``engine.checkpointer``.

Every step all ranks agree on five flags: a preemption signal reached some rank, the wall-clock interval
has passed on some rank, too many saves failed in a row, another writer owns the work dir, a save was
refused for a non-finite tensor. They are this hook's ``step_flags``, OR-ed in the step's one flag
all-reduce (the runner's, before the update; it also carries the non-finite loss check). Then every rank
takes the same decision: save (interval, time, preemption, final), stop after a preemption checkpoint, or
stop with the error (exit 3 when another writer owns the work dir, exit 65 when a save was refused for a
NaN or infinite tensor: the previous checkpoint stays the newest). Rank 0 writes (model replicas are
identical); the commit protocol lives in ``checkpoint.store``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ...config.schema import CheckpointConfig
from ...errors import WorkDirOwnedError
from .. import dist
from ..checkpointer import Checkpointer
from ..events import EventStream
from ..hook import Hook
from ..preemption import PreemptionFlag

if TYPE_CHECKING:
    from ..runner import Runner


class CheckpointHook(Hook):
    def __init__(self, checkpointer: Checkpointer, cfg: CheckpointConfig, preempt: PreemptionFlag,
                 events: EventStream) -> None:
        self.checkpointer = checkpointer
        self.cfg = cfg
        self.preempt = preempt
        self.events = events
        self._last_save = time.monotonic()
        self._saved_step = -1

    def before_run(self, runner: Runner) -> None:
        self._last_save = time.monotonic()
        self._saved_step = runner.progress.global_step

    def step_flags(self, runner: Runner) -> dict[str, bool]:
        saver, minutes = self.checkpointer, self.cfg.interval_minutes
        return {"preempt": self.preempt.is_set(),
                "save_time_due": minutes > 0 and time.monotonic() - self._last_save >= minutes * 60,
                "save_failures": saver.failures >= self.cfg.max_failures,
                "work_dir_owned": saver.owner_error is not None,
                "save_nonfinite": saver.nonfinite_error is not None}

    def after_step(self, runner: Runner) -> None:
        saver = self.checkpointer
        if saver.bug is not None:
            raise saver.bug
        record = runner.last_step
        self.preempt.note_step_time(record.step_time)
        step = runner.progress.global_step
        flags = record.flags
        if flags["work_dir_owned"]:
            raise saver.owner_error or WorkDirOwnedError(
                f"Another writer committed a newer checkpoint to {saver.store.work_dir.url}; this run stops.")
        if flags["save_nonfinite"]:
            raise saver.refused_error()
        if flags["save_failures"]:
            raise saver.failure_error(f"{self.cfg.max_failures} checkpoint saves in a row failed "
                                      "(checkpoint.max_failures); training stops so no more work is at risk.")
        if flags["preempt"]:
            self.save(runner, "preempt", sync=True)
            self.events.publish("preempt", step, signal=self.preempt.signal_name or "peer",
                                world_size=runner.dist.world_size)
            runner.request_stop("preempt")
            return
        if step == runner.max_steps:
            return  # the final save happens after the final evaluation, in after_run
        if self.cfg.interval and step % self.cfg.interval == 0:
            self.save(runner, "interval", sync=saver.saver is None)
        elif flags["save_time_due"]:
            self.save(runner, "time", sync=saver.saver is None)

    def after_run(self, runner: Runner) -> None:
        saver = self.checkpointer
        if runner.stop_reason is None and runner.progress.global_step >= runner.max_steps:
            self.save(runner, "final", sync=True)
            owned, failed = dist.any_rank_each([saver.owner_error is not None, saver.failures > 0])
            if owned:
                raise saver.owner_error or WorkDirOwnedError(
                    f"Another writer committed a newer checkpoint to {saver.store.work_dir.url}.")
            if failed:
                raise saver.failure_error("The final checkpoint could not be saved.")
        else:
            saver.wait()
        if saver.bug is not None:
            raise saver.bug

    def close(self) -> None:
        self.checkpointer.wait()

    def save(self, runner: Runner, reason: str, sync: bool) -> None:
        step = runner.progress.global_step
        self._last_save = time.monotonic()
        if step == self._saved_step and reason != "preempt":
            return
        self._saved_step = step
        self.checkpointer.save(runner, reason, sync)
