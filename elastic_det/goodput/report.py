"""Goodput report: where the wall time of a run went, across all its attempts.

    python -m elastic_det.report WORK_DIR [--json] [-o report.html|report.png]

WORK_DIR is a local path or an fsspec URL (``s3://bucket/runs/x``). Goodput is the time spent on the steps
that count toward the final model (the steps up to the final committed progress, each in the attempt whose
result was kept) divided by the wall time from the first start to the end (to now for a run still
going). The rest is badput: start-up and restore, waiting (rendezvous, launch, dead time between attempts),
lost work (steps computed, then lost to a kill and recomputed), checkpoint blocking, evaluation, and other
(shutdown, unmeasured). Prints a table in total and per attempt (``--json`` for machines); ``-o`` also draws
the timeline (``.png``) or writes a self-contained page with both (``.html``). Exit codes: 0, 2 when the
work dir is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import USER_ERROR_EXIT_CODE, UserError
from .history import Attempt, History, extend_steps, read_history, run_rate

BUCKETS = ("good", "startup", "waiting", "lost", "uncommitted", "checkpoint", "evaluation", "other")
LABELS = {
    "good": "good (steps kept)",
    "startup": "start-up and restore",
    "waiting": "waiting",
    "lost": "lost work",
    "uncommitted": "not yet committed",
    "checkpoint": "checkpoint blocking",
    "evaluation": "evaluation",
    "other": "other",
}
# The period leading up to a mark belongs to this bucket (dist_ready: rendezvous, when imports_done splits
# it from the imports).
_PHASE_BUCKET = {"process_start": "waiting", "imports_done": "startup", "dist_ready": "startup",
                 "restore_done": "startup", "train_start": "startup"}
DEFAULT_STALE_AFTER = 900.0


@dataclass
class AttemptReport:
    index: int
    id: str
    host: str
    source: str
    world_size: int | None
    start: float
    end: float
    first_step: int
    last_step: int
    how: str  # done, preempted, failed, killed, running, stopped
    signal: str | None
    error: str | None  # the exception type a failed attempt stopped with
    exit_code: int | None
    load_seconds: float | None
    buckets: dict[str, float]
    good_steps: int = 0
    lost_steps: int = 0
    uncommitted_steps: int = 0
    trained: bool = True  # reached the training loop
    segments: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, bucket)
    commits: list[tuple[float, int]] = field(default_factory=list)  # (time, step)


@dataclass
class Report:
    work_dir: str
    status: str  # done, running, preempted, failed, stopped
    start: float
    end: float
    goodput: float
    buckets: dict[str, float]
    final_step: int
    max_steps: int | None
    lost_steps: int
    recomputed_steps: int
    load_seconds: float
    has_ledger: bool
    attempts: list[AttemptReport]
    notes: list[str]

    @property
    def wall(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        attempts = []
        for a in self.attempts:
            d = {k: v for k, v in a.__dict__.items() if k not in ("segments", "commits")}
            d["buckets"] = {k: round(v, 3) for k, v in a.buckets.items()}
            attempts.append(d)
        return {"work_dir": self.work_dir, "status": self.status, "start": self.start, "end": self.end,
                "wall_seconds": round(self.wall, 3), "goodput": round(self.goodput, 6),
                "buckets": {k: round(v, 3) for k, v in self.buckets.items()}, "final_step": self.final_step,
                "max_steps": self.max_steps, "lost_steps": self.lost_steps,
                "recomputed_steps": self.recomputed_steps, "restore_load_seconds": round(self.load_seconds, 3),
                "ledger": self.has_ledger, "attempts": attempts, "notes": self.notes}


# ----------------------------------------------------------------------------------------------------------
# Accounting


def build_report(history: History, now: float | None = None, stale_after: float = DEFAULT_STALE_AFTER) -> Report:
    now = time.time() if now is None else now
    attempts = history.attempts
    notes = list(history.notes)
    last = attempts[-1]
    if last.end is not None:
        status = last.end["how"]
    else:
        status = "running" if now - last.last_time <= stale_after else "stopped"

    # The final committed progress (in the last attempt that trained), then backwards: which attempt
    # produced which steps of it.
    trained = [a for a in attempts if a.trained]
    if not trained:
        final = 0
    elif status == "done":
        final = trained[-1].last_step
    else:
        t_last = trained[-1]
        window = [s for s, t in history.commits.items() if t_last.first_step <= s <= t_last.last_step
                  and (t == 0.0 or t >= t_last.start)]
        final = max(window, default=t_last.first_step)
    kept: dict[int, tuple[int, int]] = {}  # attempt index -> (first, last) of its steps that count
    need = final
    rate = run_rate(attempts)
    for i in range(len(attempts) - 1, -1, -1):
        a = attempts[i]
        if need <= a.first_step or not a.trained:
            kept[i] = (a.first_step, a.first_step)
            continue
        if a.last_step < need:
            until = attempts[i + 1].start if i + 1 < len(attempts) else a.last_time
            if extend_steps(a, need, until, a.seconds_per_step() or rate):
                notes.append(f"attempt {i}: steps up to {need} were committed but not all are on record (the "
                             "work dir lost the attempt's last log lines); their time is estimated from its step rate.")
        kept[i] = (a.first_step, min(a.last_step, need))
        need = a.first_step

    running = status == "running"
    reports = [_account(i, a, kept[i], running and a is last, now) for i, a in enumerate(attempts)]
    for r, a in zip(reports, attempts, strict=True):
        r.commits = sorted((t, s) for s, t in history.commits.items() if t and a.start <= t <= r.end + 1e-6)

    start = min([attempts[0].start] + [r["time"] for r in history.supervisor if r.get("event") == "attempt_start"])
    end = now if running else max(r.end for r in reports)
    sup_end = [r["time"] for r in history.supervisor if r.get("event") == "attempt_end"]
    if sup_end and not running and max(sup_end) > end:
        end = max(sup_end)
    totals = dict.fromkeys(BUCKETS, 0.0)
    for r in reports:
        for k, v in r.buckets.items():
            totals[k] += v
    edges = [start] + [x for r in reports for x in (r.start, r.end)] + [end]
    overlap = 0.0
    for gap_start, gap_end in zip(edges[0::2], edges[1::2], strict=True):
        totals["waiting"] += max(gap_end - gap_start, 0.0)
        overlap += max(gap_start - gap_end, 0.0)
    if overlap > 0.5:
        notes.append(f"attempts overlap in time by {overlap:.1f} s in total (clocks of different hosts, or an "
                     "old attempt still running beside a new one): the buckets add up to more than the wall time.")
    wall = end - start
    lost_steps = sum(r.lost_steps for r in reports)
    recomputed = sum(max(min(r.last_step, final) - kept[r.index][1], 0) for r in reports if r.lost_steps)
    _explain(history, status, last, now, notes)
    return Report(history.url, status, start, end, totals["good"] / wall if wall > 0 else 0.0, totals, final,
                  next((a.max_steps for a in reversed(attempts) if a.max_steps), None), lost_steps, recomputed,
                  sum(a.load_seconds or 0.0 for a in attempts), history.has_ledger, reports, notes)


def _account(index: int, a: Attempt, kept: tuple[int, int], running: bool, now: float) -> AttemptReport:
    buckets = dict.fromkeys(BUCKETS, 0.0)
    segments: list[tuple[float, float, str]] = []

    def add(bucket: str, seconds: float, end: float) -> None:
        if seconds > 0:
            buckets[bucket] += seconds
            segments.append((end - seconds, end, bucket))

    # the phases before the loop, each period going to the bucket of the mark that ends it
    marks = sorted(((t, m) for m, t in a.marks.items() if m in _PHASE_BUCKET), key=lambda x: x[0])
    previous = a.launch if a.launch is not None else (marks[0][0] if marks else a.start)
    for t, mark in marks:
        bucket = _PHASE_BUCKET[mark]
        if mark == "dist_ready" and "imports_done" in a.marks:
            bucket = "waiting"  # the rendezvous alone
        add(bucket, t - previous, t)
        previous = max(previous, t)

    good_steps = lost_steps = uncommitted_steps = 0
    for iv in a.intervals:
        n = iv.last - iv.first
        if n <= 0:
            continue
        good = max(min(iv.last, kept[1]) - max(iv.first, kept[0]), 0)
        rest = n - good
        per = iv.seconds / n
        add("good", good * per, iv.time - rest * per)
        add("uncommitted" if running else "lost", rest * per, iv.time)
        good_steps += good
        if running:
            uncommitted_steps += rest
        else:
            lost_steps += rest
    for c in a.checkpoints:
        add("checkpoint", c.seconds, c.time)
    for e in a.evals:
        add("evaluation", e.seconds, e.time)

    end = a.end_time
    if running and now > end:
        add("uncommitted", now - end, now)  # not on record yet: the run is going
        end = now
    begin = a.start
    buckets["other"] = max(end - begin - sum(buckets.values()), 0.0)
    how = a.end["how"] if a.end else ("running" if running else "killed")
    return AttemptReport(index, a.id, a.host, a.source, a.world_size, begin, end, a.first_step, a.last_step, how,
                         (a.end or {}).get("signal"), (a.end or {}).get("error"), a.exit_code, a.load_seconds,
                         buckets, good_steps, lost_steps, uncommitted_steps, a.trained, sorted(segments))


def _explain(h: History, status: str, last: Attempt, now: float, notes: list[str]) -> None:
    """What the work dir cannot tell, in words."""
    if not h.has_ledger:
        notes.append("no ledger.jsonl (a run from before the goodput ledger): attempts, steps and checkpoints "
                     "come from metrics.jsonl; start-up and restore cannot be told apart from the dead time "
                     "between attempts (both count as waiting), the first attempt's start-up before its start "
                     "event is not seen, evaluation time counts as step time, and a checkpoint's time is its "
                     "whole save (for async saves more than what blocked the loop).")
    elif any(a.source == "metrics" for a in h.attempts):
        notes.append("some attempts predate the ledger: for them only metrics.jsonl is known (start-up counts "
                     "as waiting, evaluation as step time).")
    if any(a.end is None for a in h.attempts[:-1]):
        notes.append("attempts without an end record were killed (SIGKILL, node loss): what they did after "
                     "their last record (at most the ledger's flush interval of steps, more on an object store, "
                     "which holds the logs as of the last checkpoint) counts as waiting.")
    if status == "running":
        notes.append(f"the last attempt has no end record and wrote {now - last.last_time:.0f} s ago: taken as "
                     "still running; wall time runs to now and its steps since the last commit are 'not yet "
                     "committed'.")
    elif status == "stopped":
        notes.append(f"the last attempt has no end record and wrote nothing for {now - last.last_time:.0f} s: "
                     "taken as killed with no relaunch yet; wall time ends at its last record.")
    elif status in ("preempted", "failed"):
        notes.append(f"the run is not finished: its last attempt {status}; relaunch it to resume.")


# ----------------------------------------------------------------------------------------------------------
# Output


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _ended(a: AttemptReport) -> str:
    cause = a.signal or a.error
    text = a.how + (f" ({cause})" if cause else "")
    return text + (f", exit {a.exit_code}" if a.exit_code is not None else "")


def summary_lines(r: Report) -> list[str]:
    sizes = "/".join(dict.fromkeys(str(a.world_size or "?") for a in r.attempts))
    of = f" of {r.max_steps}" if r.max_steps else ""
    return [
        f"Goodput of {r.work_dir}",
        f"  run: {r.status} at step {r.final_step}{of}; {len(r.attempts)} attempt(s), world size {sizes}; wall "
        f"{_duration(r.wall)} ({_clock(r.start)} to {_clock(r.end)})",
        f"  goodput: {100 * r.goodput:.1f}% ({r.buckets['good']:.1f} s of {r.wall:.1f} s on steps that count)",
    ]


def bucket_rows(r: Report) -> list[tuple[str, float, float, str]]:
    detail = {
        "startup": f"checkpoint loads {r.load_seconds:.1f} s" if r.load_seconds else "",
        "lost": f"{r.lost_steps} steps computed and lost ({r.recomputed_steps} recomputed)" if r.lost_steps else "",
        "waiting": "launch, rendezvous, dead time between attempts",
    }
    wall = r.wall or 1.0
    return [(LABELS[k], r.buckets[k], 100 * r.buckets[k] / wall, detail.get(k, "")) for k in BUCKETS
            if k != "uncommitted" or r.buckets[k]]


ATTEMPT_COLUMNS = ("#", "start", "world", "steps", "good", "start-up", "waiting", "lost", "ckpt", "eval", "other",
                   "ended")


def attempt_rows(r: Report) -> list[list[str]]:
    rows = []
    for a in r.attempts:
        b = a.buckets
        steps = f"{a.first_step}-{a.last_step}" + (f" ({a.lost_steps} lost)" if a.lost_steps else "")
        steps = steps if a.trained else "- (no step)"
        rows.append([str(a.index), "+" + _duration(a.start - r.start), str(a.world_size or "?"), steps,
                     *(f"{b[k]:.1f}" for k in ("good", "startup", "waiting", "lost", "checkpoint", "evaluation",
                                               "other")), _ended(a)])
    return rows


def format_text(r: Report) -> str:
    lines = summary_lines(r) + ["", f"  {'where the time went':<24}{'seconds':>10}{'%':>8}"]
    for label, seconds, pct, detail in bucket_rows(r):
        lines.append(f"  {label:<24}{seconds:>10.1f}{pct:>8.1f}   {detail}".rstrip())
    lines.append(f"  {'wall':<24}{r.wall:>10.1f}{100.0:>8.1f}")
    rows = [list(ATTEMPT_COLUMNS)] + attempt_rows(r)
    widths = [max(len(row[i]) for row in rows) for i in range(len(ATTEMPT_COLUMNS))]
    lines.append("")
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) if i in (3, 11) else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    if r.notes:
        lines += ["", "  notes:"] + [f"  - {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def format_html(r: Report, png: bytes) -> str:
    import base64
    import html

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    buckets = [[label, f"{s:.1f}", f"{p:.1f}", d] for label, s, p, d in bucket_rows(r)]
    buckets.append(["wall", f"{r.wall:.1f}", "100.0", ""])
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes)
    title = html.escape(f"Goodput of {r.work_dir}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>{title}</h1><p>{'<br>'.join(html.escape(s.strip()) for s in summary_lines(r)[1:])}</p>"
            f"<img alt='timeline' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"{table(['where the time went', 'seconds', '%', ''], buckets)}"
            f"{table(list(ATTEMPT_COLUMNS), attempt_rows(r))}"
            f"{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}</body></html>\n")


def write_output(r: Report, out: str) -> None:
    from .pictures import render_png

    if out.lower().endswith(".html"):
        data = format_html(r, render_png(r)).encode()
    elif out.lower().endswith(".png"):
        data = render_png(r)
    else:
        raise UserError(f"Cannot write the report to {out}: use a .html or .png file name.")
    try:
        import fsspec

        with fsspec.open(out, "wb") as f:
            f.write(data)
    except OSError as e:
        raise UserError(f"Cannot write the report to {out}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elastic_det.report", description=__doc__.split("\n")[0])
    parser.add_argument("work_dir", help="work dir of a run (path or fsspec URL, e.g. s3://bucket/runs/x)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-o", "--out", help="also write the timeline: report.png, or report.html (table + image)")
    parser.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER, metavar="SECONDS",
                        help="a run with no end record is taken as still running if it wrote within this many "
                             f"seconds, else as killed (default {DEFAULT_STALE_AFTER:.0f})")
    args = parser.parse_args(argv)
    try:
        report = build_report(read_history(args.work_dir), stale_after=args.stale_after)
        if args.out:
            write_output(report, args.out)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_text(report), end="" if not args.json
          else "\n")
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
