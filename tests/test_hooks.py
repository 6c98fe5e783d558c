"""Each hook against a small stand-in runner (one process, real work dir, real checkpoint store), and the
runner's loop contract (order of calls, ``close`` after an exception)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from elastic_det.checkpoint.store import CheckpointStore
from elastic_det.config.schema import CheckpointConfig
from elastic_det.data.plan import ElasticBatchPlan, Progress, StepSchedule, split_share
from elastic_det.engine.checkpointer import Checkpointer
from elastic_det.engine.dist import DistInfo
from elastic_det.engine.events import Event, EventStream
from elastic_det.engine.hook import EvalRecord, Hook, StepRecord
from elastic_det.engine.hooks.checkpoint import CheckpointHook
from elastic_det.engine.hooks.evaluation import EvalHook
from elastic_det.engine.hooks.logger import LoggerHook
from elastic_det.engine.hooks.trace import TraceHook, next_attempt_path
from elastic_det.engine.preemption import PreemptionFlag
from elastic_det.engine.run_files import RunFiles
from elastic_det.engine.runner import Runner
from elastic_det.engine.state import TrainingParts
from elastic_det.engine.writers import ConsoleWriter, MetricsWriter
from elastic_det.errors import StorageError, StorageUnavailableError, WorkDirOwnedError
from elastic_det.storage import WorkDir

WORLD_1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), restart_count=0)
WORLD_3 = DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), restart_count=0)


@dataclass
class FakeRunner:
    """What hooks may use of a runner, and nothing more."""

    max_steps: int
    dist: DistInfo = WORLD_1
    progress: Progress = field(default_factory=Progress)
    last_step: StepRecord | None = None
    last_eval: EvalRecord | None = None
    stop_reason: str | None = None
    evals: list[dict] = field(default_factory=list)
    unwrapped_model: Any = "the model"
    eval_model: Any = "the averaged model"
    eval_weights: str = "ema"

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def record_eval(self, metrics: dict[str, float]) -> None:
        self.last_eval = EvalRecord(self.progress.global_step, metrics)
        self.evals.append(metrics)

    def state_dict(self) -> dict:
        return {"model": {"w": torch.full((4,), float(self.progress.global_step))},
                "progress": self.progress.state_dict()}

    def finish_step(self, losses: dict[str, float], samples: int = 2, indices: list[int] | None = None,
                    hooks: tuple[Hook, ...] = (), skipped: bool = False) -> None:
        """Advance one global step, as ``Runner.train`` does before calling ``after_step``; ``hooks``' step
        flags are agreed as on one rank."""
        index = self.progress.global_step
        flags = {k: v for hook in hooks for k, v in hook.step_flags(self).items()}
        self.last_step = StepRecord(index=index, epoch=0, indices=indices or list(range(samples)),
                                    loss_sums={k: torch.tensor(v * samples) for k, v in losses.items()},
                                    num_samples=samples, lr=0.1, grad_norm=torch.tensor(3.0), data_time=0.01,
                                    step_time=0.5, flags=flags, skipped=skipped)
        self.progress = Progress(global_step=index + 1, step_in_epoch=index + 1, sample_offset=(index + 1) * samples)


def files_in(tmp_path: Path) -> tuple[RunFiles, EventStream]:
    """Rank 0's files and an event stream with the ``metrics.jsonl`` writer subscribed (and open)."""
    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    events = EventStream()
    events.subscribe(MetricsWriter(files)).open()
    return files, events


def records(tmp_path: Path) -> list[dict]:
    path = tmp_path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------------------------------------
# LoggerHook


def test_logger_averages_over_the_interval_weighted_by_samples_and_keeps_sums_on_the_device(tmp_path):
    files, metrics = files_in(tmp_path)
    hook = LoggerHook(metrics, interval=2, is_main=True)
    runner = FakeRunner(max_steps=5)
    hook.before_run(runner)
    runner.finish_step({"loss_a": 1.0, "loss_b": 10.0}, samples=1)
    hook.after_step(runner)
    assert all(torch.is_tensor(v) for v in hook._sums.values())  # nothing read back to the host yet
    assert records(tmp_path) == []
    runner.finish_step({"loss_a": 4.0, "loss_b": 10.0}, samples=3)
    hook.after_step(runner)
    for losses in ({"loss_a": 2.0, "loss_b": 0.0}, {"loss_a": 2.0, "loss_b": 0.0}, {"loss_a": 7.0, "loss_b": 1.0}):
        runner.finish_step(losses)
        hook.after_step(runner)
    hook.close()
    lines = [r for r in records(tmp_path) if r.get("mode") == "train"]
    assert [r["step"] for r in lines] == [2, 4, 5]  # every interval, and the last step
    assert lines[0]["loss_a"] == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)
    assert lines[0]["loss"] == pytest.approx(lines[0]["loss_a"] + lines[0]["loss_b"])
    assert lines[2]["loss_a"] == pytest.approx(7.0) and lines[2]["eta_seconds"] == 0
    assert lines[0]["grad_norm"] == 3.0 and lines[0]["lr"] == 0.1 and lines[0]["world_size"] == 1
    assert lines[1]["eta_seconds"] == pytest.approx(0.5)  # one step left at the smoothed 0.5 s


def test_logger_on_another_rank_writes_nothing(tmp_path):
    files, metrics = files_in(tmp_path)
    console = metrics.subscribe(ConsoleWriter(progress_bar="always", is_main=False))
    hook = LoggerHook(metrics, interval=1, is_main=False)
    runner = FakeRunner(max_steps=1)
    metrics.publish("loop_start", 0, max_steps=1)
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0})
    hook.after_step(runner)
    hook.close()
    assert records(tmp_path) == [] and console._bar is None


# --------------------------------------------------------------------------------------------------------
# EvalHook


def test_eval_hook_runs_at_its_interval_and_at_the_end_once_per_step(tmp_path):
    files, metrics = files_in(tmp_path)
    seen = []

    def evaluate(model):
        seen.append(model)
        return {"bbox_mAP": 0.1 * len(seen)}

    hook = EvalHook(evaluate, interval=2, events=metrics, format_table=str)
    runner = FakeRunner(max_steps=4)
    for _ in range(4):
        runner.finish_step({"loss": 1.0})
        hook.after_step(runner)
    assert len(seen) == 1 and runner.last_eval == EvalRecord(2, {"bbox_mAP": 0.1})  # not at step 4: after_run
    hook.after_run(runner)
    hook.after_run(runner)  # the same step is never evaluated twice
    assert len(seen) == 2 and runner.last_eval.step == 4
    assert [(r["step"], r["bbox_mAP"]) for r in records(tmp_path) if r.get("mode") == "val"] == [(2, 0.1), (4, 0.2)]
    assert seen == ["the averaged model"] * 2  # runner.eval_model: the EMA weights when ema.enabled
    assert {r["weights"] for r in records(tmp_path) if r.get("mode") == "val"} == {"ema"}


def test_eval_hook_skips_the_final_evaluation_after_a_preemption(tmp_path):
    files, metrics = files_in(tmp_path)
    hook = EvalHook(lambda model: {"bbox_mAP": 1.0}, interval=0, events=metrics, format_table=str)
    runner = FakeRunner(max_steps=4)
    runner.finish_step({"loss": 1.0})
    runner.request_stop("preempt")
    hook.after_run(runner)
    assert runner.evals == []


def test_eval_hook_on_another_rank_records_an_empty_evaluation(tmp_path):
    files, metrics = files_in(tmp_path)
    hook = EvalHook(lambda model: None, interval=1, events=metrics, format_table=str)
    runner = FakeRunner(max_steps=3)
    runner.finish_step({"loss": 1.0})
    hook.after_step(runner)
    assert runner.evals == [{}] and records(tmp_path) == []


# --------------------------------------------------------------------------------------------------------
# CheckpointHook


def checkpoint_hook(tmp_path: Path, work: Path | None = None, **cfg: Any) -> tuple[CheckpointHook, PreemptionFlag]:
    files, events = files_in(tmp_path)
    store = CheckpointStore(WorkDir(str(work or tmp_path)), keep_last=0)
    preempt = PreemptionFlag()
    config = CheckpointConfig(**cfg)
    checkpointer = Checkpointer(store, events, meta={"config_hash": "x"}, is_main=True, async_save=config.async_save)
    hook = CheckpointHook(checkpointer, config, preempt, events)
    saved: list[tuple] = []

    def outcome(event: Event) -> None:
        if event.kind in ("checkpoint", "checkpoint_failed"):
            saved.append((event.step, event.fields["reason"], event.fields["seconds"], event.kind == "checkpoint"))

    events.subscribe(outcome)
    hook.saved = saved
    return hook, preempt


def test_checkpoint_hook_saves_at_the_interval_and_at_the_end(tmp_path):
    hook, _ = checkpoint_hook(tmp_path, interval=2)
    runner = FakeRunner(max_steps=5)
    hook.before_run(runner)
    for _ in range(5):
        runner.finish_step({"loss": 1.0}, hooks=(hook,))
        hook.after_step(runner)
    runner.last_eval = EvalRecord(5, {"bbox_mAP": 0.5})
    hook.after_run(runner)
    hook.close()
    assert CheckpointStore(WorkDir(str(tmp_path))).committed_steps() == [2, 4, 5]
    assert [(s[0], s[1], s[3]) for s in hook.saved] == [(2, "interval", True), (4, "interval", True),
                                                        (5, "final", True)]
    manifest = json.loads((tmp_path / "checkpoints" / "step-00000005" / "manifest.json").read_text())
    assert manifest["metrics"] == {"bbox_mAP": 0.5} and manifest["reason"] == "final"


def test_checkpoint_hook_saves_and_stops_on_a_preemption_signal(tmp_path):
    hook, preempt = checkpoint_hook(tmp_path, interval=100)
    runner = FakeRunner(max_steps=50)
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    hook.after_step(runner)
    preempt._handle(15, None)  # what the SIGTERM handler does
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    hook.after_step(runner)
    assert runner.stop_reason == "preempt"
    assert CheckpointStore(WorkDir(str(tmp_path))).committed_steps() == [2]
    assert [(e["event"], e.get("signal")) for e in records(tmp_path) if "event" in e] == [
        ("checkpoint", None), ("preempt", "SIGTERM")]


def test_failed_saves_are_counted_then_stop_the_run(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the work dir should be")
    hook, _ = checkpoint_hook(tmp_path, work=blocker / "work", interval=1, max_failures=2)
    runner = FakeRunner(max_steps=10)
    hook.before_run(runner)
    for _ in range(2):
        runner.finish_step({"loss": 1.0}, hooks=(hook,))
        hook.after_step(runner)
    failed = [e for e in records(tmp_path) if e.get("event") == "checkpoint_failed"]
    assert [e["failures"] for e in failed] == [1, 2] and "blocker" in failed[0]["error"]
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    with pytest.raises((StorageError, StorageUnavailableError), match="2 checkpoint saves in a row failed"):
        hook.after_step(runner)


def test_a_newer_checkpoint_by_another_writer_stops_the_run_at_once(tmp_path):
    other = CheckpointStore(WorkDir(str(tmp_path)))
    other.save(100, {"model": {"w": torch.zeros(1)}}, {"config_hash": "other"})
    hook, _ = checkpoint_hook(tmp_path, interval=1, max_failures=5)
    runner = FakeRunner(max_steps=10)
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    hook.after_step(runner)  # the refused save
    assert hook.checkpointer.failures == 0  # not an ordinary failed save
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    with pytest.raises(WorkDirOwnedError) as info:
        hook.after_step(runner)
    assert info.value.exit_code == 3
    assert CheckpointStore(WorkDir(str(tmp_path))).committed_steps() == [100]


def test_a_bug_in_a_save_propagates_instead_of_becoming_a_failed_save(tmp_path):
    hook, _ = checkpoint_hook(tmp_path, interval=1)
    runner = FakeRunner(max_steps=10)
    runner.state_dict = lambda: {"model": {"w": lambda: 0}}  # a programming error: not picklable
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    with pytest.raises(Exception) as info:
        hook.after_step(runner)
    assert not isinstance(info.value, (StorageError, StorageUnavailableError))
    assert not [e for e in records(tmp_path) if e.get("event") == "checkpoint_failed"]


def test_async_save_in_flight_is_waited_for_by_close(tmp_path):
    hook, _ = checkpoint_hook(tmp_path, interval=1, async_save=True)
    runner = FakeRunner(max_steps=10)
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    hook.after_step(runner)
    hook.close()
    assert not hook.checkpointer.saver.in_flight()
    assert CheckpointStore(WorkDir(str(tmp_path))).committed_steps() == [1]


# --------------------------------------------------------------------------------------------------------
# TraceHook


def test_trace_hook_writes_every_rank_share_of_each_step(tmp_path):
    files, _ = files_in(tmp_path)
    relpath = next_attempt_path(["attempt-0.jsonl", "attempt-4.jsonl", "other.txt"])
    assert relpath == "trace/attempt-5.jsonl"
    image_ids = [100 + i for i in range(10)]
    hook = TraceHook(files, relpath, image_ids)
    runner = FakeRunner(max_steps=2, dist=WORLD_3)
    runner.finish_step({"loss": 1.0}, samples=2, indices=[9, 3, 5, 0, 1])
    hook.after_step(runner)
    files.close()
    line = json.loads((tmp_path / relpath).read_text())
    assert line == {"step": 0, "epoch": 0, "world_size": 3, "ids": [[109, 103], [105, 100], [101]]}
    assert [image_ids[i] for r in range(3) for i in split_share([9, 3, 5, 0, 1], r, 3)] == \
        [i for share in line["ids"] for i in share]


# --------------------------------------------------------------------------------------------------------
# Runner: the loop contract


class Recorder(Hook):
    def __init__(self, log: list[str], name: str, fail_at: int = -1) -> None:
        self.log, self.name, self.fail_at = log, name, fail_at

    def __getattribute__(self, attr: str):
        events = ("before_run", "before_epoch", "before_step", "after_step", "after_epoch", "after_run")
        if attr in events:
            def call(runner):
                self.log.append(f"{self.name}.{attr}")
                if attr == "after_step" and runner.progress.global_step == self.fail_at:
                    raise RuntimeError("hook failed")
            return call
        return object.__getattribute__(self, attr)

    def close(self) -> None:
        self.log.append(f"{self.name}.close")


def tiny_runner(hooks: list[Hook], max_steps: int = 3, published: list[Event] | None = None) -> Runner:
    model = torch.nn.Linear(2, 1)

    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, images, targets):
            x = torch.stack([i.flatten()[:2] for i in images])
            return {"loss_l2": (self.inner(x) ** 2).mean(), "score": x.sum()}

    detector = Detector()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    plan = ElasticBatchPlan(8, seed=0)
    schedule = StepSchedule(plan, 4, Progress())
    batches = iter([([torch.ones(3, 2, 2)] * 4, [{}] * 4)] * max_steps)
    events = EventStream()
    if published is not None:
        events.subscribe(published.append)
    return Runner(parts=TrainingParts(detector, optimizer, scheduler, None), model=detector, schedule=schedule,
                  batches=batches, hooks=hooks, events=events, dist_info=WORLD_1, progress=Progress(),
                  max_steps=max_steps,
                  micro_batch_size=2, amp_mode="none", clip_grad_norm=1.0)


def test_runner_steps_the_optimizer_and_schedule_and_calls_hooks_in_order():
    log: list[str] = []
    published: list[Event] = []
    runner = tiny_runner([Recorder(log, "a"), Recorder(log, "b")], max_steps=3, published=published)
    before = runner.parts.model.inner.weight.detach().clone()
    runner.train()
    assert runner.progress.global_step == 3 and runner.stop_reason is None
    assert not torch.equal(before, runner.parts.model.inner.weight)
    assert runner.parts.scheduler.last_epoch == 3
    record = runner.last_step
    assert record.index == 2 and record.num_samples == 4 and record.lr == pytest.approx(0.1 / 3)
    assert set(record.loss_sums) == {"loss_l2", "score"} and record.grad_norm is not None
    assert log[:4] == ["a.before_run", "b.before_run", "a.before_epoch", "b.before_epoch"]
    assert log[4:8] == ["a.before_step", "b.before_step", "a.after_step", "b.after_step"]
    assert log[-4:] == ["a.after_run", "b.after_run", "a.close", "b.close"]
    # the runner publishes the loop's own events: its start, each step, its end
    assert [(e.kind, e.step) for e in published] == [("loop_start", 0), ("step", 1), ("step", 2), ("step", 3),
                                                      ("run_end", 3)]
    assert published[0].fields["max_steps"] == 3 and published[-1].fields == {"how": "done", "error": None}
    state = runner.state_dict()
    assert state["progress"]["global_step"] == 3 and set(state) >= {"model", "optimizer", "scheduler", "hooks"}


def test_runner_closes_every_hook_after_an_exception_and_skips_after_run():
    log: list[str] = []
    published: list[Event] = []
    runner = tiny_runner([Recorder(log, "a", fail_at=2), Recorder(log, "b")], max_steps=3, published=published)
    with pytest.raises(RuntimeError, match="hook failed"):
        runner.train()
    assert log[-2:] == ["a.close", "b.close"]
    assert published[-1].kind == "run_end" and published[-1].fields == {"how": "failed", "error": "RuntimeError"}
    assert not any(entry.endswith("after_run") for entry in log)
