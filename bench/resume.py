"""Restart cost phase by phase under torchrun, resume cost, and lost work per preemption.

    python bench/resume.py                       # restart phases (3 per case) + fresh/resumed + lost steps
    python bench/resume.py --only restart --restarts 5
    python bench/resume.py --only lost --kills 3 --interval 5

1. Restart phases (``--only restart``): the embedded default (tiny FCOS, shapes; ``log.interval=1`` so every
   step is timed) under ``torchrun --nproc-per-node 2`` (gloo, CPU). Two cases, each repeated ``--restarts``
   times, each time at least one checkpoint after the previous restart:

   SIGKILL of a worker (the agent restarts both workers, ``--max-restarts``):
       survivor exit   kill -> the other worker has exited (the agent SIGTERMs it after noticing the
                       death; before the fix it sat in a collective whose peer was gone)
       respawn         -> the agent has spawned the new workers (its stop + rendezvous + spawn)
   SIGTERM preemption (to the agent, as Kubernetes or torchrun shutdown does) and relaunch, as a scheduler
   would, the moment torchrun exits:
       step + save     signal -> the preemption checkpoint is committed (the step in flight finished)
       workers exit    -> both workers have exited
       agent exit      -> torchrun has exited
       respawn         relaunch -> the new agent has spawned its workers (agent start-up + rendezvous)
   then, in both cases, per new worker (the slower of the two ranks at each mark), from its spawn:
       interpreter     -> the worker's Python is running our code
       imports         -> the trainer module and what it imports (torch, torchvision, ...) are imported
       dist            -> process group ready (init_process_group)
       data            -> training set built
       model           -> model built (and moved to the device)
       restore         -> checkpoint found, read, verified and applied
       first step      -> the first train record of the new attempt in metrics.jsonl (rank 0)

   Worker marks come from a probe: torchrun runs this file with ``--probe``, which records wall-clock
   times around the trainer's building blocks (found by name; a mark whose function is gone is left out)
   into one file per process, then runs ``elastic_det.train``. Process times come from polling /proc every
   5 ms. Targets (issue 9): SIGKILL -> next step <= 5 s, SIGTERM -> relaunch -> next step <= 6 s (medians).

2. ``--only lost``: process start to first training step, fresh vs. resumed (one process), and steps lost
   per preemption (SIGTERM: graceful; SIGKILL: hard kill, bounded by the checkpoint interval).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = ["train.validate=false", "log.interval=1", "log.progress_bar=never", "data.num_workers=0"]
PROBE_DIR_ENV = "ELASTIC_DET_BENCH_PROBE_DIR"
PROBE_PID_ENV = "ELASTIC_DET_BENCH_PROBE_PID"  # the PID torchrun knows (a warm child marks under it)
POLL = 0.005

# (mark, "module:attribute") whose first return is recorded by the probe; names the engine may lose are skipped
PROBED = [
    ("dist", "elastic_det.engine.dist:init_distributed"),
    ("data", "elastic_det.engine.trainer:build_dataset"),
    ("model", "elastic_det.engine.trainer:build_model"),
    ("checkpoint_found", "elastic_det.engine.trainer:_find_checkpoint"),
    ("checkpoint_found", "elastic_det.engine.state:find_checkpoint"),
    ("restore", "elastic_det.engine.trainer:_restore"),
    ("restore", "elastic_det.engine.state:restore"),
    ("first_compute", "elastic_det.engine.runner:Runner.run_step"),
]


# ----------------------------------------------------------------------------------------------------------
# the probe: torchrun runs ``bench/resume.py --probe TRAIN ARGS``


def probe_main(argv: list[str]) -> int:
    """The process torchrun starts: marks its start, then hands over to a warm child when the bench started
    a warm server (``probe_child`` runs there, marking under this PID), else runs ``probe_child`` itself."""
    started = time.time()
    os.environ[PROBE_PID_ENV] = str(os.getpid())
    _probe_mark("interpreter", started)
    try:
        from elastic_det.launch.warm_client import handoff
    except ImportError:  # a --baseline tree from before warm start
        return probe_child(argv)
    code = handoff("resume:probe_child", argv, extra_path=str(Path(__file__).resolve().parent))
    if code is not None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return probe_child(argv)


def _probe_mark(name: str, t: float | None = None) -> None:
    ident = {"pid": int(os.environ[PROBE_PID_ENV]), "rank": int(os.environ.get("RANK", "0")),
             "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    with open(Path(os.environ[PROBE_DIR_ENV]) / f"{ident['pid']}.jsonl", "a") as f:
        f.write(json.dumps({**ident, "mark": name, "t": t or time.time()}) + "\n")


def probe_child(argv: list[str]) -> int:
    mark = _probe_mark
    import importlib

    import elastic_det.train as entry

    try:
        importlib.import_module("elastic_det.engine.trainer")
    except ImportError:
        pass
    mark("imports")
    for name, target in PROBED:
        _wrap_first_return(target, lambda name=name: mark(name))
    _wrap_signal_handler(lambda: mark("signal"))
    try:
        code = entry.main(argv)
    except BaseException as e:
        mark(f"raised:{type(e).__name__}")
        raise
    mark("returned")
    exit_now = getattr(entry, "exit_now", None)  # what ``python -m elastic_det.train`` does after main, if any
    if exit_now is not None:
        exit_now(code)
    return code


def _resolve(target: str):
    import importlib

    module_name, attr = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _wrap_first_return(target: str, on_first) -> None:
    try:
        owner, name = _resolve(target)
        original = getattr(owner, name)
    except (ImportError, AttributeError):
        return
    done = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        if not done:
            done.append(True)
            on_first()
        return result

    setattr(owner, name, wrapper)


def _wrap_signal_handler(on_signal) -> None:
    import signal as sig

    original = sig.signal

    def install(signum, handler):
        if signum == sig.SIGTERM and callable(handler):
            def handle(s, frame, inner=handler):
                on_signal()
                return inner(s, frame)
            return original(signum, handle)
        return original(signum, handler)

    sig.signal = install


# ----------------------------------------------------------------------------------------------------------
# 1. restart phases


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


def children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in env if v.startswith(b"RANK=")).split(b"=", 1)[1])


def wait_until(condition, timeout: float = 300.0, what: str = "progress", interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark run made no progress: {what}")
        time.sleep(interval)


class Cluster:
    """torchrun with 2 workers running the probe, in its own session; killed by PID at the end. With
    ``warm``, each launch first starts a warm server and runs torchrun as ``elastic_det.torchrun`` (as the
    supervisor does on every node it runs on, where the checkout has them)."""

    def __init__(self, root: Path, tree: Path, cache: Path, options: list[str], max_restarts: int,
                 warm: bool = False) -> None:
        self.root, self.tree, self.work, self.probes = root, tree, root / "work", root / "probes"
        self.probes.mkdir(parents=True, exist_ok=True)
        self.warm = warm
        self.servers: list[subprocess.Popen] = []
        self.env = {**tree_env(tree, cache), PROBE_DIR_ENV: str(self.probes)}
        args = ["--work-dir", str(self.work), "--cfg-options", f"data.shapes.cache_dir={cache}",
                "log.interval=1", "log.progress_bar=never", "train.max_steps=100000", *options]
        from helpers import torchrun_cmd

        cmd = torchrun_cmd(2, args, max_restarts=max_restarts)
        monitor = cmd.index("--monitor-interval=0.2")
        cmd[monitor] = "--monitor-interval=0.1"  # torchrun's default, which the launchers keep
        module = cmd.index("-m", monitor)
        self.cmd = [*cmd[:module], str(Path(__file__).resolve()), "--probe", *cmd[module + 2:]]
        if warm and (tree / "elastic_det" / "torchrun.py").exists():  # torchrun as the supervisor runs it
            self.cmd[self.cmd.index("torch.distributed.run")] = "elastic_det.torchrun"
        self.agents: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def launch(self) -> subprocess.Popen:
        """A new torchrun (and warm server: a relaunch lands on a fresh node, whose server starts with it)."""
        env = self.env
        if self.warm:
            self.stop_servers()
            from elastic_det.launch.warm_server import start_server

            server_dir = self.root / f"warm-{len(self.agents)}"
            server_dir.mkdir()
            server, warm_env = start_server(str(server_dir))
            self.servers.append(server)
            env = {**env, **warm_env}
        with open(self.root / f"torchrun-{len(self.agents)}.log", "ab") as log:
            agent = subprocess.Popen(self.cmd, env=env, cwd=self.tree, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.agents.append(agent)
        return agent

    def workers(self, agent: subprocess.Popen) -> list[int]:
        pids = [p for p in children(agent.pid) if alive(p)]
        self.seen.update(pids)
        return pids

    def kill_all(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                self.workers(agent)
                os.killpg(agent.pid, signal.SIGKILL)
        for pid in self.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for agent in self.agents:
            agent.wait()
        self.stop_servers()

    def stop_servers(self) -> None:
        for server in self.servers:
            if server.poll() is None:
                server.terminate()
                server.wait()

    def probe_marks(self, pids: list[int]) -> dict[int, dict[str, float]]:
        out = {}
        for pid in pids:
            path = self.probes / f"{pid}.jsonl"
            marks: dict[str, float] = {}
            for line in path.read_text().splitlines() if path.exists() else []:
                r = json.loads(line)
                marks.setdefault(r["mark"], r["t"])
            out[pid] = marks
        return out

    def first_train_after(self, t: float) -> dict | None:
        return next((r for r in records(self.work) if r.get("mode") == "train" and r["time"] > t), None)

    def ledger_marks(self, t: float) -> dict[str, float]:
        """Phase marks of the goodput ledger (WORK_DIR/ledger.jsonl) after ``t``, when it exists."""
        path = self.work / "ledger.jsonl"
        out: dict[str, float] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            name, when = r.get("phase") or r.get("mark") or r.get("event"), r.get("time") or r.get("t")
            if isinstance(name, str) and isinstance(when, (int, float)) and when > t:
                out.setdefault(name, when)
        return out


WORKER_PHASES = [("interpreter", "interpreter"), ("imports", "imports"), ("dist", "dist"), ("data", "data"),
                 ("model", "model"), ("restore", "restore")]


def worker_phases(spawned: float, marks: dict[int, dict[str, float]], first_step: float) -> dict[str, float]:
    """Per phase, the slower rank's mark, as durations from the previous mark (spawn first)."""
    out, prev = {}, spawned
    for label, mark in WORKER_PHASES:
        times = [m[mark] for m in marks.values() if mark in m]
        if len(times) == len(marks) and times:
            out[label] = max(times) - prev
            prev = max(times)
    out["first step"] = first_step - prev
    return out


def bench_sigkill(root: Path, tree: Path, cache: Path, restarts: int,
                  options: list[str], warm: bool) -> tuple[list[dict], list[dict]]:
    c = Cluster(root, tree, cache, options, max_restarts=restarts + 1, warm=warm)
    rows, detail = [], []
    try:
        agent = c.launch()
        last = 0.0
        for i in range(restarts):
            # at least 2 steps past a checkpoint of this attempt (checkpoint.interval in options)
            wait_until(lambda t=last: any(r.get("event") == "checkpoint" and r["time"] > t for r in records(c.work)),
                       600, "a checkpoint")
            old = wait_until(lambda a=agent: len(c.workers(a)) == 2 and c.workers(a), 60, "two workers")
            victim = next(p for p in old if rank_of(p) == 1)
            (survivor,) = [p for p in old if p != victim]
            t0 = time.time()
            os.kill(victim, signal.SIGKILL)
            marks: dict[str, float] = {}
            new: list[int] = []
            while "first_step" not in marks:
                now = time.time()
                if "survivor_exit" not in marks and not alive(survivor):
                    marks["survivor_exit"] = now
                if "spawned" not in marks:
                    new = [p for p in c.workers(agent) if p not in old]
                    if len(new) == 2:
                        marks["spawned"] = now
                if "spawned" in marks and (rec := c.first_train_after(marks["spawned"])):
                    marks["first_step"] = rec["time"]
                if agent.poll() is not None:
                    raise RuntimeError(f"torchrun exited, see {c.root}")
                if now - t0 > 300:
                    raise TimeoutError(f"no step after kill {i}: {marks}")
                time.sleep(POLL)
            old_marks = c.probe_marks([survivor])[survivor]
            probe = c.probe_marks(new)
            row = {"survivor exit": marks["survivor_exit"] - t0, "respawn": marks["spawned"] - marks["survivor_exit"],
                   **worker_phases(marks["spawned"], probe, marks["first_step"]), "total": marks["first_step"] - t0}
            rows.append(row)
            detail.append({"survivor_signal": old_marks.get("signal", float("nan")) - t0,
                           "survivor_end": {k: v - t0 for k, v in old_marks.items() if k.startswith("raised")},
                           "ledger": {k: v - t0 for k, v in c.ledger_marks(t0).items()}})
            last = marks["first_step"]
    finally:
        c.kill_all()
    return rows, detail


def bench_sigterm(root: Path, tree: Path, cache: Path, restarts: int, options: list[str],
                  warm: bool) -> list[dict]:
    c = Cluster(root, tree, cache, options, max_restarts=1, warm=warm)
    rows = []
    try:
        agent = c.launch()
        last = 0.0
        for i in range(restarts):
            wait_until(lambda t=last: any(r.get("event") == "checkpoint" and r["time"] > t for r in records(c.work)),
                       600, "a checkpoint")
            old = wait_until(lambda a=agent: len(c.workers(a)) == 2 and c.workers(a), 60, "two workers")
            t0 = time.time()
            agent.send_signal(signal.SIGTERM)
            marks: dict[str, float] = {}
            while agent.poll() is None or any(alive(p) for p in old):
                if "workers_exit" not in marks and not any(alive(p) for p in old):
                    marks["workers_exit"] = time.time()
                time.sleep(POLL)
            marks["agent_exit"] = time.time()
            marks.setdefault("workers_exit", marks["agent_exit"])
            agent = c.launch()
            new: list[int] = []
            while "first_step" not in marks:
                now = time.time()
                if "spawned" not in marks:
                    new = c.workers(agent)
                    if len(new) == 2:
                        marks["spawned"] = now
                if "spawned" in marks and (rec := c.first_train_after(marks["agent_exit"])):
                    marks["first_step"] = rec["time"]
                if agent.poll() is not None:
                    raise RuntimeError(f"relaunched torchrun exited, see {c.root}")
                if now - t0 > 300:
                    raise TimeoutError(f"no step after preemption {i}: {marks}")
                time.sleep(POLL)
            preempt = [r for r in records(c.work) if r.get("event") == "preempt" and r["time"] > t0]
            resume = [r for r in records(c.work) if r.get("event") == "resume" and r["time"] > t0]
            assert preempt and resume and resume[0]["step"] == preempt[0]["step"], (preempt, resume)
            saved = [r["time"] for r in records(c.work) if r.get("event") == "checkpoint" and r["time"] > t0
                     and r.get("reason") == "preempt"][0]
            rows.append({"step + save": saved - t0, "workers exit": marks["workers_exit"] - saved,
                         "agent exit": marks["agent_exit"] - marks["workers_exit"],
                         "respawn": marks["spawned"] - marks["agent_exit"],
                         **worker_phases(marks["spawned"], c.probe_marks(new), marks["first_step"]),
                         "total": marks["first_step"] - t0})
            last = marks["first_step"]
    finally:
        c.kill_all()
    return rows


def table(title: str, rows: list[dict], width: int = 9) -> str:
    cols = list(rows[0])
    lines = [title, f"  {'':7s}" + "".join(f"{c:>{max(width, len(c) + 1)}s}" for c in cols)]
    fmt = lambda c, v: f"{v:{max(width, len(c) + 1) - 1}.2f}s"  # noqa: E731
    for i, r in enumerate(rows):
        lines.append(f"  {'run ' + str(i + 1):7s}" + "".join(fmt(c, r.get(c, float('nan'))) for c in cols))
    lines.append(f"  {'median':7s}" + "".join(fmt(c, statistics.median(r.get(c, float('nan')) for r in rows))
                                             for c in cols))
    return "\n".join(lines)


def tree_env(tree: Path, cache: Path) -> dict[str, str]:
    """The tests' environment for a torchrun job, importing elastic_det from ``tree``."""
    from helpers import base_env

    return {**base_env(cache), "PYTHONPATH": str(tree)}


def export_tree(rev: str, into: Path) -> Path:
    """The files of commit ``rev`` (``git archive``), to time the code as it was."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def restart_section(root: Path, restarts: int, baseline: str | None) -> None:
    options = ["checkpoint.interval=5"]
    cache = root / "cache"
    # (label, code, warm start): the warm server is what the supervisor runs for every launcher
    trees = [("cold (this checkout, every worker imports torch)", REPO, False),
             ("warm start (this checkout, workers forked from the warm server)", REPO, True)]
    if baseline:
        trees.insert(0, (f"before ({baseline})", export_tree(baseline, root / "baseline"), False))
    # generate the shapes set once, outside the timed runs
    subprocess.run([sys.executable, "-m", "elastic_det.train", "--work-dir", str(root / "warmup"), "--cfg-options",
                    f"data.shapes.cache_dir={cache}", "train.max_steps=1", "train.validate=false",
                    "log.progress_bar=never"], env=tree_env(REPO, cache), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t, load = time.time(), os.getloadavg()[0]
    killed = {}  # case by case, the trees one after the other: both see about the same load
    for i, (label, tree, warm) in enumerate(trees):
        killed[label] = bench_sigkill(root / f"kill-{i}", tree, cache, restarts, options, warm)
    results = {}
    for i, (label, tree, warm) in enumerate(trees):
        results[label] = (*killed[label], bench_sigterm(root / f"term-{i}", tree, cache, restarts, options, warm))
    print(f"embedded default (tiny FCOS, shapes), torchrun --nproc-per-node 2, gloo, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {', '.join(options)}, "
          "log.interval=1\n")
    for label, (kill, detail, term) in results.items():
        print(f"== {label}")
        print(table("SIGKILL of a worker -> next training step (target: median total <= 5 s)", kill))
        for i, d in enumerate(detail):
            ledger = ", ".join(f"{k} {v:.2f}s" for k, v in d["ledger"].items())
            print(f"  run {i + 1}: survivor got SIGTERM at {d['survivor_signal']:.2f}s, "
                  f"ended with {d['survivor_end'] or 'no exception'}" + (f"; ledger.jsonl: {ledger}" if ledger else ""))
        print()
        print(table("SIGTERM preemption -> relaunch -> next training step (target: median total <= 6 s)", term))
        print()
    medians = {label: {case: statistics.median(r["total"] for r in rows) for case, rows in
                       (("kill", kill), ("term", term))} for label, (kill, _, term) in results.items()}
    for label, m in medians.items():
        print(f"  {label}: median total SIGKILL {m['kill']:.2f} s (target 5), SIGTERM {m['term']:.2f} s (target 6)")
    (_, cold), (_, warm) = list(medians.items())[-2:]
    print(f"  warm / cold: SIGKILL {warm['kill'] / cold['kill']:.2f}, SIGTERM {warm['term'] / cold['term']:.2f}")
    if baseline:
        b = next(iter(medians.values()))
        print(f"  warm / before: SIGKILL {warm['kill'] / b['kill']:.2f}, SIGTERM {warm['term'] / b['term']:.2f}")
    print(f"  bench {time.time() - t:.0f}s\n")


# ----------------------------------------------------------------------------------------------------------
# 2. one process: start-up and lost steps


def launch(work: Path, *options: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "elastic_det.train", "--work-dir", str(work), "--cfg-options", *BASE, *options]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=REPO)


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


def lost_section(tmp: Path, kills: int, interval: int) -> None:
    rng = random.Random(0)
    work = tmp / "run"
    fresh = start_to_first_step(work, "train.max_steps=20", "checkpoint.interval=10")
    resumed = start_to_first_step(work, "train.max_steps=25", "checkpoint.interval=10")
    term = [sigterm_lost(tmp / f"term{i}", at_step=3 + 2 * i) for i in range(kills)]
    kill = [sigkill_lost(tmp / f"kill{i}", interval, rng) for i in range(kills)]
    print("embedded default (tiny FCOS, shapes, 1 process, CPU)")
    print(f"process start -> first training step, fresh  : {fresh:6.2f} s")
    print(f"process start -> first training step, resumed: {resumed:6.2f} s   (ratio {resumed / fresh:.2f})")
    print(f"steps lost per SIGTERM (graceful)            : {term}   (target 0)")
    print(f"steps lost per SIGKILL, checkpoint.interval={interval}: {kill}   (target <= {interval})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        sys.exit(probe_main(sys.argv[2:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["restart", "lost", "all"], default="all")
    p.add_argument("--restarts", type=int, default=3, help="restarts per case in the phase tables")
    p.add_argument("--baseline", metavar="REV", help="also time the restarts of commit REV (git archive), first")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the work dirs, probe files and torchrun logs")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO / "tests"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        if args.only in ("restart", "all"):
            restart_section(tmp / "restart", args.restarts, args.baseline)
        if args.only in ("lost", "all"):
            lost_section(tmp / "lost", args.kills, args.interval)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
