"""Optimizer and learning-rate schedule (in global steps); the runner steps both."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..config.schema import OptimizerConfig, ScheduleConfig


def build_optimizer(cfg: OptimizerConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norm layers and biases (the detectron2 default)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def lr_factor(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at global step ``s``: linear warmup, then the decay policy."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            alpha = step / cfg.warmup_steps
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        else:
            warm = 1.0
        if cfg.policy == "multistep":
            decay = cfg.gamma ** sum(step >= m for m in cfg.milestones)
        elif cfg.policy == "cosine":
            span = max(max_steps - cfg.warmup_steps, 1)
            progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
            decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1.0
        return warm * decay

    return factor


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over a plain function: its state is just the step count, so it resumes exactly and
    a changed ``max_steps`` or base learning rate (``scale_lr``) applies from the resumed step on."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, base_lr: float) -> None:
    """Load the step count but keep this run's base learning rate (it may scale with the world size)."""
    scheduler.load_state_dict(state)
    scheduler.base_lrs = [base_lr for _ in scheduler.optimizer.param_groups]
    # LambdaLR.get_lr's formula; calling get_lr() outside step() warns on every resume
    lrs = [base_lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["initial_lr"] = base_lr
        group["lr"] = lr
