"""CheckpointStore and AsyncSaver on local disk and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections import OrderedDict

import pytest
import torch
from s3 import s3_env

from elastic_det.checkpoint import (
    AsyncSaver,
    CheckpointStore,
    Manifest,
    StaleCheckpointError,
    snapshot_to_cpu,
    step_dir,
)
from elastic_det.errors import CheckpointError, StorageError, WorkDirOwnedError, exit_code_for
from elastic_det.storage import WorkDir

META = {"config_hash": "cfg123", "world_size": 2, "reason": "interval", "metrics": {}}
SMALL_BLOCK = {"default_block_size": 5 * 2**20}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "work")
    return request.getfixturevalue("s3_bucket") + "/run"


def make_state(step: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return {
        "model": OrderedDict(w=torch.randn(4, 3, generator=g), b=torch.randn(3, generator=g)),
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(4, 3, generator=g)}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]},
        "progress": {"epoch": 1, "step_in_epoch": 5, "global_step": step},
        "seed": 0,
    }


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


class Recorder:
    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)


def data_rel(store: CheckpointStore, step: int) -> str:
    manifest = Manifest.from_json(store.work_dir.read_bytes(f"{step_dir(step)}/manifest.json"))
    return f"{step_dir(step)}/{manifest.data}"


def write_raw_checkpoint(wd: WorkDir, step: int, obj) -> None:
    """A checkpoint whose data is an arbitrary torch.save payload under a valid, matching manifest."""
    size, sha = wd.write_atomic(f"{step_dir(step)}/state-raw.pt", lambda f: torch.save(obj, f))
    manifest = Manifest(step=step, data="state-raw.pt", size=size, sha256=sha)
    assert wd.create_exclusive(f"{step_dir(step)}/manifest.json", manifest.to_json().encode())


class OpensAFile:
    """Unpickling this (without weights_only) would create a file: loading must never run it."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------------
# Save and load


def test_round_trip(url):
    store = CheckpointStore(WorkDir(url))
    assert store.load_latest() is None
    state = make_state(10)
    manifest = store.save(10, state, {**META, "metrics": {"loss": 1.5}})
    checkpoint = store.load_latest()
    assert checkpoint is not None
    assert_same(state, checkpoint.state)
    assert checkpoint.manifest == manifest
    assert checkpoint.location == store.location(10) == store.work_dir.path("checkpoints/step-00000010")
    assert (manifest.step, manifest.config_hash, manifest.world_size, manifest.reason) == (10, "cfg123", 2,
                                                                                          "interval")
    assert manifest.metrics == {"loss": 1.5}
    assert set(manifest.versions) == {"torch", "torchvision", "elastic_det", "python"}
    assert manifest.size == store.work_dir.size(data_rel(store, 10))
    assert store.committed_steps() == [10]
    assert store.newest_committed_step() == 10
    on_disk = json.loads(store.work_dir.read_bytes("checkpoints/step-00000010/manifest.json"))
    assert (on_disk["hash_alg"], on_disk["digest"], on_disk["format_version"]) == ("crc32/zip", manifest.digest, 2)
    assert "sha256" not in on_disk
    data = store.work_dir.read_bytes(data_rel(store, 10))
    assert manifest.digest == f"{zlib.crc32(data):08x}"  # no record of 1 MiB or more: the CRC-32 of every byte


def _zip_records(data: bytes) -> list[tuple[int, int, int]]:
    """(data offset, size, CRC-32) of each record of a zip, read with the standard library."""
    records = []
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        records.append((info.header_offset + 30 + name_len + extra_len, info.compress_size, info.CRC))
    return records


def test_digest_is_the_zip_crcs_of_large_records_and_a_crc_of_the_rest(url):
    """crc32/zip: each record of 1 MiB or more is covered by the CRC-32 torch.save's zip writer stored for
    it, every other byte by one CRC-32; a flipped bit anywhere, or a truncation, is caught on load."""
    big = {"model": {"w": torch.randn(2**19), "v": torch.randn(3 * 2**18), "b": torch.randn(10)},
           "progress": {"global_step": 20}}
    events = Recorder()
    store = CheckpointStore(WorkDir(url), keep_last=0, on_event=events)
    store.save(10, make_state(10), META)
    manifest = store.save(20, big, META)
    data = store.work_dir.read_bytes(data_rel(store, 20))
    regions = [r for r in _zip_records(data) if r[1] >= 2**20]
    assert [n for _, n, _ in regions] == [2**21, 3 * 2**20]  # the two large tensors, nothing else
    rest = bytearray()
    start = 0
    for offset, length, crc in regions:
        assert zlib.crc32(data[offset:offset + length]) == crc
        rest += data[start:offset]
        start = offset + length
    rest += data[start:]
    assert manifest.hash_alg == "crc32/zip"
    assert manifest.digest == f"{zlib.crc32(rest):08x}" + "".join(f" {o}+{n}:{c:08x}" for o, n, c in regions)
    rel = data_rel(store, 20)
    damaged = [("in a large record", regions[1][0] + 12345, f"bytes {regions[1][0]}-{sum(regions[1][:2])}"),
               ("in the zip directory", len(data) - 100, "outside its zip records"),
               ("in a local header", regions[0][0] - 40, "outside its zip records")]
    for what, where, reason in damaged:
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        store.work_dir.write_bytes_atomic(rel, bytes(flipped))
        assert store.load_latest().manifest.step == 10, what
        assert "corrupted" in events.events[-1]["reason"] and reason in events.events[-1]["reason"], what
        store = CheckpointStore(WorkDir(url), keep_last=0, on_event=events)
    store.work_dir.write_bytes_atomic(rel, data[:-1])
    assert store.load_latest().manifest.step == 10 and "truncated" in events.events[-1]["reason"]
    store.work_dir.write_bytes_atomic(rel, data)
    assert_same(big, CheckpointStore(WorkDir(url)).load_latest().state)


def test_save_without_torch_zip_crcs_digests_by_reading_back(url):
    """With torch's CRC-32s turned off (torch.serialization.set_crc32_options(False)) the zip holds no CRC to
    rely on: the data is read back and digested as crc32/64MiB, and still verified on load."""
    store = CheckpointStore(WorkDir(url))
    state = {"model": {"w": torch.randn(2**19)}, "progress": {"global_step": 10}}
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        manifest = store.save(10, state, META)
    finally:
        torch.serialization.set_crc32_options(before)
    data = store.work_dir.read_bytes(data_rel(store, 10))
    assert (manifest.hash_alg, manifest.digest) == ("crc32/64MiB", f"{zlib.crc32(data):08x}")
    assert_same(state, CheckpointStore(WorkDir(url)).load_latest().state)


def test_truncated_newest_falls_back(url):
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(10, make_state(10), META)
    store.save(20, make_state(20), META)
    rel = data_rel(store, 20)
    store.work_dir.write_bytes_atomic(rel, store.work_dir.read_bytes(rel)[:-100])
    assert CheckpointStore(WorkDir(url)).committed_steps() == [10]  # listed without loading: sizes checked
    assert CheckpointStore(WorkDir(url)).newest_committed_step() == 10
    checkpoint = store.load_latest()
    assert checkpoint.manifest.step == 10
    assert_same(make_state(10), checkpoint.state)
    assert len(events.events) == 1
    event = events.events[0]
    assert event["event"] == "fallback" and event["step"] == 20
    assert event["checkpoint"] == store.work_dir.path("checkpoints/step-00000020")
    assert "truncated" in event["reason"]


def test_wrong_sha_falls_back(url):
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(10, make_state(10), META)
    store.save(20, make_state(20), META)
    rel = data_rel(store, 20)
    data = bytearray(store.work_dir.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF
    store.work_dir.write_bytes_atomic(rel, bytes(data))
    assert store.load_latest().manifest.step == 10
    assert [e["step"] for e in events.events] == [20]
    assert "crc32/zip" in events.events[0]["reason"] and "corrupted" in events.events[0]["reason"]
    with pytest.raises(CheckpointError, match="step-00000020.*crc32/zip.*corrupted"):
        store.load(store.work_dir.path(step_dir(20)))


def test_step_without_manifest_is_skipped(url):
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(10, make_state(10), META)
    store.work_dir.write_atomic(f"{step_dir(20)}/state-orphan.pt", lambda f: torch.save(make_state(20), f))
    assert store.committed_steps() == [10]
    assert store.load_latest().manifest.step == 10
    assert [(e["step"], "no manifest.json" in e["reason"]) for e in events.events] == [(20, True)]


def test_unparseable_manifest_falls_back_and_can_be_replaced(url):
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(10, make_state(10), META)
    store.work_dir.write_bytes_atomic(f"{step_dir(20)}/manifest.json", b'{"step": 20, "da')
    assert store.load_latest().manifest.step == 10
    assert "not valid JSON" in events.events[0]["reason"]
    store.save(20, make_state(20), META)  # the invalid manifest was never a commit: it is replaced
    checkpoint = store.load_latest()
    assert checkpoint.manifest.step == 20
    assert_same(make_state(20), checkpoint.state)


def test_loading_never_executes_code(url, tmp_path):
    marker = tmp_path / "executed"
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(10, make_state(10), META)
    write_raw_checkpoint(store.work_dir, 20, {"model": OpensAFile(str(marker))})
    assert store.load_latest().manifest.step == 10
    assert "pickled object of type io.open" in events.events[0]["reason"]
    with pytest.raises(CheckpointError, match="io.open"):
        store.load(store.work_dir.path(step_dir(20)))
    assert not marker.exists()


class RunsACommand:
    """A classic malicious pickle: unpickling it would run a shell command that creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def assert_clean_refusal(message: str) -> None:
    """One paragraph that never advises running untrusted code and carries no terminal escape codes."""
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "\x1b" not in message and "\n" not in message
    assert "Weights only load failed" not in message  # not torch's first line either


@pytest.mark.parametrize("form", ["torch.save", "plain pickle"])
def test_malicious_pickle_is_refused_with_a_clear_message(url, tmp_path, form):
    marker = tmp_path / "pwned"
    store = CheckpointStore(WorkDir(url))
    payload = {"model": RunsACommand(str(marker))}
    if form == "torch.save":
        store.work_dir.write_atomic("evil.pt", lambda f: torch.save(payload, f))
    else:
        store.work_dir.write_bytes_atomic("evil.pt", pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as info:
        store.load(store.work_dir.path("evil.pt"))
    message = str(info.value)
    assert store.work_dir.path("evil.pt") in message
    assert f"contains a pickled object of type {os.system.__module__}.system, which a checkpoint never " \
           "holds" in message
    assert_clean_refusal(message)
    assert exit_code_for(info.value) == 2
    assert not marker.exists()


def test_random_and_foreign_files_are_refused_with_a_clear_message(url):
    store = CheckpointStore(WorkDir(url))
    wd = store.work_dir
    wd.write_bytes_atomic("random.pt", bytes(i % 256 for i in range(7, 1031)))
    wd.write_bytes_atomic("text.pt", b"hello, not a checkpoint\n")
    wd.write_bytes_atomic("empty.pt", b"")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "a zip, but no torch file")
    wd.write_bytes_atomic("archive.pt", archive.getvalue())
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(1000)}, buffer)
    wd.write_bytes_atomic("cut.pt", buffer.getvalue()[:2000])
    expected = {
        "random.pt": "is not a PyTorch checkpoint (first bytes: 07 08 09 0a",
        "text.pt": "is not a PyTorch checkpoint (first bytes: 'hello, not a che')",
        "empty.pt": "is empty, not a PyTorch checkpoint",
        "archive.pt": "is a zip archive but not a PyTorch checkpoint",
        "cut.pt": "is a damaged PyTorch checkpoint",
    }
    for name, text in expected.items():
        with pytest.raises(CheckpointError) as info:
            store.load(wd.path(name))
        message = str(info.value)
        assert text in message, (name, message)
        assert wd.path(name) in message
        assert_clean_refusal(message)


def test_load_explicit_forms(url):
    store = CheckpointStore(WorkDir(url))
    store.save(10, make_state(10), META)
    store.save(20, make_state(20), META)
    wd = store.work_dir
    for target, step in [(wd.path(step_dir(10)), 10), (wd.path(f"{step_dir(10)}/manifest.json"), 10),
                         (wd.path(data_rel(store, 10)), 10), (wd.url, 20), (wd.url + "/", 20)]:
        checkpoint = store.load(target)
        assert checkpoint.manifest.step == step, target
        assert_same(make_state(step), checkpoint.state)


def test_load_explicit_errors(url, tmp_path):
    store = CheckpointStore(WorkDir(url))
    missing = store.work_dir.path("nope")
    with pytest.raises(CheckpointError, match="does not exist") as info:
        store.load(missing)
    assert missing in str(info.value)
    store.work_dir.write_bytes_atomic("other/file.txt", b"x")
    with pytest.raises(CheckpointError, match="neither"):
        store.load(store.work_dir.path("other"))
    store.save(10, make_state(10), META)
    rel = data_rel(store, 10)
    store.work_dir.write_bytes_atomic(rel, b"garbage")
    with pytest.raises(CheckpointError, match="truncated") as info:
        store.load(store.work_dir.url)  # an explicit work dir: its newest, no silent fallback
    assert store.work_dir.path(step_dir(10)) in str(info.value)


def test_export_weights_and_load_bare_files(url):
    store = CheckpointStore(WorkDir(url))
    state = make_state(30)
    store.save(30, state, META)
    checkpoint = store.load_latest()
    store.export_weights(checkpoint, "exports/model.pt")
    exported = store.load(store.work_dir.path("exports/model.pt"))
    assert list(exported.state) == ["model"]
    assert_same(state["model"], exported.state["model"])
    assert exported.manifest.size == store.work_dir.size("exports/model.pt")
    store.work_dir.write_atomic("full.pt", lambda f: torch.save(state, f))  # a plain torch.save, no manifest
    bare = store.load(store.work_dir.path("full.pt"))
    assert bare.manifest.step == 30
    assert_same(state, bare.state)


def test_manifest_rejects_bad_records():
    good = Manifest(step=1, data="state-1.pt", size=300, hash_alg="crc32/zip", digest="0a1b2c3d 10+20:00ff00ff")
    assert Manifest.from_json(good.to_json()) == good
    chunks = Manifest(step=1, data="state-1.pt", size=64 * 2**20 + 1, hash_alg="crc32/64MiB", digest="0a1b2c3d" * 2)
    assert Manifest.from_json(chunks.to_json()) == chunks  # one CRC per 64 MiB chunk
    for change, reason in [({"data": "../../etc/passwd"}, "plain file name"), ({"digest": "xyz"}, "8 hex"),
                           ({"digest": "0a1b2c3d 10+20:00ff00ff 20+5:00000000"}, "overlapping"),
                           ({"digest": "0a1b2c3d 290+20:00ff00ff"}, "past the end"),
                           ({"hash_alg": "crc32/64MiB"}, "8 hex"), ({"hash_alg": "md5"}, "md5.*upgrade"),
                           ({"hash_alg": None}, "hash_alg"), ({"digest": None}, "digest"),
                           ({"format_version": 99}, "newer"), ({"step": "1"}, "step"),
                           ({"metrics": {"a": "high"}}, "malformed")]:
        raw = {**json.loads(good.to_json()), **change}
        with pytest.raises(ValueError, match=reason):
            Manifest.from_json(json.dumps(raw))
    old = {"step": 1, "data": "state-1.pt", "size": 3, "sha256": "a" * 64, "format_version": 1}
    parsed = Manifest.from_json(json.dumps(old))
    assert parsed == Manifest(step=1, data="state-1.pt", size=3, sha256="a" * 64, format_version=1)
    assert (parsed.hash_alg, parsed.digest) == ("sha256", "a" * 64)
    for change, reason in [({"sha256": "xyz"}, "sha256 is not 64 hex"), ({"sha256": None}, "sha256")]:
        with pytest.raises(ValueError, match=reason):
            Manifest.from_json(json.dumps({**old, **change}))


def _write_format_1_checkpoint(wd: WorkDir, step: int, state: dict) -> str:
    """A checkpoint exactly as elastic_det wrote it before format 2 (sha256 in the manifest); its data name."""
    size, sha256 = wd.write_atomic(f"{step_dir(step)}/state-0123abcd.pt", lambda f: torch.save(state, f))
    record = {"config_hash": "cfg123", "created": 1.7e9, "data": "state-0123abcd.pt", "format_version": 1,
              "metrics": {}, "reason": "interval", "sha256": sha256, "size": size, "step": step,
              "versions": {"python": "3.11.7", "torch": "2.14.1", "torchvision": "0.29.1", "elastic_det": "0.1.0"},
              "world_size": 2}
    assert wd.create_exclusive(f"{step_dir(step)}/manifest.json", (json.dumps(record, indent=1) + "\n").encode())
    return "state-0123abcd.pt"


def test_format_1_work_dir_still_loads_verifies_and_retires(url):
    """Work dirs written before format 2: their sha256 manifests load and are verified with sha256 (a flipped
    bit or a truncation is caught), new saves go on beside them, and retention removes them as usual."""
    wd = WorkDir(url)
    for step in (10, 20, 30):
        _write_format_1_checkpoint(wd, step, make_state(step))
    events = Recorder()
    store = CheckpointStore(wd, keep_last=2, on_event=events)
    assert store.committed_steps() == [10, 20, 30]
    data = bytearray(wd.read_bytes(f"{step_dir(30)}/state-0123abcd.pt"))
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    wd.write_bytes_atomic(f"{step_dir(30)}/state-0123abcd.pt", bytes(data))
    wd.write_bytes_atomic(f"{step_dir(20)}/state-0123abcd.pt", bytes(data[:-1]))  # truncated
    checkpoint = store.load_latest()
    assert (checkpoint.manifest.step, checkpoint.manifest.hash_alg) == (10, "sha256")
    assert_same(make_state(10), checkpoint.state)
    assert [(e["step"], "sha256" in e["reason"] and "corrupted" in e["reason"]) for e in events.events] == [
        (30, True), (20, False)]
    assert "truncated" in events.events[1]["reason"]
    store.save(20, make_state(20, seed=1), META)  # replaces the broken one, in format 2
    store.save(40, make_state(40), META)
    assert store.committed_steps() == [20, 40]
    assert CheckpointStore(WorkDir(url)).load_latest().manifest.hash_alg == "crc32/zip"


# ----------------------------------------------------------------------------------------------------------
# Writers: stale, concurrent, failing


def test_stale_writer_is_refused(url):
    new = CheckpointStore(WorkDir(url))
    new.save(20, make_state(20), META)
    old = CheckpointStore(WorkDir(url))
    with pytest.raises(StaleCheckpointError, match="step 20 is already committed") as info:
        old.save(10, make_state(10), META)
    assert isinstance(info.value, WorkDirOwnedError) and exit_code_for(info.value) == 3  # final: stop now
    assert old.committed_steps() == [20]
    assert [p for p in old.work_dir.find("checkpoints") if "step-00000010" in p] == []


def test_stale_detected_after_the_data_write(url, monkeypatch):
    """A newer attempt commits while this writer uploads: no commit, no retention, data removed."""
    old = CheckpointStore(WorkDir(url), keep_last=1)
    old.save(5, make_state(5), META)
    new = CheckpointStore(WorkDir(url))
    write = old.work_dir.write_atomic_digest

    def write_while_newer_commits(relpath, write_fn, hash_alg):
        result = write(relpath, write_fn, hash_alg)
        new.save(30, make_state(30), META)
        return result

    monkeypatch.setattr(old.work_dir, "write_atomic_digest", write_while_newer_commits)
    with pytest.raises(StaleCheckpointError):
        old.save(10, make_state(10), META)
    assert old.committed_steps() == [5, 30]
    assert [p for p in old.work_dir.find("checkpoints") if "step-00000010" in p] == []


def test_saving_resumes_after_falling_back_past_a_corrupt_newest(tmp_path):
    """A corrupt newer checkpoint must not make every later save look stale."""
    store = CheckpointStore(WorkDir(str(tmp_path)), keep_last=2)
    _save_steps(store, [20, 30])
    rel = data_rel(store, 30)
    data = bytearray(store.work_dir.read_bytes(rel))
    data[100] ^= 0xFF  # same size, wrong content
    store.work_dir.write_bytes_atomic(rel, bytes(data))
    resumed = CheckpointStore(WorkDir(str(tmp_path)), keep_last=2)
    assert resumed.load_latest().manifest.step == 20
    resumed.save(25, make_state(25), META)
    resumed.save(40, make_state(40), META)
    assert resumed.committed_steps() == [25, 40]  # the corrupt step 30 went with retention
    with pytest.raises(StaleCheckpointError):
        CheckpointStore(WorkDir(str(tmp_path))).save(35, make_state(35), META)


def test_same_step_already_committed_returns_existing(url):
    first = CheckpointStore(WorkDir(url))
    committed = first.save(10, make_state(10, seed=1), META)
    second = CheckpointStore(WorkDir(url))
    assert second.save(10, make_state(10, seed=2), META) == committed
    assert_same(make_state(10, seed=1), second.load_latest().state)


def test_concurrent_commit_of_same_step_keeps_the_winner(url, monkeypatch):
    loser = CheckpointStore(WorkDir(url))
    winner = CheckpointStore(WorkDir(url))
    write = loser.work_dir.write_atomic_digest
    won = {}

    def write_while_other_commits(relpath, write_fn, hash_alg):
        result = write(relpath, write_fn, hash_alg)
        won["manifest"] = winner.save(10, make_state(10, seed=1), META)
        return result

    monkeypatch.setattr(loser.work_dir, "write_atomic_digest", write_while_other_commits)
    assert loser.save(10, make_state(10, seed=2), META) == won["manifest"]
    assert_same(make_state(10, seed=1), loser.load_latest().state)
    assert len([p for p in loser.work_dir.find(step_dir(10)) if p.endswith(".pt")]) == 1


def test_failed_save_leaves_older_checkpoints_intact(url, request):
    wd = WorkDir(url, SMALL_BLOCK if "://" in url else None)
    store = CheckpointStore(wd, keep_last=1)
    store.save(10, make_state(10), META)
    broken = {"big": torch.ones(3 * 2**20), "not_saveable": lambda: None}  # 12 MB written, then it fails
    with pytest.raises(Exception, match="lambda|pickle"):
        store.save(20, broken, META)
    assert store.committed_steps() == [10]
    assert [p for p in wd.find("checkpoints") if "step-00000020" in p] == []
    assert_same(make_state(10), store.load_latest().state)
    if not wd.is_local:
        bucket = url.split("/")[2]
        uploads = request.getfixturevalue("s3_server").client().list_multipart_uploads(Bucket=bucket)
        assert uploads.get("Uploads", []) == []


def test_storage_failure_mid_save_local(tmp_path):
    """A step path the store cannot write (its parent is a file: like a full or broken disk)."""
    store = CheckpointStore(WorkDir(str(tmp_path)))
    store.save(10, make_state(10), META)
    (tmp_path / "checkpoints" / "step-00000020").write_text("in the way")
    with pytest.raises(StorageError, match="step-00000020"):
        store.save(20, make_state(20), META)
    assert store.committed_steps() == [10]
    assert store.load_latest().manifest.step == 10


def test_commit_whose_response_is_lost_counts_as_committed(tmp_path, monkeypatch):
    store = CheckpointStore(WorkDir(str(tmp_path)))
    create = store.work_dir.create_exclusive

    def create_then_lose_the_answer(relpath, data):
        create(relpath, data)
        raise StorageError("connection reset after the write")

    monkeypatch.setattr(store.work_dir, "create_exclusive", create_then_lose_the_answer)
    assert store.save(10, make_state(10), META).step == 10
    assert store.load_latest().manifest.step == 10


def test_failed_commit_commits_nothing(tmp_path, monkeypatch):
    store = CheckpointStore(WorkDir(str(tmp_path)), keep_last=1)
    store.save(10, make_state(10), META)

    def refuse(relpath, data):
        raise StorageError("bucket went read-only")

    with monkeypatch.context() as patch:
        patch.setattr(store.work_dir, "create_exclusive", refuse)
        with pytest.raises(StorageError, match="read-only"):
            store.save(20, make_state(20), META)
    assert store.committed_steps() == [10]
    assert store.load_latest().manifest.step == 10
    store.save(30, make_state(30), META)  # the uncommitted data of step 20 goes with retention
    assert sorted({p.split("/")[0] for p in store.work_dir.find("checkpoints")}) == ["step-00000030"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_work_dir_local(tmp_path):
    store = CheckpointStore(WorkDir(str(tmp_path)))
    store.save(10, make_state(10), META)
    (tmp_path / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(StorageError, match="Permission denied"):
            store.save(20, make_state(20), META)
    finally:
        (tmp_path / "checkpoints").chmod(0o700)
    assert store.load_latest().manifest.step == 10


# ----------------------------------------------------------------------------------------------------------
# Retention


def _save_steps(store, steps, metrics=None):
    for i, step in enumerate(steps):
        store.save(step, make_state(step), {**META, "metrics": metrics[i] if metrics else {}})


def test_retention_keep_last(url):
    store = CheckpointStore(WorkDir(url), keep_last=2)
    _save_steps(store, [1, 2, 3, 4, 5])
    assert store.committed_steps() == [4, 5]
    assert {p.split("/")[0] for p in store.work_dir.find("checkpoints")} == {"step-00000004", "step-00000005"}


def test_retention_keep_every_and_best(tmp_path):
    every = CheckpointStore(WorkDir(str(tmp_path / "every")), keep_last=1, keep_every=2)
    _save_steps(every, [1, 2, 3, 4, 5])
    assert every.committed_steps() == [2, 4, 5]
    best = CheckpointStore(WorkDir(str(tmp_path / "best")), keep_last=1, keep_best="acc")
    _save_steps(best, [1, 2, 3, 4, 5], [{"acc": a} for a in (0.1, 0.9, 0.3, 0.2, 0.4)])
    assert best.committed_steps() == [2, 5]
    lowest = CheckpointStore(WorkDir(str(tmp_path / "loss")), keep_last=1, keep_best="min:loss")
    _save_steps(lowest, [1, 2, 3], [{"loss": v} for v in (0.5, 0.2, 0.7)])
    assert lowest.committed_steps() == [2, 3]
    everything = CheckpointStore(WorkDir(str(tmp_path / "all")), keep_last=0)
    _save_steps(everything, [1, 2, 3])
    assert everything.committed_steps() == [1, 2, 3]


def test_retention_removes_uncommitted_debris_and_never_newer(tmp_path):
    store = CheckpointStore(WorkDir(str(tmp_path)), keep_last=1)
    store.save(1, make_state(1), META)
    store.work_dir.write_bytes_atomic(f"{step_dir(2)}/state-partial.pt", b"partial")  # a killed writer
    store.work_dir.write_bytes_atomic(f"{step_dir(9)}/state-partial.pt", b"newer, in progress")
    store.save(3, make_state(3), META)
    assert sorted({p.split("/")[0] for p in store.work_dir.find("checkpoints")}) == [
        "step-00000003", "step-00000009"]


def test_retention_failure_does_not_fail_the_save(tmp_path, monkeypatch):
    store = CheckpointStore(WorkDir(str(tmp_path)), keep_last=1)
    store.save(1, make_state(1), META)

    def refuse(relpath, recursive=False):
        raise StorageError(f"Cannot delete {relpath}: simulated")

    monkeypatch.setattr(store.work_dir, "delete", refuse)
    assert store.save(2, make_state(2), META).step == 2
    assert store.committed_steps() == [1, 2]
    assert store.load_latest().manifest.step == 2


# ----------------------------------------------------------------------------------------------------------
# Async saving


def test_snapshot_is_an_independent_copy_and_reuses_buffers():
    live = make_state(1)
    live["model"]._metadata = {"": {"version": 2}}
    live["tied"] = live["model"]["w"]
    snap = snapshot_to_cpu(live)
    assert_same(live, snap)
    assert snap["tied"] is snap["model"]["w"]
    assert snap["model"]._metadata == {"": {"version": 2}}
    live["model"]["w"].add_(1)
    assert not torch.equal(live["model"]["w"], snap["model"]["w"])
    pointer = snap["model"]["w"].data_ptr()
    again = snapshot_to_cpu(live, reuse=snap)
    assert again["model"]["w"].data_ptr() == pointer
    assert torch.equal(again["model"]["w"], live["model"]["w"])
    assert again["model"]["w"].data_ptr() != live["model"]["w"].data_ptr()


def test_async_save_snapshots_before_returning(tmp_path):
    store = CheckpointStore(WorkDir(str(tmp_path)))
    saver = AsyncSaver(store)
    live = make_state(5)
    expected = snapshot_to_cpu(live)
    results = []
    saver.submit(5, live, META, lambda m, e, s: results.append((m, e, s)))
    for tensor in (live["model"]["w"], live["optimizer"]["state"][0]["momentum_buffer"]):
        tensor.mul_(0).add_(42)  # the training loop goes on, in place
    live["progress"]["global_step"] = 6
    saver.wait()
    assert not saver.in_flight()
    (manifest, error, seconds), = results
    assert error is None and manifest.step == 5 and seconds > 0
    assert_same(expected, store.load_latest().state)


def test_async_save_copies_large_tensors_before_the_next_optimizer_step(tmp_path):
    """The large tensors are copied by the save thread; optimizer.step() waits for those copies."""
    store = CheckpointStore(WorkDir(str(tmp_path)))
    saver = AsyncSaver(store)
    weight = torch.nn.Parameter(torch.randn(2**20))  # 4 MB: deferred
    optimizer = torch.optim.SGD([weight], lr=0.5, momentum=0.9)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    live = {"model": {"w": weight.detach()}, "optimizer": optimizer.state_dict(), "progress": {"global_step": 1}}
    expected = snapshot_to_cpu(live)
    results = []
    saver.submit(1, live, META, lambda m, e, s: results.append((m, e)))
    for _ in range(3):  # the loop goes on: every step changes the weight and the momentum in place
        optimizer.step()
    saver.wait()
    (manifest, error), = results
    assert error is None and manifest.step == 1
    saved = store.load_latest().state
    assert_same(expected["model"], saved["model"])
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"],
                       expected["optimizer"]["state"][0]["momentum_buffer"])
    assert not torch.equal(saved["model"]["w"], weight.detach())


def test_async_save_refuses_a_state_changed_outside_the_optimizer_step(tmp_path, monkeypatch):
    from elastic_det.checkpoint import async_save

    release = threading.Event()
    copy = async_save.copy_deferred

    def copy_when_released(copies):
        assert release.wait(timeout=30)
        copy(copies)

    monkeypatch.setattr(async_save, "copy_deferred", copy_when_released)
    store = CheckpointStore(WorkDir(str(tmp_path)))
    saver = AsyncSaver(store)
    live = {"model": {"w": torch.zeros(2**20)}, "progress": {"global_step": 1}}
    results = []
    saver.submit(1, live, META, lambda m, e, s: results.append((m, e)))
    live["model"]["w"].add_(1)  # a large tensor changed in place before the save thread copied it
    release.set()
    saver.wait()
    (manifest, error), = results
    assert manifest is None and isinstance(error, async_save.StateChangedError) and "model.w" in str(error)
    assert store.committed_steps() == []


class BlockingStore:
    """Stands in for CheckpointStore: each save waits for a release, or fails when told to."""

    def __init__(self):
        self.release = threading.Event()
        self.saved: list[int] = []
        self.fail = False

    def save(self, step, state, meta):
        if not self.release.wait(timeout=30):
            raise TimeoutError("never released")
        if self.fail:
            raise StorageError("disk on fire")
        self.saved.append(step)
        return Manifest(step=step, data="x.pt", size=0, sha256="0" * 64)


def _can_raise_thread_priority() -> bool:
    """Whether this process may give a thread back a priority it lowered (root, CAP_SYS_NICE, RLIMIT_NICE)."""
    result, base = [], os.getpriority(os.PRIO_PROCESS, 0)

    def probe():
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, base)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are Linux")
def test_async_writer_yields_the_cpu_until_the_loop_waits_for_it(tmp_path, monkeypatch):
    """The save thread writes at nice 19 while training runs; once the training thread waits for it (the
    next, final or preemption save) it gets the caller's priority back, where the process may raise it."""
    store = CheckpointStore(WorkDir(str(tmp_path)))
    saver = AsyncSaver(store)
    writing, release, seen = threading.Event(), threading.Event(), []
    save = store.save

    def observed_save(step, state, meta):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        writing.set()
        assert release.wait(60)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return save(step, state, meta)

    monkeypatch.setattr(store, "save", observed_save)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    raised = _can_raise_thread_priority()
    saver.submit(1, make_state(1), META, lambda *args: None)
    assert writing.wait(60)
    writer = saver._thread.native_id

    def release_once_raised():  # polls with a deadline: wait() must raise the priority before the join
        deadline = time.monotonic() + 30
        while raised and os.getpriority(os.PRIO_PROCESS, writer) != base and time.monotonic() < deadline:
            time.sleep(0.005)
        release.set()

    releaser = threading.Thread(target=release_once_raised)
    releaser.start()
    saver.wait()
    releaser.join()
    assert seen == [19, base if raised else 19]
    assert store.committed_steps() == [1]


def test_async_submit_waits_for_the_save_in_flight():
    store = BlockingStore()
    saver = AsyncSaver(store)
    done = []
    saver.submit(1, {"x": torch.zeros(2)}, {}, lambda m, e, s: done.append(m.step))
    assert saver.in_flight()
    second = threading.Thread(target=saver.submit, args=(2, {"x": torch.ones(2)}, {},
                                                         lambda m, e, s: done.append(m.step)))
    second.start()
    second.join(timeout=0.3)
    assert second.is_alive() and done == []  # blocked behind the first save
    store.release.set()
    second.join(timeout=30)
    saver.wait()
    assert done == [1, 2] and store.saved == [1, 2]


def test_async_on_done_bug_is_raised_in_the_training_thread():
    store = BlockingStore()
    store.release.set()
    saver = AsyncSaver(store)

    def broken_callback(manifest, error, seconds):
        raise KeyError("a bug in the callback")

    saver.submit(4, {"x": torch.zeros(2)}, {}, broken_callback)
    with pytest.raises(KeyError, match="a bug in the callback"):
        saver.wait()
    saver.wait()  # raised once


def test_async_on_done_reports_errors():
    store = BlockingStore()
    store.fail = True
    store.release.set()
    saver = AsyncSaver(store)
    results = []
    saver.submit(3, {"x": torch.zeros(2)}, {}, lambda m, e, s: results.append((m, e)))
    saver.wait()
    (manifest, error), = results
    assert manifest is None and isinstance(error, StorageError) and "disk on fire" in str(error)


# ----------------------------------------------------------------------------------------------------------
# SIGKILL mid-write

WRITER = """
import sys, torch
from elastic_det.checkpoint import CheckpointStore
from elastic_det.storage import WorkDir
url, mb, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = CheckpointStore(WorkDir(url, {"default_block_size": block} if block else None))
store.save(2, {"model": {"w": torch.ones(mb * 2**20 // 4)}}, {})
print("committed", flush=True)
"""


def _start_writer(url: str, mb: int, block: int = 0, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, str(mb), str(block)], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(process: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if process.poll() is not None:
                pytest.fail(f"writer finished before it could be killed: {process.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail("the write never started")
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _assert_previous_survives(store: CheckpointStore) -> None:
    assert store.committed_steps() == [1]
    checkpoint = store.load_latest()
    assert checkpoint.manifest.step == 1
    assert_same(make_state(1), checkpoint.state)


def test_sigkill_mid_write_local(tmp_path):
    events = Recorder()
    store = CheckpointStore(WorkDir(str(tmp_path)), on_event=events)
    store.save(1, make_state(1), META)
    step2 = tmp_path / "checkpoints" / "step-00000002"
    process = _start_writer(str(tmp_path), mb=200)
    _kill_when(process, lambda: step2.is_dir() and any(n.endswith(".tmp") for n in os.listdir(step2)))
    _assert_previous_survives(store)
    assert [(e["step"], "no manifest.json" in e["reason"]) for e in events.events] == [(2, True)]
    store.save(3, make_state(3), META)  # the next commit cleans the debris up
    assert not step2.exists()


def test_sigkill_mid_multipart_upload_s3(s3_bucket, s3_server):
    url = s3_bucket + "/run"
    events = Recorder()
    store = CheckpointStore(WorkDir(url), on_event=events)
    store.save(1, make_state(1), META)
    client, bucket = s3_server.client(), url.split("/")[2]
    process = _start_writer(url, mb=60, block=5 * 2**20, env=s3_env(s3_server.endpoint))
    _kill_when(process, lambda: client.list_multipart_uploads(Bucket=bucket).get("Uploads"))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert not [k for k in keys if "step-00000002" in k]  # the killed upload published nothing
    _assert_previous_survives(store)


SAVE_LOOP = """
import os, signal, sys, torch
from elastic_det.checkpoint import CheckpointStore, reclaim
from elastic_det.storage import WorkDir
url, mb, saves, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = CheckpointStore(WorkDir(url), keep_last=1)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if kill_at == "retention":  # the dropped checkpoint's manifest is deleted, its data not yet
    store._delete = die
elif kill_at == "reclaim":  # its files are unlinked, their space not yet freed (background thread)
    reclaim._close_all = die
start = (store.newest_committed_step() or 0) + 1
for step in range(start, start + saves):
    store.save(step, {"model": {"w": torch.full((mb * 2**18,), float(step))}, "progress": {"global_step": step}}, {})
    print("committed", step, flush=True)
"""


def _run_save_loop(url: str, kill_at: str, delay: float = 0.0, saves: int = 1000) -> list[int]:
    """Run SAVE_LOOP (keep_last=1) until it kills itself at ``kill_at``, or, for ``write``, until it is killed
    ``delay`` s after its first commit; the steps it reported committed."""
    process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, url, "24", str(saves), kill_at], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reported = []
        if kill_at == "write":
            first = process.stdout.readline()
            assert first.startswith("committed"), (first, process.stderr.read())
            reported.append(int(first.split()[1]))
            time.sleep(delay)  # not a wait for a condition: it moves the kill to another phase of a save
            os.kill(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == (0 if kill_at == "none" else -signal.SIGKILL), err
    return reported + [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]


def test_sigkill_anywhere_in_save_and_retention_keeps_the_newest_commit(tmp_path):
    """Real processes killed in the middle of a retention (manifest deleted, data not), while the space of
    deleted files is freed, and at several instants of a save loop: every time, the newest step any run
    reported committed is still committed and loads, and the next run cleans up what a kill left."""
    url = str(tmp_path / "work")
    newest = 0
    for kill_at, delay in [("retention", 0), ("reclaim", 0), ("write", 0), ("write", 0.02), ("write", 0.05),
                           ("write", 0.11), ("retention", 0)]:
        reported = _run_save_loop(url, kill_at, delay)
        store = CheckpointStore(WorkDir(url))
        steps = store.committed_steps()
        assert steps and steps[-1] >= max(reported + [newest]), (kill_at, delay, reported, steps)
        checkpoint = store.load_latest()
        assert checkpoint.manifest.step == steps[-1] and checkpoint.state["progress"]["global_step"] == steps[-1]
        assert torch.equal(checkpoint.state["model"]["w"], torch.full((24 * 2**18,), float(steps[-1])))
        newest = steps[-1]
    assert _run_save_loop(url, "none", saves=2) == [newest + 1, newest + 2]
    assert CheckpointStore(WorkDir(url)).committed_steps() == [newest + 2]
    step = tmp_path / "work" / "checkpoints" / step_dir(newest + 2).split("/")[1]
    assert [p.name for p in (tmp_path / "work" / "checkpoints").iterdir()] == [step.name]  # no debris left
    manifest, data = sorted(p.name for p in step.iterdir())  # no temp files either
    assert manifest == "manifest.json" and data.startswith("state-") and data.endswith(".pt")


@pytest.mark.parametrize("damage", ["flip_byte", "no_manifest"])
def test_resaving_a_step_that_was_found_broken_commits_it_for_good(url, damage):
    """After falling back past a broken step, training re-runs and re-saves that step: the new commit must
    replace the broken one and survive later retention (keep everything)."""
    store = CheckpointStore(WorkDir(url), keep_last=0)
    store.save(10, make_state(10), META)
    store.save(20, make_state(20), META)
    if damage == "flip_byte":
        rel = data_rel(store, 20)
        data = bytearray(store.work_dir.read_bytes(rel))
        data[len(data) // 2] ^= 0xFF
        store.work_dir.write_bytes_atomic(rel, bytes(data))
    else:
        store.work_dir.delete(f"{step_dir(20)}/manifest.json")
    resumed = CheckpointStore(WorkDir(url), keep_last=0)
    assert resumed.load_latest().manifest.step == 10
    resumed.save(20, make_state(20, seed=1), META)
    resumed.save(30, make_state(30), META)
    assert resumed.committed_steps() == [10, 20, 30]
    assert_same(make_state(20, seed=1), resumed.load(resumed.work_dir.path(step_dir(20))).state)
