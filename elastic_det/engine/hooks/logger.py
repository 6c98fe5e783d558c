"""The logger: the averaged train record every ``log.interval`` steps, as a ``train`` event."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .. import dist
from ..events import EventStream
from ..hook import Hook

if TYPE_CHECKING:
    from ..runner import Runner

class LoggerHook(Hook):
    """Every ``interval`` global steps: losses averaged over the interval and over ranks (weighted by
    samples), published as a ``train`` event (``metrics.jsonl``, the console line, TensorBoard are its
    writers). Step and data time are smoothed (exponential moving average) and give the ETA.

    The loss sums stay on the device between log lines and are averaged over ranks with one all-reduce,
    so a step never waits for the device because of logging. A step whose update was dropped for a
    non-finite loss (``train.nonfinite=skip``) is left out of the averages and counted in
    ``skipped_steps`` (the interval's); its losses are null when every step of the interval was dropped.
    """

    def __init__(self, events: EventStream, interval: int, is_main: bool, smoothing: float = 0.9) -> None:
        self.events = events
        self.interval = interval
        self.is_main = is_main
        self.smoothing = smoothing
        self.step_time: float | None = None
        self.data_time: float | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._samples = 0
        self._skipped = 0

    def after_step(self, runner: Runner) -> None:
        record = runner.last_step
        self._smooth(record.step_time, record.data_time)
        if record.skipped:
            self._skipped += 1
        else:
            for k, v in record.loss_sums.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._samples += record.num_samples
        step = runner.progress.global_step
        if step % self.interval and step != runner.max_steps:
            return
        # every rank takes part in the average; the step numbers are the same on all ranks
        means = dist.mean_over_ranks({k: v / max(self._samples, 1) for k, v in self._sums.items()}, self._samples)
        counted, skipped = self._samples, self._skipped
        self._sums, self._samples, self._skipped = {}, 0, 0
        if not self.is_main:
            return
        losses = {k: v for k, v in means.items() if "loss" in k}
        nothing = not counted  # every step of the interval was dropped (all ranks drop the same steps)
        timing = {"step_time": self.step_time, "data_time": self.data_time,
                  "eta_seconds": self.step_time * (runner.max_steps - step)}
        if record.grad_norm is not None and not record.skipped:
            timing["grad_norm"] = float(record.grad_norm)
        extra = {"skipped_steps": skipped} if skipped else {}
        self.events.publish("train", step, epoch=runner.progress.epoch, time=round(time.time(), 3),
                            loss=None if nothing else sum(losses.values()), lr=record.lr,
                            world_size=runner.dist.world_size, **means,
                            **{k: round(v, 4) for k, v in timing.items()}, **extra)

    def _smooth(self, step_time: float, data_time: float) -> None:
        s = self.smoothing
        self.step_time = step_time if self.step_time is None else s * self.step_time + (1 - s) * step_time
        self.data_time = data_time if self.data_time is None else s * self.data_time + (1 - s) * data_time
