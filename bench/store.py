"""No special node: three nodes lost in a row (the first started included) and the store itself, timed.

    python bench/store.py              # 3 losses, then the store SIGKILLed and started again
    python bench/store.py --losses 1   # a quick run

Three agents as three nodes on this machine, each through the real launcher (launch/elastic_run.sh ->
supervisor -> torchrun, one worker each), all with ``is_host=false`` against ``python -m elastic_det.store``
(torch's TCPStore, its own process: no node hosts it). Then, in turn, the oldest node still running (the
first one started first) is SIGKILLed with its whole process tree; once the survivors train at world size
2, a replacement node is started, as a scheduler would, and the run grows back to 3. Printed per loss:
seconds from the SIGKILL to the survivors' first training step at world size 2 (target: median <= 10 s),
and the step they resumed at against the newest committed one. Then the store is SIGKILLed and started
again with no state: seconds until training resumes by itself. The run must finish with every resume at
a committed step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import PYTHON, Procs, base_env, descendants, events, fast_overrides, free_port, read_jsonl, wait_for  # noqa: E402


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def trained_at(work: Path, world_size: int, after: float) -> dict | None:
    records = [r for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"] \
        if (work / "metrics.jsonl").exists() else []
    return next((r for r in records if r["world_size"] == world_size and r["time"] > after), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=400)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    procs = Procs()
    cache, work, port = tmp / "cache", tmp / "work", free_port()
    store_cmd = [PYTHON, "-m", "elastic_det.store", "--host", "127.0.0.1", "--port", str(port)]

    def start_store(name: str):
        store = procs.start(store_cmd, base_env(tmp), tmp / name)
        wait_for(lambda: "serving the rendezvous store" in tail(tmp / name), 60, "the store")
        return store

    train_args = ["--work-dir", str(work), "--cfg-options",
                  *fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm",
                                  f"train.max_steps={args.max_steps}", "data.global_batch_size=6",
                                  "checkpoint.interval=2", "dist.timeout_seconds=30")]
    torchrun = [str(REPO / "launch" / "elastic_run.sh"), "--nnodes=1:3", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench-store",
                "--monitor-interval=0.2",
                "--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,is_host=false",
                "-m", "elastic_det.train", *train_args]
    env = base_env(cache, PYTHON=PYTHON, ELASTIC_RUN_QUIET="1", MAX_STALLED_ATTEMPTS="20")
    try:
        store = start_store("store.log")
        nodes = [procs.start(torchrun, env, tmp / f"node-{i}.log") for i in range(3)]
        wait_for(lambda: trained_at(work, 3, 0), 300, "training at world size 3")
        wait_for(lambda: events(work, "checkpoint"), 120, "a first checkpoint")  # so a loss resumes from one
        recoveries = []
        for loss in range(args.losses):
            victim = nodes.pop(0)
            pids = [victim.pid, *descendants(victim.pid)]
            killed = time.time()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            victim.wait(timeout=30)
            first = wait_for(lambda killed=killed: trained_at(work, 2, killed), 180, f"ws 2 after loss {loss + 1}")
            resume = [e for e in events(work, "resume") if e["time"] > killed]
            committed = [e["step"] for e in events(work, "checkpoint") if e["time"] < killed]
            recoveries.append(first["time"] - killed)
            print(f"loss {loss + 1}: SIGKILL of node {loss} (pid {victim.pid}, {len(pids)} processes) -> ws 2 "
                  f"training after {recoveries[-1]:.1f} s; resumed at step {resume[0]['step'] if resume else '?'}"
                  f" (newest committed before the kill: {max(committed, default=0)})", flush=True)
            joined = time.time()
            nodes.append(procs.start(torchrun, env, tmp / f"node-{loss + 3}.log"))
            wait_for(lambda joined=joined: trained_at(work, 3, joined), 180, f"ws 3 after replacement {loss + 1}")
        print(f"median node loss -> training at ws 2: {statistics.median(recoveries):.1f} s "
              f"(all: {', '.join(f'{r:.1f}' for r in recoveries)})", flush=True)
        store.kill()
        store.wait(timeout=30)
        lost = time.time()
        store = start_store("store-2.log")
        resumed = wait_for(lambda: [e for e in events(work, "resume") if e["time"] > lost], 240,
                           "a resume after the store")[0]
        back = wait_for(lambda: trained_at(work, 3, resumed["time"]) or trained_at(work, 2, resumed["time"]), 240,
                        "training after that resume")
        print(f"store SIGKILLed and started again with no state -> resumed at step {resumed['step']} after "
              f"{resumed['time'] - lost:.1f} s, training again after {back['time'] - lost:.1f} s (the workers "
              "train on until their agents find the store gone)", flush=True)
        for node in nodes:
            code = node.wait(timeout=900)
            assert code == 0, f"a node ended with {code}"
        checkpoints = events(work, "checkpoint")
        for r in events(work, "resume"):
            before = [e["step"] for e in checkpoints if e["time"] < r["time"]]
            assert r["step"] >= max(before, default=0), (r, before)
        done = events(work, "done")
        assert done and done[-1]["step"] == args.max_steps, done
        print(f"finished at step {args.max_steps}; {len(events(work, 'resume'))} resumes, each at a committed step")
    except BaseException:
        for log in sorted(tmp.glob("node-*.log")):
            print(f"--- {log.name}\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        procs.kill_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
