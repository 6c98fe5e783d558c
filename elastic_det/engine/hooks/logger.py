"""The logger: text log, ``metrics.jsonl``, progress bar and TensorBoard, every ``log.interval`` steps."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from .. import dist
from ..hook import Hook
from ..run_files import MetricsLog

if TYPE_CHECKING:
    from ..runner import Runner

log = logging.getLogger(__name__)


class LoggerHook(Hook):
    """Every ``interval`` global steps: losses averaged over the interval and over ranks (weighted by
    samples), as a text line, a ``metrics.jsonl`` train record and TensorBoard scalars; a tqdm bar on rank 0
    when attached to a terminal. Step and data time are smoothed (exponential moving average) and give
    the ETA.

    The loss sums stay on the device between log lines and are averaged over ranks with one all-reduce,
    so a step never waits for the device because of logging. A step whose update was dropped for a
    non-finite loss (``train.nonfinite=skip``) is left out of the averages and counted in
    ``skipped_steps`` (the interval's); its losses are null when every step of the interval was dropped.
    """

    def __init__(self, metrics: MetricsLog, interval: int, progress_bar: str, tensorboard_dir: str | None,
                 is_main: bool, smoothing: float = 0.9) -> None:
        self.metrics = metrics
        self.interval = interval
        self.is_main = is_main
        self.show_bar = is_main and (progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()))
        self.tensorboard_dir = tensorboard_dir if is_main else None
        self.smoothing = smoothing
        self.step_time: float | None = None
        self.data_time: float | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._samples = 0
        self._skipped = 0
        self._bar = None
        self._writer = None

    def before_run(self, runner: Runner) -> None:
        if self.show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=runner.max_steps, initial=runner.progress.global_step, unit="step",
                             dynamic_ncols=True)
        if self.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs the tensorboard package: "
                                  "pip install 'elastic_det[tensorboard]'") from e
            self._writer = SummaryWriter(self.tensorboard_dir)

    def after_step(self, runner: Runner) -> None:
        record = runner.last_step
        self._smooth(record.step_time, record.data_time)
        if record.skipped:
            self._skipped += 1
        else:
            for k, v in record.loss_sums.items():
                self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._samples += record.num_samples
        if self._bar is not None:
            self._bar.update(1)
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
        line: dict[str, Any] = {
            "mode": "train", "step": step, "epoch": runner.progress.epoch, "time": round(time.time(), 3),
            "loss": None if nothing else sum(losses.values()), "lr": record.lr,
            "world_size": runner.dist.world_size, **means, **{k: round(v, 4) for k, v in timing.items()},
        }
        if skipped:
            line["skipped_steps"] = skipped
        self.metrics.write(line)
        shown = float("nan") if nothing else line["loss"]
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{shown:.4f}", lr=f"{line['lr']:.2e}")
        else:
            eta = int(line["eta_seconds"])
            log.info("step %d/%d epoch %d loss %.4f lr %.3e step_time %.3fs data_time %.3fs eta %dm%02ds",
                     step, runner.max_steps, line["epoch"], shown, line["lr"], line["step_time"],
                     line["data_time"], eta // 60, eta % 60)
        if self._writer is not None:
            for k, v in line.items():
                if isinstance(v, float) and k != "eta_seconds":
                    self._writer.add_scalar(f"train/{k}", v, step)

    def after_eval(self, runner: Runner) -> None:
        if self._writer is not None and runner.last_eval is not None:
            for k, v in runner.last_eval.metrics.items():
                self._writer.add_scalar(f"val/{k}", v, runner.last_eval.step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _smooth(self, step_time: float, data_time: float) -> None:
        s = self.smoothing
        self.step_time = step_time if self.step_time is None else s * self.step_time + (1 - s) * step_time
        self.data_time = data_time if self.data_time is None else s * self.data_time + (1 - s) * data_time
