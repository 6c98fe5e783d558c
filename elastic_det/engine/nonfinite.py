"""Non-finite losses (``train.nonfinite``): found on every rank at the step they happen, before the update.

Each rank checks its own loss terms (those whose name contains "loss": what is back-propagated) and,
without AMP's GradScaler, the total gradient norm, on the device. The flags travel in the step's one flag
all-reduce (``Runner._agree``: the checkpoint hook's preemption/interval flags ride in the same
collective), so every rank knows at once that *some* rank saw a NaN or an infinity, and which terms:

* ``stop``: every rank raises :class:`NonFiniteLossError` (exit 65, final: the launchers do not retry)
  before the optimizer step, so nothing after the previous step is ever saved; the message names the
  step, the terms and the newest committed checkpoint (filled in by the trainer).
* ``skip``: every rank drops the step's update (no optimizer step, no EMA update; the LR schedule and the
  data cursor advance, as for a GradScaler skip), and the run stops as with ``stop`` once ``patience``
  steps in a row were skipped. Skips are counted (``metrics.jsonl``: a ``nonfinite_skip`` event per step,
  ``skipped_steps`` in the train records) and the count is resumable.

AMP's GradScaler keeps doing its own skipping: with a scaler, infinite *gradients* are its business (it
lowers the scale); a non-finite *loss* is still caught here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import NonFiniteError

SLOTS = 16
"""Flags per step for the terms: the loss terms in name order (the same on every rank), the last slot
shared by the terms beyond it. A fixed width, so that the all-reduce has the same size on every rank."""

GRAD_NORM = "grad_norm"


class NonFiniteLossError(NonFiniteError):
    """A non-finite loss stopped the run (``train.nonfinite``); every rank raises it at the same step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step

    def with_checkpoint(self, location: str | None) -> NonFiniteLossError:
        """The same error, its message naming the newest committed checkpoint (``location``)."""
        newest = (f"The newest good checkpoint is {location}: it stays the newest, and a relaunch would resume "
                  f"from it into the same divergence." if location else "No checkpoint was committed before it.")
        return NonFiniteLossError(f"{self} {newest} Lower optimizer.lr, set optimizer.clip_grad_norm, check the "
                                  "data of that step (data.trace=true lists its image ids), or set "
                                  "train.nonfinite=skip to drop such steps.", self.step)


class NonFiniteGuard:
    """The policy and its counters; ``state_dict`` is saved with the hooks' states (key ``NonFiniteGuard``)."""

    def __init__(self, policy: str = "stop", patience: int = 10,
                 on_skip: Callable[[int, list[str], int, int], None] | None = None) -> None:
        self.policy = policy
        self.patience = patience
        self.on_skip = on_skip  # on_skip(step, terms, in_a_row, total): rank 0 writes the event
        self.in_a_row = 0
        self.skipped = 0

    def local_flags(self, loss_sums: dict[str, torch.Tensor],
                    grad_norm: torch.Tensor | None) -> tuple[list[str], torch.Tensor]:
        """The names checked and this rank's flags (1 = not finite) as a device tensor of ``SLOTS``."""
        names = sorted(k for k in loss_sums if "loss" in k)
        values = [loss_sums[k].detach().reshape(()) for k in names]
        if grad_norm is not None:
            names.append(GRAD_NORM)
            values.append(grad_norm.detach().reshape(()).to(values[0].device if values else grad_norm.device))
        if not values:
            return names, torch.zeros(SLOTS, dtype=torch.int64)
        bad = (~torch.isfinite(torch.stack([v.float() for v in values]))).to(torch.int64)
        slots = torch.zeros(SLOTS, dtype=torch.int64, device=bad.device)
        head = min(len(names), SLOTS)
        slots[:head] = bad[:head]
        if len(names) > SLOTS:
            slots[SLOTS - 1] = bad[SLOTS - 1:].max()
        return names, slots

    def decide(self, step: int, names: list[str], agreed: list[bool]) -> bool:
        """True to skip the update of ``step`` (1-based: the step that would complete as global step
        ``step``); raises :class:`NonFiniteLossError` to stop. ``agreed``: the slots, OR-ed over ranks."""
        if not any(agreed):
            self.in_a_row = 0
            return False
        terms = [n for i, n in enumerate(names) if agreed[min(i, SLOTS - 1)]]
        what = ", ".join(terms) or "a loss term"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"Training stopped at global step {step}: a non-finite value (NaN or inf) in {what} on at least "
                f"one rank (train.nonfinite=stop). The step's update was not applied and nothing after step "
                f"{step - 1} was saved.", step)
        self.in_a_row += 1
        self.skipped += 1
        if self.on_skip is not None:
            self.on_skip(step, terms, self.in_a_row, self.skipped)
        if self.in_a_row >= self.patience:
            raise NonFiniteLossError(
                f"Training stopped at global step {step}: {self.in_a_row} steps in a row (train.nonfinite_patience="
                f"{self.patience}) had a non-finite value (NaN or inf), the last in {what}; their updates were "
                f"dropped (train.nonfinite=skip, {self.skipped} skipped in all).", step)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.in_a_row = int(state.get("in_a_row", 0))
        self.skipped = int(state.get("skipped", 0))
