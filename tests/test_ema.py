"""EMA weights (issue 18 part 2): the average, its checkpoint, its use for evaluation/test/export, and its
exact resume under real torchrun (SIGTERM + resume vs the uninterrupted run).

In one process: the decay's warmup ramp, one update per applied global step however the step is split
(micro-batches; a step dropped by ``train.nonfinite=skip`` is not folded in), the state dict round trip, the
checkpoint holding the averaged and the raw weights and the counter (sync and async saves, each the
average of its own step), evaluation during training of the averaged weights with the val record saying
so, ``load_weights``/``export_weights`` preferring the average.

Under real torchrun (2 processes, gloo): a run SIGTERMed at step k and resumed ends at step S with the
uninterrupted run's averaged weights. Same world size, so the tolerance is the exact-resume one of
tests/test_elastic.py for steps before the first world-size change: bitwise. ``elastic_det.test`` on the
result says it evaluates the averaged weights.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO, base_env, events, fast_overrides, read_jsonl, torchrun_cmd, train_steps, wait_for
from test_hooks import checkpoint_hook, files_in, records, tiny_runner
from test_nonfinite import AfterStep, NanAt

from elastic_det.checkpoint import CheckpointStore
from elastic_det.checkpoint.manifest import Manifest
from elastic_det.checkpoint.store import Checkpoint
from elastic_det.engine import state
from elastic_det.engine.ema import ModelEMA, averaged_weights
from elastic_det.engine.hooks.evaluation import EvalHook
from elastic_det.engine.nonfinite import NonFiniteGuard
from elastic_det.errors import CheckpointError
from elastic_det.storage import WorkDir


def test_the_average_follows_the_warmed_up_decay_and_copies_integer_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup_steps=4)
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        model[1].num_batches_tracked += 1
        ema.update(model)
        d = 0.9 * (1 - math.exp(-n / 4))
        assert ema.current_decay(n) == pytest.approx(d)
        for k in expected:
            expected[k] = d * expected[k] + (1 - d) * model.state_dict()[k].double()
    got = ema.module.state_dict()
    assert ema.updates == 5 and got["1.num_batches_tracked"] == 5
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got["0.weight"], model[0].weight)  # an average, not a copy
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ModelEMA(model, 0.9, 0).current_decay(1) == 0.9  # warmup_steps=0: constant decay


def ema_runner(max_steps: int):
    torch.manual_seed(0)  # the same initial weights in every runner
    runner = tiny_runner([], max_steps=max_steps)
    runner.parts.ema = ModelEMA(runner.parts.model, decay=0.8, warmup_steps=2)
    return runner


def averaged(runner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in runner.parts.ema.module.state_dict().items()}


def test_one_update_per_global_step_however_the_step_is_split():
    whole, split = ema_runner(4), ema_runner(4)
    whole.micro_batch_size, split.micro_batch_size = 0, 1  # one forward per step / four micro-batches
    whole.train()
    split.train()
    assert whole.parts.ema.updates == split.parts.ema.updates == 4
    for k, v in averaged(whole).items():
        torch.testing.assert_close(averaged(split)[k], v, rtol=1e-6, atol=1e-7)  # summation order only


def test_a_dropped_step_is_not_folded_into_the_average():
    runner = ema_runner(4)
    runner.micro_batch_size = 0
    runner.model = NanAt(runner.parts.model, {2})
    runner.nonfinite = NonFiniteGuard("skip", patience=3)
    seen: list[tuple[int, dict]] = []
    runner.hooks.append(AfterStep(lambda r: seen.append((r.parts.ema.updates, averaged(r)))))
    runner.train()
    assert [u for u, _ in seen] == [1, 1, 2, 3]  # step 2's update was dropped, the counter with it
    assert all(torch.equal(a, b) for a, b in zip(seen[0][1].values(), seen[1][1].values(), strict=True))
    assert not any(t.isnan().any() for t in averaged(runner).values())


def test_state_dict_round_trip_restores_the_average_and_the_counter(caplog):
    runner = ema_runner(3)
    runner.train()
    saved = runner.parts.ema.state_dict()
    assert saved["updates"] == 3 and (saved["decay"], saved["warmup_steps"]) == (0.8, 2)
    torch.manual_seed(1)
    other = ModelEMA(tiny_runner([]).parts.model, decay=0.5, warmup_steps=0)  # other initial weights
    assert not torch.equal(other.module.inner.weight, saved["model"]["inner.weight"])
    with caplog.at_level(logging.WARNING, logger="elastic_det.engine.ema"):
        other.load_state_dict(saved, "here")
    assert other.updates == 3 and (other.decay, other.warmup_steps) == (0.5, 0)  # this run's settings
    assert "ema.decay is 0.5" in caplog.text and "ema.warmup_steps is 0" in caplog.text
    for k, v in saved["model"].items():
        assert torch.equal(other.module.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="no update counter"):
        other.load_state_dict({"model": saved["model"]}, "here")


@pytest.mark.parametrize("async_save", [False, True])
def test_every_checkpoint_holds_its_steps_average_the_raw_weights_and_the_counter(tmp_path, async_save):
    runner = ema_runner(4)
    hook, _ = checkpoint_hook(tmp_path, interval=1, async_save=async_save)
    seen: dict[int, tuple[dict, dict]] = {}
    runner.hooks += [AfterStep(lambda r: seen.update({r.progress.global_step: (
        averaged(r), {k: v.clone() for k, v in r.parts.model.state_dict().items()})})), hook]
    runner.train()
    store = CheckpointStore(WorkDir(str(tmp_path)))
    assert store.committed_steps() == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        saved = store.load(store.location(step)).state
        assert saved["ema"]["updates"] == step
        ema, raw = seen[step]
        for k in ema:  # each the step's own weights, not a later step's (the async snapshot)
            assert torch.equal(saved["ema"]["model"][k], ema[k]) and torch.equal(saved["model"][k], raw[k]), k
        assert not torch.equal(saved["ema"]["model"]["inner.weight"], saved["model"]["inner.weight"])
        assert averaged_weights(saved) is not None


def test_evaluation_during_training_runs_the_averaged_weights_and_says_so(tmp_path):
    _, events_ = files_in(tmp_path)
    evaluated: list[dict] = []
    runner = ema_runner(4)

    def evaluate(model):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        assert model is runner.parts.ema.module
        return {"bbox_mAP": 0.25}

    runner.hooks.append(EvalHook(evaluate, 2, events_, str))
    runner.train()
    assert len(evaluated) == 2 and torch.equal(evaluated[-1]["inner.weight"], runner.parts.ema.module.inner.weight)
    assert not torch.equal(evaluated[-1]["inner.weight"], runner.parts.model.inner.weight)
    assert [(r["step"], r["weights"]) for r in records(tmp_path) if r.get("mode") == "val"] == [(2, "ema"), (4, "ema")]
    plain = tiny_runner([], max_steps=1)
    assert (plain.eval_weights, plain.eval_model) == ("raw", plain.parts.model)


def test_resume_continues_the_same_average_and_counter_in_process(tmp_path):
    straight = ema_runner(6)
    straight.train()
    first = ema_runner(3)
    first.train()
    saved = first.state_dict()
    assert saved["ema"]["updates"] == 3 and set(saved) >= {"model", "ema"}
    store = CheckpointStore(WorkDir(str(tmp_path)))
    store.save(3, saved, {})
    resumed = ema_runner(6)
    progress, _ = state.restore(store.load_latest(), resumed.parts, base_lr=0.1, seed=0, optimizer_type="sgd")
    assert resumed.parts.ema.updates == 3
    resumed.progress = progress
    resumed.start_step = progress.global_step
    resumed.batches = iter([([torch.ones(3, 2, 2)] * 4, [{}] * 4)] * 3)
    resumed.train()
    assert resumed.parts.ema.updates == straight.parts.ema.updates == 6
    for (k, a), b in zip(straight.parts.ema.module.state_dict().items(),
                         resumed.parts.ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert resumed.eval_weights == "ema" and resumed.eval_model is resumed.parts.ema.module


def test_test_and_export_use_the_averaged_weights(tmp_path):
    runner = ema_runner(3)
    runner.train()
    saved = runner.state_dict()
    store = CheckpointStore(WorkDir(str(tmp_path / "work")))
    store.save(3, saved, {})
    checkpoint = store.load_latest()
    model = tiny_runner([]).parts.model
    loaded = state.load_weights(model, str(tmp_path / "work"), {})
    assert state.weights_kind(loaded) == "ema"
    assert torch.equal(model.inner.weight, saved["ema"]["model"]["inner.weight"])
    assert not torch.equal(model.inner.weight, saved["model"]["inner.weight"])
    state.load_weights(model, str(tmp_path / "work"), {}, weights="raw")
    assert torch.equal(model.inner.weight, saved["model"]["inner.weight"])
    assert store.export_weights(checkpoint, "exports/model.pt") == "ema"
    exported = torch.load(tmp_path / "work" / "exports" / "model.pt", weights_only=True)
    assert torch.equal(exported["inner.weight"], saved["ema"]["model"]["inner.weight"])
    plain = Checkpoint(Manifest(step=1, data="x.pt", size=0), "plain", {"model": saved["model"]})
    with pytest.raises(CheckpointError, match="no averaged weights"):
        store.export_weights(plain, "exports/raw.pt", weights="ema")
    assert store.export_weights(plain, "exports/raw.pt") == "raw"


def test_enabling_ema_on_resume_starts_the_average_from_the_resumed_weights(tmp_path):
    plain = tiny_runner([], max_steps=2)
    plain.train()
    store = CheckpointStore(WorkDir(str(tmp_path)))
    store.save(2, plain.state_dict(), {})
    resumed = ema_runner(4)
    state.restore(store.load_latest(), resumed.parts, base_lr=0.1, seed=0, optimizer_type="sgd")
    assert resumed.parts.ema.updates == 0
    assert torch.equal(resumed.parts.ema.module.inner.weight, plain.parts.model.inner.weight)


# ----------------------------------------------------------------------------------------------------------
# Under torchrun: SIGTERM + resume gives the uninterrupted run's average, bitwise, and the counter continues

S = 12


def ema_opts(cache: Path, *more: str) -> list[str]:
    return fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm", "data.shapes.num_train=40",
                          "data.global_batch_size=6", "schedule.policy=constant", "checkpoint.interval=0",
                          "ema.enabled=true", "ema.decay=0.9", "ema.warmup_steps=3", *more)


def final_state(work: Path) -> dict:
    return CheckpointStore(WorkDir(str(work))).load_latest().state


@pytest.mark.slow
def test_sigterm_and_resume_give_the_uninterrupted_runs_average(tmp_path, procs):
    cache = tmp_path / "cache"
    env = base_env(cache)
    reference = tmp_path / "reference"
    ref = procs.start(torchrun_cmd(2, ["--work-dir", str(reference), "--cfg-options",
                                       *ema_opts(cache, f"train.max_steps={S}", "train.validate=true")]),
                      env, tmp_path / "ref.log")
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    (val,) = [r for r in read_jsonl(reference / "metrics.jsonl") if r.get("mode") == "val"]
    assert (val["step"], val["weights"]) == (S, "ema")  # the final evaluation ran the average

    work = tmp_path / "work"
    first = procs.start(torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                                         *ema_opts(cache, "train.max_steps=200")]), env, tmp_path / "first.log")
    wait_for(lambda: max(train_steps(work), default=0) >= 3 or first.poll() is not None, 120, "3 steps")
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    procs.remember(first)
    os.kill(first.pid, signal.SIGTERM)
    assert first.wait(timeout=60) != 0
    (preempt,) = events(work, "preempt")
    k = preempt["step"]
    assert 3 <= k <= S - 2, f"preempted at step {k}"
    assert final_state(work)["ema"]["updates"] == k
    second = procs.start(torchrun_cmd(2, ["--work-dir", str(work), "--cfg-options",
                                          *ema_opts(cache, f"train.max_steps={S}")]), env, tmp_path / "second.log")
    assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    (resume,) = events(work, "resume")
    assert resume["step"] == k

    want, got = final_state(reference), final_state(work)
    assert got["ema"]["updates"] == want["ema"]["updates"] == S  # the counter continued from k
    assert set(got["ema"]["model"]) == set(want["ema"]["model"])
    for name, tensor in want["ema"]["model"].items():
        assert torch.equal(got["ema"]["model"][name], tensor), name  # same world size: bitwise
    moved = [n for n, t in want["ema"]["model"].items() if t.is_floating_point()
             and not torch.equal(t, want["model"][n])]
    assert moved  # the average differs from the raw weights: the comparison is not of copies

    tested = subprocess.run([PYTHON, "-m", "elastic_det.test", str(reference / "config.yaml"), str(reference)],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert f"(step {S}, ema weights)" in tested.stderr, tested.stderr[-3000:]
