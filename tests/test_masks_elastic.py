"""Masks end to end under real torchrun, gloo, CPU (issue 18): ``tiny_mask_rcnn`` trains on the shapes set
with its masks at world size 2 and logs ``segm_mAP`` ...; preempted at world size 2 and resumed at world
size 1 (micro-batches of 2), it continues the reference's samples and losses as the elastic tests of
``tests/test_elastic.py`` do (their helpers and tolerances are reused here).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import Procs, base_env, events, read_jsonl, torchrun_cmd, train_steps, wait_for
from test_elastic import (
    BATCH,
    N_TRAIN,
    S,
    check_each_sample_once_per_epoch,
    check_shares,
    elastic_opts,
    finish,
    loss_mismatches,
    losses,
    merged_trace,
    rel_diff,
    run_to_end,
    tail,
    trace_attempts,
    union,
)

from elastic_det.evaluation.coco_eval import METRIC_NAMES, SEGM_METRIC_NAMES

pytestmark = pytest.mark.slow


def mask_opts(cache: Path, *more: str) -> list[str]:
    """test_elastic's options (40 images, global batch 7, constant lr, trace) with the tiny Mask R-CNN."""
    return elastic_opts(cache, "model.type=tiny_mask_rcnn", "model.norm=group_norm", *more)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """World size 2, no interruption, evaluated at the end."""
    root = tmp_path_factory.mktemp("mask-reference")
    work = root / "work"
    cmd = torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                           *mask_opts(cache, f"train.max_steps={S}", "train.validate=true")])
    p = Procs()
    try:
        run_to_end(p, cmd, base_env(cache), root / "torchrun.log", timeout=240)
    finally:
        p.kill_all()
    trace = merged_trace(work)
    assert sorted(trace) == list(range(S))
    ids = {i for line in trace.values() for i in union(line)}
    assert len(ids) == N_TRAIN
    return {"work": work, "trace": trace, "losses": losses(work), "ids": ids}


def test_tiny_mask_rcnn_trains_on_shapes_masks_and_logs_segm_map(reference):
    (start,) = events(reference["work"], "start")
    assert start["world_size"] == 2 and start["global_batch_size"] == BATCH
    records = read_jsonl(reference["work"] / "metrics.jsonl")
    train = [r for r in records if r.get("mode") == "train"]
    assert [r["step"] for r in train] == list(range(1, S + 1))
    assert all(r["loss_mask"] > 0 for r in train)  # the mask head trains
    (val,) = [r for r in records if r.get("mode") == "val"]
    assert val["step"] == S
    for name in (*METRIC_NAMES, *SEGM_METRIC_NAMES):
        assert isinstance(val[name], float) and (val[name] == -1.0 or 0.0 <= val[name] <= 1.0), (name, val)
    assert "segm_mAP" in (reference["work"] / "train.log").read_text()  # the table in the text log


def test_resume_at_another_world_size_continues_the_mask_reference(tmp_path, cache, procs, reference):
    env = base_env(cache)
    first = tmp_path / "ws2"
    cmd = torchrun_cmd(2, ["--work-dir", str(first), "--cfg-options", *mask_opts(cache, "train.max_steps=200")])
    proc = procs.start(cmd, env, tmp_path / "ws2.log")
    wait_for(lambda: max(train_steps(first), default=0) >= 4 or proc.poll() is not None, 120, "4 steps at ws 2")
    assert proc.poll() is None, tail(tmp_path / "ws2.log")
    procs.remember(proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, 60, tmp_path / "ws2.log") != 0  # preempted, not done
    (preempt,) = events(first, "preempt")
    k = preempt["step"]
    assert 4 <= k <= S - 3, f"preempted at step {k}; the test needs 4 <= k <= {S - 3}"
    assert all(loss == reference["losses"][s] for s, loss in losses(first).items())  # same world size: bitwise

    work = tmp_path / "resumed-ws1"
    shutil.copytree(first, work)
    cmd = torchrun_cmd(1, ["--work-dir", str(work), "--cfg-options",
                           *mask_opts(cache, f"train.max_steps={S}", "data.micro_batch_size=2")])
    run_to_end(procs, cmd, env, tmp_path / "ws1.log")
    (resume,) = events(work, "resume")
    assert (resume["step"], resume["world_size"], resume["global_batch_size"]) == (k, 1, BATCH)
    before, after = trace_attempts(work)
    assert [line["step"] for line in before + after] == list(range(S))  # no step skipped or repeated
    for line in after:
        check_shares(line, 1)
        assert union(line) == union(reference["trace"][line["step"]]), line["step"]
    check_each_sample_once_per_epoch(before + after, reference["ids"])

    got = {s: v for s, v in losses(work).items() if s > k}
    assert sorted(got) == list(range(k + 1, S + 1))
    assert not loss_mismatches(got, reference["losses"], first=k + 1), got
    shifted = {s: v for s, v in got.items() if s + 1 in reference["losses"]}  # the check is not vacuous
    assert loss_mismatches(shifted, {s: reference["losses"][s + 1] for s in shifted}, first=k + 1)
    measured = [f"{rel_diff(got[s], reference['losses'][s]):.1e}" for s in sorted(got)]
    print(f"preempted at step {k}; relative loss differences at ws 1 from step {k + 1}: {measured}")
