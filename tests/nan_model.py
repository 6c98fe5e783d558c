"""A plug-in model (``model.type=nan_model:build``, tests/ on PYTHONPATH) whose loss turns NaN at chosen steps.

The tiny FCOS, wrapped: its ``classification`` term (``loss_classification`` in the logs) is multiplied by
NaN (so the gradients are NaN too) at the 1-based training forward calls listed in ``NAN_STEPS`` (``"5"`` or
``"3,5,6"``), on the rank ``NAN_RANK`` only (default: every rank). Without micro-batches a training forward
call is a global step.
"""

from __future__ import annotations

import os

from torch import nn

from elastic_det.config.schema import ModelConfig
from elastic_det.models.tiny import tiny_fcos


class NanAt(nn.Module):
    def __init__(self, inner: nn.Module, steps: set[int], rank: str) -> None:
        super().__init__()
        self.inner = inner
        self.steps = steps
        self.on_this_rank = rank in ("", os.environ.get("RANK", "0"))
        self.calls = 0

    def forward(self, images, targets=None):
        out = self.inner(images, targets)
        if self.training:
            self.calls += 1
            if self.on_this_rank and self.calls in self.steps:
                out = {**out, "classification": out["classification"] * float("nan")}
        return out


def build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    steps = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s.strip()}
    inner = tiny_fcos(num_classes, cfg.width, cfg.norm, cfg.min_size, cfg.max_size)
    return NanAt(inner, steps, os.environ.get("NAN_RANK", ""))
