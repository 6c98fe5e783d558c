"""Evaluation every ``train.eval_interval`` global steps and at the end (distributed inference), of the
averaged weights when ``ema.enabled`` (``runner.eval_model``); the val record says which (``weights``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from ..events import EventStream
from ..hook import Hook

if TYPE_CHECKING:
    from ..runner import Runner

log = logging.getLogger(__name__)


class EvalHook(Hook):
    """Runs ``evaluate(model)`` on every rank (it returns the metrics on rank 0, None elsewhere), publishes
    ``eval_start``, the ``val`` record and ``eval_end``, and hands the metrics to ``runner.record_eval``."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float] | None], interval: int,
                 events: EventStream, format_table: Callable[[dict[str, float]], str]) -> None:
        self.evaluate = evaluate
        self.interval = interval
        self.events = events
        self.format_table = format_table
        self._done_step = -1

    def after_step(self, runner: Runner) -> None:
        step = runner.progress.global_step
        if self.interval and step % self.interval == 0 and step < runner.max_steps:
            self._run(runner)

    def after_run(self, runner: Runner) -> None:
        if runner.stop_reason is None and runner.progress.global_step >= runner.max_steps:
            self._run(runner)

    def _run(self, runner: Runner) -> None:
        step = runner.progress.global_step
        if step == self._done_step:
            return
        self._done_step = step
        self.events.publish("eval_start", step)
        start = time.monotonic()
        results = self.evaluate(runner.eval_model)
        if results is not None:  # rank 0
            self.events.publish("val", step, weights=runner.eval_weights, **results)
            log.info("Evaluation at step %d (%s weights):\n%s", step, runner.eval_weights,
                     self.format_table(results))
        self.events.publish("eval_end", step, seconds=round(time.monotonic() - start, 4))
        runner.record_eval(results or {})
