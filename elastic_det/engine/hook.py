"""The hook API: small objects called around the run, each epoch, each global step and each evaluation.

The runner does the step itself (forward, backward, optimizer, scaler, LR); hooks observe and decide.
They read two typed records instead of each other's fields:

* ``runner.last_step`` (:class:`StepRecord`): what the step that just ended consumed and produced;
* ``runner.last_eval`` (:class:`EvalRecord` or None): the newest evaluation, set by
  ``runner.record_eval``, which then calls every hook's ``after_eval``.

Hooks run in list order. The only order that matters is in ``after_step``: a hook that evaluates comes
before the one that saves, so a checkpoint at step *s* carries the metrics of the evaluation at *s*.
``after_run`` runs when the loop ends without an exception (finished, or stopped by a hook); ``close``
always runs, last, even after an exception: it releases what the hook holds (a save in flight, open
writers) and must not raise. A hook with state worth resuming returns it from ``state_dict`` and gets it
back from ``load_state_dict``; it is saved in every checkpoint under the hook's class name.

Flags that all ranks must agree on every step (a preemption signal, a save that is due) come from
``step_flags``: the runner ORs them over ranks in the step's one flag all-reduce, before the update (the
same collective carries the non-finite loss check, see ``engine.nonfinite``), and hands the result to
every hook as ``runner.last_step.flags``. A hook never runs a collective of its own per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runner import Runner


@dataclass(frozen=True)
class StepRecord:
    """One global step, as the runner saw it on this rank."""

    index: int  # 0-based: after it, index + 1 global steps are done
    epoch: int
    indices: list[int]  # the global batch, as dataset indices (every rank knows all of it)
    loss_sums: dict[str, torch.Tensor]  # this rank's loss terms summed over its samples, on the device
    num_samples: int  # this rank's share of the global batch
    lr: float  # the learning rate the step used
    grad_norm: torch.Tensor | None  # before clipping; None when clipping is off
    data_time: float  # seconds waiting for the batch
    step_time: float  # seconds for the whole step, data included (not synchronised with the device)
    flags: dict[str, bool] = field(default_factory=dict)  # every hook's step_flags, OR-ed over the ranks
    skipped: bool = False  # the update was dropped (train.nonfinite=skip): the losses are not finite


@dataclass(frozen=True)
class EvalRecord:
    step: int  # global steps done when the model was evaluated
    metrics: dict[str, float]  # COCO metrics (rank 0; empty on the other ranks)


class Hook:
    def before_run(self, runner: Runner) -> None: ...

    def before_epoch(self, runner: Runner) -> None: ...

    def before_step(self, runner: Runner) -> None: ...

    def step_flags(self, runner: Runner) -> dict[str, bool]:
        """This rank's flags for the step's agreement (names unique across hooks); see the module docstring."""
        return {}

    def after_step(self, runner: Runner) -> None: ...

    def after_eval(self, runner: Runner) -> None: ...

    def after_epoch(self, runner: Runner) -> None: ...

    def after_run(self, runner: Runner) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
