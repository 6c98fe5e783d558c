"""The global sample order, replacing ``DistributedSampler``.

Every rank computes the same order from ``(seed, epoch)`` alone, cuts it into global batches, and takes
its contiguous share of the current one. Nothing depends on the world size, the rank or how many
restarts happened, so a checkpointed cursor ``(epoch, step_in_epoch)`` or a global step is enough to
continue exactly, with any number of ranks:

    plan = ElasticBatchPlan(len(dataset), seed=cfg.seed)
    epoch, step_in_epoch, batch = plan.step_batch(global_step, cfg.data.global_batch_size)
    share = split_share(batch, rank, world_size)
    for micro in split_micro(share, cfg.data.micro_batch_size): ...
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def batches_per_epoch(self, batch_size: int) -> int:
        _check_batch_size(batch_size)
        if self.drop_last:
            return self.num_samples // batch_size
        return -(-self.num_samples // batch_size)

    def batch(self, epoch: int, offset: int, batch_size: int) -> list[int]:
        """``batch_size`` samples of ``epoch`` from position ``offset`` (fewer at the end of the epoch)."""
        return self.epoch_order(epoch)[offset:offset + batch_size]

    def step_batch(self, global_step: int, batch_size: int) -> tuple[int, int, list[int]]:
        """``(epoch, step_in_epoch, indices)`` of a global step, for a batch size fixed since step 0.

        Arithmetic on the step, then one permutation: resuming at step 10**6 costs what step 10 does.
        """
        per_epoch = self.batches_per_epoch(batch_size)
        if per_epoch == 0:
            raise DataError(f"The training dataset has {self.num_samples} samples, fewer than the global "
                            f"batch size {batch_size}, and data.drop_last is set: an epoch has no batch. "
                            f"Lower data.global_batch_size or set data.drop_last=false.")
        epoch, step_in_epoch = divmod(global_step, per_epoch)
        return epoch, step_in_epoch, self.batch(epoch, step_in_epoch * batch_size, batch_size)


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


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
