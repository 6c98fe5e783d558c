"""The global sample order, replacing ``DistributedSampler``: the one home of the epoch arithmetic.

Every rank computes the same order from ``(seed, epoch)`` alone, cuts it into global batches, and takes
its contiguous share of the current one. Nothing depends on the world size, the rank or how many
restarts happened, so the checkpointed cursor (:class:`Progress`) is enough to continue exactly, with any
number of ranks:

    plan = ElasticBatchPlan(len(dataset), seed=cfg.seed)
    schedule = StepSchedule(plan, global_batch_size, start=progress)
    step = schedule.at(global_step)                     # epoch, step_in_epoch, the global batch
    share = split_share(step.indices, rank, world_size)
    for micro in split_micro(share, cfg.data.micro_batch_size): ...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import DataError


class ElasticBatchPlan:
    """A permutation of ``range(num_samples)`` per epoch, read in global batches.

    With ``drop_last`` an epoch is ``floor(N / B)`` full batches (the tail of the permutation is not
    used that epoch; the next epoch is a new permutation); without it, ``ceil(N / B)`` batches, the last
    one smaller.

    With ``group_ids`` (e.g. :func:`aspect_groups`), each epoch's order is arranged so that consecutive
    chunks of ``group_batch_size`` come from one group: the permutation is split by group, each group cut
    into full batches, the batches shuffled, and the leftovers of all groups appended at the end. Every
    sample is still in the order exactly once.
    """

    def __init__(self, num_samples: int, seed: int, drop_last: bool = True,
                 group_ids: Sequence[int] | None = None, group_batch_size: int | None = None):
        if num_samples <= 0:
            raise DataError("The training dataset is empty (after filtering images without boxes).")
        if group_ids is not None:
            if len(group_ids) != num_samples:
                raise ValueError(f"group_ids has {len(group_ids)} entries for {num_samples} samples")
            if not group_batch_size or group_batch_size <= 0:
                raise ValueError("group_ids needs a positive group_batch_size")
        self.num_samples = num_samples
        self.seed = seed
        self.drop_last = drop_last
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)
        self.group_batch_size = group_batch_size
        self._cached: tuple[int, list[int]] | None = None

    def epoch_order(self, epoch: int) -> list[int]:
        """The sample order of ``epoch``; the last epoch asked for is cached."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._compute_order(epoch))
        return self._cached[1]

    def _compute_order(self, epoch: int) -> list[int]:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed % 2**64, epoch])))
        # argsort of uniform keys, not Generator.permutation: its output depends only on the PCG64 stream,
        # which numpy keeps stable, so the order survives numpy upgrades between restarts.
        order = np.argsort(rng.random(self.num_samples), kind="stable")
        if self.group_ids is None:
            return order.tolist()
        size = self.group_batch_size
        batches, leftovers = [], []
        groups = self.group_ids[order]
        for g in np.unique(groups):
            members = order[groups == g]
            full = len(members) // size * size
            batches += [members[i:i + size] for i in range(0, full, size)]
            leftovers.append(members[full:])
        shuffled = [batches[i] for i in np.argsort(rng.random(len(batches)), kind="stable")]
        return np.concatenate([*shuffled, *leftovers]).tolist()

    def batch(self, epoch: int, offset: int, batch_size: int) -> list[int]:
        """``batch_size`` samples of ``epoch`` from position ``offset`` (fewer at the end of the epoch)."""
        return self.epoch_order(epoch)[offset:offset + batch_size]


def split_share(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of a global batch; the first ``len % world_size`` ranks get one
    more (like ``numpy.array_split``), so shares differ by at most one and may be empty."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start:start + base + (rank < extra)])


def split_micro(share: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Chunks of at most ``micro_batch_size`` (0 = the whole share as one chunk); none for an empty share."""
    if not share:
        return []
    if micro_batch_size <= 0:
        return [list(share)]
    return [list(share[i:i + micro_batch_size]) for i in range(0, len(share), micro_batch_size)]


def aspect_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Group 0 for wide or square images (w >= h), 1 for tall ones."""
    return [0 if r >= 1.0 else 1 for r in aspect_ratios]


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

    def __init__(self, plan: ElasticBatchPlan, batch_size: int, start: Progress) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.plan = plan
        self.num_samples = plan.num_samples
        self.batch_size = batch_size
        self.drop_last = plan.drop_last
        self.start = start
        self.steps_per_epoch = self._steps_from(0)
        if self.steps_per_epoch == 0:
            raise DataError(f"The training set has {self.num_samples} images, fewer than one global batch "
                            f"({batch_size}), and data.drop_last is set: an epoch has no batch. Lower "
                            "data.global_batch_size or set data.drop_last=false.")

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
