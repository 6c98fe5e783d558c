"""When to save, and what happens when a save fails or a preemption signal arrives.

Every step all ranks agree on five flags: a preemption signal reached some rank, the wall-clock interval
has passed on some rank, too many saves failed in a row, another writer owns the work dir, a save was
refused for a non-finite tensor. They are this hook's ``step_flags``, OR-ed in the step's one flag
all-reduce (the runner's, before the update; it also carries the non-finite loss check). Then every rank
takes the same decision. Rank 0 writes (model replicas are identical); the commit protocol lives in
``checkpoint.store``.

A failed save is a storage problem (``StorageError``, ``InfrastructureError``, ``OSError``): it is
logged as ``checkpoint_failed`` and retried at the next interval. A save refused because a newer
checkpoint exists (``WorkDirOwnedError``: another run writes here) stops every rank at once, exit 3. A
save refused because a tensor is NaN or infinite (``NonFiniteStateError``: the previous checkpoint stays
the newest) stops every rank at the next agreement, exit 65. Anything else is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...checkpoint.async_save import AsyncSaver
from ...checkpoint.store import CheckpointStore
from ...config.schema import CheckpointConfig
from ...errors import (
    InfrastructureError,
    NonFiniteStateError,
    StorageError,
    StorageUnavailableError,
    WorkDirOwnedError,
)
from ...goodput.ledger import Ledger
from .. import dist
from ..grace import GraceMonitor, grace_from_env, start_figures
from ..hook import Hook
from ..preemption import PreemptionFlag
from ..run_files import METRICS, MetricsLog, RunFiles

if TYPE_CHECKING:
    from ..runner import Runner

log = logging.getLogger(__name__)

SAVE_FAILURES = (StorageError, InfrastructureError, OSError)
"""What a failed save may raise; it commits nothing and leaves older checkpoints alone."""

OnSaved = Callable[[int, str, float, bool], None]
"""``on_saved(step, reason, seconds, committed)``: told of every save attempt (e.g. the goodput ledger)."""


class CheckpointHook(Hook):
    def __init__(self, store: CheckpointStore, cfg: CheckpointConfig, preempt: PreemptionFlag,
                 metrics: MetricsLog, files: RunFiles, meta: dict[str, Any], is_main: bool,
                 on_saved: OnSaved | None = None, ledger: Ledger | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.preempt = preempt
        self.metrics = metrics
        self.files = files
        self.meta = meta
        self.is_main = is_main
        self.ledger = ledger
        self.on_saved = on_saved if on_saved is not None else (ledger.saved if ledger is not None else None)
        self.saver = AsyncSaver(store) if cfg.async_save and is_main else None
        self.failures = 0
        self.last_error: BaseException | None = None
        self.owner_error: WorkDirOwnedError | None = None
        self.nonfinite_error: NonFiniteStateError | None = None  # rank 0's refused save
        self.bug: BaseException | None = None  # a non-storage exception from the save thread
        self._last_save = time.monotonic()
        self._saved_step = -1
        grace = grace_from_env()  # on every rank: a bad value stops them all
        self.grace = GraceMonitor(grace if is_main else None)

    def before_run(self, runner: Runner) -> None:
        self._last_save = time.monotonic()
        self._saved_step = runner.progress.global_step
        if runner.progress.global_step > 0:  # resumed from a committed checkpoint
            self.preempt.note_checkpoint(runner.progress.global_step, committed=True)
        if self.grace.grace is not None:
            model_bytes = sum(v.nbytes for v in runner.unwrapped_model.state_dict().values())
            self.grace.at_start(*start_figures(self.files.local_path(METRICS), model_bytes,
                                               remote=not self.store.work_dir.is_local))

    def step_flags(self, runner: Runner) -> dict[str, bool]:
        minutes = self.cfg.interval_minutes
        return {"preempt": self.preempt.is_set(),
                "save_time_due": minutes > 0 and time.monotonic() - self._last_save >= minutes * 60,
                "save_failures": self.failures >= self.cfg.max_failures,
                "work_dir_owned": self.owner_error is not None,
                "save_nonfinite": self.nonfinite_error is not None}

    def after_step(self, runner: Runner) -> None:
        if self.bug is not None:
            raise self.bug
        record = runner.last_step
        self.preempt.note_step_time(record.step_time)
        step = runner.progress.global_step
        flags = record.flags
        preempted, time_due, too_many = flags["preempt"], flags["save_time_due"], flags["save_failures"]
        if flags["work_dir_owned"]:
            raise self.owner_error or WorkDirOwnedError(
                f"Another writer committed a newer checkpoint to {self.store.work_dir.url}; this run stops.")
        if flags["save_nonfinite"]:
            raise self._nonfinite_error()
        if too_many:
            raise self._failure_error(f"{self.cfg.max_failures} checkpoint saves in a row failed "
                                      "(checkpoint.max_failures); training stops so no more work is at risk.")
        if preempted:
            self.save(runner, "preempt", sync=True)
            if self.is_main:
                self.metrics.event("preempt", step, signal=self.preempt.signal_name or "peer",
                                   world_size=runner.dist.world_size)
            runner.request_stop("preempt")
            return
        if step == runner.max_steps:
            return  # the final save happens after the final evaluation, in after_run
        if self.cfg.interval and step % self.cfg.interval == 0:
            self.save(runner, "interval", sync=self.saver is None)
        elif time_due:
            self.save(runner, "time", sync=self.saver is None)

    def after_run(self, runner: Runner) -> None:
        if runner.stop_reason is None and runner.progress.global_step >= runner.max_steps:
            self.save(runner, "final", sync=True)
            owned, nonfinite, failed = dist.any_rank_each(
                [self.owner_error is not None, self.nonfinite_error is not None, self.failures > 0])
            if owned:
                raise self.owner_error or WorkDirOwnedError(
                    f"Another writer committed a newer checkpoint to {self.store.work_dir.url}.")
            if nonfinite:
                raise self._nonfinite_error()
            if failed:
                raise self._failure_error("The final checkpoint could not be saved.")
        elif self.saver is not None:
            self.saver.wait()
        if self.bug is not None:
            raise self.bug

    def close(self) -> None:
        if self.saver is not None:
            self.saver.wait()

    def save(self, runner: Runner, reason: str, sync: bool) -> None:
        step = runner.progress.global_step
        self._last_save = time.monotonic()
        if step == self._saved_step and reason != "preempt":
            return
        self._saved_step = step
        if not self.is_main:
            self.preempt.note_checkpoint(step, committed=False)
        timed = self.ledger.checkpoint(step, reason=reason) if self.ledger else contextlib.nullcontext()
        with timed:
            self._save(runner, step, reason, sync)

    def _save(self, runner: Runner, step: int, reason: str, sync: bool) -> None:
        """The part of a save that blocks the loop (all of it, or the snapshot of an async save)."""
        if self.is_main:
            state = runner.state_dict()
            meta = {**self.meta, "reason": reason, "world_size": runner.dist.world_size,
                    "metrics": dict(runner.last_eval.metrics) if runner.last_eval else {}}
            if self.saver is not None and not sync:
                self.saver.submit(step, state, meta, self._on_done(step, reason))
            else:
                if self.saver is not None:
                    self.saver.wait()
                start = time.perf_counter()
                try:
                    manifest = self.store.save(step, state, meta)
                except (*SAVE_FAILURES, WorkDirOwnedError, NonFiniteStateError) as e:
                    self._on_done(step, reason)(None, e, time.perf_counter() - start)
                else:
                    self._on_done(step, reason)(manifest, None, time.perf_counter() - start)
        if sync and reason == "preempt":
            # no rank exits (and so no agent tears rank 0 down) before the commit; a refused save stops all
            if dist.any_rank_each([self.nonfinite_error is not None])[0]:
                raise self._nonfinite_error()

    def _on_done(self, step: int, reason: str) -> Callable[[Any, BaseException | None, float], None]:
        def done(manifest: Any, error: BaseException | None, seconds: float) -> None:
            if self.on_saved is not None:
                self.on_saved(step, reason, seconds, error is None)
            if error is None:
                self.failures = 0
                self.preempt.note_checkpoint(step, committed=True)
                self.grace.after_save(step, seconds, self.preempt.step_time())
                self.metrics.event("checkpoint", step, reason=reason, seconds=round(seconds, 3),
                                   path=self.store.location(step))
                self.files.sync()
            elif isinstance(error, NonFiniteStateError):
                self.nonfinite_error = error
                log.error("Checkpoint at step %d refused: %s", step, error)
                self.metrics.event("checkpoint_failed", step, reason=reason, error=_describe(error), final=True)
            elif isinstance(error, WorkDirOwnedError):
                self.owner_error = error
                log.error("Checkpoint at step %d refused: %s", step, error)
                self.metrics.event("checkpoint_failed", step, reason=reason, error=_describe(error), final=True)
            elif isinstance(error, SAVE_FAILURES):
                self.failures += 1
                self.last_error = error
                log.error("Checkpoint at step %d failed (%d in a row): %s", step, self.failures, _describe(error))
                self.metrics.event("checkpoint_failed", step, reason=reason, error=_describe(error),
                                   failures=self.failures, seconds=round(seconds, 3))
            else:
                self.bug = error
        return done

    def _nonfinite_error(self) -> NonFiniteStateError:
        """The refused save's error on rank 0; on the others, the same finding in other words."""
        if self.nonfinite_error is not None:
            return self.nonfinite_error
        return NonFiniteStateError(f"Rank 0 refused to commit a checkpoint to {self.store.work_dir.url}: a tensor "
                                   "of the training state is not finite (NaN or inf); see rank 0's log. The "
                                   "newest committed checkpoint stays the newest.")

    def _failure_error(self, what: str) -> Exception:
        """Final when the last failure was (a store that denies access, does not exist); else retryable."""
        detail = f" Last error: {_describe(self.last_error)}" if self.last_error else " (see rank 0's log)"
        if isinstance(self.last_error, StorageError):
            return StorageError(what + detail)
        return StorageUnavailableError(what + detail)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
