"""Evaluation every ``train.eval_interval`` global steps and at the end (distributed inference)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from ..run_files import MetricsLog
from .hook import Hook

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)


class EvalHook(Hook):
    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float] | None], interval: int,
                 metrics: MetricsLog, format_table: Callable[[dict[str, float]], str],
                 on_metrics: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.evaluate = evaluate
        self.interval = interval
        self.metrics = metrics
        self.format_table = format_table
        self.on_metrics = on_metrics
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
        results = self.evaluate(runner.unwrapped_model)
        if results is None:  # not rank 0
            return
        runner.latest_metrics = results
        self.metrics.write({"mode": "val", "step": step, **results})
        log.info("Evaluation at step %d:\n%s", step, self.format_table(results))
        if self.on_metrics is not None:
            self.on_metrics(step, results)
