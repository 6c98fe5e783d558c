"""No special node: the rendezvous store runs outside every training node (``python -m elastic_det.store``,
torch's TCPStore) and every agent runs with ``is_host=false``. Three agents as three nodes through the real
launcher (launch/elastic_run.sh -> supervisor -> torchrun): the first node started is SIGKILLed with its
whole process tree and the other two train on at world size 2; then the store is SIGKILLed and started
again with no state, and every supervisor re-rendezvouses by itself and training resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, base_env, descendants, events, fast_overrides, free_port, read_jsonl, wait_for

pytestmark = pytest.mark.slow

MAX_STEPS = 60


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def start_store(procs, port: int, log: Path) -> subprocess.Popen:
    store = procs.start([PYTHON, "-m", "elastic_det.store", "--host", "127.0.0.1", "--port", str(port)],
                        base_env(log.parent), log)
    wait_for(lambda: "serving the rendezvous store" in tail(log) or store.poll() is not None, 60, "the store")
    assert store.poll() is None, tail(log)
    return store


def node_cmd(port: int, train_args: list[str]) -> list[str]:
    return [str(REPO / "launch" / "elastic_run.sh"), "--nnodes=1:3", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=no-special-node", "--monitor-interval=0.2",
            "--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,is_host=false",
            "-m", "elastic_det.train", *train_args]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node: the supervisor and everything below it (workers run in their own sessions)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def train_records(work: Path) -> list[dict]:
    return [r for r in read_jsonl(work / "metrics.jsonl") if r.get("mode") == "train"]


def trained_at(work: Path, world_size: int, after: float) -> dict | None:
    """The first train record at ``world_size`` logged after ``after``."""
    return next((r for r in train_records(work) if r["world_size"] == world_size and r["time"] > after), None)


def test_any_node_and_the_store_itself_can_be_lost(tmp_path, procs):
    cache, work, port = tmp_path / "cache", tmp_path / "work", free_port()
    store = start_store(procs, port, tmp_path / "store.log")
    args = ["--work-dir", str(work), "--cfg-options",
            *fast_overrides(cache, "model.type=tiny_retinanet", "model.norm=group_norm", f"train.max_steps={MAX_STEPS}",
                            "data.global_batch_size=6", "checkpoint.interval=2", "dist.timeout_seconds=30")]
    env = base_env(cache, PYTHON=PYTHON, ELASTIC_RUN_QUIET="1", MAX_STALLED_ATTEMPTS="20")
    nodes = [procs.start(node_cmd(port, args), env, tmp_path / f"node-{i}.log") for i in range(3)]
    logs = lambda: "\n".join(f"node {i}:\n{tail(tmp_path / f'node-{i}.log')}" for i in range(3))  # noqa: E731
    wait_for(lambda: trained_at(work, 3, 0) or any(n.poll() is not None for n in nodes), 240, "training at ws 3")
    assert all(n.poll() is None for n in nodes), logs()
    assert "external store" in tail(tmp_path / "node-0.log", 100000), "the supervisor names the mode"

    # the first node started: with the store inside an agent it would have ended the job
    killed = time.time()
    kill_tree(nodes[0])
    shrunk = wait_for(lambda: trained_at(work, 2, killed) or any(n.poll() is not None for n in nodes[1:]), 120,
                      "training at ws 2 after the first node's loss")
    assert all(n.poll() is None for n in nodes[1:]), logs()
    print(f"first node lost -> training at ws 2 after {shrunk['time'] - killed:.1f} s")

    # the store: SIGKILLed, started again with no state on the same port
    store.kill()
    store.wait(timeout=30)
    lost = time.time()
    restarted = start_store(procs, port, tmp_path / "store-2.log")
    wait_for(lambda: [e for e in events(work, "resume") if e["time"] > lost] or
             any(n.poll() is not None for n in nodes[1:]), 180, "a resume after the store's restart")
    assert all(n.poll() is None for n in nodes[1:]), logs()
    after = [e for e in events(work, "resume") if e["time"] > lost][0]
    committed = [e["step"] for e in events(work, "checkpoint") if e["time"] < after["time"]]
    assert after["step"] >= max(committed), (after, committed)
    print(f"store lost -> resumed at step {after['step']} after {after['time'] - lost:.1f} s")

    for n in nodes[1:]:
        assert n.wait(timeout=300) == 0, logs()
    done = events(work, "done")
    assert done and done[-1]["step"] == MAX_STEPS
    restarted.terminate()
    assert restarted.wait(timeout=30) == 0


def test_the_store_says_why_it_cannot_start(tmp_path, procs):
    port = free_port()
    first = start_store(procs, port, tmp_path / "store.log")
    taken = subprocess.run([PYTHON, "-m", "elastic_det.store", "--host", "127.0.0.1", "--port", str(port)],
                           env=base_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert taken.returncode == 75, taken.stderr
    assert taken.stderr.count("elastic_det.store: error:") == 1 and f"127.0.0.1:{port}" in taken.stderr
    bad = subprocess.run([PYTHON, "-m", "elastic_det.store", "--port", "70000"], env=base_env(tmp_path), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--port 70000" in bad.stderr and "Traceback" not in bad.stderr
    first.terminate()
    assert first.wait(timeout=30) == 0


@pytest.mark.parametrize(("command", "env", "mode"), [
    (["--rdzv-backend=c10d", "--rdzv-endpoint", "store:29400", "--rdzv-conf=last_call_timeout=2,is_host=false"], {},
     "external store at store:29400"),
    ([], {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "node0:29400"}, "first-node mode"),
    (["--rdzv-backend", "etcd-v2", "--rdzv-endpoint", "etcd:2379"], {}, "external store (etcd at etcd:2379)"),
    (["--standalone"], {}, "standalone"),
])
def test_the_supervisor_names_the_rendezvous_mode(command, env, mode):
    from elastic_det.launch.checks import rendezvous_mode

    line = rendezvous_mode([PYTHON, "-m", "torch.distributed.run", *command, "-m", "elastic_det.train",
                            "--rdzv-conf", "is_host=true"], env)
    assert mode in line, line
