"""Evaluation every ``train.eval_interval`` global steps and at the end (distributed inference), of the
averaged weights when ``ema.enabled`` (``runner.eval_model``); the val record says which (``weights``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from ...goodput.ledger import Ledger
from ..hook import Hook
from ..run_files import MetricsLog

if TYPE_CHECKING:
    from ..runner import Runner

log = logging.getLogger(__name__)


class EvalHook(Hook):
    """Runs ``evaluate(model)`` on every rank (it returns the metrics on rank 0, None elsewhere), writes the
    val record to ``metrics.jsonl`` and hands the metrics to ``runner.record_eval``."""

    def __init__(self, evaluate: Callable[[nn.Module], dict[str, float] | None], interval: int,
                 metrics: MetricsLog, format_table: Callable[[dict[str, float]], str],
                 ledger: Ledger | None = None) -> None:
        self.evaluate = evaluate
        self.ledger = ledger
        self.interval = interval
        self.metrics = metrics
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
        with self.ledger.evaluation(step) if self.ledger else contextlib.nullcontext():
            results = self.evaluate(runner.eval_model)
        if results is not None:  # rank 0
            self.metrics.write({"mode": "val", "step": step, "weights": runner.eval_weights, **results})
            log.info("Evaluation at step %d (%s weights):\n%s", step, runner.eval_weights,
                     self.format_table(results))
        runner.record_eval(results or {})
