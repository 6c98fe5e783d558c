"""An exponential moving average of the model's weights (``ema.*``), as YOLOX's ``ModelEMA`` and
mmdetection's ``ExpMomentumEMA``.

After every global step whose update was applied (after ``optimizer.step``), every rank updates its own
copy: ``avg = d * avg + (1 - d) * weights`` for each floating-point parameter and buffer (integer buffers
such as BatchNorm's ``num_batches_tracked`` are copied), with ``d = decay * (1 - exp(-updates /
warmup_steps))`` (``d = decay`` when ``warmup_steps`` is 0) and ``updates`` counted after the increment.
The weights are the same on every rank (DDP), so the average is too: once per global step, whatever the
world size, without communication.

The checkpoint holds the averaged weights and the update counter next to the raw weights (``state["ema"]``,
see ``state.build_state``): a resume continues the same average with the same decay. Evaluation during
training, ``elastic_det.test`` and weight exports use the averaged weights.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from torch import nn

from ..config.schema import EmaConfig
from ..errors import CheckpointError
from ..models.weights import load_model_state

log = logging.getLogger(__name__)


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float, warmup_steps: int) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._model: nn.Module | None = None

    def current_decay(self, updates: int) -> float:
        """The decay of the ``updates``-th update (1-based)."""
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (once per applied global step)."""
        floats, others = self._tensors(model)
        self.updates += 1
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1.0 - self.current_decay(self.updates))
        for avg, w in others:
            avg.copy_(w)

    def _tensors(self, model: nn.Module) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], list]:
        """(averaged, live) floating-point tensor lists and the (averaged, live) pairs of the others; the
        state dicts' tensors share storage with the modules, so they are collected once."""
        if self._pairs is None or self._model is not model:
            own, live = self.module.state_dict(), model.state_dict()
            self._pairs = [(own[k], live[k]) for k in own]
            self._model = model
        floats = [(a, w) for a, w in self._pairs if a.is_floating_point()]
        others = [(a, w) for a, w in self._pairs if not a.is_floating_point()]
        return ([a for a, _ in floats], [w for _, w in floats]), others

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore the average and its counter (``decay``/``warmup_steps`` stay this run's: a change is
        logged)."""
        load_model_state(self.module, state["model"], f"{source} (ema.model)")
        if not isinstance(state.get("updates"), int):
            raise CheckpointError(f"Checkpoint {source}: its 'ema' entry has no update counter.")
        self.updates = state["updates"]
        for key in ("decay", "warmup_steps"):
            if key in state and state[key] != getattr(self, key):
                log.warning("ema.%s is %s, the checkpoint's average was built with %s: the average continues "
                            "with the new value", key, getattr(self, key), state[key])
        self._pairs = None


def build_ema(cfg: EmaConfig, model: nn.Module) -> ModelEMA | None:
    """The average of ``model`` (on its device), or None when ``ema.enabled`` is false."""
    return ModelEMA(model, cfg.decay, cfg.warmup_steps) if cfg.enabled else None


def averaged_weights(state: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The averaged weights of a training state (``state["ema"]["model"]``), None when it has none."""
    ema = state.get("ema")
    return ema.get("model") if isinstance(ema, dict) and isinstance(ema.get("model"), dict) else None
