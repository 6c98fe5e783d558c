import itertools

import numpy as np
import pytest

from elastic_det.data import ElasticBatchPlan, aspect_groups, split_micro, split_share
from elastic_det.data.plan import Progress, StepSchedule
from elastic_det.errors import DataError


def test_epoch_order_is_a_permutation_that_depends_only_on_seed_and_epoch():
    plan = ElasticBatchPlan(100, seed=3)
    orders = [plan.epoch_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(100)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    # Another instance, asked in another order of epochs, and with another batch size in between.
    other = ElasticBatchPlan(100, seed=3)
    step_batch(other, 57, 7)
    assert [other.epoch_order(e) for e in (2, 0, 1)] == [orders[2], orders[0], orders[1]]
    assert ElasticBatchPlan(100, seed=4).epoch_order(0) != orders[0]
    # Fixed expectation: the order must not change between versions (resuming an old run).
    assert ElasticBatchPlan(10, seed=0).epoch_order(0) == REFERENCE_ORDER


REFERENCE_ORDER = [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]


def step_batch(plan: ElasticBatchPlan, step: int, batch_size: int) -> tuple[int, int, list[int]]:
    """``(epoch, step_in_epoch, indices)`` of a global step of a run that started at step 0."""
    info = StepSchedule(plan, batch_size, Progress()).at(step)
    return info.epoch, info.step_in_epoch, info.indices


def per_epoch(plan: ElasticBatchPlan, batch_size: int) -> int:
    return StepSchedule(plan, batch_size, Progress()).steps_per_epoch


@pytest.mark.parametrize("drop_last", [True, False])
def test_step_batch_matches_iterating_the_epochs(drop_last):
    n, b = 23, 5
    plan = ElasticBatchPlan(n, seed=1, drop_last=drop_last)
    n_steps = per_epoch(plan, b)
    assert n_steps == (4 if drop_last else 5)
    step = 0
    for epoch in range(3):
        for k in range(n_steps):
            expected = plan.epoch_order(epoch)[k * b:(k + 1) * b]
            assert step_batch(plan, step, b) == (epoch, k, expected)
            assert plan.batch(epoch, k * b, b) == expected
            step += 1
    last = step_batch(plan, n_steps - 1, b)[2]
    assert len(last) == (5 if drop_last else 3)  # the last partial batch: kept smaller, or dropped


def test_every_sample_exactly_once_per_epoch_without_drop_last():
    plan = ElasticBatchPlan(23, seed=2, drop_last=False)
    for epoch in range(2):
        seen = [i for k in range(per_epoch(plan, 5)) for i in step_batch(plan, epoch * 5 + k, 5)[2]]
        assert sorted(seen) == list(range(23))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shares_reassemble_the_global_batch(world_size):
    for batch in ([], list(range(1)), list(range(7)), list(range(16)), list(range(100, 117))):
        shares = [split_share(batch, rank, world_size) for rank in range(world_size)]
        assert list(itertools.chain(*shares)) == batch
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert sizes == [len(a) for a in np.array_split(batch, world_size)]


def test_split_micro():
    assert split_micro([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert split_micro([1, 2, 3], 0) == [[1, 2, 3]]
    assert split_micro([1, 2, 3], 8) == [[1, 2, 3]]
    assert split_micro([], 2) == [] and split_micro([], 0) == []


def test_samples_of_a_step_do_not_depend_on_world_size():
    plan = ElasticBatchPlan(50, seed=9)
    for step in (0, 3, 11, 40):
        batch = step_batch(plan, step, 8)[2]
        for world_size in (1, 2, 3, 5):
            shares = [split_share(batch, r, world_size) for r in range(world_size)]
            assert sorted(itertools.chain(*shares)) == sorted(batch)


def test_grouped_order_has_homogeneous_batches_except_the_tail():
    rng = np.random.default_rng(0)
    ratios = rng.choice([0.75, 1.33, 1.0], size=103).tolist()
    groups = aspect_groups(ratios)
    assert groups == [0 if r >= 1 else 1 for r in ratios]
    b = 8
    plan = ElasticBatchPlan(103, seed=5, drop_last=False, group_ids=groups, group_batch_size=b)
    for epoch in range(3):
        order = plan.epoch_order(epoch)
        assert sorted(order) == list(range(103))
        full = sum(groups.count(g) // b for g in (0, 1))
        chunks = [order[k * b:(k + 1) * b] for k in range(full)]
        assert all(len({groups[i] for i in chunk}) == 1 for chunk in chunks)
        tail = order[full * b:]
        assert len(tail) == sum(groups.count(g) % b for g in (0, 1))
    # Batches of both groups are interleaved, not all of one group first.
    first_groups = [groups[plan.epoch_order(0)[k * b]] for k in range(full)]
    assert 0 < sum(first_groups) < full and first_groups != sorted(first_groups)
    assert plan.epoch_order(1) != plan.epoch_order(2)


def test_step_batch_is_constant_time_in_the_step(monkeypatch):
    plan = ElasticBatchPlan(1000, seed=0)
    computed = []
    real = plan._compute_order

    def counting(epoch):
        computed.append(epoch)
        return real(epoch)

    monkeypatch.setattr(plan, "_compute_order", counting)
    epoch, step_in_epoch, batch = step_batch(plan, 10**6, 16)
    assert computed == [10**6 // 62] and (epoch, step_in_epoch) == divmod(10**6, 62)
    assert batch == real(epoch)[step_in_epoch * 16:(step_in_epoch + 1) * 16]
    step_batch(plan, 10**6 + 1, 16)  # same epoch: cached
    assert len(computed) == 1


def test_bad_sizes():
    with pytest.raises(DataError, match=r"fewer than one global batch \(16\)"):
        step_batch(ElasticBatchPlan(10, seed=0), 0, 16)
    assert step_batch(ElasticBatchPlan(10, seed=0, drop_last=False), 1, 16)[:2] == (1, 0)
    with pytest.raises(DataError, match="empty"):
        ElasticBatchPlan(0, seed=0)
    with pytest.raises(ValueError, match="group_batch_size"):
        ElasticBatchPlan(3, seed=0, group_ids=[0, 1, 0])
    with pytest.raises(ValueError):
        split_share([1, 2], 2, 2)
