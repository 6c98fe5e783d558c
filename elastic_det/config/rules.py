"""The config rules that involve more than one key (max_size >= min_size, a remote work dir against the
collective timeout, ...), checked by ``config.load_config`` after each key's choices and range."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

MASK_MODELS = ("tiny_mask_rcnn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
"""The model types that predict masks (``data.masks`` follows them when left null)."""


def check_rules(cfg: Any) -> None:
    """Raise ``ConfigError`` naming the keys of the first cross-key rule that ``cfg`` breaks."""
    if cfg.train.max_steps == 0 and cfg.train.max_epochs == 0:
        raise ConfigError("Set train.max_steps or train.max_epochs (both are 0).")
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"Config key 'optimizer.betas' must hold two numbers, got {cfg.optimizer.betas!r}.")
    if cfg.model.width % 32:
        raise ConfigError(f"Config key 'model.width' is {cfg.model.width}; it must be a multiple of 32 (the "
                          "heads' GroupNorm has 32 groups).")
    if cfg.model.max_size < cfg.model.min_size:
        raise ConfigError(f"Config key 'model.max_size' ({cfg.model.max_size}) is smaller than 'model.min_size' "
                          f"({cfg.model.min_size}).")
    if cfg.schedule.milestones != sorted(cfg.schedule.milestones):
        raise ConfigError(f"Config key 'schedule.milestones' must be increasing, got {cfg.schedule.milestones}.")
    stalled_save = 8 * cfg.checkpoint.timeout_seconds + 10  # two failing requests of a save, each retried
    remote = "://" in cfg.work_dir and not cfg.work_dir.startswith("file://")
    if remote and stalled_save >= cfg.dist.timeout_seconds:
        raise ConfigError(f"dist.timeout_seconds={cfg.dist.timeout_seconds:g} must exceed the longest save on a "
                          f"stalled store (8 x checkpoint.timeout_seconds + 10 = {stalled_save:g} s): the other "
                          "ranks wait for rank 0's save in a collective. Raise dist.timeout_seconds or lower "
                          "checkpoint.timeout_seconds.")
    if cfg.model.type in MASK_MODELS and not cfg.data.masks:
        raise ConfigError(f"model.type {cfg.model.type} predicts masks and trains on them, but data.masks is "
                          "false: set data.masks=true (or leave it null).")
    if cfg.data.masks and cfg.data.type == "voc":
        raise ConfigError("data.masks is true but data.type voc has boxes only: masks need COCO segmentations "
                          "(data.type coco or shapes).")
    if cfg.data.group_by_aspect_ratio and cfg.elastic.batch_policy == "scale_lr":
        raise ConfigError("data.group_by_aspect_ratio needs elastic.batch_policy=fixed_global: grouped "
                          "global batches have a fixed size.")

