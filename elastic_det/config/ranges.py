"""The valid range of every numeric config key, checked by ``config.load_config``.

A key ending in ``[]`` means each item of a list. Cross-key rules (max_size >= min_size, ...) live with the
other checks in ``config.rules``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric config key: ``low <= value <= high`` (``>`` / ``<`` when open)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) + (f" ({self.why})" if self.why else "")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)

RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE,
    "data.shapes.num_train": Range(1),
    "data.shapes.num_val": Range(1),
    "data.shapes.image_size": Range(32, why="the shapes generator draws objects of 16 px and more"),
    "data.shapes.max_objects": Range(1),
    "data.shapes.seed": NON_NEGATIVE,
    "data.global_batch_size": POSITIVE,
    "data.micro_batch_size": NON_NEGATIVE,
    "data.samples_per_device": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.val_batch_size": POSITIVE,
    "data.cache.max_gb": NON_NEGATIVE,
    "data.cache.prefetch_steps": NON_NEGATIVE,
    "data.cache.prefetch_threads": NON_NEGATIVE,
    "data.train_transforms.min_size[]": POSITIVE,
    "data.train_transforms.max_size": POSITIVE,
    "data.train_transforms.flip_prob": FRACTION,
    "data.train_transforms.color_jitter": FRACTION,
    "data.val_transforms.min_size[]": POSITIVE,
    "data.val_transforms.max_size": POSITIVE,
    "data.val_transforms.flip_prob": FRACTION,
    "data.val_transforms.color_jitter": FRACTION,
    "model.num_classes": NON_NEGATIVE,
    "model.min_size": POSITIVE,
    "model.max_size": POSITIVE,
    "model.trainable_backbone_layers": Range(0, 5),
    "model.width": Range(32, why="the heads' GroupNorm needs 32 groups"),
    "optimizer.lr": POSITIVE,
    "optimizer.momentum": Range(0, 1, high_open=True),
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.betas[]": Range(0, 1, high_open=True),
    "optimizer.clip_grad_norm": NON_NEGATIVE,
    "schedule.warmup_steps": NON_NEGATIVE,
    "schedule.warmup_factor": FRACTION,
    "schedule.milestones[]": NON_NEGATIVE,
    "schedule.gamma": POSITIVE,
    "schedule.min_lr_ratio": FRACTION,
    "train.max_steps": NON_NEGATIVE,
    "train.max_epochs": NON_NEGATIVE,
    "train.eval_interval": NON_NEGATIVE,
    "train.nonfinite_patience": Range(1),
    "ema.decay": Range(0, 1, low_open=True, high_open=True, why="the weight of the old average per step"),
    "ema.warmup_steps": NON_NEGATIVE,
    "checkpoint.interval": NON_NEGATIVE,
    "checkpoint.interval_minutes": NON_NEGATIVE,
    "checkpoint.keep_last": NON_NEGATIVE,
    "checkpoint.keep_every": NON_NEGATIVE,
    "checkpoint.max_failures": Range(1),
    "checkpoint.timeout_seconds": POSITIVE,
    "log.interval": POSITIVE,
    "dist.timeout_seconds": POSITIVE,
}
"""Every numeric key with a valid range (``key[]``: each item of a list). Checked when a config is loaded."""
