"""Feeds the goodput ledger (``elastic_det.ledger``) from the training loop.

Place it after the logger and trace hooks and *before* the evaluation and checkpoint hooks: a step's time
then covers its data, forward/backward, optimizer step and logging, and the steps up to a checkpoint are
on record before the save starts. Checkpoint and evaluation time reach the ledger through
``with ledger.checkpoint(step)`` / ``with ledger.evaluation(step)`` in those hooks. ``close`` writes how
the attempt ended: ``done``, ``preempted`` (the loop stopped early, or the preemption flag is set) or
``failed`` (the loop raised).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ...goodput.ledger import Ledger
from ..hook import Hook
from ..preemption import PreemptionFlag

if TYPE_CHECKING:
    from ..runner import Runner


class GoodputHook(Hook):
    def __init__(self, ledger: Ledger, preempt: PreemptionFlag | None = None) -> None:
        self.ledger = ledger
        self.preempt = preempt
        self._runner: Runner | None = None
        self._finished = False

    def before_run(self, runner: Runner) -> None:
        self._runner = runner
        self.ledger.loop_start(runner.progress.global_step, runner.max_steps)

    def after_step(self, runner: Runner) -> None:
        self.ledger.step_done(runner.progress.global_step)

    def after_run(self, runner: Runner) -> None:
        self._finished = True
        self.ledger.flush()

    def close(self) -> None:
        if self._runner is None:
            return
        step = self._runner.progress.global_step
        signal = self.preempt.signal_name if self.preempt is not None and self.preempt.is_set() else None
        if not self._finished:
            error = sys.exc_info()[1]  # close runs in the runner's finally: the exception on its way out
            self.ledger.end("failed", last_step=step, error=type(error).__name__ if error else None)
        elif signal is not None or step < self._runner.max_steps:
            self.ledger.end("preempted", last_step=step, signal=signal or "peer")
        else:
            self.ledger.end("done", last_step=step)
