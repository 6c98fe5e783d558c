"""The engine's promises about bad input, secrets and exit codes, through the real CLI.

- credentials given in ``storage_options`` reach no file, object, event, log line or checkpoint;
- every config value with a range is checked at load time (a config error, exit 2, not a traceback);
- a rejected resume changes nothing in the work dir but its text log (``config.yaml`` byte-identical);
- the exit codes of the taxonomy: 2 bad input, 3 another writer owns the work dir, 75 storage outage.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import base_env, events, fast_overrides, free_port, run_train, start, stop, torchrun_cmd

from elastic_det.checkpoint.store import CheckpointStore
from elastic_det.config.schema import ConfigError, load_config
from elastic_det.errors import (
    INFRASTRUCTURE_EXIT_CODE,
    USER_ERROR_EXIT_CODE,
    WORK_DIR_OWNED_EXIT_CODE,
)
from elastic_det.storage import WorkDir

SECRET_KEY = "AKIAELASTICDETSECRETKEYID"
SECRET = "s3cr3t-elastic-det-Xq9vZ7"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


def test_credentials_in_storage_options_are_written_nowhere(tmp_path, cache, s3_server, s3_bucket):
    home = tmp_path / "home"  # the local mirror of an object-store run's logs lives under ~/.cache
    home.mkdir()
    options = (f"checkpoint.storage_options={{key: {SECRET_KEY}, secret: {SECRET}, "
               f"client_kwargs: {{region_name: us-east-1}}}}")
    env = base_env(cache, HOME=str(home))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(var, None)  # the run has only the config's credentials
    work = f"{s3_bucket}/run"
    args = ["--work-dir", work, "--cfg-options",
            *fast_overrides(cache, "train.max_steps=4", "checkpoint.interval=2", options)]
    done = run_train(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    # a resume with other credentials compares configs (the resume event lists the changes)
    again = run_train([*args[:-1], options.replace(SECRET, SECRET + "-rotated"), "train.max_steps=6"], env)
    assert again.returncode == 0, again.stderr[-3000:]

    client = s3_server.client()
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("manifest.json") for k in keys) and "run/config.yaml" in keys
    assert "run/metrics.jsonl" in keys and "run/train.log" in keys
    blobs = {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    blobs.update({str(p): p.read_bytes() for p in home.rglob("*") if p.is_file()})
    blobs["stderr"] = (done.stderr + again.stderr).encode()
    assert any(b"<redacted>" in blob for blob in blobs.values())  # the config is there, redacted
    for name, blob in blobs.items():
        for secret in (SECRET, SECRET_KEY):
            assert secret.encode() not in blob, f"{secret} found in {name}"
    resume = [e for e in events_from(blobs["run/metrics.jsonl"]) if e.get("event") == "resume"][-1]
    assert resume["step"] == 4 and any("max_steps" in line for line in resume["config_changes"])


def events_from(blob: bytes) -> list[dict]:
    import json

    return [json.loads(line) for line in blob.decode().splitlines() if line.strip()]


@pytest.mark.parametrize("override, key", [
    ("data.shapes.image_size=16", "data.shapes.image_size"),
    ("optimizer.lr=-0.1", "optimizer.lr"),
    ("schedule.warmup_factor=2", "schedule.warmup_factor"),
    ("data.train_transforms.flip_prob=1.5", "data.train_transforms.flip_prob"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas[1]"),
    ("checkpoint.max_failures=0", "checkpoint.max_failures"),
    ("dist.timeout_seconds=0", "dist.timeout_seconds"),
    ("model.width=40", "model.width"),
])
def test_out_of_range_values_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_out_of_range_value_through_the_cli_exits_2_without_traceback(tmp_path, cache):
    done = run_train(["--work-dir", str(tmp_path / "work"), "--cfg-options", *fast_overrides(cache),
                      "data.shapes.image_size=16"], base_env(cache))
    assert done.returncode == USER_ERROR_EXIT_CODE
    assert "data.shapes.image_size" in done.stderr and ">= 32" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()


def test_rejected_resume_leaves_the_run_files_unchanged(tmp_path, cache):
    work = tmp_path / "work"
    first = run_train(["--work-dir", str(work), "--cfg-options",
                       *fast_overrides(cache, "train.max_steps=2")], base_env(cache))
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (work / "config.yaml", work / "metrics.jsonl")}
    # another model width: the checkpoint does not fit, resume is refused
    rejected = run_train(["--work-dir", str(work), "--cfg-options",
                          *fast_overrides(cache, "train.max_steps=4", "model.width=64")], base_env(cache))
    assert rejected.returncode == USER_ERROR_EXIT_CODE, rejected.stderr[-3000:]
    assert "does not fit the model" in rejected.stderr
    assert {p: (work / p).read_bytes() for p in before} == before
    # the README's evaluation command still works against the run's own checkpoints
    import subprocess
    import sys

    evaluated = subprocess.run([sys.executable, "-m", "elastic_det.test", str(work / "config.yaml"), str(work)],
                               env=base_env(cache), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "bbox_mAP" in evaluated.stdout


def test_another_writer_owning_the_work_dir_exits_3(tmp_path, cache):
    work = tmp_path / "work"
    CheckpointStore(WorkDir(str(work))).save(100, {"model": {"w": torch.zeros(1)}}, {"config_hash": "other"})
    done = run_train(["--work-dir", str(work), "--resume", "none", "--cfg-options",
                      *fast_overrides(cache, "train.max_steps=6", "checkpoint.interval=2")], base_env(cache))
    assert done.returncode == WORK_DIR_OWNED_EXIT_CODE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and str(work) in done.stderr
    assert CheckpointStore(WorkDir(str(work))).committed_steps() == [100]
    assert events(work, "checkpoint") == []


def test_unreachable_object_store_is_a_retryable_exit_75(tmp_path, cache):
    env = base_env(cache, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="x",
                   AWS_SECRET_ACCESS_KEY="y", AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")
    done = run_train(["--work-dir", "s3://nobody-listens/run", "--cfg-options", *fast_overrides(cache)], env)
    assert done.returncode == INFRASTRUCTURE_EXIT_CODE, done.stderr[-3000:]
    assert "s3://nobody-listens/run" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_bad_data_under_torchrun_ends_every_rank_with_the_same_paragraph(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    (data / "ann.json").write_text("{not json")
    log = tmp_path / "torchrun.log"
    cmd = torchrun_cmd(2, ["--work-dir", str(tmp_path / "work"), "--cfg-options", *fast_overrides(
        cache, "data.type=coco", f"data.root={data}", f"data.train_ann={data / 'ann.json'}")])
    proc = start(cmd, base_env(cache), log)
    try:
        proc.wait(timeout=300)
    finally:
        stop(proc)
    text = log.read_text()
    assert text.count("elastic_det: error:") == 2, text[-3000:]  # one paragraph per rank
    assert text.count("ann.json") >= 2
    for noise in ("Connection closed by peer", "DistBackendError", "gloo"):
        assert noise not in text, text[-3000:]


def test_env_is_clean_of_secrets_in_the_environment_log(tmp_path, cache):
    """The environment logged at start lists versions and devices, never environment variables."""
    work = tmp_path / "work"
    env = base_env(cache, AWS_SECRET_ACCESS_KEY=SECRET)
    done = run_train(["--work-dir", str(work), "--cfg-options", *fast_overrides(cache, "train.max_steps=1")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in [p for p in Path(work).rglob("*") if p.is_file()]:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in done.stderr
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != SECRET
