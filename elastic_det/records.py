"""The schema of the JSONL files a run writes into its work dir, and the one reader of them.

``metrics.jsonl`` (public interface, DESIGN.md) holds three kinds of line: train records
(``{"mode": "train", "step", "epoch", "loss", "lr", "world_size", ...}``), val records
(``{"mode": "val", "step", "bbox_mAP", ...}``) and events (``{"event": name, "step", "time", ...}``,
names in ``METRICS_EVENTS``). ``ledger.jsonl`` (``elastic_det.goodput.ledger``) holds one record per phase
of an attempt (``{"kind", "attempt", "time", "host", ...}``). Both are written by rank 0 through the run's
event stream (``elastic_det.engine.events``) and read back here by the report, the curve plot and the
grace check. Standard library only: the supervisor's pre-flight reads these without importing torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS = "metrics.jsonl"
TEXT_LOG = "train.log"
LEDGER = "ledger.jsonl"
HISTORY = (METRICS, TEXT_LOG, LEDGER)
"""The files that continue across attempts: a relaunch on another machine downloads them first."""

METRICS_EVENTS = ("start", "resume", "checkpoint", "checkpoint_failed", "preempt", "fallback", "done",
                  "nonfinite_skip")
"""The events that ``metrics.jsonl`` records (DESIGN.md, public interface)."""

LEDGER_MARKS = ("process_start", "imports_done", "dist_ready", "restore_done", "train_start", "first_step")
"""One-off phases of an attempt in ``ledger.jsonl``, in the order they happen."""

ATTEMPT_ENDS = ("done", "preempted", "failed")
"""How an attempt ends (the ledger's ``end`` record)."""


def parse_jsonl(data: bytes | str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL text, in order; lines cut short by a kill (or otherwise broken) and
    lines that are not objects are skipped."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_tail(path: str, tail_bytes: int) -> list[dict[str, Any]]:
    """The records in the last ``tail_bytes`` of a local JSONL file (its first, cut line is skipped); empty
    when the file cannot be read. For checks that need recent records of a file that can be long."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            return parse_jsonl(f.read())
    except OSError:
        return []


def metrics_event(name: str, step: int, time: float, fields: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` event line."""
    return {"event": name, "step": step, "time": round(time, 3), **fields}


def ledger_record(kind: str, attempt: str, time: float, host: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A ``ledger.jsonl`` record; fields that are None are left out."""
    return {"kind": kind, "attempt": attempt, "time": round(time, 3), "host": host,
            **{k: v for k, v in fields.items() if v is not None}}


def is_train(record: dict[str, Any]) -> bool:
    return record.get("mode") == "train"


def is_val(record: dict[str, Any]) -> bool:
    return record.get("mode") == "val"
