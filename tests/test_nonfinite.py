"""Guarantee 7 (nothing non-finite is committed), issue 18 part 3.

In one process: the runner's guard stops before the update (``stop``) or drops it (``skip``, with its
patience), the flags ride in the step's one agreement; a save of a state with a NaN tensor is refused before
anything is written (sync, async, local and S3) and the previous checkpoint stays the newest.

Under real torchrun (2 processes, gloo): a plug-in model (``model.type: nan_model:build``, tests/nan_model.py)
whose loss turns NaN on rank 1 only. With ``stop`` both ranks end with the paragraph, under the supervisor
with exit 65 and no second attempt, and no checkpoint after step k-1 exists; with ``skip`` the steps are
dropped on both ranks, counted in metrics.jsonl, every committed tensor is finite, and the patience stops it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, base_env, events, fast_overrides, read_jsonl, torchrun_cmd
from test_hooks import FakeRunner, checkpoint_hook, records, tiny_runner

from elastic_det.checkpoint import AsyncSaver, CheckpointStore
from elastic_det.checkpoint.finite import nonfinite_tensors
from elastic_det.engine.hook import Hook
from elastic_det.engine.nonfinite import SLOTS, NonFiniteGuard, NonFiniteLossError
from elastic_det.errors import FINAL_EXIT_CODES, NONFINITE_EXIT_CODE, NonFiniteStateError, exit_code_for
from elastic_det.storage import WorkDir

REPO = Path(__file__).resolve().parents[1]


class NanAt(torch.nn.Module):
    """Wraps the tiny runner's detector: its loss is NaN at the given 1-based forward calls (= steps)."""

    def __init__(self, inner: torch.nn.Module, steps: set[int]) -> None:
        super().__init__()
        self.inner, self.steps, self.calls = inner, steps, 0

    def forward(self, images, targets):
        out = self.inner(images, targets)
        self.calls += 1
        if self.calls in self.steps:
            out = {**out, "loss_l2": out["loss_l2"] * float("nan")}
        return out


def nan_runner(steps: set[int], max_steps: int, guard: NonFiniteGuard):
    runner = tiny_runner([], max_steps=max_steps)
    runner.micro_batch_size = 0  # one forward per step
    runner.model = NanAt(runner.parts.model, steps)
    runner.nonfinite = guard
    return runner


class AfterStep(Hook):
    def __init__(self, call) -> None:
        self.call = call

    def after_step(self, runner) -> None:
        self.call(runner)


def test_stop_raises_at_the_step_before_its_update():
    runner = nan_runner({3}, max_steps=5, guard=NonFiniteGuard("stop"))
    weights = []
    runner.hooks.append(AfterStep(lambda r: weights.append(r.parts.model.inner.weight.detach().clone())))
    with pytest.raises(NonFiniteLossError) as info:
        runner.train()
    assert info.value.step == 3 and exit_code_for(info.value) == NONFINITE_EXIT_CODE in FINAL_EXIT_CODES
    assert "global step 3" in str(info.value) and "loss_l2" in str(info.value)
    assert len(weights) == 2 and runner.progress.global_step == 2
    assert torch.equal(runner.parts.model.inner.weight, weights[-1])  # step 3's update was not applied
    assert torch.isfinite(runner.parts.model.inner.weight).all()
    message = str(info.value.with_checkpoint("work/checkpoints/step-00000002"))
    assert "step-00000002" in message and "newest good checkpoint" in message


def test_skip_drops_the_update_counts_it_and_stops_after_the_patience():
    skips: list[tuple] = []
    guard = NonFiniteGuard("skip", patience=2, on_skip=lambda *a: skips.append(a))
    runner = nan_runner({2, 4, 5}, max_steps=8, guard=guard)
    seen: list[tuple[int, bool, torch.Tensor]] = []
    runner.hooks.append(AfterStep(lambda r: seen.append(
        (r.progress.global_step, r.last_step.skipped, r.parts.model.inner.weight.detach().clone()))))
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        runner.train()
    assert [(s, skipped) for s, skipped, _ in seen] == [(1, False), (2, True), (3, False), (4, True)]
    assert torch.equal(seen[1][2], seen[0][2]) and not torch.equal(seen[2][2], seen[1][2])
    assert all(torch.isfinite(w).all() for _, _, w in seen)
    assert runner.parts.scheduler.last_epoch == 4  # the schedule advances on a skipped step
    nan = ["loss_l2", "grad_norm"]  # a NaN loss makes the gradients NaN too
    assert [(step, terms, row, total) for step, terms, row, total in skips] == [
        (2, nan, 1, 1), (4, nan, 1, 2), (5, nan, 2, 3)]
    assert runner.hook_states()["NonFiniteGuard"] == {"in_a_row": 2, "skipped": 3}


def test_guard_flags_name_the_terms_and_have_a_fixed_width():
    guard = NonFiniteGuard("stop")
    sums = {f"loss_{i:02d}": torch.tensor(1.0) for i in range(SLOTS + 3)}
    sums["loss_03"] = torch.tensor(float("inf"))
    sums["loss_17"] = torch.tensor(float("nan"))
    sums["score"] = torch.tensor(float("nan"))  # not a loss term: not back-propagated, not checked
    names, flags = guard.local_flags(sums, torch.tensor(2.0))
    assert flags.shape == (SLOTS,) and flags.tolist()[3] == 1 and flags.tolist()[-1] == 1 and flags.sum() == 2
    with pytest.raises(NonFiniteLossError) as info:
        guard.decide(9, names, [bool(v) for v in flags.tolist()])
    assert "loss_03" in str(info.value) and "loss_17" in str(info.value) and "score" not in str(info.value)
    _, flags = guard.local_flags({"loss": torch.tensor(1.0)}, torch.tensor(float("nan")))
    assert flags.tolist()[:2] == [0, 1]  # the gradient norm (no GradScaler): its own slot


# ----------------------------------------------------------------------------------------------------------
# Saves


def nan_state(step: int) -> dict:
    w = torch.randn(4, 3)
    moment = torch.zeros(4, 3)
    moment[1, 2] = float("nan")
    return {"model": {"w": w, "b": torch.zeros(3)}, "optimizer": {"state": {0: {"exp_avg": moment}}},
            "progress": {"global_step": step}}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_save_with_a_nan_tensor_is_refused_and_the_previous_checkpoint_stays_newest(where, tmp_path, request):
    url = str(tmp_path / "work") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    store = CheckpointStore(WorkDir(url), keep_last=1)
    good = {"model": {"w": torch.ones(4, 3), "b": torch.zeros(3)}, "progress": {"global_step": 4}}
    store.save(4, good, {})
    with pytest.raises(NonFiniteStateError) as info:
        store.save(6, nan_state(6), {})
    assert "optimizer.state.0.exp_avg" in str(info.value) and "step 6" in str(info.value)
    assert exit_code_for(info.value) == NONFINITE_EXIT_CODE
    assert store.committed_steps() == [4] and store.newest_committed_step() == 4
    assert not [p for p in WorkDir(url).find("checkpoints") if "step-00000006" in p]  # nothing written
    assert torch.equal(store.load_latest().state["model"]["w"], torch.ones(4, 3))
    # the async saver reports the same refusal to its callback
    done: list = []
    saver = AsyncSaver(store)
    saver.submit(8, nan_state(8), {}, lambda manifest, error, seconds: done.append((manifest, error)))
    saver.wait()
    assert done[0][0] is None and isinstance(done[0][1], NonFiniteStateError)
    assert store.newest_committed_step() == 4


def test_nonfinite_tensors_finds_every_kind_and_ignores_integers():
    state = {"a": torch.tensor([1.0, float("-inf")]), "b": [torch.tensor(float("nan"), dtype=torch.bfloat16)],
             "c": torch.tensor([7]), "d": torch.zeros(2, dtype=torch.float16), "e": 1.5}
    assert nonfinite_tensors(state) == ["a", "b.0"]
    assert nonfinite_tensors({"m": torch.randn(100)}) == []


def test_checkpoint_hook_stops_every_rank_after_a_refused_async_save(tmp_path):
    hook, _ = checkpoint_hook(tmp_path, interval=1, async_save=True)
    runner = FakeRunner(max_steps=10)
    runner.state_dict = lambda: nan_state(runner.progress.global_step)
    hook.before_run(runner)
    runner.finish_step({"loss": 1.0}, hooks=(hook,))
    hook.after_step(runner)  # submits the save of step 1; the save thread refuses it
    hook.checkpointer.wait()
    runner.finish_step({"loss": 1.0}, hooks=(hook,))  # its flags carry the refusal to every rank
    with pytest.raises(NonFiniteStateError):
        hook.after_step(runner)
    hook.close()
    assert CheckpointStore(WorkDir(str(tmp_path))).committed_steps() == []
    (failed,) = [e for e in records(tmp_path) if e.get("event") == "checkpoint_failed"]
    assert failed["final"] is True and "NonFiniteStateError" in failed["error"]


# ----------------------------------------------------------------------------------------------------------
# Under torchrun: a plug-in model whose loss turns NaN on rank 1


def nan_opts(cache: Path, *more: str) -> list[str]:
    return fast_overrides(cache, "model.type=nan_model:build", "model.norm=group_norm", "data.shapes.num_train=32",
                          "checkpoint.interval=2", "train.max_steps=8", *more)


def nan_env(cache: Path, steps: str) -> dict[str, str]:
    env = base_env(cache, NAN_STEPS=steps, NAN_RANK="1")
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    return env


def all_finite(path: Path) -> bool:
    state = torch.load(path, weights_only=True)
    return not nonfinite_tensors(state)


@pytest.mark.slow
def test_stop_under_the_supervisor_ends_every_rank_with_the_message_and_no_retry(tmp_path, procs):
    cache, work = tmp_path / "cache", tmp_path / "work"
    cmd = [PYTHON, "-m", "elastic_det.supervise", "--",
           *torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options", *nan_opts(cache)], max_restarts=2)]
    log = tmp_path / "supervisor.log"
    proc = procs.start(cmd, nan_env(cache, "5"), log)
    assert proc.wait(timeout=240) == NONFINITE_EXIT_CODE, log.read_text()[-4000:]
    text = log.read_text()
    paragraphs = [line for line in text.splitlines() if "elastic_det: error: Training stopped at global step 5" in line]
    assert len(paragraphs) == 2, text[-4000:]  # rank 0 (finite losses) and rank 1 (the NaN)
    assert all("loss_classification" in p and "step-00000004" in p for p in paragraphs), paragraphs
    assert "attempt 1:" in text and "attempt 2:" not in text, text[-4000:]  # final: never retried
    committed = CheckpointStore(WorkDir(str(work))).committed_steps()
    assert committed and max(committed) <= 4  # nothing after step k-1
    assert max(r["step"] for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train") == 4


@pytest.mark.slow
def test_skip_under_torchrun_drops_the_steps_on_every_rank_counts_them_and_commits_finite_weights(tmp_path, procs):
    cache, work = tmp_path / "cache", tmp_path / "work"
    cmd = torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                           *nan_opts(cache, "train.nonfinite=skip", "train.nonfinite_patience=2")])
    log = tmp_path / "torchrun.log"
    proc = procs.start(cmd, nan_env(cache, "3,5,6"), log)
    assert proc.wait(timeout=240) != 0, log.read_text()[-4000:]
    text = log.read_text()
    assert text.count("Training stopped at global step 6: 2 steps in a row") == 2, text[-4000:]  # both ranks
    assert [(e["step"], e["in_a_row"], e["skipped"]) for e in events(work, "nonfinite_skip")] == \
        [(3, 1, 1), (5, 1, 2), (6, 2, 3)]
    train = {r["step"]: r for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"}
    assert sorted(train) == [1, 2, 3, 4, 5]
    assert train[3]["skipped_steps"] == 1 and train[3]["loss"] is None and "skipped_steps" not in train[4]
    assert all(math.isfinite(train[s]["loss"]) for s in (1, 2, 4))
    store = CheckpointStore(WorkDir(str(work)))
    assert store.committed_steps() == [2, 4]
    newest = store.load_latest()
    assert not nonfinite_tensors(newest.state)
    assert newest.state["hooks"]["NonFiniteGuard"] == {"in_a_row": 0, "skipped": 1}
