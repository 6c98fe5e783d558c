"""Timer (data time, step time, ETA) and logger (text log, metrics.jsonl, progress bar, TensorBoard)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import dist
from ..run_files import MetricsLog
from .hook import Hook

if TYPE_CHECKING:
    from .runner import Runner

log = logging.getLogger(__name__)


class TimerHook(Hook):
    """Step and data-loading time, smoothed, and the ETA they imply."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self.step_time: float | None = None
        self.data_time: float | None = None
        self._start = 0.0

    def before_step(self, runner: Runner) -> None:
        self._start = time.perf_counter() - runner.data_time

    def after_step(self, runner: Runner) -> None:
        elapsed = time.perf_counter() - self._start
        s = self.smoothing
        self.step_time = elapsed if self.step_time is None else s * self.step_time + (1 - s) * elapsed
        d = runner.data_time
        self.data_time = d if self.data_time is None else s * self.data_time + (1 - s) * d
        runner.step_outputs["step_time"] = self.step_time
        runner.step_outputs["data_time"] = self.data_time
        runner.step_outputs["eta_seconds"] = self.step_time * (runner.max_steps - runner.progress.global_step)


class LoggerHook(Hook):
    """Every ``interval`` global steps: losses averaged over the interval and over ranks (weighted by
    samples), as a text line, a ``metrics.jsonl`` train record and TensorBoard scalars; a tqdm bar on rank 0
    when attached to a terminal."""

    def __init__(self, metrics: MetricsLog, interval: int, progress_bar: str, tensorboard_dir: str | None,
                 is_main: bool) -> None:
        self.metrics = metrics
        self.interval = interval
        self.is_main = is_main
        self.show_bar = is_main and (progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()))
        self.tensorboard_dir = tensorboard_dir if is_main else None
        self._sums: dict[str, float] = {}
        self._samples = 0
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
        out = runner.step_outputs
        for k, v in out["loss_sums"].items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._samples += out["num_samples"]
        if self._bar is not None:
            self._bar.update(1)
        step = runner.progress.global_step
        if step % self.interval and step != runner.max_steps:
            return
        # every rank takes part in the average; the step numbers are the same on all ranks
        means = dist.mean_over_ranks({k: v / self._samples for k, v in self._sums.items()}, self._samples)
        self._sums, self._samples = {}, 0
        if not self.is_main:
            return
        losses = {k: v for k, v in means.items() if "loss" in k}
        record: dict[str, Any] = {
            "mode": "train", "step": step, "epoch": runner.progress.epoch, "time": round(time.time(), 3),
            "loss": sum(losses.values()), "lr": out.get("lr", 0.0), "world_size": runner.dist.world_size,
            **means,
            **{k: round(out[k], 4) for k in ("step_time", "data_time", "eta_seconds", "grad_norm") if k in out},
        }
        self.metrics.write(record)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        else:
            eta = int(record.get("eta_seconds", 0))
            log.info("step %d/%d epoch %d loss %.4f lr %.3e step_time %.3fs data_time %.3fs eta %dm%02ds",
                     step, runner.max_steps, record["epoch"], record["loss"], record["lr"],
                     record.get("step_time", 0.0), record.get("data_time", 0.0), eta // 60, eta % 60)
        if self._writer is not None:
            for k, v in record.items():
                if isinstance(v, float) and k != "eta_seconds":
                    self._writer.add_scalar(f"train/{k}", v, step)

    def log_val(self, step: int, metrics: dict[str, float]) -> None:
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(f"val/{k}", v, step)

    def after_run(self, runner: Runner) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
