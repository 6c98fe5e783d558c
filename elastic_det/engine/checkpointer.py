"""How a save happens, once the checkpoint hook has decided that one is due: the state is taken from the
runner, written by rank 0 (synchronously, or handed to the async saver), and its outcome published.

Events (see ``engine.events``): ``checkpoint_start`` and ``checkpoint_end`` around the part that blocks the
loop; then the outcome, ``checkpoint`` (committed) or ``checkpoint_failed``, when it is known: inside that
window for a synchronous save, later for an async one. The ledger, ``metrics.jsonl``, the grace check and
the preemption flag (which names the newest commit when a peer is lost) are writers of these events.

A failed save is a storage problem (``StorageError``, ``InfrastructureError``, ``OSError``): it is counted
and the hook retries at its next interval. A save refused because a newer checkpoint exists
(``WorkDirOwnedError``: another run writes here) is kept in ``owner_error`` for the hook to stop every rank;
one refused because a tensor is NaN or infinite (``NonFiniteStateError``, checked before anything is
written) is kept in ``nonfinite_error`` and stops every rank the same way, exit 65, at the next agreement
(at once after a preemption or final save, whose closing agreement carries it). Anything else is a bug,
kept in ``bug`` and raised by the hook at the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..checkpoint.async_save import AsyncSaver
from ..checkpoint.store import CheckpointStore
from ..errors import (
    InfrastructureError,
    NonFiniteStateError,
    StorageError,
    StorageUnavailableError,
    WorkDirOwnedError,
)
from . import dist
from .events import EventStream

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)

SAVE_FAILURES = (StorageError, InfrastructureError, OSError)
"""What a failed save may raise; it commits nothing and leaves older checkpoints alone."""


class Checkpointer:
    def __init__(self, store: CheckpointStore, events: EventStream, meta: dict[str, Any], is_main: bool,
                 async_save: bool) -> None:
        self.store = store
        self.events = events
        self.meta = meta
        self.is_main = is_main
        self.saver = AsyncSaver(store) if async_save and is_main else None
        self.failures = 0  # failed saves in a row
        self.last_error: BaseException | None = None
        self.owner_error: WorkDirOwnedError | None = None
        self.nonfinite_error: NonFiniteStateError | None = None  # rank 0's refused save
        self.bug: BaseException | None = None  # a non-storage exception from the save thread

    def save(self, runner: Runner, reason: str, sync: bool) -> None:
        step = runner.progress.global_step
        self.events.publish("checkpoint_start", step, reason=reason)
        start = time.perf_counter()
        committed: bool | None = None
        try:
            if self.is_main:
                committed = self._save(runner, step, reason, sync)
            if sync and reason in ("preempt", "final"):
                # no rank exits (and so no agent tears rank 0 down) before the commit; a refused save stops all
                if dist.any_rank_each([self.nonfinite_error is not None])[0]:
                    raise self.refused_error()
        except BaseException:
            committed = False
            raise
        finally:
            self.events.publish("checkpoint_end", step, reason=reason, seconds=round(time.perf_counter() - start, 4),
                                committed=committed, pending=committed is None and self.is_main)

    def wait(self) -> None:
        if self.saver is not None:
            self.saver.wait()

    def _save(self, runner: Runner, step: int, reason: str, sync: bool) -> bool | None:
        """The part of a save that blocks the loop (all of it, or the snapshot of an async save); whether
        it committed, None when the async saver has it."""
        state = runner.state_dict()
        meta = {**self.meta, "reason": reason, "world_size": runner.dist.world_size,
                "metrics": dict(runner.last_eval.metrics) if runner.last_eval else {}}
        if self.saver is not None and not sync:
            self.saver.submit(step, state, meta, self._on_done(step, reason))
            return None
        self.wait()
        start = time.perf_counter()
        try:
            manifest = self.store.save(step, state, meta)
        except (*SAVE_FAILURES, WorkDirOwnedError, NonFiniteStateError) as e:
            self._on_done(step, reason)(None, e, time.perf_counter() - start)
            return False
        self._on_done(step, reason)(manifest, None, time.perf_counter() - start)
        return True

    def _on_done(self, step: int, reason: str) -> Callable[[Any, BaseException | None, float], None]:
        def done(manifest: Any, error: BaseException | None, seconds: float) -> None:
            if error is None:
                self.failures = 0
                self.events.publish("checkpoint", step, reason=reason, seconds=round(seconds, 3),
                                    path=self.store.location(step))
            elif isinstance(error, (WorkDirOwnedError, NonFiniteStateError)):
                if isinstance(error, WorkDirOwnedError):
                    self.owner_error = error
                else:
                    self.nonfinite_error = error
                log.error("Checkpoint at step %d refused: %s", step, error)
                self.events.publish("checkpoint_failed", step, reason=reason, error=describe(error), final=True,
                                    seconds=round(seconds, 3))
            elif isinstance(error, SAVE_FAILURES):
                self.failures += 1
                self.last_error = error
                log.error("Checkpoint at step %d failed (%d in a row): %s", step, self.failures, describe(error))
                self.events.publish("checkpoint_failed", step, reason=reason, error=describe(error),
                                    failures=self.failures, seconds=round(seconds, 3))
            else:
                self.bug = error
        return done

    def refused_error(self) -> NonFiniteStateError:
        """The refused save's error on rank 0; on the others, the same finding in other words."""
        if self.nonfinite_error is not None:
            return self.nonfinite_error
        return NonFiniteStateError(f"Rank 0 refused to commit a checkpoint to {self.store.work_dir.url}: a tensor "
                                   "of the training state is not finite (NaN or inf); see rank 0's log. The "
                                   "newest committed checkpoint stays the newest.")

    def failure_error(self, what: str) -> Exception:
        """Final when the last failure was (a store that denies access, does not exist); else retryable."""
        detail = f" Last error: {describe(self.last_error)}" if self.last_error else " (see rank 0's log)"
        if isinstance(self.last_error, StorageError):
            return StorageError(what + detail)
        return StorageUnavailableError(what + detail)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
