"""Checkpoints on an S3 endpoint that throttles, resets connections and stalls (tests/faulty_s3.py in front
of the moto server): a save commits or fails cleanly within a bound, and a load never takes a partial
object for a good one (nor a good one for a broken one)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict

import pytest
import torch
from faulty_s3 import Fault, FaultyS3
from s3 import s3_env

from elastic_det.checkpoint import CheckpointStore, Manifest, step_dir
from elastic_det.errors import StorageUnavailableError, exit_code_for
from elastic_det.storage import WorkDir

TIMEOUT = 1.0  # checkpoint.timeout_seconds in these tests
BOUND = 4 * TIMEOUT + 4 + 6  # 4 tries of one request, their back-off (<= 4 s), the rest of the save (loaded machine)
SMALL_BLOCK = {"default_block_size": 5 * 2**20}  # a 12 MB state is a multipart upload of 3 parts
META = {"config_hash": "cfg", "world_size": 2, "reason": "interval", "metrics": {}}
DATA_PUT = r"/checkpoints/step-\d+/state-[0-9a-f]+\.pt"
MANIFEST = r"/checkpoints/step-\d+/manifest\.json"
FAULT_KINDS = ["503", "reset_request", "reset_response", "stall"]


@pytest.fixture
def proxy(s3_server):
    started = FaultyS3(s3_server.endpoint).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def url(proxy, s3_server, monkeypatch) -> str:
    """A fresh bucket, reached through the proxy (``AWS_ENDPOINT_URL`` points at it)."""
    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{s3_server.create_bucket('faults')}/run"
    s3fs.S3FileSystem.clear_instance_cache()


def make_state(step: int, mb: int = 0) -> dict:
    g = torch.Generator().manual_seed(step)
    numel = mb * 2**20 // 4 or 1000
    return {"model": OrderedDict(w=torch.randn(numel, generator=g)), "progress": {"global_step": step}}


def faulty_store(url: str, multipart: bool = False) -> CheckpointStore:
    return CheckpointStore(WorkDir(url, SMALL_BLOCK if multipart else None, timeout=TIMEOUT), keep_last=0)


def direct(url: str, s3_server) -> CheckpointStore:
    """The same work dir, straight to moto: what the store really holds."""
    return CheckpointStore(WorkDir(url, {"endpoint_url": s3_server.endpoint}))


def assert_every_commit_is_whole(url: str, s3_server) -> list[int]:
    """Every step with a manifest loads, with size and sha256 verified; returns those steps."""
    store = direct(url, s3_server)
    steps = store._manifest_steps()
    for step in steps:
        checkpoint = store.load(store.location(step))  # CheckpointError if anything is partial
        assert checkpoint.state["progress"]["global_step"] == step
    return steps


def unfinished_uploads(url: str, s3_server) -> list[str]:
    bucket = url.split("/")[2]
    return [u["Key"] for u in s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def timed(fn):
    start = time.monotonic()
    try:
        return fn(), None, time.monotonic() - start
    except Exception as e:  # the test inspects what was raised
        return None, e, time.monotonic() - start


# ----------------------------------------------------------------------------------------------------------
# Saves


@pytest.mark.parametrize("kind", ["503", "reset_request", "reset_response"])
@pytest.mark.parametrize("multipart", [False, True], ids=["single", "multipart"])
def test_one_fault_during_a_save_is_retried(url, proxy, s3_server, kind, multipart):
    store = faulty_store(url, multipart)
    path = DATA_PUT + (r"\?partNumber=2" if multipart else "")
    proxy.add(Fault(kind, method="PUT", path=path))
    manifest = store.save(10, make_state(10, 12 if multipart else 0), META)
    assert manifest.step == 10
    assert len(proxy.served(kind)) == 1
    assert assert_every_commit_is_whole(url, s3_server) == [10]
    assert unfinished_uploads(url, s3_server) == []


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("target", ["data", "manifest"])
def test_a_failing_store_fails_the_save_cleanly_and_in_time(url, proxy, s3_server, kind, target):
    store = faulty_store(url, multipart=True)
    store.save(10, make_state(10), META)
    proxy.add(Fault(kind, method="PUT", path=DATA_PUT if target == "data" else MANIFEST, times=0, seconds=120))
    manifest, error, seconds = timed(lambda: store.save(20, make_state(20, 12), META))
    assert proxy.served(kind), "the fault never applied"
    assert seconds < BOUND, f"a save against a {kind} store took {seconds:.1f} s"
    committed = assert_every_commit_is_whole(url, s3_server)
    if error is None:
        # only possible when the store acted on a request whose answer was lost: it must be a full commit
        assert kind == "reset_response" and target == "manifest" and manifest.step == 20
        assert committed == [10, 20]
    else:
        assert isinstance(error, StorageUnavailableError), repr(error)
        assert exit_code_for(error) == 75
        assert "step-00000020" in str(error)
        assert committed == [10]
    proxy.clear()
    assert store.save(30, make_state(30), META).step == 30  # the store recovers: the next save commits
    assert direct(url, s3_server).load_latest().manifest.step == 30
    assert unfinished_uploads(url, s3_server) == []


def test_a_stalled_store_does_not_hold_a_save_longer_than_the_bound(url, proxy, s3_server):
    """Every kind of request of a save stalls in turn (listing, upload start, part, complete, manifest)."""
    store = faulty_store(url, multipart=True)
    store.save(10, make_state(10), META)
    for method, path in [("GET", r"list-type=2"), ("POST", r"\?uploads"), ("PUT", r"partNumber=1"),
                         ("POST", r"uploadId="), ("HEAD", DATA_PUT), ("PUT", MANIFEST)]:
        proxy.clear()
        proxy.add(Fault("stall", method=method, path=path, times=0, seconds=120))
        step = 20 + len(proxy.served())
        _, error, seconds = timed(lambda step=step: store.save(step, make_state(step, 12), META))
        assert proxy.served("stall"), f"no {method} {path} request was stalled"
        assert isinstance(error, StorageUnavailableError), (method, path, error)
        assert seconds < BOUND, f"{method} {path}: {seconds:.1f} s"
    assert assert_every_commit_is_whole(url, s3_server) == [10]


def test_workdir_write_under_faults_publishes_nothing_partial(url, proxy, s3_server):
    wd = WorkDir(url, SMALL_BLOCK, timeout=TIMEOUT)
    data = bytes(range(256)) * (12 * 2**20 // 256)
    proxy.add(Fault("reset_request", method="PUT", path=r"partNumber=", times=0))
    with pytest.raises(StorageUnavailableError):
        wd.write_bytes_atomic("big.bin", data)
    assert not direct(url, s3_server).work_dir.exists("big.bin")
    assert unfinished_uploads(url, s3_server) == []
    proxy.clear()
    wd.write_bytes_atomic("big.bin", data)
    assert direct(url, s3_server).work_dir.read_bytes("big.bin") == data


# ----------------------------------------------------------------------------------------------------------
# Loads


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_a_failing_store_never_turns_a_good_checkpoint_into_a_fallback(url, proxy, s3_server, kind):
    store = faulty_store(url)
    store.save(10, make_state(10), META)
    store.save(20, make_state(20), META)
    events: list[dict] = []
    resumed = CheckpointStore(WorkDir(url, timeout=TIMEOUT), on_event=events.append)
    proxy.add(Fault(kind, method="GET", path=DATA_PUT, times=0, seconds=120))
    _, error, seconds = timed(resumed.load_latest)
    assert isinstance(error, StorageUnavailableError), repr(error)
    assert exit_code_for(error) == 75
    assert seconds < BOUND
    assert events == []  # not a fallback to step 10: the newest checkpoint may be fine
    proxy.clear()
    checkpoint = resumed.load_latest()
    assert checkpoint.manifest.step == 20
    assert torch.equal(checkpoint.state["model"]["w"], make_state(20)["model"]["w"])


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_one_fault_during_a_load_is_retried_and_the_object_is_whole(url, proxy, s3_server, kind):
    store = faulty_store(url)
    state = make_state(20, 3)
    store.save(20, state, META)
    proxy.add(Fault(kind, method="GET", path=DATA_PUT, seconds=120))
    checkpoint = CheckpointStore(WorkDir(url, timeout=TIMEOUT)).load_latest()
    assert proxy.served(kind)
    assert checkpoint.manifest.step == 20
    assert torch.equal(checkpoint.state["model"]["w"], state["model"]["w"])


def test_a_large_object_cut_mid_answer_is_read_again(url, proxy, s3_server):
    """Above s3fs's 50 MB read block a body cut by a reset is not retried by s3fs: WorkDir reads again."""
    raw = direct(url, s3_server).work_dir
    data = bytes(range(256)) * (60 * 2**20 // 256)
    raw.write_bytes_atomic("big.bin", data)
    proxy.add(Fault("reset_response", method="GET", path=r"/big\.bin"))
    assert WorkDir(url, timeout=TIMEOUT).read_bytes("big.bin") == data
    assert len(proxy.served("reset_response")) == 1


def test_a_partial_object_under_a_manifest_is_never_loaded(url, proxy, s3_server):
    """A manifest whose data object was cut short (written by another tool, or damaged): fallback."""
    store = faulty_store(url)
    store.save(10, make_state(10), META)
    store.save(20, make_state(20, 3), META)
    raw = direct(url, s3_server).work_dir
    manifest = Manifest.from_json(raw.read_bytes(f"{step_dir(20)}/manifest.json"))
    blob = raw.read_bytes(f"{step_dir(20)}/{manifest.data}")
    raw.write_bytes_atomic(f"{step_dir(20)}/{manifest.data}", blob[: len(blob) // 2])
    events: list[dict] = []
    checkpoint = CheckpointStore(WorkDir(url, timeout=TIMEOUT), on_event=events.append).load_latest()
    assert checkpoint.manifest.step == 10
    assert [e["step"] for e in events] == [20] and "truncated" in events[0]["reason"]
    assert CheckpointStore(WorkDir(url, timeout=TIMEOUT)).committed_steps() == [10]


# ----------------------------------------------------------------------------------------------------------
# End to end: torchrun, 2 processes, a work dir on S3 through the proxy, faults during saves


E2E_TIMEOUT = 5.0  # checkpoint.timeout_seconds of the run (moto answers slowly while two ranks train)
E2E_EXTRA = 4 * E2E_TIMEOUT + 4 + 6  # what a failing request may add to a save: 4 tries, back-off, slack


def save_holds(records: list[dict]) -> dict[int, float]:
    """Step -> seconds from rank 0's train record of a save step to its checkpoint (or failure) event.

    Rank 0 saves after logging the step; the other rank waits for it at the next collective, so this is
    how long a save held every rank at the barrier.
    """
    logged = {r["step"]: r["time"] for r in records if r.get("mode") == "train"}
    done = {r["step"]: r["time"] for r in records if r.get("event") in ("checkpoint", "checkpoint_failed")}
    return {step: done[step] - logged[step] for step in done if step in logged}


@pytest.mark.slow
def test_training_under_storage_faults(tmp_path, s3_server, proxy, url, procs):
    from helpers import base_env, fast_overrides, torchrun_cmd, wait_for

    cache = tmp_path / "cache"
    max_steps = 24
    # each fault counts the requests it matches itself; retries count too
    proxy.add(Fault("503", method="PUT", path=DATA_PUT, skip=1, times=1))  # retried: commits
    proxy.add(Fault("reset_request", method="PUT", path=DATA_PUT, skip=3, times=1))  # retried: commits
    proxy.add(Fault("stall", method="PUT", path=MANIFEST, skip=4, times=4, seconds=300))  # a save fails
    proxy.add(Fault("reset_response", method="PUT", path=DATA_PUT, skip=8, times=4))  # a save fails
    proxy.add(Fault("503", method="PUT", path=MANIFEST, skip=10, times=4))  # a save fails
    env = base_env(cache, **s3_env(proxy.endpoint), HOME=str(tmp_path / "home"))
    args = ["--work-dir", url, "--cfg-options",
            *fast_overrides(cache, f"train.max_steps={max_steps}", "checkpoint.interval=2", "checkpoint.keep_last=0",
                            "checkpoint.max_failures=3", f"checkpoint.timeout_seconds={E2E_TIMEOUT}")]
    log = tmp_path / "torchrun.log"
    start = time.monotonic()
    proc = procs.start(torchrun_cmd(2, args), env, log)
    wait_for(lambda: proc.poll() is not None, 600, "the run to end")
    wall = time.monotonic() - start
    text = log.read_text()
    assert proc.returncode in (0, 75), text[-4000:]
    if proc.returncode == 75:  # a clean stop: one paragraph, no traceback
        assert "Traceback" not in text, text[-4000:]

    store = direct(url, s3_server)
    records = [json.loads(line) for line in store.work_dir.read_bytes("metrics.jsonl").decode().splitlines()]
    committed_events = [r["step"] for r in records if r.get("event") == "checkpoint"]
    failed_events = [r["step"] for r in records if r.get("event") == "checkpoint_failed"]
    committed = assert_every_commit_is_whole(url, s3_server)  # every manifest's object is complete
    assert set(committed_events) <= set(committed)
    assert not set(failed_events) & set(committed)  # a failed save left no commit behind
    assert failed_events and committed_events, (committed_events, failed_events)
    if proc.returncode == 0:
        assert max(committed) == max_steps
    holds = save_holds(records)
    longest = max(holds.values())
    typical = sorted(holds[s] for s in committed_events if s in holds)[len(committed_events) // 2]
    bound = typical + E2E_EXTRA  # no rank waits at the barrier longer than a save plus one failing request
    assert longest < bound, (bound, holds)
    served = {kind: len(proxy.served(kind)) for kind in KINDS_SERVED}
    assert all(served.values()), served

    proxy.clear()
    proxy.add(Fault("reset_response", method="GET", path=DATA_PUT, times=1))  # resume through one more fault
    resumed = CheckpointStore(WorkDir(url, timeout=E2E_TIMEOUT)).load_latest()
    assert resumed.manifest.step == max(committed)
    assert resumed.state["progress"]["global_step"] == max(committed)

    normal = sorted(b - a for a, b in zip(
        [r["time"] for r in records if r.get("mode") == "train"],
        [r["time"] for r in records if r.get("mode") == "train"][1:], strict=False))
    print(f"\nfaults e2e: exit {proc.returncode}, {wall:.0f} s; saves committed {len(committed_events)} "
          f"(steps {committed_events}), failed {len(failed_events)} (steps {failed_events}); faults served "
          f"{served}; longest hold at the barrier {longest:.2f} s (bound {bound:.1f} s = median committed save "
          f"{typical:.2f} s + {E2E_EXTRA:.0f} s; median step {normal[len(normal) // 2]:.2f} s); holds "
          f"{({k: round(v, 2) for k, v in sorted(holds.items())})}")
    for request in proxy.served():
        if request.fault:
            held = f"{request.end - request.start:.2f} s" if request.end else "held until the proxy stops"
            print(f"  {request.fault:>14} {request.method} {request.target.split('?')[0][-60:]} {held}")


KINDS_SERVED = ("503", "reset_request", "reset_response", "stall")
