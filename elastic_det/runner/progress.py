"""Where training stands, in world-size-free terms, and which samples each global step consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.plan import ElasticBatchPlan


@dataclass
class Progress:
    """The cursor saved in every checkpoint: the next step to run and where it starts in the sample order."""

    global_step: int = 0  # global steps completed
    epoch: int = 0
    step_in_epoch: int = 0
    sample_offset: int = 0  # samples of `epoch` already consumed
    seed: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> Progress:
        return cls(**{k: int(v) for k, v in state.items()})


@dataclass(frozen=True)
class StepInfo:
    global_step: int  # the step's index (0-based): after it, global_step + 1 steps are done
    epoch: int
    step_in_epoch: int
    offset: int  # position of the batch in the epoch's order
    indices: list[int]  # the global batch, as dataset indices

    def next_progress(self, seed: int) -> Progress:
        return Progress(self.global_step + 1, self.epoch, self.step_in_epoch + 1,
                        self.offset + len(self.indices), seed)


class StepSchedule:
    """Maps any global step at or after a cursor to its global batch in O(1).

    Nothing is replayed: step ``s`` is found arithmetically from the cursor, and only the permutation of
    the epoch it falls in is computed. ``batch_size`` may differ from the one the cursor was made with
    (the ``scale_lr`` policy after a world-size change): the cursor counts samples.
    """

    def __init__(self, plan: ElasticBatchPlan, num_samples: int, batch_size: int, drop_last: bool,
                 start: Progress) -> None:
        self.plan = plan
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.start = start
        self.steps_per_epoch = self._steps_from(0)

    def _steps_from(self, offset: int) -> int:
        remaining = max(self.num_samples - offset, 0)
        if self.drop_last:
            return remaining // self.batch_size
        return -(-remaining // self.batch_size)

    def epoch_done(self, progress: Progress) -> bool:
        """No step of ``progress.epoch`` is left after the cursor (the next step starts a new epoch)."""
        return self._steps_from(progress.sample_offset) == 0

    def at(self, global_step: int) -> StepInfo:
        k = global_step - self.start.global_step
        if k < 0:
            raise ValueError(f"step {global_step} is before the cursor at {self.start.global_step}")
        left_in_first = self._steps_from(self.start.sample_offset)
        if k < left_in_first:
            epoch = self.start.epoch
            step_in_epoch = self.start.step_in_epoch + k
            offset = self.start.sample_offset + k * self.batch_size
        else:
            k -= left_in_first
            epoch = self.start.epoch + 1 + k // self.steps_per_epoch
            step_in_epoch = k % self.steps_per_epoch
            offset = step_in_epoch * self.batch_size
        indices = self.plan.batch(epoch, offset, self.batch_size)
        return StepInfo(global_step, epoch, step_in_epoch, offset, indices)
