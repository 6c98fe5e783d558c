"""Restore once per node: a checkpoint on S3 is read from the endpoint once per node, the node's other ranks
load a local copy verified by its digest, and every guarantee of the load stays (verify before load, fall
back past a broken checkpoint, exit 75 and no fallback when the store fails mid-read, the same error on
every rank). Bytes are counted at the endpoint: tests/faulty_s3.py in front of the moto server."""

from __future__ import annotations

import subprocess
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from faulty_s3 import Fault, FaultyS3
from helpers import REPO, base_env, fast_overrides, read_jsonl, run_train, torchrun_cmd
from s3 import s3_env

from elastic_det.checkpoint import CheckpointStore, step_dir
from elastic_det.checkpoint.node_copy import NodeCopies
from elastic_det.errors import StorageUnavailableError, exit_code_for
from elastic_det.storage import WorkDir

META = {"config_hash": "cfg", "world_size": 2, "reason": "interval", "metrics": {}}
DATA = r"/checkpoints/step-\d+/state-[0-9a-f]+\.pt"


@pytest.fixture
def proxy(s3_server):
    started = FaultyS3(s3_server.endpoint).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def url(proxy, s3_server, monkeypatch) -> str:
    """A fresh bucket, reached through the counting proxy (``AWS_ENDPOINT_URL`` points at it)."""
    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{s3_server.create_bucket('copies')}/run"
    s3fs.S3FileSystem.clear_instance_cache()


def make_state(step: int, mb: int = 2) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"model": OrderedDict(w=torch.randn(mb * 2**18, generator=g)), "progress": {"global_step": step}}


def saved(url: str, s3_server, *steps: int) -> dict[int, int]:
    """Commit ``steps`` straight to moto; their data sizes."""
    store = CheckpointStore(WorkDir(url, {"endpoint_url": s3_server.endpoint}), keep_last=0)
    return {step: store.save(step, make_state(step), META).size for step in steps}


def rank_store(url: str, root: Path, events: list | None = None) -> CheckpointStore:
    """What one rank of the node builds: its own store, the node's copy folder."""
    on_event = events.append if events is not None else (lambda e: None)
    return CheckpointStore(WorkDir(url, timeout=2.0), on_event=on_event, node_copies=NodeCopies(str(root)))


def test_the_ranks_of_a_node_read_a_checkpoint_from_the_store_once(url, proxy, s3_server, tmp_path):
    sizes = saved(url, s3_server, 10, 20)
    results: list = [None] * 4

    def load(i: int) -> None:
        results[i] = rank_store(url, tmp_path / "copies").load_latest()

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]  # four ranks at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [r.manifest.step for r in results] == [20] * 4
    for r in results:
        assert torch.equal(r.state["model"]["w"], make_state(20)["model"]["w"])
    assert proxy.bytes_served(DATA) == sizes[20]
    # a later restart on the same node (its copy still there) reads no checkpoint data at all
    assert rank_store(url, tmp_path / "copies").load_latest().manifest.step == 20
    assert proxy.bytes_served(DATA) == sizes[20]
    # without copies each rank reads it (the behaviour before)
    CheckpointStore(WorkDir(url)).load_latest()
    assert proxy.bytes_served(DATA) == 2 * sizes[20]


def test_a_damaged_node_copy_is_read_again_from_the_store_and_is_no_fallback(url, proxy, s3_server, tmp_path):
    sizes = saved(url, s3_server, 10, 20)
    rank_store(url, tmp_path / "copies").load_latest()
    (copy,) = [p for p in (tmp_path / "copies").iterdir() if len(p.name) == 40]
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte on the node's disk
    copy.write_bytes(bytes(data))
    events: list[dict] = []
    checkpoint = rank_store(url, tmp_path / "copies", events).load_latest()
    assert checkpoint.manifest.step == 20 and events == []
    assert torch.equal(checkpoint.state["model"]["w"], make_state(20)["model"]["w"])
    assert proxy.bytes_served(DATA) == 2 * sizes[20]


def test_a_broken_checkpoint_is_read_once_per_node_and_every_rank_falls_back(url, proxy, s3_server, tmp_path):
    sizes = saved(url, s3_server, 10, 20)
    client, bucket = s3_server.client(), url.split("/")[2]
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"run/{step_dir(20)}/")["Contents"]
               if o["Key"].endswith(".pt"))
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the digest tells
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    for rank in range(3):
        events: list[dict] = []
        checkpoint = rank_store(url, tmp_path / "copies", events).load_latest()
        assert checkpoint.manifest.step == 10, rank
        assert [e["step"] for e in events] == [20] and "corrupted" in events[0]["reason"], events
    assert proxy.bytes_served(r"step-00000020/state-") == sizes[20]  # the broken one read by the first rank only
    assert proxy.bytes_served(r"step-00000010/state-") == sizes[10]


@pytest.mark.parametrize("kind", ["reset_response", "stall"])
def test_a_store_failing_mid_read_is_exit_75_and_leaves_no_copy(url, proxy, s3_server, tmp_path, kind):
    saved(url, s3_server, 10, 20)
    proxy.add(Fault(kind, method="GET", path=DATA, times=0, seconds=60))
    events: list[dict] = []
    with pytest.raises(StorageUnavailableError) as raised:
        rank_store(url, tmp_path / "copies", events).load_latest()
    assert exit_code_for(raised.value) == 75
    assert events == []  # not a fallback to step 10: the newest checkpoint may be fine
    assert [p.name for p in (tmp_path / "copies").iterdir() if not p.name.endswith(".lock")] == []
    proxy.clear()
    assert rank_store(url, tmp_path / "copies").load_latest().manifest.step == 20


def test_a_copy_folder_that_cannot_be_written_reads_from_the_store(url, proxy, s3_server, tmp_path, caplog):
    sizes = saved(url, s3_server, 20)
    (tmp_path / "file").write_text("not a folder")
    for _ in range(2):
        assert rank_store(url, tmp_path / "file" / "copies").load_latest().manifest.step == 20
    assert proxy.bytes_served(DATA) == 2 * sizes[20]
    assert "reads checkpoints from the store itself" in caplog.text


def test_two_ranks_under_torchrun_read_once_and_share_a_store_failure(url, proxy, s3_server, tmp_path):
    """The trainer: a restart of 2 real ranks reads the checkpoint from the endpoint once; with the store
    failing mid-read both ranks stop with exit 75 and the same one-paragraph error."""
    cache = tmp_path / "cache"
    args = ["--work-dir", url, "--cfg-options",
            *fast_overrides(cache, "train.max_steps=2", "checkpoint.interval=2")]
    env = base_env(cache, **s3_env(proxy.endpoint))
    first = run_train(args, env)
    assert first.returncode == 0, first.stdout[-3000:]
    size = CheckpointStore(WorkDir(url)).load_latest().manifest.size
    with proxy._lock:
        proxy.log.clear()
    resumed = subprocess.run(torchrun_cmd(2, args), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert proxy.bytes_served(DATA) == size  # not 2x: one read for the node

    for p in cache.glob("data-cache/checkpoints/*"):
        p.unlink()  # a fresh node
    proxy.add(Fault("reset_response", method="GET", path=DATA, times=0))
    failed = subprocess.run(torchrun_cmd(2, args), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if "elastic_det: error:" in line]
    assert failed.returncode != 0
    assert len(errors) == 2 and errors[0].split("error:", 1)[1] == errors[1].split("error:", 1)[1], errors
    assert "exitcode  : 75" in failed.stderr and "exitcode  : 1" not in failed.stderr, failed.stderr[-3000:]
    local = tmp_path / "metrics.jsonl"
    local.write_bytes(s3_server.client().get_object(Bucket=url.split("/")[2], Key="run/metrics.jsonl")["Body"].read())
    assert not [r for r in read_jsonl(local) if r.get("event") == "fallback"]


def test_node_copies_are_bounded(tmp_path, url, proxy, s3_server):
    saved(url, s3_server, 10, 20, 30, 40)
    store = rank_store(url, tmp_path / "copies")
    for step in (10, 20, 30, 40):
        assert store.load(store.location(step)).manifest.step == step
    assert len([p for p in (tmp_path / "copies").iterdir() if len(p.name) == 40]) == 2

