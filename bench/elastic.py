"""Elastic recovery and resume cost, under the real torchrun (gloo, CPU), on the tiny test model.

    python bench/elastic.py              # 2 lose/rejoin cycles, 2 repeats of the early/late resume
    python bench/elastic.py --cycles 1 --repeats 1

1. Two torchrun agents on 127.0.0.1 acting as two nodes (``--nnodes 1:2``, c10d rendezvous hosted by the first
   agent, one worker each, ``last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3``,
   ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, ``--monitor-interval 0.2``). Each cycle SIGKILLs the second agent
   (a lost node) and then starts a new one (a node joins). Times, from polling /proc every 5 ms and from
   the ``time`` of metrics.jsonl records:

   lost node:  detection   kill -> the survivor's worker has exited (its collective failed on the lost peer)
               rendezvous  -> the agent has started the new worker (new round, last_call_timeout, spawn)
               restore     -> ``resume`` event: python start, process group, data, model, checkpoint load
               first step  -> the first train record at the new world size
   node joins: detection   new agent launched -> the running worker has exited (the agent saw a waiting
                           node and stopped its worker, which saved a preemption checkpoint first)
               rendezvous, restore, first step as above.

2. Resume cost at a late step vs an early one (one process): a real checkpoint at step 10, and the same state
   with its cursor moved to step 100000 (progress and LR-scheduler step edited, committed with
   CheckpointStore.save). Time from process start to the resume event and to the first train record.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import (  # noqa: E402
    PYTHON,
    Procs,
    alive,
    base_env,
    children,
    fast_overrides,
    free_port,
    read_jsonl,
    torchrun_cmd,
    wait_for,
)

from elastic_det.checkpoint.store import CheckpointStore  # noqa: E402
from elastic_det.data.plan import (  # noqa: E402
    ElasticBatchPlan,  # noqa: E402
    Progress,
    StepSchedule,
)
from elastic_det.storage import WorkDir  # noqa: E402

POLL = 0.005
RDZV_CONF = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"


# ----------------------------------------------------------------------------------------------------------
# processes


def wait(condition, timeout: float, what: str):
    return wait_for(condition, timeout, what, interval=POLL)


# ----------------------------------------------------------------------------------------------------------
# 1. lost node / joining node


def first_record(work: Path, after: float, world_size: int) -> tuple[float | None, float | None, int | None]:
    """(time of the first resume at ``world_size`` after ``after``, time of the first train record after it,
    its step)."""
    resume = None
    for r in read_jsonl(work / "metrics.jsonl"):
        if r.get("time", 0) <= after:
            continue
        if resume is None and r.get("event") == "resume" and r.get("world_size") == world_size:
            resume = r
        elif resume is not None and r.get("mode") == "train" and r["world_size"] == world_size:
            return resume["time"], r["time"], resume["step"]
    return (resume["time"] if resume else None), None, (resume["step"] if resume else None)


def transition(work: Path, survivor_agent: subprocess.Popen, t0: float, new_world: int,
               watch_gone: list[int]) -> dict[str, float]:
    """Poll until the survivor's worker was replaced and trained a step at ``new_world``; the phases."""
    (old_worker,) = children(survivor_agent.pid)
    marks: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = time.time()
        if "orphan_gone" not in marks and watch_gone and not any(alive(p) for p in watch_gone):
            marks["orphan_gone"] = now
        if "detected" not in marks and not alive(old_worker):
            marks["detected"] = now
        if "detected" in marks and "spawned" not in marks and [p for p in children(survivor_agent.pid)
                                                               if p != old_worker and alive(p)]:
            marks["spawned"] = now
        if "spawned" in marks:
            resumed, first, step = first_record(work, t0, new_world)
            if first is not None and ("orphan_gone" in marks or not watch_gone):
                marks.update(resumed=resumed, first_step=first, resume_step=step)
                return marks
        if survivor_agent.poll() is not None:
            raise RuntimeError("the surviving agent exited")
        time.sleep(POLL)
    raise TimeoutError(f"no progress at world size {new_world}: {marks}")


def phases(t0: float, m: dict[str, float]) -> dict[str, float]:
    out = {"detection": m["detected"] - t0}
    if "orphan_gone" in m:  # lost node: the killed agent's worker stops (watchdog), then the survivor's fails
        out.update({"watchdog": m["orphan_gone"] - t0, "survivor": m["detected"] - m["orphan_gone"]})
    return {**out, "rendezvous": m["spawned"] - m["detected"], "restore": m["resumed"] - m["spawned"],
            "first step": m["first_step"] - m["resumed"], "total": m["first_step"] - t0}


def bench_nodes(root: Path, cycles: int) -> tuple[list[dict], list[dict], dict]:
    cache, work = root / "cache", root / "nodes"
    args = ["--work-dir", str(work), "--cfg-options",
            *fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm",
                            "train.max_steps=100000", "checkpoint.interval=5",
                            "checkpoint.keep_last=1", "schedule.policy=constant", "dist.timeout_seconds=30")]
    env, port = base_env(cache), free_port()

    def agent(is_host: bool, name: str) -> subprocess.Popen:
        cmd = torchrun_cmd(1, args, max_restarts=cycles + 2, nnodes="1:2", rdzv_port=port, run_id="bench",
                           extra=[f"--rdzv-conf={RDZV_CONF},is_host={str(is_host).lower()}"])
        return procs.start(cmd, env, root / f"{name}.log")

    def at_world(n: int, after: float, steps: int = 3) -> bool:
        records = [r for r in read_jsonl(work / "metrics.jsonl") if r.get("time", 0) > after]
        return sum(r.get("mode") == "train" and r["world_size"] == n for r in records) >= steps

    procs = Procs()
    lost, joined, lost_steps = [], [], []
    try:
        host = agent(True, "agent-host")
        other = agent(False, "agent-0")
        wait(lambda: at_world(2, 0), 180, "training at world size 2")
        for cycle in range(cycles):
            orphans = procs.remember(other)
            procs.remember(host)
            t_kill = time.time()
            os.kill(other.pid, signal.SIGKILL)
            other.wait()
            m = transition(work, host, t_kill, 1, orphans)
            lost.append(phases(t_kill, m))
            reached = max(r["step"] for r in read_jsonl(work / "metrics.jsonl")
                          if r.get("mode") == "train" and r["time"] < m["detected"])
            lost_steps.append(reached - m["resume_step"])
            wait(lambda t=m["first_step"]: at_world(1, t - 0.001), 60, "steps at world size 1")

            procs.remember(host)
            t_join = time.time()
            other = agent(False, f"agent-{cycle + 1}")
            m = transition(work, host, t_join, 2, [])
            joined.append(phases(t_join, m))
            # kill at varying distances from the last checkpoint (every 5 steps)
            wait(lambda t=m["first_step"], n=3 + 2 * cycle: at_world(2, t - 0.001, n), 60, "steps at world size 2")
        step_time = statistics.median(r["step_time"] for r in read_jsonl(work / "metrics.jsonl")
                                      if r.get("mode") == "train" and r["world_size"] == 2 and "step_time" in r)
        return lost, joined, {"lost_steps": lost_steps, "step_time": step_time}
    finally:
        procs.kill_all()


# ----------------------------------------------------------------------------------------------------------
# 2. resume at step 10 vs step 100000


LATE = 100_000


def late_copy(early: Path, late: Path, num_samples: int, batch: int) -> None:
    """The early checkpoint's state with the cursor (and LR-scheduler step) moved to step LATE."""
    checkpoint = CheckpointStore(WorkDir(str(early))).load_latest()
    manifest = checkpoint.manifest
    state = torch.load(Path(checkpoint.location) / manifest.data, weights_only=True)
    per_epoch = StepSchedule(ElasticBatchPlan(num_samples, seed=0, drop_last=True), batch, Progress()).steps_per_epoch
    epoch, step_in_epoch = divmod(LATE, per_epoch)
    state["progress"].update(global_step=LATE, epoch=epoch, step_in_epoch=step_in_epoch,
                             sample_offset=step_in_epoch * batch)
    state["scheduler"].update(last_epoch=LATE, _step_count=LATE + 1)
    late.mkdir(parents=True)
    shutil.copy(early / "config.yaml", late / "config.yaml")
    CheckpointStore(WorkDir(str(late))).save(LATE, state, {"config_hash": manifest.config_hash,
                                                          "world_size": manifest.world_size,
                                                          "reason": manifest.reason})


def timed_resume(work: Path, cache: Path, steps: int, log: Path) -> dict[str, float]:
    args = ["--work-dir", str(work), "--cfg-options",
            *fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm",
                            f"train.max_steps={steps}", "checkpoint.interval=0",
                            "schedule.policy=constant", "log.interval=1")]
    t0 = time.time()
    with open(log, "ab") as out:
        proc = subprocess.Popen([PYTHON, "-m", "elastic_det.train", *args], env=base_env(cache), cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if proc.wait(timeout=180) != 0:
            raise RuntimeError(f"resume run failed, see {log}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    records = [r for r in read_jsonl(work / "metrics.jsonl") if r.get("time", 0) > t0]
    resume = next(r for r in records if r.get("event") in ("resume", "start"))
    first = next(r for r in records if r.get("mode") == "train")
    return {"event": resume["event"], "step": resume["step"], "to_resume": resume["time"] - t0,
            "first_step": first["time"] - resume["time"], "total": first["time"] - t0}


def bench_resume(root: Path, repeats: int) -> tuple[list[dict], list[dict]]:
    cache, early = root / "cache", root / "early"
    timed_resume(early, cache, 10, root / "early-initial.log")  # a fresh run: its final checkpoint is step 10
    late = root / "late"
    late_copy(early, late, num_samples=96, batch=8)
    early_runs, late_runs = [], []
    for i in range(repeats):
        for work, base, out in ((early, 10, early_runs), (late, LATE, late_runs)):
            run = root / f"run-{work.name}-{i}"
            shutil.copytree(work, run)
            result = timed_resume(run, cache, base + 3, root / f"{run.name}.log")
            assert (result["event"], result["step"]) == ("resume", base), result
            out.append(result)
    return early_runs, late_runs


def seek_cost() -> dict[int, float]:
    """In-process: StepSchedule.at on a COCO-sized plan (118287 samples, batch 16), early vs late step."""
    out = {}
    for step in (10, 10**6):
        plan = ElasticBatchPlan(118_287, seed=0)
        start = time.perf_counter()
        StepSchedule(plan, 16, Progress()).at(step)
        out[step] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------------------------------------


def table(title: str, rows: list[dict], cols: list[str]) -> str:
    lines = [title, f"  {'':10s}" + "".join(f"{c:>12s}" for c in cols)]
    for i, r in enumerate(rows):
        lines.append(f"  {'run ' + str(i + 1):10s}" + "".join(f"{r[c]:11.2f}s" for c in cols))
    if len(rows) > 1:
        lines.append(f"  {'median':10s}" + "".join(f"{statistics.median(r[c] for r in rows):11.2f}s" for c in cols))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cycles", type=int, default=2, help="lose/rejoin cycles in the two-agent run")
    p.add_argument("--repeats", type=int, default=2, help="repeats of the early/late resume")
    p.add_argument("--keep", action="store_true", help="keep the work dirs and logs (printed)")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    try:
        t_start = time.time()
        lost, joined, info = bench_nodes(root, a.cycles)
        early, late = bench_resume(root, a.repeats)
        seek = seek_cost()
        cols = ["detection", "rendezvous", "restore", "first step", "total"]
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
              f"tiny_retinanet 64 px, global batch 8, step time at ws 2 ~{info['step_time']:.2f}s")
        print(f"rdzv-conf {RDZV_CONF}, --monitor-interval 0.2, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n")
        print(table("Lost node (SIGKILL of the second agent): world size 2 -> 1",
                    lost, ["watchdog", "survivor", "rendezvous", "restore", "first step", "total"]))
        print("  watchdog: kill -> the killed agent's orphaned worker exits (parent-death watchdog, 1 s poll)\n"
              "  survivor: -> the survivor's worker has exited (its gloo collective fails at once; most of this is\n"
              "            the interpreter's teardown after the error)\n"
              "  rendezvous: -> the agent has spawned the new worker; restore: -> resume event (python start,\n"
              "            process group, data, model, checkpoint); first step: -> first train record")
        print(f"  steps lost (last step reached - resume step; checkpoint.interval=5): {info['lost_steps']}\n")
        print(table("Node joins (new agent started): world size 1 -> 2", joined, cols))
        print("  detection: new agent's start-up + the running agent noticing the waiting node + its worker's\n"
              "            preemption save and exit\n")
        cols = ["to_resume", "first_step", "total"]
        print(table("Resume at step 10 (process start -> resume event -> first train record)", early, cols))
        print(table(f"Resume at step {LATE}", late, cols))
        ratio = statistics.median(r["total"] for r in late) / statistics.median(r["total"] for r in early)
        print(f"  late / early (total, medians): {ratio:.2f}")
        print(f"  StepSchedule.at on 118287 samples: step 10 {seek[10] * 1e3:.1f} ms, step 10**6 "
              f"{seek[10**6] * 1e3:.1f} ms (one permutation each)")
        print(f"\nbench wall time {time.time() - t_start:.0f}s")
    finally:
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
