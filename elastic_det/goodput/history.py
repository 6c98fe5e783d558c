"""The history of a run as the work dir tells it: its attempts, read from ``ledger.jsonl`` and ``metrics.jsonl``,
completed by the committed checkpoint manifests and the supervisor's attempt log.

An attempt is one life of the rank-0 process. The ledger (``elastic_det.ledger``) gives its phases, its
productive step time per interval, checkpoint and evaluation time and how it ended. A work dir written
before the ledger existed has only ``metrics.jsonl``: each ``start``/``resume`` event begins an attempt,
and consecutive ``train`` records bound its step intervals. Both are read here into :class:`Attempt`;
``elastic_det.report`` does the accounting.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import StorageError, UserError
from ..records import LEDGER, METRICS, parse_jsonl
from ..records import LEDGER_MARKS as MARKS
from ..storage import WorkDir

SUPERVISOR = "supervisor"


@dataclass
class Interval:
    """Global steps ``first+1..last`` done, ``seconds`` of productive time, the last one ending at ``time``."""

    first: int
    last: int
    seconds: float
    time: float
    source: str = "ledger"  # ledger, metrics (train records), estimate


@dataclass
class Timed:
    """A checkpoint save or an evaluation that blocked the loop for ``seconds``, ending at ``time``."""

    step: int
    seconds: float
    time: float
    committed: bool | None = None
    source: str = "ledger"


@dataclass
class Attempt:
    id: str
    source: str  # "ledger" or "metrics"
    host: str = ""
    world_size: int | None = None
    marks: dict[str, float] = field(default_factory=dict)  # phase -> time
    launch: float | None = None
    restore_step: int | None = None
    load_seconds: float | None = None
    max_steps: int | None = None
    intervals: list[Interval] = field(default_factory=list)
    checkpoints: list[Timed] = field(default_factory=list)
    evals: list[Timed] = field(default_factory=list)
    end: dict[str, Any] | None = None  # how, last_step, signal, error, time, source
    last_time: float = 0.0
    exit_code: int | None = None
    saved: dict[int, float] = field(default_factory=dict)  # async saves committed: step -> when

    @property
    def start(self) -> float:
        times = [t for t in (self.launch, *self.marks.values()) if t is not None]
        return min(times) if times else self.last_time

    @property
    def first_step(self) -> int:
        if self.restore_step is not None:
            return self.restore_step
        return self.intervals[0].first if self.intervals else 0

    @property
    def last_step(self) -> int:
        return max([self.first_step, *(iv.last for iv in self.intervals)])

    @property
    def trained(self) -> bool:
        """It reached the training loop (an attempt that failed while starting produced no steps)."""
        return bool(self.intervals) or "train_start" in self.marks

    @property
    def loop_time(self) -> float:
        """When the last thing on record in the training loop ended (the loop start if nothing did)."""
        times = [iv.time for iv in self.intervals] + [t.time for t in self.checkpoints + self.evals]
        times += [self.marks[m] for m in ("train_start", "restore_done", "dist_ready") if m in self.marks]
        return max(times) if times else self.start

    @property
    def end_time(self) -> float:
        return self.end["time"] if self.end else self.last_time

    def seconds_per_step(self) -> float | None:
        measured = [iv for iv in self.intervals if iv.source != "estimate"]
        steps = sum(iv.last - iv.first for iv in measured)
        return sum(iv.seconds for iv in measured) / steps if steps else None


@dataclass
class History:
    url: str
    attempts: list[Attempt]
    commits: dict[int, float]  # committed step -> when it was committed (as far as known; 0 unknown)
    manifests: dict[int, dict[str, Any]]
    supervisor: list[dict[str, Any]]
    has_ledger: bool
    has_metrics: bool
    notes: list[str]


# ----------------------------------------------------------------------------------------------------------
# Reading the work dir


def _read(work_dir: WorkDir, relpath: str) -> bytes | None:
    try:
        return work_dir.read_bytes(relpath)
    except FileNotFoundError:
        return None


def read_history(url: str, storage_options: dict | None = None) -> History:
    """Everything the report needs from ``url`` (a path or an fsspec URL); ``UserError`` naming it when
    it is missing, unreadable, or holds neither a ledger nor a metrics file."""
    work_dir = WorkDir(url, storage_options)
    if work_dir.is_local and not os.path.isdir(work_dir.url):
        raise UserError(f"Work dir {work_dir.url} does not exist (or is not a directory): give the work dir "
                        "of a training run (the --work-dir it was started with).")
    try:
        ledger = _read(work_dir, LEDGER)
        metrics = _read(work_dir, METRICS)
        manifests = _read_manifests(work_dir)
        supervisor = []
        for name in work_dir.find(SUPERVISOR):
            if name.endswith(".jsonl"):
                supervisor += [{**r, "log": name} for r in parse_jsonl(_read(work_dir, f"{SUPERVISOR}/{name}") or b"")]
    except StorageError as e:
        raise StorageError(f"Cannot read the work dir {work_dir.url}: {e}") from None
    except OSError as e:
        raise StorageError(f"Cannot read the work dir {work_dir.url}: {e}") from None
    if ledger is None and metrics is None:
        raise UserError(f"Work dir {work_dir.url} holds neither {LEDGER} nor {METRICS}: it is not the work dir "
                        "of a training run, or the run has not logged anything yet.")
    return build_history(work_dir.url, parse_jsonl(ledger) if ledger is not None else None,
                         parse_jsonl(metrics) if metrics is not None else None, manifests,
                         sorted((r for r in supervisor if isinstance(r.get("time"), (int, float))),
                                key=lambda r: r["time"]))


def _read_manifests(work_dir: WorkDir) -> dict[int, dict[str, Any]]:
    """``step -> manifest`` of every step directory with a parseable manifest (one listing on S3)."""
    out = {}
    for path in work_dir.find("checkpoints"):
        parts = path.split("/")
        if len(parts) != 2 or parts[1] != "manifest.json" or not parts[0].startswith("step-"):
            continue
        try:
            manifest = json.loads(_read(work_dir, f"checkpoints/{path}") or b"")
            step = manifest["step"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            continue
        if isinstance(step, int) and isinstance(manifest.get("created", 0), (int, float)):
            out[step] = manifest
    return out


# ----------------------------------------------------------------------------------------------------------
# Attempts


def _num(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(record: dict, key: str) -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def attempts_from_ledger(records: list[dict[str, Any]]) -> list[Attempt]:
    by_id: dict[str, Attempt] = {}
    for r in records:
        aid, kind, t = r.get("attempt"), r.get("kind"), _num(r, "time")
        if not isinstance(aid, str) or t is None:
            continue
        a = by_id.setdefault(aid, Attempt(aid, "ledger"))
        a.host = str(r.get("host", a.host))
        a.last_time = max(a.last_time, t)
        if kind in MARKS:
            a.marks.setdefault(kind, t)
            a.world_size = _int(r, "world_size") or a.world_size
            if kind == "process_start":
                launch = _num(r, "launch_time")
                if launch is not None and 0 <= t - launch < 3600:
                    a.launch = launch
            elif kind in ("restore_done", "train_start") and a.restore_step is None:
                a.restore_step = _int(r, "step")
            if kind == "restore_done":
                a.load_seconds = _num(r, "load_seconds")
            a.max_steps = _int(r, "max_steps") or a.max_steps
        elif kind == "steps" and _int(r, "first") is not None and _int(r, "last") is not None:
            a.intervals.append(Interval(r["first"], r["last"], _num(r, "seconds") or 0.0, t))
        elif kind in ("checkpoint", "eval") and _int(r, "step") is not None:
            committed = r.get("committed") if isinstance(r.get("committed"), bool) else None
            timed = Timed(r["step"], _num(r, "seconds") or 0.0, t, committed)
            (a.checkpoints if kind == "checkpoint" else a.evals).append(timed)
        elif kind == "saved" and r.get("committed") is True and _int(r, "step") is not None:
            a.saved[r["step"]] = t
        elif kind == "end":
            a.end = {"how": r.get("how", "failed"), "last_step": _int(r, "last_step"), "signal": r.get("signal"),
                     "error": r.get("error"), "time": t, "source": "ledger"}
    for a in by_id.values():
        a.intervals.sort(key=lambda iv: iv.last)
    return sorted(by_id.values(), key=lambda a: a.start)


def attempts_from_metrics(records: list[dict[str, Any]]) -> list[Attempt]:
    """Attempts as ``metrics.jsonl`` shows them: from each start/resume event (written just before the
    training loop) to the next, with intervals between consecutive train records."""
    out: list[Attempt] = []
    a: Attempt | None = None
    cursor = (0, 0.0)
    blocked = 0.0  # checkpoint seconds since the cursor
    for r in records:
        event, t, step = r.get("event"), _num(r, "time"), _int(r, "step")
        if event in ("start", "resume") and t is not None and step is not None:
            a = Attempt(f"metrics-{len(out)}", "metrics", world_size=_int(r, "world_size"), restore_step=step,
                        max_steps=_int(r, "max_steps"), marks={"train_start": t}, last_time=t)
            out.append(a)
            cursor, blocked = (step, t), 0.0
            continue
        if a is None or t is None or step is None:
            continue
        a.last_time = max(a.last_time, t)
        if r.get("mode") == "train" and step > cursor[0]:
            a.intervals.append(Interval(cursor[0], step, max(t - cursor[1] - blocked, 0.0), t, "metrics"))
            cursor, blocked = (step, t), 0.0
            a.world_size = a.world_size or _int(r, "world_size")
        elif event == "checkpoint":
            seconds = _num(r, "seconds") or 0.0
            a.checkpoints.append(Timed(step, seconds, t, True, "metrics"))
            blocked += seconds
        elif event in ("preempt", "done"):
            a.end = {"how": "preempted" if event == "preempt" else "done", "last_step": step,
                     "signal": r.get("signal"), "error": None, "time": t, "source": "metrics"}
    return out


def _merge(ledger: list[Attempt], metrics: list[Attempt], notes: list[str]) -> list[Attempt]:
    """Ledger attempts, completed by the metrics attempt that ran inside each; metrics attempts that match
    none (written before the ledger existed) are kept as they are."""
    if not ledger:
        return metrics
    starts = [a.start for a in ledger]
    out = list(ledger)
    for m in metrics:
        t = m.marks["train_start"]
        i = bisect.bisect_right(starts, t) - 1
        a = ledger[i] if i >= 0 else None
        if a is None or (a.end is not None and t > a.end["time"]):
            out.append(m)
            continue
        a.world_size = a.world_size or m.world_size
        a.max_steps = a.max_steps or m.max_steps
        if a.restore_step is None:
            a.restore_step = m.restore_step
        if a.end is None and m.end is not None:
            a.end = m.end
            notes.append(f"attempt {a.id}: its end ({m.end['how']}) comes from metrics.jsonl, not the ledger.")
        # train records logged after the ledger's last record (a kill before its next flush)
        step, since = a.last_step, a.loop_time
        for iv in m.intervals:
            if iv.last > step and iv.time > since:
                a.intervals.append(Interval(step, iv.last, iv.time - since, iv.time, "metrics"))
                step, since = iv.last, iv.time
                a.last_time = max(a.last_time, iv.time)
    return sorted(out, key=lambda a: a.start)


def build_history(url: str, ledger: list[dict] | None, metrics: list[dict] | None,
                  manifests: dict[int, dict[str, Any]], supervisor: list[dict[str, Any]]) -> History:
    notes: list[str] = []
    attempts = _merge(attempts_from_ledger(ledger or []), attempts_from_metrics(metrics or []), notes)
    if not attempts:
        raise UserError(f"Work dir {url} holds no attempt yet: {LEDGER} and {METRICS} have no start record.")
    commits: dict[int, float] = {}
    for a in attempts:
        for c in a.checkpoints:
            if c.committed:
                commits.setdefault(c.step, c.time)
        for step, t in a.saved.items():
            commits.setdefault(step, t)
    for step, manifest in manifests.items():
        created = float(manifest.get("created") or 0.0)
        commits[step] = min(commits.get(step, created), created) if created else commits.get(step, 0.0)
    for a in attempts:
        if a.restore_step:
            commits.setdefault(a.restore_step, 0.0)
    history = History(url, attempts, commits, manifests, supervisor, ledger is not None, metrics is not None, notes)
    _reconcile_manifests(history)
    _attach_supervisor(history)
    return history


def attempt_at(attempts: list[Attempt], t: float) -> int | None:
    """Index of the attempt running at time ``t`` (the last one started by then)."""
    i = bisect.bisect_right([a.start for a in attempts], t) - 1
    return i if i >= 0 else None


def extend_steps(a: Attempt, step: int, until: float, rate: float | None) -> bool:
    """Steps ``a.last_step+1..step`` that ``a`` must have done (a later commit or resume proves them) but
    that have no step record (between train records of metrics.jsonl, or lost log lines). With ``a``'s
    checkpoint record of ``step`` their time is measured: from the record before them to that save's start;
    without it, estimated at ``rate`` s/step, at most up to ``until``. True when estimated."""
    if step <= a.last_step:
        return False
    commit = next((c for c in a.checkpoints if c.step == step), None)
    end = commit.time - commit.seconds if commit is not None else until
    before = [iv.time for iv in a.intervals] + [t.time for t in a.checkpoints + a.evals if t.time <= end]
    before += [a.marks[m] for m in ("train_start", "restore_done", "dist_ready") if m in a.marks]
    begin = max(before, default=a.start)
    window = max(end - begin, 0.0)
    seconds = window if commit is not None else min((step - a.last_step) * (rate or 0.0), window)
    a.intervals.append(Interval(a.last_step, step, seconds, begin + seconds,
                                "metrics" if commit is not None else "estimate"))
    a.intervals.sort(key=lambda iv: iv.last)
    a.last_time = max(a.last_time, begin + seconds)
    return commit is None


def _reconcile_manifests(h: History) -> None:
    """A kill between a checkpoint's commit and its log lines: the manifest proves the save (and the steps
    before it) even though neither the ledger nor metrics.jsonl recorded it."""
    recorded = {c.step for a in h.attempts for c in a.checkpoints if c.committed is not False}
    recorded |= {step for a in h.attempts for step in a.saved}
    for step, manifest in sorted(h.manifests.items()):
        created = float(manifest.get("created") or 0.0)
        i = attempt_at(h.attempts, created) if created else None
        if step in recorded or i is None:
            continue
        a = h.attempts[i]
        if a.end is not None or created <= a.loop_time or step < a.first_step:
            continue
        nxt = h.attempts[i + 1].start if i + 1 < len(h.attempts) else created
        extend_steps(a, step, min(created, nxt), a.seconds_per_step() or run_rate(h.attempts))
        a.checkpoints.append(Timed(step, max(created - a.loop_time, 0.0), created, True, "manifest"))
        a.last_time = max(a.last_time, created)
        h.notes.append(f"checkpoint at step {step} was committed (its manifest says so, at "
                       f"{_clock(created)}) but the attempt was stopped before logging it: counted as saved.")


def run_rate(attempts: list[Attempt]) -> float | None:
    rates = [r for a in attempts if (r := a.seconds_per_step()) is not None]
    return sum(rates) / len(rates) if rates else None


def _attach_supervisor(h: History) -> None:
    """Exit codes from the supervisors' attempt logs, onto the last attempt that started inside each.

    Attempts are numbered per supervisor: a relaunched supervisor on the same host starts at 1 again, so an
    attempt is known by its log (``log``, one per supervisor process) as well as its number.
    """
    starts: dict[tuple, float] = {}
    for r in h.supervisor:  # in time order: an attempt_end belongs to the latest start of its key
        key = (r.get("log"), r.get("host"), r.get("attempt"))
        if r.get("event") == "attempt_start":
            starts[key] = r["time"]
            continue
        if r.get("event") != "attempt_end":
            continue
        began = starts.get(key, float("-inf"))
        # the attempt's own processes started inside (its start may be the launcher's, before the supervisor)
        inside = [a for a in h.attempts if began <= a.marks.get("process_start", a.start) <= r["time"]]
        if inside and isinstance(r.get("exit_code"), int):
            inside[-1].exit_code = r["exit_code"]
        elif not inside:
            h.notes.append(f"supervisor attempt {r.get('attempt')} (exit code {r.get('exit_code')}) left no "
                           "record in the work dir: its time counts as waiting.")


def _clock(t: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.gmtime(t)) + " UTC"
