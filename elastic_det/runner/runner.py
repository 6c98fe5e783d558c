"""The training loop: one global step at a time, hooks around it.

A global step consumes exactly ``global batch size`` samples, split across the current ranks and, on each
rank, into micro-batches. The loss of every micro-batch is weighted by its share of the global batch, so
the gradient is the mean over the global batch however it was split (DDP averages over ranks, hence the
factor ``world_size``). DDP synchronises once per step: every micro-batch but the last runs in
``no_sync``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.plan import split_micro
from ..dist import DistInfo
from .hook import Hook
from .progress import Progress, StepInfo, StepSchedule

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                 schedule: StepSchedule, batches: Iterable[tuple[list, list]], hooks: list[Hook],
                 dist_info: DistInfo, progress: Progress, max_steps: int, micro_batch_size: int,
                 amp_dtype: torch.dtype | None, meta: dict[str, Any] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.meta = meta or {}  # saved with every checkpoint: config text, environment
        self.scaler = scaler
        self.schedule = schedule
        self.batches = batches
        self.hooks = hooks
        self.dist = dist_info
        self.progress = progress
        self.start_step = progress.global_step
        self.max_steps = max_steps
        self.micro_batch_size = micro_batch_size
        self.amp_dtype = amp_dtype
        self.step: StepInfo | None = None
        self.step_outputs: dict[str, Any] = {}
        self.data_time = 0.0
        self.stop_reason: str | None = None  # set by a hook to end the run after this step
        self.latest_metrics: dict[str, float] = {}  # the last evaluation's results (rank 0)

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def train(self) -> None:
        self._call("before_run")
        batches = iter(self.batches)
        while self.progress.global_step < self.max_steps and self.stop_reason is None:
            self.step = self.schedule.at(self.progress.global_step)
            if self.step.step_in_epoch == 0 or self.progress.global_step == self.start_step:
                self._call("before_epoch")
            start = time.perf_counter()
            images, targets = next(batches)
            self.data_time = time.perf_counter() - start
            self._call("before_step")
            self.step_outputs = self.run_step(images, targets, len(self.step.indices))
            self.progress = self.step.next_progress(self.progress.seed)
            self._call("after_step")
            if self.progress.global_step == self.max_steps or self._epoch_ends():
                self._call("after_epoch")
        self._call("after_run")

    def _epoch_ends(self) -> bool:
        # From the sample cursor, not step_in_epoch: after a scale_lr resume at another world size the
        # epoch's remaining steps have another batch size than its first ones, so step counts don't add up.
        return self.schedule.epoch_done(self.progress)

    def run_step(self, images: list[torch.Tensor], targets: list[dict], global_batch_size: int) -> dict[str, Any]:
        """Forward and backward over this rank's share; the optimizer steps in ``OptimizerHook``."""
        device = self.dist.device
        chunks = split_micro(list(range(len(images))), self.micro_batch_size)
        sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            imgs = [images[j].to(device, non_blocking=True) for j in chunk]
            tgts = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in targets[j].items()}
                    for j in chunk]
            last = i == len(chunks) - 1
            no_sync = self.model.no_sync() if isinstance(self.model, DistributedDataParallel) and not last \
                else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    losses = name_losses(self.model(imgs, tgts))
                total = sum(v for k, v in losses.items() if "loss" in k)
                weight = len(chunk) * self.dist.world_size / global_batch_size
                scaled = total * weight
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(chunk)
        return {"loss_sums": {k: float(v) for k, v in sums.items()}, "num_samples": len(images)}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.amp_dtype)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)

    def hook_states(self) -> dict[str, dict]:
        return {type(h).__name__: s for h in self.hooks if (s := h.state_dict()) is not None}

    def load_hook_states(self, states: dict[str, dict]) -> None:
        for hook in self.hooks:
            if type(hook).__name__ in states:
                hook.load_state_dict(states[type(hook).__name__])


def name_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's RetinaNet/FCOS/SSD name their terms without "loss" ("classification", ...). As in
    mmdetection's ``parse_losses`` the total is the sum of terms whose name contains "loss", so a dict
    with no such name gets the prefix on every term."""
    if any("loss" in k for k in losses):
        return losses
    return {f"loss_{k}": v for k, v in losses.items()}
