"""Shared by the end-to-end tests: free ports, torchrun processes cleaned up by PID, polling with deadlines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A run that takes seconds: tiny model, tiny images, tiny synthetic set, no evaluation.
FAST = [
    "model.width=32", "model.min_size=64", "model.max_size=64",
    "data.shapes.num_train=96", "data.shapes.num_val=16", "data.shapes.image_size=64",
    "data.global_batch_size=8", "data.num_workers=0", "data.train_transforms.flip_prob=0.5",
    "train.validate=false", "log.interval=1", "log.progress_bar=never",
    "schedule.warmup_steps=2", "optimizer.type=sgd", "optimizer.lr=0.01", "optimizer.weight_decay=0.0001",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "LOCAL_RANK", "RANK"))}
    env.update(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               ELASTIC_DET_TEST="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def fast_overrides(cache_dir: Path, *more: str) -> list[str]:
    return [*FAST, f"data.shapes.cache_dir={cache_dir}", f"data.cache.dir={cache_dir}/data-cache", *more]


def torchrun_cmd(nproc: int, train_args: list[str], max_restarts: int = 0, extra: list[str] | None = None,
                 nnodes: str = "1", rdzv_port: int | None = None, run_id: str = "test") -> list[str]:
    port = rdzv_port or free_port()
    return [PYTHON, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={run_id}",
            "--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2", *(extra or []),
            "-m", "elastic_det.train", *train_args]


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Kill what this test started: the process and its session (torchrun's workers run in their own)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return lines


def events(work_dir: Path, name: str | None = None) -> list[dict]:
    return [r for r in read_jsonl(work_dir / "metrics.jsonl") if "event" in r and (name is None or r["event"] == name)]


def train_steps(work_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(work_dir / "metrics.jsonl") if r.get("mode") == "train"]


def run_train(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "elastic_det.train", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------------------
# Processes: everything a test starts is killed by PID at its end, orphaned workers included.


def children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def is_torchrun(pid: int) -> bool:
    """A torchrun agent: ``torch.distributed.run``, or ``elastic_det.torchrun`` as the supervisor starts it."""
    line = cmdline(pid)
    return "torch.distributed.run" in line or "elastic_det.torchrun" in line


def alive(pid: int) -> bool:
    """Running (a zombie, or a PID gone from /proc, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Procs:
    """Started processes and every descendant seen; ``kill_all`` SIGKILLs them by PID (workers run in their
    own sessions, and a worker of a killed agent is no longer in its tree)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()

    def start(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def remember(self, proc: subprocess.Popen) -> list[int]:
        pids = descendants(proc.pid)
        self.seen.update(pids)
        return pids

    def kill_all(self) -> None:
        pids = set(self.seen)
        for proc in self.procs:
            if proc.poll() is None:
                pids.update(descendants(proc.pid))
                pids.add(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
