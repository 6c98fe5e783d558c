"""Shared fixtures: a moto S3 server for the session and a fresh bucket per test.

Tests that start subprocesses (torchrun) pass ``s3_env(s3_server.endpoint)`` on in their environment.
"""

from __future__ import annotations

import pytest
from s3 import MotoServer, s3_env


@pytest.fixture(scope="session")
def s3_server():
    """The moto server (``.endpoint`` is its URL, ``.client()`` a boto3 client)."""
    server = MotoServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh, empty bucket with the AWS environment pointing at moto; returns ``s3://<bucket>``."""
    import s3fs

    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_env(s3_server.endpoint).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{s3_server.create_bucket()}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def procs():
    """Start processes with ``procs.start``; all of them and their descendants are SIGKILLed at the end."""
    from helpers import Procs

    started = Procs()
    try:
        yield started
    finally:
        started.kill_all()
