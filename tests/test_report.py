"""Goodput: the ledger writer and ``python -m elastic_det.report`` on work dirs with a known history.

The history is built from timestamps chosen here, so every figure of the report is known exactly:
attempt 0 at world size 2 is preempted at step 150 (0 steps lost), attempt 1 resumes there, commits step
200 and is killed at step 270 (70 steps lost, recomputed), attempt 2 resumes at 200 at world size 1 and
finishes at 300 (an evaluation and the final save at the end).
"""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from elastic_det.engine.run_files import RunFiles
from elastic_det.goodput.history import read_history
from elastic_det.goodput.ledger import Ledger
from elastic_det.goodput.report import build_report, main
from elastic_det.records import LEDGER
from elastic_det.storage import WorkDir

T = 1_800_000_000.0


def _l(attempt: str, kind: str, t: float, **fields) -> dict:
    return {"kind": kind, "attempt": attempt, "time": T + t, "host": "node-a", **fields}


def _phases(a: str, ws: int, start: float, restore: int, load: float, launch: float | None = None) -> list[dict]:
    """process start, imports done (+3 or +2), rendezvous, restore, loop start (as in KNOWN's attempts)."""
    imports = 2 if restore == 200 else 3
    rendezvous = {0: 2, 150: 1, 200: 1}[restore]
    t = start
    out = [_l(a, "process_start", t, pid=1, restart_count=0, world_size=ws,
              **({"launch_time": T + launch} if launch is not None else {}))]
    t += imports
    out.append(_l(a, "imports_done", t))
    t += rendezvous
    out.append(_l(a, "dist_ready", t, world_size=ws))
    t += 3
    out.append(_l(a, "restore_done", t, step=restore, load_seconds=load))
    t += 1
    out.append(_l(a, "train_start", t, step=restore, max_steps=300))
    return out


KNOWN_LEDGER = [
    *_phases("a0", 2, 0, 0, 0.0),  # loop starts at +9
    _l("a0", "first_step", 9.5, step=1),
    _l("a0", "steps", 59, first=0, last=100, seconds=50.0),
    _l("a0", "checkpoint", 61, step=100, seconds=2.0, committed=True, reason="interval"),
    _l("a0", "steps", 86, first=100, last=150, seconds=25.0),
    _l("a0", "checkpoint", 87, step=150, seconds=1.0, committed=True, reason="preempt"),
    _l("a0", "end", 88, how="preempted", last_step=150, signal="SIGTERM"),
    *_phases("a1", 2, 100, 150, 1.5, launch=95),  # loop starts at +108
    _l("a1", "steps", 133, first=150, last=200, seconds=25.0),
    _l("a1", "checkpoint", 135, step=200, seconds=2.0, committed=True, reason="interval"),
    _l("a1", "steps", 165, first=200, last=260, seconds=30.0),
    # SIGKILL at +170: no end record, steps 261-270 never flushed to the ledger
    *_phases("a2", 1, 180, 200, 2.0),  # loop starts at +187
    _l("a2", "steps", 287, first=200, last=300, seconds=100.0),
    _l("a2", "eval", 293, step=300, seconds=6.0),
    _l("a2", "checkpoint", 296, step=300, seconds=3.0, committed=True, reason="final"),
    _l("a2", "end", 297, how="done", last_step=300),
]


def _train(step: int, t: float, ws: int) -> dict:
    return {"mode": "train", "step": step, "epoch": 0, "time": T + t, "loss": 1.0, "lr": 0.01, "world_size": ws}


def _event(name: str, step: int, t: float, **fields) -> dict:
    return {"event": name, "step": step, "time": T + t, **fields}


KNOWN_METRICS = [
    _event("start", 0, 9, world_size=2, max_steps=300),
    _train(100, 59, 2), _event("checkpoint", 100, 61, reason="interval", seconds=2.0),
    _train(150, 86, 2), _event("checkpoint", 150, 87, reason="preempt", seconds=1.0),
    _event("preempt", 150, 87.5, signal="SIGTERM", world_size=2),
    _event("resume", 150, 108, world_size=2, max_steps=300),
    _train(200, 133, 2), _event("checkpoint", 200, 135, reason="interval", seconds=2.0),
    _train(260, 165, 2), _train(270, 170, 2),
    _event("resume", 200, 187, world_size=1, max_steps=300),
    _train(300, 287, 1), {"mode": "val", "step": 300, "bbox_mAP": 0.5},
    _event("checkpoint", 300, 296, reason="final", seconds=3.0), _event("done", 300, 297, world_size=1),
]

# retention (keep_last=2) deleted the manifests of steps 100 and 150
KNOWN_MANIFESTS = {200: 135, 300: 296}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _manifest(step: int, created: float) -> bytes:
    return json.dumps({"step": step, "data": "state-0.pt", "size": 1, "sha256": "0" * 64, "created": T + created,
                       "world_size": 1, "reason": "interval", "format_version": 1}).encode()


def write_work_dir(url: str, ledger: list[dict] | None, metrics: list[dict] | None,
                   manifests: dict[int, float]) -> None:
    wd = WorkDir(url)
    if ledger is not None:
        wd.write_bytes_atomic(LEDGER, _jsonl(ledger))
    if metrics is not None:
        wd.write_bytes_atomic("metrics.jsonl", _jsonl(metrics))
    for step, created in manifests.items():
        wd.write_bytes_atomic(f"checkpoints/step-{step:08d}/state-0.pt", b"x")
        wd.write_bytes_atomic(f"checkpoints/step-{step:08d}/manifest.json", _manifest(step, created))


def assert_known(d: dict) -> None:
    """The figures of the known history, from its timestamps (see the attempts' comments above)."""
    assert d["status"] == "done" and d["final_step"] == 300 and d["max_steps"] == 300 and d["ledger"]
    assert d["wall_seconds"] == pytest.approx(297.0)
    # good: 75 s (attempt 0) + 25 s (attempt 1, steps 151-200) + 100 s (attempt 2)
    assert d["buckets"]["good"] == pytest.approx(200.0)
    assert d["goodput"] == pytest.approx(200.0 / 297.0, abs=1e-6)
    # start-up: imports 3+3+2, build and restore 3+3+3, to loop start 1+1+1
    assert d["buckets"]["startup"] == pytest.approx(20.0)
    # waiting: rendezvous 2+1+1, launch 5, dead time 88->95 and 170->180
    assert d["buckets"]["waiting"] == pytest.approx(26.0)
    # lost: steps 201-260 (30 s in the ledger) and 261-270 (5 s, from metrics.jsonl after the last flush)
    assert d["buckets"]["lost"] == pytest.approx(35.0)
    assert (d["lost_steps"], d["recomputed_steps"]) == (70, 70)
    assert d["buckets"]["checkpoint"] == pytest.approx(8.0)
    assert d["buckets"]["evaluation"] == pytest.approx(6.0)
    assert d["buckets"]["other"] == pytest.approx(2.0)  # after the preempt save, after the final save
    assert d["buckets"]["uncommitted"] == 0.0
    assert sum(d["buckets"].values()) == pytest.approx(d["wall_seconds"])
    assert d["restore_load_seconds"] == pytest.approx(3.5)
    a0, a1, a2 = d["attempts"]
    assert [(a["world_size"], a["first_step"], a["last_step"], a["how"]) for a in d["attempts"]] == [
        (2, 0, 150, "preempted"), (2, 150, 270, "killed"), (1, 200, 300, "done")]
    assert (a0["signal"], a0["lost_steps"], a1["lost_steps"], a2["lost_steps"]) == ("SIGTERM", 0, 70, 0)
    assert (a0["good_steps"], a1["good_steps"], a2["good_steps"]) == (150, 50, 100)
    assert a0["buckets"]["good"] == pytest.approx(75.0) and a0["buckets"]["other"] == pytest.approx(1.0)
    assert a1["buckets"]["lost"] == pytest.approx(35.0) and a1["buckets"]["waiting"] == pytest.approx(6.0)
    assert a2["buckets"]["evaluation"] == pytest.approx(6.0)


@pytest.fixture(params=["local", "s3"])
def known_url(request, tmp_path) -> str:
    url = str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/run"
    write_work_dir(url, KNOWN_LEDGER, KNOWN_METRICS, KNOWN_MANIFESTS)
    return url


def test_known_history_figures(known_url, capsys):
    assert main([known_url, "--json"]) == 0
    assert_known(json.loads(capsys.readouterr().out))


def test_known_history_text_table(known_url, capsys):
    assert main([known_url]) == 0
    out = capsys.readouterr().out
    assert "goodput: 67.3% (200.0 s of 297.0 s" in out
    assert re.search(r"lost work\s+35\.0\s+11\.8\s+70 steps computed and lost \(70 recomputed\)", out)
    assert re.search(r"preempted \(SIGTERM\)", out) and "killed" in out and "done" in out
    assert "were killed (SIGKILL" in out  # says what it cannot see after attempt 1's last record


def test_picture_png_and_html(known_url, tmp_path, capsys):
    png = tmp_path / "report.png"
    assert main([known_url, "-o", str(png)]) == 0
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 800 and image.size[1] > 300
    page = tmp_path / "report.html"
    assert main([known_url, "-o", str(page)]) == 0
    text = page.read_text()
    assert "<table>" in text and "67.3%" in text and "preempted (SIGTERM)" in text
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text).group(1)
    import base64

    with Image.open(io.BytesIO(base64.b64decode(embedded))) as image:
        assert image.format == "PNG" and image.size[0] > 0


def test_supervisor_attempt_log_adds_exit_codes_and_the_time_around_the_attempts(tmp_path):
    url = str(tmp_path / "run")
    write_work_dir(url, KNOWN_LEDGER, KNOWN_METRICS, KNOWN_MANIFESTS)
    sup = [{"event": "attempt_start", "attempt": 0, "time": T - 2, "committed_step": None, "host": "n"},
           {"event": "attempt_end", "attempt": 0, "time": T + 89, "exit_code": 143, "host": "n"},
           {"event": "attempt_start", "attempt": 1, "time": T + 94, "committed_step": 150, "host": "n"},
           {"event": "attempt_end", "attempt": 1, "time": T + 172, "exit_code": 1, "host": "n"},
           {"event": "attempt_start", "attempt": 2, "time": T + 178, "committed_step": 200, "host": "n"},
           {"event": "attempt_end", "attempt": 2, "time": T + 299, "exit_code": 0, "host": "n"}]
    WorkDir(url).write_bytes_atomic("supervisor/n-1.jsonl", _jsonl(sup))
    d = build_report(read_history(url)).to_dict()
    assert [a["exit_code"] for a in d["attempts"]] == [143, 1, 0]
    assert d["wall_seconds"] == pytest.approx(301.0)  # from the supervisor's first start to its last end
    assert d["buckets"]["waiting"] == pytest.approx(30.0) and d["buckets"]["good"] == pytest.approx(200.0)


def test_relaunched_supervisors_on_one_host_each_match_their_own_attempt(tmp_path):
    """A scheduler relaunch on the same host: every supervisor numbers its attempts from 1 in a log of its
    own (host-pid), and each exit code lands on the attempt whose processes started inside that
    supervisor's window (attempt 1's launcher started at +95, before its supervisor at +96)."""
    url = str(tmp_path / "run")
    write_work_dir(url, KNOWN_LEDGER, KNOWN_METRICS, KNOWN_MANIFESTS)
    windows = [(T - 2, T + 89, 143), (T + 96, T + 172, 1), (T + 178, T + 299, 0)]
    for pid, (begin, end, code) in enumerate(windows, start=100):
        sup = [{"event": "attempt_start", "attempt": 1, "time": begin, "committed_step": None, "host": "n"},
               {"event": "attempt_end", "attempt": 1, "time": end, "exit_code": code, "host": "n"}]
        WorkDir(url).write_bytes_atomic(f"supervisor/n-{pid}.jsonl", _jsonl(sup))
    report = build_report(read_history(url))
    assert [a["exit_code"] for a in report.to_dict()["attempts"]] == [143, 1, 0]
    assert not [n for n in report.notes if "left no record" in n], report.notes


# ----------------------------------------------------------------------------------------------------------
# A kill between a checkpoint's commit and its log lines


KILLED_AFTER_COMMIT = [
    _l("b0", "process_start", 0, world_size=1),
    _l("b0", "restore_done", 4, step=0, load_seconds=0.0),
    _l("b0", "train_start", 5, step=0, max_steps=200),
    _l("b0", "steps", 55, first=0, last=100, seconds=50.0),  # flushed as the save began; killed at +57
]
RESUMED = [
    _l("b1", "process_start", 70, world_size=1),
    _l("b1", "restore_done", 74, step=100, load_seconds=0.5),
    _l("b1", "train_start", 75, step=100, max_steps=200),
    _l("b1", "steps", 125, first=100, last=200, seconds=50.0),
    _l("b1", "checkpoint", 127, step=200, seconds=2.0, committed=True, reason="final"),
    _l("b1", "end", 128, how="done", last_step=200),
]


def test_kill_between_commit_and_log_line_counts_the_committed_steps(tmp_path):
    url = str(tmp_path / "run")
    metrics = [_event("start", 0, 5, world_size=1, max_steps=200), _train(100, 55, 1),
               _event("resume", 100, 75, world_size=1), _train(200, 125, 1), _event("done", 200, 128)]
    write_work_dir(url, KILLED_AFTER_COMMIT + RESUMED, metrics, {100: 57, 200: 127})
    d = build_report(read_history(url)).to_dict()
    assert d["status"] == "done" and d["lost_steps"] == 0
    assert d["buckets"]["good"] == pytest.approx(100.0)
    assert d["buckets"]["checkpoint"] == pytest.approx(4.0)  # 2 s seen only in step 100's manifest
    assert d["buckets"]["waiting"] == pytest.approx(13.0)  # from the commit at +57 to the relaunch at +70
    assert d["wall_seconds"] == pytest.approx(128.0) and d["goodput"] == pytest.approx(100 / 128)
    assert any("step 100 was committed" in n for n in d["notes"])


def test_committed_manifest_alone_proves_the_steps_of_a_run_not_relaunched(tmp_path):
    url = str(tmp_path / "run")
    write_work_dir(url, KILLED_AFTER_COMMIT, [_event("start", 0, 5, world_size=1)], {100: 57})
    d = build_report(read_history(url), now=T + 10_000).to_dict()
    assert d["status"] == "stopped" and d["final_step"] == 100
    assert (d["lost_steps"], d["buckets"]["lost"]) == (0, 0.0)
    assert d["buckets"]["good"] == pytest.approx(50.0) and d["wall_seconds"] == pytest.approx(57.0)
    assert any("killed with no relaunch" in n for n in d["notes"])


def test_running_run_counts_to_now_and_flags_uncommitted_steps(tmp_path):
    url = str(tmp_path / "run")
    ledger = KILLED_AFTER_COMMIT[:3] + [
        _l("b0", "steps", 55, first=0, last=100, seconds=50.0),
        _l("b0", "checkpoint", 57, step=100, seconds=2.0, committed=True),
        _l("b0", "steps", 67, first=100, last=120, seconds=10.0),
    ]
    write_work_dir(url, ledger, None, {100: 57})
    d = build_report(read_history(url), now=T + 70).to_dict()
    assert d["status"] == "running" and d["final_step"] == 100 and d["wall_seconds"] == pytest.approx(70.0)
    assert d["buckets"]["good"] == pytest.approx(50.0)
    assert d["buckets"]["uncommitted"] == pytest.approx(13.0)  # steps 101-120, then 3 s not on record yet
    assert d["lost_steps"] == 0


# ----------------------------------------------------------------------------------------------------------
# A work dir from before the ledger: metrics.jsonl only


def test_pre_ledger_work_dir_reports_what_metrics_show_and_says_what_it_cannot_know(tmp_path, capsys):
    url = str(tmp_path / "run")
    write_work_dir(url, None, KNOWN_METRICS, KNOWN_MANIFESTS)
    assert main([url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ledger"] is False and d["status"] == "done" and d["final_step"] == 300
    # wall from the first start event (+9) to done (+297); start-up is not seen, so it counts as waiting
    assert d["wall_seconds"] == pytest.approx(288.0)
    assert d["buckets"]["good"] == pytest.approx(200.0)
    assert d["buckets"]["lost"] == pytest.approx(35.0) and d["lost_steps"] == 70
    assert d["buckets"]["startup"] == 0.0 and d["buckets"]["waiting"] == pytest.approx(37.5)
    assert d["buckets"]["checkpoint"] == pytest.approx(8.0)
    assert d["goodput"] == pytest.approx(200 / 288)
    assert any("no ledger.jsonl" in n and "cannot be told apart" in n for n in d["notes"])
    assert main([url]) == 0
    assert "no ledger.jsonl" in capsys.readouterr().out


def test_missing_or_empty_work_dir_is_exit_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "ledger.jsonl" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------
# The ledger writer


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_ledger_records_round_trip_into_the_report(tmp_path):
    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    clock = Clock(T)
    ledger = Ledger(files, world_size=2, attempt_id="x", process_start=T - 4, flush_seconds=10, clock=clock)
    ledger.mark("dist_ready", time=T - 1)
    ledger.mark("restore_done", step=0, load_seconds=0.0)
    ledger.loop_start(0, max_steps=40)
    for step in range(1, 41):
        clock.t += 0.5
        ledger.step_done(step)
        if step == 20:
            with ledger.checkpoint(step) as record:
                clock.t += 2.0
                record.committed = True
        if step == 30:
            with ledger.evaluation(step):
                clock.t += 3.0
    with pytest.raises(OSError), ledger.checkpoint(40):
        clock.t += 1.0
        raise OSError("disk full")
    ledger.end("done", last_step=40)
    ledger.end("failed", last_step=40)  # ignored: an attempt ends once
    files.close()
    records = [json.loads(line) for line in (tmp_path / LEDGER).read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[:5] == ["process_start", "dist_ready", "restore_done", "train_start", "first_step"]
    assert kinds.count("end") == 1 and records[-1]["how"] == "done"
    steps = [r for r in records if r["kind"] == "steps"]
    assert sum(r["last"] - r["first"] for r in steps) == 40
    assert sum(r["seconds"] for r in steps) == pytest.approx(20.0)  # 40 x 0.5 s, save and eval excluded
    assert 20 in {r["last"] for r in steps} and 30 in {r["last"] for r in steps}  # flushed before each
    failed = [r for r in records if r["kind"] == "checkpoint" and r["step"] == 40][0]
    assert failed["committed"] is False and failed["seconds"] == pytest.approx(1.0)
    assert all(r["attempt"] == "x" and "host" in r for r in records)
    d = build_report(read_history(str(tmp_path)), now=T + 100).to_dict()
    assert d["status"] == "done" and d["buckets"]["good"] == pytest.approx(20.0)
    assert d["buckets"]["checkpoint"] == pytest.approx(3.0) and d["buckets"]["evaluation"] == pytest.approx(3.0)
    assert d["buckets"]["startup"] == pytest.approx(4.0) and d["wall_seconds"] == pytest.approx(30.0)


def test_ledger_stays_small_for_a_long_run_restarted_often(tmp_path):
    """100 000 steps at 0.4 s, restarted 300 times, a checkpoint every 500 steps: well under 2 MB."""
    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    clock = Clock(T)
    step = 0
    for attempt in range(300):
        ledger = Ledger(files, world_size=8, attempt_id=f"{attempt:04d}", process_start=clock.t, clock=clock)
        ledger.mark("restore_done", step=step, load_seconds=1.0)
        ledger.loop_start(step, max_steps=100_000)
        for _ in range(100_000 // 300):
            clock.t += 0.4
            step += 1
            ledger.step_done(step)
            if step % 500 == 0:
                with ledger.checkpoint(step) as record:
                    record.committed = True
        ledger.end("preempted", last_step=step, signal="SIGTERM")
    files.close()
    size = (tmp_path / LEDGER).stat().st_size
    assert 100_000 < size < 2_000_000


def test_ledger_rejects_unknown_phases(tmp_path):
    ledger = Ledger(RunFiles(WorkDir(str(tmp_path)), enabled=False))
    with pytest.raises(ValueError, match="unknown ledger phase 'restored'"):
        ledger.mark("restored")
    with pytest.raises(ValueError, match="unknown attempt end"):
        ledger.end("killed", last_step=0)
    assert not (tmp_path / LEDGER).exists()  # not rank 0: nothing written


def test_async_save_outcome_and_sync_outcome_through_saved(tmp_path):
    """``on_saved=ledger.saved``: inside a timed save it sets ``committed``; later (async) it is a record."""
    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    ledger = Ledger(files, attempt_id="s")
    ledger.loop_start(0)
    ledger.step_done(1)
    with ledger.checkpoint(1, reason="interval"):
        ledger.saved(1, "interval", 0.2, True)  # a sync save reports inside the timed block
    ledger.step_done(2)
    with ledger.checkpoint(2, reason="interval"):
        pass  # handed to the async saver
    ledger.saved(2, "interval", 0.7, True)  # the background write finished
    files.close()
    records = [json.loads(line) for line in (tmp_path / LEDGER).read_text().splitlines()]
    ckpts = {r["step"]: r for r in records if r["kind"] == "checkpoint"}
    assert ckpts[1]["committed"] is True and "pending" not in ckpts[1]
    assert "committed" not in ckpts[2] and ckpts[2]["pending"] is True
    assert [(r["step"], r["committed"]) for r in records if r["kind"] == "saved"] == [(2, True)]


@pytest.mark.parametrize("outcome", ["done", "preempted", "failed"])
def test_the_ledger_as_a_writer_of_the_event_stream_records_steps_and_how_the_attempt_ended(tmp_path, outcome):
    """The events the runner and the checkpoint hook publish (loop_start, step, preempt, run_end) become
    the ledger's train_start, steps and end records."""
    from elastic_det.engine.events import EventStream

    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    events = EventStream()
    events.subscribe(Ledger(files, attempt_id="h"))
    step = 10
    events.publish("loop_start", step, max_steps=13)
    for _ in range(3 if outcome == "done" else 2):
        step += 1
        events.publish("step", step, step_time=0.1, data_time=0.0, world_size=1)
    if outcome == "preempted":
        events.publish("preempt", step, signal="SIGTERM", world_size=1)
    events.publish("run_end", step, how=outcome, error="RuntimeError" if outcome == "failed" else None)
    events.publish("run_end", -1, how="failed", error="RuntimeError")  # the trainer's fallback: ignored
    files.close()
    records = [json.loads(line) for line in (tmp_path / LEDGER).read_text().splitlines()]
    end = records[-1]
    assert [r["kind"] for r in records].count("end") == 1
    assert end["kind"] == "end" and end["how"] == outcome and end["last_step"] == step
    assert [(r["first"], r["last"]) for r in records if r["kind"] == "steps"] == [(10, step)]
    assert end.get("error") == ("RuntimeError" if outcome == "failed" else None)
    assert end.get("signal") == ("SIGTERM" if outcome == "preempted" else None)


def test_the_ledger_times_checkpoints_and_evaluations_from_their_events(tmp_path):
    """checkpoint_start/end around a sync save (its outcome inside: committed), an async one (pending, then
    a ``saved`` record), and eval_start/end: each a record with its seconds, excluded from step time."""
    from elastic_det.engine.events import EventStream

    clock = Clock(1000.0)
    files = RunFiles(WorkDir(str(tmp_path)), enabled=True)
    events = EventStream()
    events.subscribe(Ledger(files, attempt_id="t", clock=clock))
    events.publish("loop_start", 0, max_steps=4)
    clock.t += 1
    events.publish("step", 1)
    events.publish("checkpoint_start", 1, reason="interval")
    clock.t += 2
    events.publish("checkpoint", 1, reason="interval", seconds=2.0, path="x")
    events.publish("checkpoint_end", 1, reason="interval", seconds=2.0, committed=True, pending=False)
    clock.t += 1
    events.publish("step", 2)
    events.publish("checkpoint_start", 2, reason="interval")
    clock.t += 0.5
    events.publish("checkpoint_end", 2, reason="interval", seconds=0.5, committed=None, pending=True)
    events.publish("eval_start", 2)
    clock.t += 3
    events.publish("eval_end", 2, seconds=3.0)
    events.publish("checkpoint", 2, reason="interval", seconds=4.0, path="y")  # the async save's outcome
    clock.t += 1
    events.publish("step", 3)
    events.publish("run_end", 3, how="done", error=None)
    files.close()
    records = [json.loads(line) for line in (tmp_path / LEDGER).read_text().splitlines()]
    saves = [(r["step"], r["seconds"], r.get("committed"), r.get("pending")) for r in records
             if r["kind"] == "checkpoint"]
    assert saves == [(1, 2.0, True, None), (2, 0.5, None, True)]
    assert [(r["step"], r["seconds"]) for r in records if r["kind"] == "eval"] == [(2, 3.0)]
    assert [(r["step"], r["committed"]) for r in records if r["kind"] == "saved"] == [(2, True)]
    steps = [r for r in records if r["kind"] == "steps"]
    assert sum(r["seconds"] for r in steps) == pytest.approx(3.0)  # 1 + 1 + 1: saves and evaluation excluded


# ----------------------------------------------------------------------------------------------------------
# A real run


def test_real_short_run_has_a_ledger_and_a_done_report(tmp_path, capsys):
    from helpers import base_env, fast_overrides, run_train

    work = tmp_path / "run"
    env = base_env(tmp_path, ELASTIC_DET_LAUNCH_TIME="")  # no launcher time: wall starts at process start
    args = ["--work-dir", str(work), "--cfg-options",
            *fast_overrides(tmp_path / "data", "train.max_steps=6", "checkpoint.interval=3")]
    result = run_train(args, env)
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = [json.loads(line)["kind"] for line in (work / LEDGER).read_text().splitlines()]
    assert kinds[0] == "process_start" and kinds[-1] == "end"
    assert {"dist_ready", "restore_done", "train_start", "first_step", "steps", "checkpoint"} <= set(kinds)
    assert main([str(work), "--json", "-o", str(tmp_path / "report.png")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ledger"] and d["status"] == "done" and d["final_step"] == 6 and d["lost_steps"] == 0
    assert [a["how"] for a in d["attempts"]] == ["done"]
    assert 0 < d["goodput"] < 1 and d["buckets"]["good"] > 0 and d["buckets"]["startup"] > 0
    assert d["buckets"]["checkpoint"] > 0  # the saves at steps 3 and 6
    assert sum(d["buckets"].values()) == pytest.approx(d["wall_seconds"], abs=0.01)
    with Image.open(tmp_path / "report.png") as image:
        assert image.format == "PNG"


def test_s3_ledger_keeps_every_attempt_when_the_relaunch_runs_elsewhere(s3_bucket, s3_server, tmp_path, capsys):
    """Two attempts on an S3 work dir, each with its own local mirror (as on two machines): the ledger in the
    bucket holds both, so the report sees the whole history."""
    from helpers import base_env, fast_overrides, run_train
    from s3 import s3_env

    url = s3_bucket + "/run"
    for attempt, steps in enumerate((3, 6)):
        env = base_env(tmp_path, HOME=str(tmp_path / f"machine-{attempt}"), **s3_env(s3_server.endpoint))
        args = ["--work-dir", url, "--cfg-options",
                *fast_overrides(tmp_path / "data", f"train.max_steps={steps}", "checkpoint.interval=3")]
        result = run_train(args, env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert main([url, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(a["first_step"], a["last_step"], a["how"], a["source"]) for a in d["attempts"]] == [
        (0, 3, "done", "ledger"), (3, 6, "done", "ledger")]
    assert d["final_step"] == 6 and d["lost_steps"] == 0


def test_attempt_that_failed_while_starting_produced_no_steps(tmp_path):
    """A relaunch rejected before its loop (e.g. an unreadable checkpoint) is an attempt without steps: the
    steps of the attempt before it still count, and nothing is invented for it."""
    url = str(tmp_path / "run")
    rejected = [_l("c1", "process_start", 140, world_size=1), _l("c1", "dist_ready", 143),
                _l("c1", "end", 145, how="failed", last_step=-1, error="CheckpointError")]
    write_work_dir(url, KILLED_AFTER_COMMIT + RESUMED[:-1] + rejected, None, {100: 57, 200: 127})
    d = build_report(read_history(url)).to_dict()
    assert d["status"] == "failed" and d["final_step"] == 200 and d["lost_steps"] == 0
    assert d["buckets"]["good"] == pytest.approx(100.0)
    last = d["attempts"][-1]
    assert (last["how"], last["error"], last["trained"], last["good_steps"]) == ("failed", "CheckpointError", False, 0)
    assert (last["buckets"]["startup"], last["buckets"]["other"]) == (pytest.approx(3.0), pytest.approx(2.0))


def test_steps_between_train_records_up_to_a_preemption_save_are_measured_not_estimated(tmp_path):
    """metrics.jsonl logs every 20 steps; a preemption saves at step 59: steps 41-59 took from the save at
    40 to the start of the save at 59."""
    url = str(tmp_path / "run")
    metrics = [_event("start", 0, 0, world_size=2, max_steps=60), _train(20, 20, 2), _train(40, 40, 2),
               _event("checkpoint", 40, 41, seconds=1.0), _event("checkpoint", 59, 61, seconds=1.0),
               _event("preempt", 59, 61, signal="SIGTERM"), _event("resume", 59, 70, world_size=2),
               _train(60, 71, 2), _event("checkpoint", 60, 72, seconds=1.0), _event("done", 60, 72)]
    write_work_dir(url, None, metrics, {60: 72})
    d = build_report(read_history(url)).to_dict()
    assert d["buckets"]["good"] == pytest.approx(40.0 + 19.0 + 1.0)
    assert d["buckets"]["checkpoint"] == pytest.approx(3.0) and d["wall_seconds"] == pytest.approx(72.0)
    assert not any("estimated" in n for n in d["notes"])
