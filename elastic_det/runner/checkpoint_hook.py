"""When to save, and what happens when a save fails or a preemption signal arrives.

Every step all ranks agree, with one small all-reduce, on three flags: a preemption signal reached some
rank, the wall-clock interval has passed on some rank, too many saves failed in a row. Then every rank
takes the same decision. Rank 0 writes (model replicas are identical); the commit protocol lives in
``checkpoint.store``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import dist
from ..checkpoint.async_save import AsyncSaver
from ..checkpoint.store import CheckpointStore
from ..config import CheckpointConfig
from ..errors import StorageError
from ..preemption import PreemptionFlag
from ..run_files import MetricsLog, RunFiles
from .hook import Hook

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)


class CheckpointHook(Hook):
    def __init__(self, store: CheckpointStore, cfg: CheckpointConfig, preempt: PreemptionFlag,
                 metrics: MetricsLog, files: RunFiles, build_state: Callable[[Runner], dict[str, Any]],
                 meta: dict[str, Any], is_main: bool) -> None:
        self.store = store
        self.cfg = cfg
        self.preempt = preempt
        self.metrics = metrics
        self.files = files
        self.build_state = build_state
        self.meta = meta
        self.is_main = is_main
        self.saver = AsyncSaver(store) if cfg.async_save and is_main else None
        self.failures = 0
        self.last_error = ""
        self._last_save = time.monotonic()
        self._saved_step = -1

    def before_run(self, runner: Runner) -> None:
        self._last_save = time.monotonic()
        self._saved_step = runner.progress.global_step

    def after_step(self, runner: Runner) -> None:
        step = runner.progress.global_step
        minutes = self.cfg.interval_minutes
        time_due = minutes > 0 and time.monotonic() - self._last_save >= minutes * 60
        preempted, time_due, fatal = dist.any_rank_each(
            [self.preempt.is_set(), time_due, self.failures >= self.cfg.max_failures])
        if fatal:
            raise StorageError(
                f"{self.cfg.max_failures} checkpoint saves in a row failed (checkpoint.max_failures); "
                f"training stops so no more work is at risk. Last error: {self.last_error or 'see rank 0'}"
            )
        if preempted:
            self.save(runner, "preempt", sync=True)
            if self.is_main:
                self.metrics.event("preempt", step, signal=self.preempt.signal_name or "peer",
                                   world_size=runner.dist.world_size)
            runner.stop_reason = "preempt"
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
            if dist.any_rank(self.failures > 0):
                raise StorageError(f"The final checkpoint could not be saved: {self.last_error or 'see rank 0'}")
        elif self.saver is not None:
            self.saver.wait()

    def save(self, runner: Runner, reason: str, sync: bool) -> None:
        step = runner.progress.global_step
        self._last_save = time.monotonic()
        if step == self._saved_step and reason != "preempt":
            return
        self._saved_step = step
        if self.is_main:
            state = self.build_state(runner)
            meta = {**self.meta, "reason": reason, "world_size": runner.dist.world_size,
                    "metrics": dict(getattr(runner, "latest_metrics", {}) or {})}
            if self.saver is not None and not sync:
                self.saver.submit(step, state, meta, self._on_done(step, reason))
            else:
                if self.saver is not None:
                    self.saver.wait()
                start = time.perf_counter()
                try:
                    manifest = self.store.save(step, state, meta)
                except Exception as e:  # disk full, bucket unreachable, permission denied, ...
                    self._on_done(step, reason)(None, e, time.perf_counter() - start)
                else:
                    self._on_done(step, reason)(manifest, None, time.perf_counter() - start)
        if sync and reason in ("preempt", "final"):
            dist.barrier()  # no rank exits (and so no agent tears rank 0 down) before the commit

    def _on_done(self, step: int, reason: str) -> Callable[[Any, BaseException | None, float], None]:
        def done(manifest: Any, error: BaseException | None, seconds: float) -> None:
            if error is None:
                self.failures = 0
                self.metrics.event("checkpoint", step, reason=reason, seconds=round(seconds, 3),
                                   path=self.store.location(step))
                self.files.sync()
            else:
                self.failures += 1
                self.last_error = f"{type(error).__name__}: {error}"
                log.error("Checkpoint at step %d failed (%d in a row): %s", step, self.failures, self.last_error)
                self.metrics.event("checkpoint_failed", step, reason=reason, error=self.last_error,
                                   failures=self.failures)
        return done
