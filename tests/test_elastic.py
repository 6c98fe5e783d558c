"""Guarantee 3 (elastic determinism) under real torchrun, gloo, CPU (issue 4).

- World-size changes across a preemption: a run at world size 2 is preempted (SIGTERM to the agent) and
  resumed at world size 1 (with gradient accumulation) and at world size 3 (an uneven split of the global
  batch). Every global step consumes the reference's samples, every epoch sees each sample once, and the
  loss curve continues the reference's within a stated tolerance.
- Two torchrun agents on 127.0.0.1 acting as two nodes: one is SIGKILLed (its orphaned worker stops by
  itself), the survivor continues at world size 1, a new agent brings it back to 2; the trace still
  equals the reference's step by step.
- ``elastic.batch_policy=scale_lr``: the sample stream does not depend on the world size, the learning rate
  does (linearly), also across a resume that changes the world size.
- Unit: seeking the schedule to step 10**6 computes one permutation, as seeking to step 10 does.

Model: ``tiny_retinanet`` (GroupNorm everywhere, loss normalised per image), so the loss of a split batch
is the whole batch's mean and nothing depends on the per-device batch.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    PYTHON,
    Procs,
    alive,
    base_env,
    events,
    fast_overrides,
    free_port,
    read_jsonl,
    torchrun_cmd,
    train_steps,
    wait_for,
)

from elastic_det.data.plan import ElasticBatchPlan, Progress, StepSchedule

N_TRAIN = 40
BATCH = 7  # divisible by neither 2 nor 3: shares at world size 2 are 4+3, at 3 they are 3+2+2
STEPS_PER_EPOCH = 6  # ceil(40 / 7) with data.drop_last=false: 5 full batches and one of 5
S = 14  # test 1 runs to here: epochs 0 and 1 complete, 2 steps into epoch 2
S_NODES = 60  # the two-node test runs to here (long enough to kill, recover and rejoin mid-run)
S_REF = max(S, S_NODES)

# Loss tolerance (relative difference from the reference, per step after the resume). The first two resumed
# steps see the reference's weights and samples; only the summation order over ranks / micro-batches differs
# (measured <= 7e-8 at ws 1 and 3). From the third step on, that float noise is amplified by the network's
# switching points (ReLU, max-pool): measured <= 7e-8 in these runs but up to 2.7e-4 within 9 steps at ws 1
# without micro-batches, and runs from step 0 at ws 1/2/3 with lr 0.01 drift apart by 1e-2 within 13 steps
# (hence the small lr here). What a real mismatch does, measured on this test's runs:
#   data order wrong (resumed with seed+1):           8.8e-4 at the first step, 2.4e-3 .. 5e-2 later;
#   loss weighting wrong (ws 3, shares 3/2/2 averaged as equals): 1.1e-3 at the second step, up to 1.6e-2 later.
RTOL_EXACT = 1e-6  # first two resumed steps
RTOL_DRIFT = 5e-3  # later steps

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


def elastic_opts(cache: Path, *more: str) -> list[str]:
    return fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm",
                          f"data.shapes.num_train={N_TRAIN}",
                          f"data.global_batch_size={BATCH}", "data.drop_last=false", "data.trace=true",
                          "log.interval=1", "schedule.policy=constant", "schedule.warmup_steps=2",
                          "optimizer.lr=0.002", "checkpoint.interval=0", *more)


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout}s; log:\n{tail(log)}")


def run_to_end(procs: Procs, cmd: list[str], env: dict[str, str], log: Path, timeout: float = 110) -> None:
    code = finish(procs.start(cmd, env, log), timeout, log)
    assert code == 0, tail(log)


# ----------------------------------------------------------------------------------------------------------
# Reading a run


def trace_attempts(work: Path) -> list[list[dict]]:
    """The trace lines of every attempt, in attempt order."""
    files = sorted((work / "trace").glob("attempt-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    return [read_jsonl(f) for f in files]


def merged_trace(work: Path) -> dict[int, dict]:
    """Step -> trace line over all attempts; a step replayed after a restart: the last occurrence wins."""
    merged: dict[int, dict] = {}
    for lines in trace_attempts(work):
        for line in lines:
            merged[line["step"]] = line
    return merged


def union(line: dict) -> list[int]:
    """The global batch of a trace line: the ranks' shares concatenated in rank order."""
    return [i for share in line["ids"] for i in share]


def losses(work: Path) -> dict[int, float]:
    """Steps completed -> loss of that step (the last record wins, as for the trace)."""
    return {r["step"]: r["loss"] for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"}


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def loss_mismatches(got: dict[int, float], ref: dict[int, float], first: int) -> list[tuple[int, float, float]]:
    """(step, relative difference, tolerance) for every step of ``got`` from ``first`` (the first step after the
    resume) on that is outside the tolerance."""
    out = []
    for step in sorted(s for s in got if s >= first):
        tol = RTOL_EXACT if step - first < 2 else RTOL_DRIFT
        d = rel_diff(got[step], ref[step])
        if d > tol:
            out.append((step, d, tol))
    return out


def check_shares(line: dict, world_size: int) -> None:
    assert line["world_size"] == world_size == len(line["ids"]), line
    sizes = [len(s) for s in line["ids"]]
    assert max(sizes) - min(sizes) <= 1, line  # uneven only by one sample


def check_each_sample_once_per_epoch(lines: list[dict], all_ids: set[int]) -> None:
    by_epoch: dict[int, list[int]] = {}
    for line in sorted(lines, key=lambda x: x["step"]):
        by_epoch.setdefault(line["epoch"], []).extend(union(line))
    last = max(by_epoch)
    for epoch, ids in by_epoch.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch} repeats a sample"
        if epoch != last:  # complete epochs: the last partial batch (drop_last=false) included
            assert set(ids) == all_ids, f"epoch {epoch} misses {sorted(all_ids - set(ids))}"


# ----------------------------------------------------------------------------------------------------------
# The reference: world size 2, no interruption


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("reference")
    work = root / "work"
    cmd = torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options", *elastic_opts(cache, f"train.max_steps={S_REF}")])
    p = Procs()
    try:
        run_to_end(p, cmd, base_env(cache), root / "torchrun.log", timeout=240)
    finally:
        p.kill_all()
    trace = merged_trace(work)
    assert sorted(trace) == list(range(S_REF))
    ids = {i for s in range(STEPS_PER_EPOCH) for i in union(trace[s])}
    assert len(ids) == N_TRAIN
    check_each_sample_once_per_epoch(list(trace.values()), ids)
    assert [len(union(trace[s])) for s in range(STEPS_PER_EPOCH)] == [7, 7, 7, 7, 7, 5]  # the partial batch kept
    return {"work": work, "trace": trace, "losses": losses(work), "ids": ids}


# ----------------------------------------------------------------------------------------------------------
# 0. Under the supervisor: workers forked by the warm server train exactly as cold ones


def test_warm_workers_under_the_supervisor_continue_the_reference_exactly(tmp_path, cache, procs, reference):
    """The launchers' path: supervisor -> torchrun (2 workers, forked ready by the warm server). Same
    samples and bitwise the same losses as the cold reference; a SIGTERM to the supervisor saves, and the
    relaunched supervisor (a new warm server) resumes at that step with the same samples and losses."""
    env, work = base_env(cache), tmp_path / "warm"
    supervised = [PYTHON, "-m", "elastic_det.supervise", "--",
                  *torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                                    *elastic_opts(cache, f"train.max_steps={S}")])]
    proc = procs.start(supervised, env, tmp_path / "first.log")
    wait_for(lambda: max(train_steps(work), default=0) >= 4 or proc.poll() is not None, 100, "4 steps")
    assert proc.poll() is None, tail(tmp_path / "first.log")
    proc.send_signal(signal.SIGTERM)
    assert finish(proc, 60, tmp_path / "first.log") == 143, tail(tmp_path / "first.log")
    (preempt,) = events(work, "preempt")
    run_to_end(procs, supervised, env, tmp_path / "second.log")
    (resume,) = events(work, "resume")
    assert resume["step"] == preempt["step"]
    starts = [r for r in read_jsonl(work / "ledger.jsonl") if r["kind"] == "process_start"]
    assert [r["warm_start"] for r in starts] == [True, True]
    before, after = trace_attempts(work)
    assert [line["step"] for line in before + after] == list(range(S))  # no step skipped or repeated
    for line in before + after:
        assert line["ids"] == reference["trace"][line["step"]]["ids"]
    got = losses(work)
    assert sorted(got) == list(range(1, S + 1))
    assert all(loss == reference["losses"][s] for s, loss in got.items() if s <= preempt["step"])  # bitwise
    assert loss_mismatches(got, reference["losses"], preempt["step"] + 1) == []


# ----------------------------------------------------------------------------------------------------------
# 1. Preempted at world size 2, resumed at 1 and at 3


def test_resume_at_another_world_size_continues_the_reference(tmp_path, cache, procs, reference):
    env = base_env(cache)
    first = tmp_path / "ws2"
    cmd = torchrun_cmd(2, ["--work-dir", str(first), "--cfg-options", *elastic_opts(cache, "train.max_steps=200")])
    proc = procs.start(cmd, env, tmp_path / "ws2.log")
    wait_for(lambda: max(train_steps(first), default=0) >= 4 or proc.poll() is not None, 100, "4 steps at ws 2")
    assert proc.poll() is None, tail(tmp_path / "ws2.log")
    procs.remember(proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, 60, tmp_path / "ws2.log") != 0  # preempted, not done
    (preempt,) = events(first, "preempt")
    k = preempt["step"]
    assert 4 <= k <= S - 3, f"preempted at step {k}; the test needs 4 <= k <= {S - 3}"
    # up to the preemption, the same world size as the reference: same samples, same losses
    (before,) = trace_attempts(first)
    assert [line["step"] for line in before] == list(range(k))
    for line in before:
        assert line["ids"] == reference["trace"][line["step"]]["ids"]
    assert all(loss == reference["losses"][s] for s, loss in losses(first).items())  # bitwise

    measured = {}
    for world_size, extra in ((1, ["data.micro_batch_size=2"]), (3, [])):
        work = tmp_path / f"resumed-ws{world_size}"
        shutil.copytree(first, work)
        cmd = torchrun_cmd(world_size, ["--work-dir", str(work), "--cfg-options",
                                        *elastic_opts(cache, f"train.max_steps={S}", *extra)])
        run_to_end(procs, cmd, env, tmp_path / f"ws{world_size}.log")
        (resume,) = events(work, "resume")
        assert (resume["step"], resume["world_size"], resume["global_batch_size"]) == (k, world_size, BATCH)

        before, after = trace_attempts(work)
        assert [line["step"] for line in after] == list(range(k, S))  # no step skipped or repeated
        for line in after:
            check_shares(line, world_size)
            ref = reference["trace"][line["step"]]
            assert union(line) == union(ref), f"step {line['step']} at ws {world_size}"
            assert line["epoch"] == ref["epoch"]
        check_each_sample_once_per_epoch(before + after, reference["ids"])

        got = {s: v for s, v in losses(work).items() if s > k}
        assert sorted(got) == list(range(k + 1, S + 1))
        assert not loss_mismatches(got, reference["losses"], first=k + 1), (world_size, got)
        measured[world_size] = [f"{rel_diff(got[s], reference['losses'][s]):.1e}" for s in sorted(got)]
        # the check is not vacuous: the same losses one step off (another batch) fail it
        shifted = {s: v for s, v in got.items() if s + 1 in reference["losses"]}
        assert loss_mismatches(shifted, {s: reference["losses"][s + 1] for s in shifted}, first=k + 1)
    print(f"preempted at step {k}; relative loss differences from step {k + 1}: {measured}")


# ----------------------------------------------------------------------------------------------------------
# 2. Two agents as two nodes: lose one, continue alone, get one back


def agent_cmd(train_args: list[str], port: int, is_host: bool) -> list[str]:
    conf = f"--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3," \
           f"is_host={str(is_host).lower()}"
    return torchrun_cmd(1, train_args, max_restarts=3, nnodes="1:2", rdzv_port=port, run_id="two-nodes",
                        extra=[conf])


def train_records(work: Path) -> list[dict]:
    return [r for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"]


def steps_at(work: Path, world_size: int) -> int:
    return sum(r["world_size"] == world_size for r in train_records(work))


def started_at(work: Path, world_size: int, after: float) -> dict | None:
    """The first start/resume event at ``world_size`` after time ``after`` followed by a train record."""
    records = read_jsonl(work / "metrics.jsonl")
    for i, r in enumerate(records):
        if r.get("event") in ("start", "resume") and r["world_size"] == world_size and r["time"] > after:
            if any(x.get("mode") == "train" and x["world_size"] == world_size for x in records[i + 1:]):
                return r
    return None


def test_two_agents_lose_a_node_continue_and_grow_back(tmp_path, cache, procs, reference):
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "--cfg-options",
            *elastic_opts(cache, f"train.max_steps={S_NODES}", "checkpoint.interval=2", "dist.timeout_seconds=30")]
    env, port = base_env(cache), free_port()
    a = procs.start(agent_cmd(args, port, is_host=True), env, tmp_path / "agent-a.log")
    b = procs.start(agent_cmd(args, port, is_host=False), env, tmp_path / "agent-b.log")
    logs = f"A:\n{tail(tmp_path / 'agent-a.log')}\nB:\n{tail(tmp_path / 'agent-b.log')}"
    wait_for(lambda: steps_at(work, 2) >= 4 or a.poll() is not None, 120, "4 steps at world size 2")
    assert a.poll() is None and b.poll() is None, logs

    # lose the second node: SIGKILL its agent; its worker must stop by itself (parent-death watchdog)
    orphans = procs.remember(b)
    procs.remember(a)
    assert orphans, "agent B has no worker"
    killed_at = time.time()
    os.kill(b.pid, signal.SIGKILL)
    b.wait(timeout=10)
    wait_for(lambda: not any(alive(p) for p in orphans), 30, "the orphaned worker of agent B to exit")
    shrunk = wait_for(lambda: started_at(work, 1, killed_at) or a.poll() is not None, 90, "resume at ws 1")
    assert a.poll() is None, f"the survivor ended:\n{tail(tmp_path / 'agent-a.log')}"
    committed = [e["step"] for e in events(work, "checkpoint") if e["time"] < shrunk["time"]]
    reached = [r["step"] for r in train_records(work) if r["time"] < shrunk["time"]]
    assert shrunk["event"] == "resume" and max(committed) <= shrunk["step"] <= max(reached), (committed, shrunk)

    # a new node joins: back to world size 2
    joined_at = time.time()
    c = procs.start(agent_cmd(args, port, is_host=False), env, tmp_path / "agent-c.log")
    grown = wait_for(lambda: started_at(work, 2, joined_at) or a.poll() is not None, 90, "resume at ws 2")
    assert a.poll() is None, f"the run ended before the new node joined (raise S_NODES):\n{tail(work / 'train.log')}"
    assert grown["event"] == "resume" and grown["step"] > shrunk["step"]
    assert finish(a, 120, tmp_path / "agent-a.log") == 0
    assert finish(c, 30, tmp_path / "agent-c.log") == 0
    procs.remember(c)

    # the trace, all attempts merged, is the reference's step by step; replayed steps match it too
    merged = merged_trace(work)
    assert sorted(merged) == list(range(S_NODES))
    for lines in trace_attempts(work):
        for line in lines:
            assert union(line) == union(reference["trace"][line["step"]]), line
            check_shares(line, line["world_size"])
    sizes = [merged[s]["world_size"] for s in range(S_NODES)]
    phases = [size for size, _ in itertools.groupby(sizes)]
    assert phases[-3:] == [2, 1, 2], phases  # (both agents may not make the first round: then 1, 2, 1, 2)
    check_each_sample_once_per_epoch(list(merged.values()), reference["ids"])
    done = events(work, "done")
    assert done and done[-1]["step"] == S_NODES and done[-1]["world_size"] == 2
    worlds = [(e["event"], e["step"], e["world_size"]) for e in events(work) if e["event"] in ("start", "resume")]
    print(f"start/resume events: {worlds}; steps at ws 1: {sizes.count(1)}")


# ----------------------------------------------------------------------------------------------------------
# 3. scale_lr: the sample stream is fixed, the learning rate follows the world size


SCALE_N = 38  # 19 steps of 2 per epoch at ws 1; 10 at ws 2 (the last one of 2 samples)


def scale_opts(cache: Path, steps: int, *more: str) -> list[str]:
    return fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm",
                          f"data.shapes.num_train={SCALE_N}",
                          "elastic.batch_policy=scale_lr", "data.samples_per_device=2", "data.global_batch_size=4",
                          "optimizer.lr=0.01", "schedule.policy=constant", "schedule.warmup_steps=0",
                          "data.drop_last=false", "data.trace=true", "log.interval=1", f"train.max_steps={steps}",
                          "checkpoint.interval=7", "checkpoint.keep_last=0", *more)


def stream(lines: list[dict]) -> list[tuple[int, int]]:
    """(epoch, id) of every sample consumed, in order."""
    return [(line["epoch"], i) for line in sorted(lines, key=lambda x: x["step"]) for i in union(line)]


def test_scale_lr_keeps_the_sample_stream_and_scales_the_lr(tmp_path, cache, procs):
    env = base_env(cache)
    one, two, grown = tmp_path / "ws1", tmp_path / "ws2", tmp_path / "ws1-then-ws2"
    run_to_end(procs, torchrun_cmd(1, ["--work-dir", str(one), "--cfg-options", *scale_opts(cache, 24)]), env,
               tmp_path / "ws1.log")
    run_to_end(procs, torchrun_cmd(2, ["--work-dir", str(two), "--cfg-options", *scale_opts(cache, 12)]), env,
               tmp_path / "ws2.log")
    ref = stream(merged_trace(one).values())
    assert len(ref) == 48 and [e for e, _ in ref].count(0) == SCALE_N  # crosses the epoch boundary
    # ws 2: epoch 0 is 9 steps of 4 and one of 2 (drop_last=false), then epoch 1: 46 samples in 12 steps
    assert stream(merged_trace(two).values()) == ref[:46]
    assert all(len(line["ids"]) == 2 and [len(s) for s in line["ids"]] in ([2, 2], [1, 1])
               for line in merged_trace(two).values())
    (start1,), (start2,) = events(one, "start"), events(two, "start")
    assert (start1["global_batch_size"], start1["lr"]) == (2, pytest.approx(0.005))
    assert (start2["global_batch_size"], start2["lr"]) == (4, pytest.approx(0.01))
    lr1 = {r["step"]: r["lr"] for r in train_records(one)}
    lr2 = {r["step"]: r["lr"] for r in train_records(two)}
    for step, lr in lr2.items():  # same sample position: ws 2 after `step` steps = ws 1 after 2 * step
        assert lr == pytest.approx(2 * lr1[2 * step], rel=1e-9), (step, lr, lr1[2 * step])

    # resume the ws 1 run's checkpoint at step 7 (14 samples: not a multiple of the new global batch 4) at ws 2
    cmd = torchrun_cmd(2, ["--work-dir", str(grown), "--resume", str(one / "checkpoints" / "step-00000007"),
                           "--cfg-options", *scale_opts(cache, 15)])
    run_to_end(procs, cmd, env, tmp_path / "grown.log")
    (resume,) = events(grown, "resume")
    assert (resume["step"], resume["world_size"], resume["global_batch_size"], resume["lr"]) == (7, 2, 4, 0.01)
    resumed = stream(merged_trace(grown).values())
    assert [line["step"] for line in trace_attempts(grown)[0]] == list(range(7, 15))
    assert ref[:14] + resumed == ref[:14 + len(resumed)]  # continues where it stopped: nothing skipped or repeated
    assert len(resumed) == 32 and resumed[-1][0] == 1  # ... and across the epoch boundary (24 left in epoch 0)
    assert all(r["lr"] == pytest.approx(0.01) for r in train_records(grown))


# ----------------------------------------------------------------------------------------------------------
# 4. Seeking is O(1): a late resume computes what an early one does


def reference_batch(plan: ElasticBatchPlan, step: int, batch: int, per_epoch: int) -> list[int]:
    """The global batch of ``step`` by plain arithmetic on the epochs' orders (batch size fixed since step 0)."""
    epoch, k = divmod(step, per_epoch)
    return plan.epoch_order(epoch)[k * batch:(k + 1) * batch]


@pytest.mark.parametrize("drop_last", [True, False])
def test_seek_to_a_late_step_computes_one_permutation(monkeypatch, drop_last):
    calls = []
    original = ElasticBatchPlan._compute_order
    monkeypatch.setattr(ElasticBatchPlan, "_compute_order",
                        lambda self, epoch: calls.append(epoch) or original(self, epoch))
    n, batch = 1000, 7
    per_epoch = -(-n // batch) if not drop_last else n // batch
    counts = {}
    for step in (10, 10**6):
        plan = ElasticBatchPlan(n, seed=5, drop_last=drop_last)
        calls.clear()
        info = StepSchedule(plan, batch, Progress(seed=5)).at(step)
        counts[step] = len(calls)
        assert (info.epoch, info.step_in_epoch) == divmod(step, per_epoch)
        assert info.indices == reference_batch(plan, step, batch, per_epoch)
    assert counts == {10: 1, 10**6: 1}

    # from a cursor late in an epoch (what a resume builds): the same batches, and again one permutation
    plan = ElasticBatchPlan(n, seed=5, drop_last=drop_last)
    cursor = StepSchedule(plan, batch, Progress(seed=5)).at(10**6 - 3).next_progress(5)
    expected = [reference_batch(plan, s, batch, per_epoch) for s in range(10**6 - 3, 10**6 + 3)]
    calls.clear()
    late = StepSchedule(ElasticBatchPlan(n, seed=5, drop_last=drop_last), batch, cursor)
    assert [late.at(s).indices for s in range(10**6 - 2, 10**6 + 3)] == expected[1:]
    assert len(set(calls)) == len(calls) <= 2  # at most this epoch and the next, each once


def test_trace_file_format(tmp_path):
    """The trace reader above reads what TraceHook writes (checked here without torchrun)."""
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "attempt-0.jsonl").write_text(
        json.dumps({"step": 0, "epoch": 0, "world_size": 2, "ids": [[1, 2], [3]]}) + "\n")
    (tmp_path / "trace" / "attempt-10.jsonl").write_text(
        json.dumps({"step": 0, "epoch": 0, "world_size": 1, "ids": [[1, 2, 3]]}) + "\n")
    (tmp_path / "trace" / "attempt-2.jsonl").write_text(
        json.dumps({"step": 0, "epoch": 0, "world_size": 3, "ids": [[1], [2], [3]]}) + "\n")
    assert merged_trace(tmp_path)[0]["world_size"] == 1  # attempt 10 is the last, not attempt 2


def test_epoch_hooks_follow_the_sample_cursor_after_a_batch_size_change():
    """A scale_lr resume at another world size: the cursor (ws 1, batch 2) is 14 samples into an epoch of 38,
    the run continues with batch 4. The epoch ends after the 6 steps that consume the 24 samples left, not
    when the step count reaches 10 (the steps per epoch at batch 4)."""
    import torch
    from torch import nn

    from elastic_det.engine.dist import DistInfo
    from elastic_det.engine.events import EventStream
    from elastic_det.engine.hook import Hook, StepRecord
    from elastic_det.engine.runner import Runner

    calls = []

    class Recorder(Hook):
        def before_epoch(self, runner):
            calls.append(("before", runner.step.epoch, runner.step.global_step))

        def after_epoch(self, runner):
            calls.append(("after", runner.progress.epoch, runner.progress.global_step))

    class NoModel(Runner):
        def run_step(self, images, targets, data_time, start):
            return StepRecord(self.step.global_step, self.step.epoch, self.step.indices, {}, 0, 0.0, None,
                              data_time, 0.0)

    cursor = Progress(global_step=7, epoch=0, step_in_epoch=7, sample_offset=14, seed=0)
    schedule = StepSchedule(ElasticBatchPlan(SCALE_N, seed=0, drop_last=False), 4, cursor)
    runner = NoModel(parts=None, model=nn.Identity(), schedule=schedule,
                     batches=itertools.repeat(([], [])), hooks=[Recorder()], events=EventStream(),
                     dist_info=DistInfo(0, 1, 0, torch.device("cpu"), 0), progress=cursor, max_steps=16,
                     micro_batch_size=0, amp_mode="none", clip_grad_norm=0.0)
    runner.train()
    assert calls == [("before", 0, 7), ("after", 0, 13), ("before", 1, 13), ("after", 1, 16)]
