"""The training loop: one global step at a time, hooks around it.

A global step consumes exactly ``global batch size`` samples, split across the current ranks and, on each
rank, into micro-batches. The loss of every micro-batch is weighted by its share of the global batch, so
the gradient is the mean over the global batch however it was split (DDP averages over ranks, hence the
factor ``world_size``). DDP synchronises once per step: every micro-batch but the last runs in
``no_sync``. Losses stay on the device until the step's one flag all-reduce (``_agree``), after the
backward and before the update: it carries the hooks' flags and the non-finite loss check, and its result
is the one host read of a step.
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

from ..data.plan import Progress, StepInfo, StepSchedule, split_micro
from ..models import amp
from .dist import DistInfo, any_rank_each, watched
from .events import EventStream
from .hook import EvalRecord, Hook, StepRecord
from .nonfinite import NonFiniteGuard
from .state import TrainingParts, build_state

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, *, parts: TrainingParts, model: nn.Module, schedule: StepSchedule,
                 batches: Iterable[tuple[list, list]], hooks: list[Hook], events: EventStream,
                 dist_info: DistInfo, progress: Progress, max_steps: int, micro_batch_size: int, amp_mode: str,
                 clip_grad_norm: float, meta: dict[str, Any] | None = None,
                 nonfinite: NonFiniteGuard | None = None) -> None:
        self.parts = parts  # model (unwrapped), optimizer, scheduler, scaler
        self.model = model  # what the step calls: the DDP wrapper when distributed
        self.schedule = schedule
        self.batches = batches
        self.hooks = hooks
        self.events = events  # what the runner publishes itself: loop_start, step, run_end
        self.dist = dist_info
        self.progress = progress
        self.start_step = progress.global_step
        self.max_steps = max_steps
        self.micro_batch_size = micro_batch_size
        self.amp_mode = amp_mode
        self.clip_grad_norm = clip_grad_norm
        self.meta = meta or {}  # saved with every checkpoint: config text (redacted), environment
        self.nonfinite = nonfinite or NonFiniteGuard()
        self.step: StepInfo | None = None  # the step being run
        self.last_step: StepRecord | None = None
        self.last_eval: EvalRecord | None = None
        self.stop_reason: str | None = None

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.parts.model

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation runs: the averaged weights with ``ema.enabled``, else the trained model."""
        return self.parts.ema.module if self.parts.ema is not None else self.parts.model

    @property
    def eval_weights(self) -> str:
        """``ema`` or ``raw``: which weights ``eval_model`` holds (the val record says so)."""
        return "ema" if self.parts.ema is not None else "raw"

    def request_stop(self, reason: str) -> None:
        """End the run after the current step (hooks still get ``after_step`` and ``after_run``)."""
        self.stop_reason = reason

    def record_eval(self, metrics: dict[str, float]) -> None:
        """Called by the hook that evaluates: sets ``last_eval`` and tells every hook."""
        self.last_eval = EvalRecord(self.progress.global_step, dict(metrics))
        self._call("after_eval")

    def train(self) -> None:
        how, error = "failed", None
        try:
            self.events.publish("loop_start", self.progress.global_step, max_steps=self.max_steps)
            self._call("before_run")
            batches = iter(self.batches)
            while self.progress.global_step < self.max_steps and self.stop_reason is None:
                self.step = self.schedule.at(self.progress.global_step)
                if self.step.step_in_epoch == 0 or self.progress.global_step == self.start_step:
                    self._call("before_epoch")
                start = time.perf_counter()
                images, targets = next(batches)
                data_time = time.perf_counter() - start
                self._call("before_step")
                with watched(f"step {self.step.global_step + 1}"):  # a stop signal must not wait on a lost peer
                    self.last_step = self.run_step(images, targets, data_time, start)
                self.progress = self.step.next_progress(self.progress.seed)
                self.events.publish("step", self.progress.global_step, step_time=self.last_step.step_time,
                                    data_time=data_time, world_size=self.dist.world_size)
                self._call("after_step")
                # from the sample cursor, not step_in_epoch: after a scale_lr resume at another world size
                # the epoch's remaining steps have another batch size than its first ones
                if self.progress.global_step == self.max_steps or self.schedule.epoch_done(self.progress):
                    self._call("after_epoch")
            self._call("after_run")
            stopped_early = self.stop_reason is not None or self.progress.global_step < self.max_steps
            how = "preempted" if stopped_early else "done"
        except BaseException as e:
            error = type(e).__name__
            raise
        finally:
            self.events.publish("run_end", self.progress.global_step, how=how, error=error)
            for hook in self.hooks:
                hook.close()

    def run_step(self, images: list[torch.Tensor], targets: list[dict], data_time: float,
                 start: float) -> StepRecord:
        """Forward and backward over this rank's share; the flag agreement; then (unless the update is
        dropped) clip, optimizer (and scaler) step and EMA update; LR step."""
        step = self.step
        loss_sums = self._forward_backward(images, targets, len(step.indices))
        optimizer, scaler = self.parts.optimizer, self.parts.scaler
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = None
        if self.clip_grad_norm > 0 and scaler is None:  # before the agreement: its finiteness is checked
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).detach()
        flags, skip = self._agree(loss_sums, grad_norm)
        if not skip:
            if self.clip_grad_norm > 0:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm).detach()
                else:
                    torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad_norm, grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if self.parts.ema is not None:
                self.parts.ema.update(self.parts.model)
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        self.parts.scheduler.step()
        return StepRecord(index=step.global_step, epoch=step.epoch, indices=step.indices, loss_sums=loss_sums,
                          num_samples=len(images), lr=lr, grad_norm=grad_norm, data_time=data_time,
                          step_time=time.perf_counter() - start, flags=flags, skipped=skip)

    def _agree(self, loss_sums: dict[str, torch.Tensor],
               grad_norm: torch.Tensor | None) -> tuple[dict[str, bool], bool]:
        """The step's one flag all-reduce: every hook's ``step_flags`` and the non-finite check, OR-ed over
        the ranks; returns the hooks' agreed flags and whether the update is dropped (or raises to stop)."""
        local: dict[str, bool] = {}
        for hook in self.hooks:
            local.update(hook.step_flags(self))
        names, device_flags = self.nonfinite.local_flags(loss_sums, grad_norm)
        agreed = any_rank_each(list(local.values()), device_flags)
        flags = dict(zip(local, agreed[:len(local)], strict=True))
        skip = self.nonfinite.decide(self.step.global_step + 1, names, agreed[len(local):])
        return flags, skip

    def _forward_backward(self, images: list[torch.Tensor], targets: list[dict],
                          global_batch_size: int) -> dict[str, torch.Tensor]:
        device = self.dist.device
        scaler = self.parts.scaler
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
                with amp.autocast(self.amp_mode, device):
                    losses = name_losses(self.model(imgs, tgts))
                total = sum(v for k, v in losses.items() if "loss" in k)
                scaled = total * (len(chunk) * self.dist.world_size / global_batch_size)
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(chunk)
        return sums

    def state_dict(self) -> dict[str, Any]:
        """The full training state at the current progress (see ``elastic_det.state``)."""
        return build_state(self.parts, self.progress, self.hook_states(), self.meta)

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self)

    def hook_states(self) -> dict[str, dict]:
        """The hooks' states by class name, and the non-finite counters (``NonFiniteGuard``)."""
        states = {type(h).__name__: s for h in self.hooks if (s := h.state_dict()) is not None}
        return {**states, type(self.nonfinite).__name__: self.nonfinite.state_dict()}

    def load_hook_states(self, states: dict[str, dict]) -> None:
        for hook in [*self.hooks, self.nonfinite]:
            if type(hook).__name__ in states:
                hook.load_state_dict(states[type(hook).__name__])


def name_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's RetinaNet/FCOS/SSD name their terms without "loss" ("classification", ...). As in
    mmdetection's ``parse_losses`` the total is the sum of terms whose name contains "loss", so a dict
    with no such name gets the prefix on every term."""
    if any("loss" in k for k in losses):
        return losses
    return {f"loss_{k}": v for k, v in losses.items()}
