"""The grace window: the launchers' grace from the environment, the trainer's save and step times, and the
warnings when a preemption would not fit (at start and after a slow save)."""

from __future__ import annotations

import json
import logging
import re

import pytest
from helpers import base_env, fast_overrides, run_train

from elastic_det.engine.grace import (
    GRACE_ENV,
    TORCHRUN_ENV,
    Grace,
    GraceMonitor,
    grace_from_env,
    history,
    shortfall,
    start_figures,
)
from elastic_det.errors import USER_ERROR_EXIT_CODE, ConfigError


def test_grace_from_env_takes_the_smaller_of_the_launchers_figures():
    assert grace_from_env({}) is None
    assert grace_from_env({GRACE_ENV: "300"}) == Grace(300.0, GRACE_ENV)
    assert grace_from_env({TORCHRUN_ENV: "120"}) == Grace(120.0, TORCHRUN_ENV)
    assert grace_from_env({GRACE_ENV: "300", TORCHRUN_ENV: "120"}) == Grace(120.0, TORCHRUN_ENV)
    assert grace_from_env({GRACE_ENV: "30", TORCHRUN_ENV: "120"}) == Grace(30.0, GRACE_ENV)
    assert grace_from_env({GRACE_ENV: " ", TORCHRUN_ENV: "45.5"}) == Grace(45.5, TORCHRUN_ENV)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_bad_grace_value_is_a_config_error_naming_the_variable(value):
    with pytest.raises(ConfigError) as e:
        grace_from_env({TORCHRUN_ENV: "120", GRACE_ENV: value})
    assert f"{GRACE_ENV}={value!r}" in str(e.value) and "\n" not in str(e.value)


def test_shortfall_names_the_grace_the_save_and_the_step():
    grace = Grace(30.0, GRACE_ENV)
    assert shortfall(grace, 20.0, 5.0, "the checkpoint at step 8 took") is None  # 25 s fit in 30 s
    message = shortfall(grace, 28.0, 5.0, "the checkpoint at step 8 took")
    assert message is not None
    for figure in ("30 s (ELASTIC_DET_GRACE_SECONDS)", "the checkpoint at step 8 took 28.00 s",
                   "a step takes 5.00 s", "33.00 s in all"):
        assert figure in message
    untimed = shortfall(grace, 31.0, None, "a save takes")
    assert untimed is not None and "not timed yet" in untimed and "31.00 s in all" in untimed


def _write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_history_reads_recent_saves_and_step_times_from_the_tail(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert history(str(metrics)) == (None, None)  # no file yet
    old = [{"mode": "train", "step": s, "step_time": 9.0, "padding": "x" * 200} for s in range(400)]
    recent = [
        {"event": "checkpoint", "step": 400, "reason": "interval", "seconds": 9.0},
        {"event": "checkpoint", "step": 600, "reason": "interval", "seconds": 1.5},
        *({"mode": "train", "step": 600 + s, "step_time": t} for s, t in enumerate([0.4, 0.5, 0.6, 0.5, 0.5])),
        {"event": "checkpoint", "step": 800, "reason": "interval", "seconds": 2.5},
        {"event": "checkpoint", "step": 1000, "reason": "time", "seconds": 0.5},
        {"event": "resume", "step": 1000},
    ]
    _write_metrics(metrics, old + recent)
    recent_bytes = len("".join(json.dumps(r) + "\n" for r in recent))
    # only the tail is read: the slowest of the last three saves (not step 400's 9 s), the median step time;
    # the cut line the tail starts in is skipped
    assert history(str(metrics), tail_bytes=recent_bytes) == (2.5, 0.5)
    assert history(str(metrics), tail_bytes=recent_bytes + 100) == (2.5, 0.5)
    # a longer tail reaches the old, slow steps: the last 20 step times are mostly theirs
    assert history(str(metrics), tail_bytes=recent_bytes + 20 * 260) == (2.5, 9.0)


def test_start_figures_come_from_the_run_or_from_the_state_size(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [{"event": "checkpoint", "step": 2, "seconds": 4.0},
                             {"mode": "train", "step": 3, "step_time": 0.25}])
    assert start_figures(str(metrics), 10**9, remote=False) == (4.0, 0.25, "recent checkpoints of this run took up to")
    save, step, source = start_figures(str(tmp_path / "none.jsonl"), 100 * 10**6, remote=False)
    assert (save, step) == (1.0, None) and "300 MB" in source  # model + 2x optimizer state at 300 MB/s
    save, _, source = start_figures(str(tmp_path / "none.jsonl"), 100 * 10**6, remote=True)
    assert save == 6.0 and "50 MB/s" in source


def test_monitor_warns_at_start_and_after_slow_saves_without_repeating_itself(caplog):
    caplog.set_level(logging.WARNING, logger="elastic_det.engine.grace")
    monitor = GraceMonitor(Grace(10.0, TORCHRUN_ENV))
    assert monitor.at_start(3.0, 1.0, "recent checkpoints took up to") is None
    assert "(10.50 s in all)" in monitor.at_start(9.5, 1.0, "recent checkpoints took up to")
    assert monitor.after_save(100, 8.0, 1.0) is None  # 9 s fit in 10 s
    first = monitor.after_save(200, 9.5, 1.0)
    assert first is not None and "step 200 took 9.50 s" in first and "10 s (PET_SHUTDOWN_TIMEOUT)" in first
    assert monitor.after_save(300, 10.0, 1.0) is None  # not 10% slower than the one reported
    assert monitor.after_save(400, 10.5, 1.0) is not None
    assert [r.getMessage() for r in caplog.records].count(first) == 1
    assert len(caplog.records) == 3  # start, step 200, step 400
    silent = GraceMonitor(None)
    assert silent.at_start(1e9, 1.0, "x") is None and silent.after_save(1, 1e9, 1.0) is None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


@pytest.mark.slow
def test_trainer_warns_when_the_launchers_grace_is_too_short(tmp_path, cache):
    work = tmp_path / "work"
    args = ["--work-dir", str(work), "--cfg-options",
            *fast_overrides(cache, "train.max_steps=2", "checkpoint.interval=2")]
    done = run_train(args, base_env(cache, ELASTIC_DET_GRACE_SECONDS="0.001", PET_SHUTDOWN_TIMEOUT="120"))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "grace period of 0.001 s" in line]
    # at start, an estimate from the state's size; after the (final) save at step 2, its measured time
    assert len(warnings) == 2, done.stderr[-3000:]
    assert "(ELASTIC_DET_GRACE_SECONDS)" in warnings[0] and "no save timed yet" in warnings[0]
    saved = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()
             if '"checkpoint"' in line][-1]
    took = re.search(r"the checkpoint at step 2 took (\d+\.\d\d) s", warnings[1])
    assert took, warnings[1]
    # metrics.jsonl keeps 3 decimals, the warning 2: the same measurement, rounded twice
    assert abs(float(took.group(1)) - saved["seconds"]) <= 0.0051, (took.group(1), saved["seconds"])
    # a resumed run warns at start from the saves it finds in metrics.jsonl
    args[-1] = "checkpoint.interval=0"
    args = [a if a != "train.max_steps=2" else "train.max_steps=3" for a in args]
    done = run_train(args, base_env(cache, PET_SHUTDOWN_TIMEOUT="0.001"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "grace period of 0.001 s (PET_SHUTDOWN_TIMEOUT) is shorter than a preemption needs: recent " \
           f"checkpoints of this run took up to {saved['seconds']:.2f} s" in done.stderr


@pytest.mark.slow
def test_a_bad_grace_in_the_environment_stops_with_one_paragraph(tmp_path, cache):
    args = ["--work-dir", str(tmp_path / "work"), "--cfg-options", *fast_overrides(cache, "train.max_steps=1")]
    done = run_train(args, base_env(cache, ELASTIC_DET_GRACE_SECONDS="soon"))
    assert done.returncode == USER_ERROR_EXIT_CODE
    assert "ELASTIC_DET_GRACE_SECONDS='soon'" in done.stderr and "Traceback" not in done.stderr
