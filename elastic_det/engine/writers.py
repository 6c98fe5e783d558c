"""The engine's writers of the event stream: ``metrics.jsonl``, the console (text log line and progress
bar) and TensorBoard. Each is a callable taking an :class:`~elastic_det.engine.events.Event`."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from ..records import METRICS, METRICS_EVENTS, metrics_event
from .events import Event
from .run_files import RunFiles

log = logging.getLogger(__name__)


class MetricsWriter:
    """``WORK_DIR/metrics.jsonl`` on rank 0: train and val records, and the run events of ``METRICS_EVENTS``.

    It starts *held*: records are kept in memory until :meth:`open`, which the trainer calls once the
    restore has succeeded, so that a rejected launch (a broken checkpoint, a config mismatch) leaves the
    run's file as it was, while what happened on the way (a ``fallback`` past a broken checkpoint) is
    still written, in order, once the run is valid.
    """

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self._held: list[dict[str, Any]] | None = []

    def open(self) -> None:
        held, self._held = self._held or [], None
        for record in held:
            self._write(record)

    def __call__(self, event: Event) -> None:
        if event.kind == "train":
            record = {"mode": "train", "step": event.step, **event.fields}
        elif event.kind == "val":
            record = {"mode": "val", "step": event.step, **event.fields}
        elif event.kind in METRICS_EVENTS:
            record = metrics_event(event.kind, event.step, event.time, event.fields)
            log.info("event %s at step %d %s", event.kind, event.step,
                     " ".join(f"{k}={v}" for k, v in event.fields.items()))
        else:
            return
        if self._held is not None:
            self._held.append(record)
        else:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.files.append_line(METRICS, json.dumps(record, sort_keys=False))


class ConsoleWriter:
    """The train record as a text line (console and ``train.log``) and, on a terminal, a tqdm progress bar.

    With a bar the console handler writes through ``tqdm.write`` (``run_files.setup_text_logging``), so log
    lines land above the bar instead of glued onto it, and the loss line still reaches ``train.log``."""

    def __init__(self, progress_bar: str, is_main: bool) -> None:
        self.show_bar = is_main and (progress_bar == "always" or (progress_bar == "auto" and sys.stderr.isatty()))
        self.is_main = is_main
        self._bar = None
        self._max_steps = 0

    def __call__(self, event: Event) -> None:
        if event.kind == "loop_start":
            self._max_steps = event.fields.get("max_steps") or 0
            if self.show_bar:
                from tqdm import tqdm

                self._bar = tqdm(total=self._max_steps, initial=event.step, unit="step", dynamic_ncols=True)
        elif event.kind == "step" and self._bar is not None:
            self._bar.update(1)
        elif event.kind == "train" and self.is_main:
            line = event.fields
            loss = float("nan") if line["loss"] is None else line["loss"]  # None: every update dropped
            if self._bar is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{line['lr']:.2e}")
            eta = int(line["eta_seconds"])
            log.info("step %d/%d epoch %d loss %.4f lr %.3e step_time %.3fs data_time %.3fs eta %dm%02ds",
                     event.step, self._max_steps, line["epoch"], loss, line["lr"], line["step_time"],
                     line["data_time"], eta // 60, eta % 60)
        elif event.kind == "run_end":
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBoardWriter:
    """Train and val scalars under ``train/`` and ``val/`` (rank 0, ``log.tensorboard: true``)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("log.tensorboard=true needs the tensorboard package: "
                              "pip install 'elastic_det[tensorboard]'") from e
        self._writer = SummaryWriter(log_dir)

    def __call__(self, event: Event) -> None:
        if self._writer is None:
            return
        if event.kind in ("train", "val"):
            for k, v in event.fields.items():
                if isinstance(v, float) and k != "eta_seconds":
                    self._writer.add_scalar(f"{event.kind}/{k}", v, event.step)
        elif event.kind == "run_end":
            self._writer.close()
            self._writer = None
