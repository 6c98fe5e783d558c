"""elastic_det.goodput.curve: the series and markers read from metrics.jsonl, and the CLI end to end."""

from __future__ import annotations

import json

from elastic_det.goodput.curve import Marker, extract_series, main, read_metrics


def _train(step: int, loss: float, world_size: int) -> dict:
    return {"mode": "train", "step": step, "epoch": 0, "loss": loss, "lr": 0.01, "world_size": world_size}


# A run on 4 ranks: checkpoint at 20, killed after logging 30; resumed from 20 on 2 ranks (30 is logged
# again), checkpoint at 40, preempted at 45; resumed from 45 on 2 ranks, evaluated at 60, done.
RECORDS = [
    {"event": "start", "step": 0, "world_size": 4},
    _train(10, 2.0, 4), _train(20, 1.8, 4),
    {"event": "checkpoint", "step": 20, "reason": "interval", "seconds": 0.1},
    {"mode": "val", "step": 20, "bbox_mAP": 0.05, "bbox_mAP_50": 0.1},
    _train(30, 1.75, 4),
    {"event": "resume", "step": 20, "checkpoint": "step_20", "world_size": 2},
    _train(30, 1.6, 2), _train(40, 1.5, 2),
    {"event": "checkpoint", "step": 40, "reason": "interval", "seconds": 0.1},
    {"event": "preempt", "step": 45, "signal": "SIGTERM"},
    {"event": "checkpoint", "step": 45, "reason": "preempt", "seconds": 0.1},
    {"event": "resume", "step": 45, "checkpoint": "step_45", "world_size": 2},
    {"event": "fallback", "step": 45, "skipped": "step_50"},
    _train(50, 1.4, 2), _train(60, 1.3, 2),
    {"mode": "val", "step": 60, "bbox_mAP": 0.2, "bbox_mAP_50": 0.4},
    {"event": "done", "step": 60},
]


def _write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_extract_series_keeps_last_line_per_step_and_finds_markers():
    series = extract_series(RECORDS)
    assert series.train_steps == [10, 20, 30, 40, 50, 60]
    assert series.loss == [2.0, 1.8, 1.6, 1.5, 1.4, 1.3]  # step 30 from after the restart
    assert (series.val_steps, series.bbox_mAP) == ([20, 60], [0.05, 0.2])
    assert series.steps_of("resume") == [20, 45]
    assert series.steps_of("checkpoint") == [20, 40, 45]
    assert series.steps_of("preempt") == [45]
    assert series.steps_of("fallback") == [45]
    assert [m for m in series.markers if m.kind == "world_size"] == [Marker("world_size", 30, "2")]
    assert [m.step for m in series.markers] == sorted(m.step for m in series.markers)


def test_event_without_step_is_placed_at_the_last_logged_step():
    series = extract_series([_train(10, 1.0, 1), {"event": "preempt"}, _train(20, 0.9, 1)])
    assert series.steps_of("preempt") == [10]
    assert series.steps_of("world_size") == []


def test_truncated_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, RECORDS, tail='{"mode": "train", "st')
    assert read_metrics(str(path)) == RECORDS


def test_cli_writes_png(tmp_path):
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    _write(work_dir / "metrics.jsonl", RECORDS)
    out = tmp_path / "curve.png"
    assert main([str(work_dir), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 5000


def test_cli_reads_an_fsspec_url(tmp_path):
    _write(tmp_path / "metrics.jsonl", RECORDS[:3])
    out = tmp_path / "curve.svg"
    assert main([f"file://{tmp_path}", "-o", str(out)]) == 0
    assert b"<svg" in out.read_bytes()


def test_missing_or_empty_metrics_is_a_user_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([str(missing), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{missing}/metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path}/metrics.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
