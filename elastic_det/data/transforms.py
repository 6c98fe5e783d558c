"""Augmentation with ``torchvision.transforms.v2``; boxes are transformed by the library with the image.

All randomness comes from torch's global generator, which :class:`elastic_det.data.loader.TrainSamples`
seeds per sample from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..config.schema import TransformConfig


def build_transforms(cfg: TransformConfig, train: bool) -> v2.Compose:
    """``(image, target) -> (float image in [0, 1], target)`` with boxes clamped and empty ones removed.

    For evaluation (``train=False``) the random parts are off: no flip or colour jitter, and a
    multi-scale ``min_size`` uses its largest value. Evaluation normally keeps ``min_size`` empty: the
    torchvision detectors resize internally and map their boxes back to the input image, whose
    coordinates the ground truth is in.
    """
    ops: list[torch.nn.Module] = []
    if cfg.min_size:
        sizes = list(cfg.min_size) if train else [max(cfg.min_size)]
        ops.append(v2.RandomShortestSize(min_size=sizes, max_size=cfg.max_size, antialias=True))
    if train and cfg.flip_prob > 0:
        ops.append(v2.RandomHorizontalFlip(p=cfg.flip_prob))
    if train and cfg.color_jitter > 0:
        s = cfg.color_jitter
        ops.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
    ]
    return v2.Compose(ops)
