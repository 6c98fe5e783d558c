"""Resume cost and lost work: process start to first training step (fresh vs. resumed), and steps lost per
preemption (SIGTERM: graceful; SIGKILL: hard kill, bounded by the checkpoint interval).

    python bench/resume.py [--kills 3] [--interval 5]

Runs ``python -m elastic_det.train`` on the embedded default (tiny FCOS, shapes) in subprocesses, no
evaluation, ``log.interval=1``; times come from the ``time`` of the first train record in metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE = ["train.validate=false", "log.interval=1", "log.progress_bar=never", "data.num_workers=0"]


def records(work: Path) -> list[dict]:
    path = work / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def train_steps(work: Path) -> list[int]:
    return [r["step"] for r in records(work) if r.get("mode") == "train"]


def launch(work: Path, *options: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elastic_det.train", "--work-dir", str(work), "--cfg-options", *BASE, *options]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def wait_until(condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark run made no progress")
        time.sleep(0.01)


def start_to_first_step(work: Path, *options: str) -> float:
    """Seconds from spawning the process to the first train record of this launch."""
    seen = len(train_steps(work))
    started = time.time()
    proc = launch(work, *options)
    wait_until(lambda: len(train_steps(work)) > seen)
    first = [r for r in records(work) if r.get("mode") == "train"][seen]
    proc.wait()
    return first["time"] - started


def sigterm_lost(work: Path, at_step: int) -> int:
    proc = launch(work, "train.max_steps=100000", "checkpoint.interval=0")
    wait_until(lambda: max(train_steps(work), default=0) >= at_step)
    done_at_signal = max(train_steps(work))
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait()
    saved = [r for r in records(work) if r.get("event") == "preempt"][-1]["step"]
    return max(done_at_signal - saved, 0)


def sigkill_lost(work: Path, interval: int, rng: random.Random) -> int:
    proc = launch(work, "train.max_steps=100000", f"checkpoint.interval={interval}")
    target = rng.randint(interval + 1, 3 * interval)
    wait_until(lambda: max(train_steps(work), default=0) >= target)
    done_at_kill = max(train_steps(work))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = launch(work, "train.max_steps=100000", f"checkpoint.interval={interval}")
    wait_until(lambda: any(r.get("event") == "resume" for r in records(work)))
    resume_step = [r for r in records(work) if r.get("event") == "resume"][-1]["step"]
    os.killpg(resumed.pid, signal.SIGKILL)
    resumed.wait()
    return done_at_kill - resume_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--interval", type=int, default=5)
    args = p.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        fresh = start_to_first_step(work, "train.max_steps=20", "checkpoint.interval=10")
        resumed = start_to_first_step(work, "train.max_steps=25", "checkpoint.interval=10")
        term = [sigterm_lost(Path(tmp) / f"term{i}", at_step=3 + 2 * i) for i in range(args.kills)]
        kill = [sigkill_lost(Path(tmp) / f"kill{i}", args.interval, rng) for i in range(args.kills)]
    print("embedded default (tiny FCOS, shapes, 1 process, CPU)")
    print(f"process start -> first training step, fresh  : {fresh:6.2f} s")
    print(f"process start -> first training step, resumed: {resumed:6.2f} s   (ratio {resumed / fresh:.2f})")
    print(f"steps lost per SIGTERM (graceful)            : {term}   (target 0)")
    print(f"steps lost per SIGKILL, checkpoint.interval={args.interval}: {kill}   (target <= {args.interval})")


if __name__ == "__main__":
    main()
