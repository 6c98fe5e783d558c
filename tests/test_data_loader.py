import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from elastic_det.config.schema import TransformConfig
from elastic_det.data import (
    CocoDataset,
    ElasticBatchPlan,
    TrainSamples,
    build_train_loader,
    build_transforms,
    build_val_loader,
    detection_collate,
    generate_shapes,
    split_share,
)
from elastic_det.data.plan import Progress, StepSchedule
from elastic_det.errors import DataError


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader") / "shapes"
    generate_shapes(str(root), 12, 5, 48, 3, seed=0)
    return root


def train_set(root):
    return CocoDataset(str(root / "train"), str(root / "annotations" / "train.json"))


def steps(plan, batch_size, rank, world_size, start=0):
    """(epoch, this rank's indices) per global step, forever."""
    schedule = StepSchedule(plan, batch_size, Progress())
    for step in itertools.count(start):
        info = schedule.at(step)
        yield info.epoch, split_share(info.indices, rank, world_size)


def test_collate_keeps_lists():
    images, targets = detection_collate([(torch.zeros(3, 2, 2), {"a": 1}), (torch.ones(3, 4, 2), {"a": 2})])
    assert [i.shape[-2] for i in images] == [2, 4] and targets == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_follows_the_plan_lazily(shapes_root, num_workers):
    dataset = train_set(shapes_root)
    transforms = build_transforms(TransformConfig(min_size=[32, 48], flip_prob=0.5), train=True)
    samples = TrainSamples(dataset, transforms, seed=0)
    plan = ElasticBatchPlan(len(dataset), seed=0)
    loader = build_train_loader(samples, steps(plan, 5, rank=1, world_size=2, start=3), num_workers)
    got = list(itertools.islice(loader, 6))  # the step generator is infinite
    for k, (images, targets) in enumerate(got):
        step = StepSchedule(plan, 5, Progress()).at(3 + k)
        epoch, share = step.epoch, split_share(step.indices, 1, 2)
        assert [t["image_id"] for t in targets] == [dataset.image_ids[i] for i in share]
        for image, target, i in zip(images, targets, share, strict=True):
            expected_image, expected_target = samples[(epoch, i)]
            assert torch.equal(image, expected_image)
            assert torch.equal(target["boxes"], expected_target["boxes"])


def test_val_loader_partitions_the_dataset_across_ranks(shapes_root):
    dataset = CocoDataset(str(shapes_root / "val"), str(shapes_root / "annotations" / "val.json"))
    transforms = build_transforms(TransformConfig(), train=False)
    seen = []
    for rank in range(3):
        loader = build_val_loader(dataset, transforms, rank, 3, batch_size=1, num_workers=0)
        ids = [t["image_id"] for _, targets in loader for t in targets]
        assert ids == [dataset.image_ids[i] for i in range(rank, len(dataset), 3)]
        seen += ids
    assert sorted(seen) == sorted(dataset.image_ids)
    images, _ = next(iter(build_val_loader(dataset, transforms, 0, 1, batch_size=4, num_workers=0)))
    assert len(images) == 4 and images[0].dtype == torch.float32


def test_data_error_in_a_worker_reaches_the_main_process_with_its_message(shapes_root):
    dataset = train_set(shapes_root)
    os.rename(dataset.image_path(2), dataset.image_path(2) + ".moved")
    try:
        samples = TrainSamples(dataset, build_transforms(TransformConfig(), train=True), seed=0)
        loader = build_train_loader(samples, iter([(0, [0, 1]), (0, [2])]), num_workers=1)
        iterator = iter(loader)
        next(iterator)
        with pytest.raises(DataError) as info:
            next(iterator)
        assert str(info.value) == f"Image file not found: {dataset.image_path(2)} (in a data-loader worker)"
        del info, iterator  # info's traceback holds this frame: a cycle that would delay the worker shutdown
    finally:
        os.rename(dataset.image_path(2) + ".moved", dataset.image_path(2))


def test_workers_survive_preemption_signals_from_others(shapes_root):
    dataset = train_set(shapes_root)
    samples = TrainSamples(dataset, build_transforms(TransformConfig(), train=True), seed=0)
    loader = build_train_loader(samples, ([0, [i]] for i in range(6)), num_workers=1)
    before = set(multiprocessing.active_children())
    iterator = iter(loader)
    next(iterator)
    (worker,) = set(multiprocessing.active_children()) - before
    # Sent by another process, as torchrun (killpg) and Slurm (every process of the step) do.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        subprocess.run(["kill", f"-{sig.name[3:]}", str(worker.pid)], check=True)
    assert [t["image_id"] for _, targets in iterator for t in targets] == dataset.image_ids[1:6]
    assert worker.exitcode in (None, 0)


def test_exit_does_not_hang_while_an_iterator_is_still_referenced(shapes_root):
    # multiprocessing stops leftover workers with SIGTERM at exit: they must still obey their parent.
    script = textwrap.dedent(f"""
        from elastic_det.config.schema import TransformConfig
        from elastic_det.data import CocoDataset, TrainSamples, build_train_loader, build_transforms
        ds = CocoDataset({str(shapes_root / "train")!r}, {str(shapes_root / "annotations" / "train.json")!r})
        samples = TrainSamples(ds, build_transforms(TransformConfig(), train=True), seed=0)
        iterator = iter(build_train_loader(samples, ((0, [i % 12]) for i in range(10**9)), num_workers=2))
        next(iterator)
        print("done", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done" and "Error" not in result.stderr
