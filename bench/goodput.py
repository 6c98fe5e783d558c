"""Goodput under preemptions and kills: the report's figures against the ground truth, in one run.

    python bench/goodput.py                                  # the embedded default, N = 120 s
    python bench/goodput.py --every 40 --cfg-options train.max_steps=300    # shorter

Three runs of the same config under ``torchrun --nproc-per-node 2`` (gloo, CPU), each in a fresh work dir,
each launch through the supervisor as every launcher does (with its warm server; ``--plain-torchrun``
launches torchrun alone, as before):

(a) uninterrupted;
(b) a SIGTERM to the launched process (the supervisor, or torchrun) N seconds after each launch (it is
    forwarded to the workers, which finish the step, save and exit); the same command is launched again
    after it exits, as a scheduler would, until the run is done (a relaunch on a new node: a new
    supervisor, a new warm server);
(c) a SIGKILL of one worker every N seconds (alternately rank 1 and rank 0); torchrun ``--max-restarts``
    restarts the workers.

A preemption waits, if need be, until the attempt has finished a step, and a kill until a checkpoint was
committed since the previous kill: otherwise a machine too slow to reach a checkpoint within N seconds
would never finish (the wait is part of the wall time; the count of interruptions is printed).

For each it prints the wall time (first launch to the last exit), ``python -m elastic_det.report``'s goodput
and its breakdown, and the ground truth: the time the uninterrupted run took for the same steps (from its
``start`` event to its last train record, less its checkpoint saves, all from metrics.jsonl, not the
ledger) over the wall time of the run. The difference is in percentage points (target: within 2 pp;
goodput >= 95% with a preemption every 2 minutes). That ground truth assumes every run's steps are as fast
as the uninterrupted run's: on a machine shared with other work it is only as good as that assumption,
so the per-step time of every run is printed, and a second one that does not assume it: "truth B", the
time of the run's own kept steps between its train records in metrics.jsonl (a separate file and clock
points from the ledger's), over its wall time. Every launch sets ``ELASTIC_DET_LAUNCH_TIME``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import Procs, base_env, children, is_torchrun, read_jsonl, torchrun_cmd  # noqa: E402

from elastic_det.goodput.history import build_history, parse_jsonl, read_history  # noqa: E402
from elastic_det.goodput.ledger import LAUNCH_TIME_ENV  # noqa: E402
from elastic_det.goodput.report import BUCKETS, Report, build_report  # noqa: E402
from elastic_det.records import LEDGER  # noqa: E402
from elastic_det.storage import WorkDir  # noqa: E402

SCENARIOS = ("uninterrupted", "preempt", "kill")


@dataclass
class Result:
    name: str
    wall: float
    launches: int
    interruptions: int
    report: Report
    stops: list[tuple[float, float]] = field(default_factory=list)  # (SIGTERM sent, launched process exited)


def done(work: Path) -> bool:
    return any(r.get("event") == "done" for r in read_jsonl(work / "metrics.jsonl"))


def trained_since(work: Path, since: float) -> bool:
    """A step finished after ``since`` (the ledger's first_step or steps, or a train record)."""
    records = read_jsonl(work / LEDGER) + read_jsonl(work / "metrics.jsonl")
    return any(r.get("time", 0) > since and (r.get("kind") in ("first_step", "steps") or r.get("mode") == "train")
               for r in records)


def steps_time(work: Path) -> tuple[float, int]:
    """The uninterrupted run's time for its steps, from metrics.jsonl: start event to the last train record,
    less the checkpoint saves in between; and the number of steps."""
    records = read_jsonl(work / "metrics.jsonl")
    start = next(r for r in records if r.get("event") == "start")
    train = [r for r in records if r.get("mode") == "train"]
    last = train[-1]
    saves = sum(r.get("seconds", 0.0) for r in records
                if r.get("event") == "checkpoint" and start["time"] < r["time"] < last["time"])
    return last["time"] - start["time"] - saves, last["step"] - start["step"]


def committed_since(work: Path, since: float) -> bool:
    """A checkpoint was committed after ``since`` (the manifests' ``created``)."""
    for manifest in (work / "checkpoints").glob("step-*/manifest.json"):
        try:
            if json.loads(manifest.read_text()).get("created", 0) > since:
                return True
        except (OSError, ValueError):
            pass
    return False


def worker_ranks(launched: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started (under the supervisor, its grandchildren; a
    warm worker's trainer, forked by the warm server, has the RANK too but is not torchrun's child)."""
    agents = [launched] + [p for p in children(launched) if is_torchrun(p)]
    out = {}
    for pid in (p for agent in agents for p in children(agent)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


class Bench:
    def __init__(self, root: Path, nproc: int, every: float, train_args: list[str], procs: Procs,
                 supervised: bool = True) -> None:
        self.root = root
        self.supervised = supervised
        self.nproc = nproc
        self.every = every
        self.train_args = train_args
        self.procs = procs

    def launch(self, work: Path, log: Path, max_restarts: int) -> subprocess.Popen:
        env = base_env(self.root, **{LAUNCH_TIME_ENV: f"{time.time():.3f}"})
        cmd = torchrun_cmd(self.nproc, ["--work-dir", str(work), *self.train_args], max_restarts=max_restarts,
                           run_id=work.name)
        if self.supervised:  # as launch/elastic_run.sh runs it; torchrun's restarts stay torchrun's
            cmd = [sys.executable, "-m", "elastic_det.supervise", "--max-stalled-attempts", "1000", "--", *cmd]
        return self.procs.start(cmd, env, log)

    def run(self, name: str) -> Result:
        work = self.root / name
        log = self.root / f"{name}.log"
        start = time.time()
        launches = interruptions = 0
        stops: list[tuple[float, float]] = []
        if name == "kill":
            agent = self.launch(work, log, max_restarts=1000)
            launches, victim, last = 1, 1, start
            while agent.poll() is None:
                if time.time() - last >= self.every and committed_since(work, last):
                    pid = worker_ranks(agent.pid).get(victim)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        interruptions += 1
                        victim = 1 - victim if self.nproc > 1 else 0
                    last = time.time()
                self.procs.remember(agent)
                time.sleep(0.2)
        else:
            while not done(work) and launches < 100:
                launched = time.time()
                agent = self.launch(work, log, max_restarts=0)
                launches += 1
                while agent.poll() is None:
                    self.procs.remember(agent)
                    if (name == "preempt" and time.time() - launched >= self.every
                            and trained_since(work, launched)):
                        sent = time.time()
                        agent.send_signal(signal.SIGTERM)  # forwarded by torchrun to its workers
                        interruptions += 1
                        while agent.poll() is None:  # as a scheduler sees it: polled, not waited
                            time.sleep(0.01)
                        stops.append((sent, time.time()))
                        break
                    time.sleep(0.2)
                if name == "uninterrupted" and agent.returncode != 0:
                    raise RuntimeError(f"{name}: torchrun exited {agent.returncode}; see {log}")
        wall = time.time() - start
        if not done(work):
            raise RuntimeError(f"{name}: the run did not finish; see {log}")
        if not (work / LEDGER).exists():
            print(f"note: {name}: no {LEDGER} (the ledger is not wired into the trainer): the report falls back "
                  "to metrics.jsonl", file=sys.stderr)
        return Result(name, wall, launches, interruptions, build_report(read_history(str(work))), stops)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--every", type=float, default=120.0, help="seconds between interruptions (default 120)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    p.add_argument("--keep", help="keep the work dirs and logs in this directory")
    p.add_argument("--plain-torchrun", action="store_true",
                   help="launch torchrun alone (no supervisor, no warm server)")
    p.add_argument("--cfg-options", nargs="*", default=[], help="passed to elastic_det.train (default: none)")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    if "uninterrupted" not in names:
        p.error("--only must include uninterrupted: it is the baseline")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_goodput_"))
    root.mkdir(parents=True, exist_ok=True)
    train_args = ["--cfg-options", "log.progress_bar=never", *args.cfg_options]
    print(f"config: embedded default, --cfg-options {' '.join(train_args[1:])}; torchrun --nproc-per-node "
          f"{args.nproc}{'' if args.plain_torchrun else ' under the supervisor (warm start)'}; interruptions every "
          f"{args.every:g} s; work dirs in {root}")
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below kills what was started
    bench = Bench(root, args.nproc, args.every, train_args, procs, supervised=not args.plain_torchrun)
    results = []
    try:
        for name in SCENARIOS:
            if name in names:
                results.append(bench.run(name))
                print(f"  {name}: done in {results[-1].wall:.1f} s", flush=True)
    finally:
        procs.kill_all()
    base_seconds, base_steps = steps_time(root / "uninterrupted")
    print(f"\nuninterrupted: {base_steps} steps in {base_seconds:.1f} s ({base_seconds / base_steps:.3f} s/step): "
          "the ground truth's numerator\n")
    print(table(results, base_seconds, root))
    for r in results:
        if r.stops:
            print(f"\n{r.name}: each preemption, phase by phase (seconds; medians last)\n"
                  + relaunch_phases(root / r.name, r.stops))
    return 0


RELAUNCH_PHASES = ("stop", "relaunch", "pre-flight", "torchrun", "warm wait", "restore", "first step", "total")


def relaunch_phases(work: Path, stops: list[tuple[float, float]]) -> str:
    """Per preemption: SIGTERM -> the launched process exited (stop; the step in flight, the save, the exits),
    -> the next launch (relaunch, this bench's poll), -> torchrun started (the supervisor's pre-flight),
    -> the worker process started (torchrun's start-up, rendezvous, spawn), -> the trainer's imports were
    done (waiting for the warm server), -> training started (process group, data, model, restore) -> the
    first step was done. From the ledger and the supervisors' attempt logs."""
    ledger = read_jsonl(work / LEDGER)
    starts = sorted(r["time"] for path in (work / "supervisor").glob("*.jsonl") for r in read_jsonl(path)
                    if r.get("event") == "attempt_start")
    attempts: dict[str, dict[str, float]] = {}
    for r in ledger:
        marks = attempts.setdefault(r.get("attempt", ""), {})
        marks.setdefault(r["kind"], r["time"])
        if r["kind"] == "process_start" and r.get("launch_time"):
            marks.setdefault("launch", r["launch_time"])
    ordered = sorted((m for m in attempts.values() if "process_start" in m), key=lambda m: m["process_start"])
    rows = []
    for sent, exited in stops:
        nxt = next((m for m in ordered if m["process_start"] > exited), None)
        torchrun = next((t for t in starts if t > exited), None)
        if nxt is None or torchrun is None or not {"launch", "imports_done", "train_start", "first_step"} <= set(nxt):
            continue
        marks = [sent, exited, nxt["launch"], torchrun, nxt["process_start"], nxt["imports_done"],
                 nxt["train_start"], nxt["first_step"]]
        rows.append([b - a for a, b in zip(marks, marks[1:], strict=False)] + [marks[-1] - sent])
    if not rows:
        return "  (no complete relaunch on record)"
    lines = ["  " + "".join(f"{p:>12}" for p in RELAUNCH_PHASES)]
    lines += ["  " + "".join(f"{v:>12.2f}" for v in row) for row in rows]
    lines.append("  " + "".join(f"{statistics.median(col):>12.2f}" for col in zip(*rows, strict=True)))
    return "\n".join(lines)


def own_steps_time(work: Path) -> float:
    """The time of the run's kept steps by its own train records (metrics.jsonl alone, not the ledger)."""
    wd = WorkDir(str(work))
    metrics = parse_jsonl(wd.read_bytes("metrics.jsonl"))
    return build_report(build_history(str(work), None, metrics, {}, []), now=time.time()).buckets["good"]


def table(results: list[Result], base_seconds: float, root: Path) -> str:
    lines = [f"{'run':<15}{'wall s':>8}{'launch':>7}{'intr':>5}{'report':>8}{'truth':>8}{'diff':>7}"
             f"{'truth B':>8}{'diff':>7}{'s/step':>8}  " + " ".join(f"{b[:7]:>7}" for b in BUCKETS)]
    for r in results:
        rep = r.report
        truth = base_seconds / r.wall
        truth_b = own_steps_time(root / r.name) / r.wall
        per_step = rep.buckets["good"] / max(rep.final_step, 1)
        lines.append(f"{r.name:<15}{r.wall:>8.1f}{r.launches:>7}{r.interruptions:>5}{100 * rep.goodput:>7.1f}%"
                     f"{100 * truth:>7.1f}%{100 * (rep.goodput - truth):>+7.1f}{100 * truth_b:>7.1f}%"
                     f"{100 * (rep.goodput - truth_b):>+7.1f}{per_step:>8.3f}  "
                     + " ".join(f"{rep.buckets[b]:>7.1f}" for b in BUCKETS))
    lines.append("\nbuckets in seconds; report = python -m elastic_det.report WORK_DIR; "
                 "truth = the uninterrupted run's "
                 "step time / wall (valid when every run's steps are as fast as the uninterrupted run's); truth B = "
                 "the run's own kept-step time from its metrics.jsonl train records (not the ledger) / wall; diff in "
                 "percentage points; lost steps: " + ", ".join(f"{r.name} {r.report.lost_steps}" for r in results))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
