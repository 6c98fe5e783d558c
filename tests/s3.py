"""A real S3 endpoint for tests: moto's HTTP server on a free loopback port (also used by bench/).

    server = MotoServer.start()
    env = s3_env(server.endpoint)   # pass to subprocesses (torchrun) as their environment additions
    ...
    server.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point boto/s3fs at ``endpoint`` with moto's dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    process: subprocess.Popen
    endpoint: str

    @classmethod
    def start(cls, timeout: float = 60.0, log_path: str | None = None) -> MotoServer:
        """Start ``python -m moto.server`` in its own process group and wait until it answers."""
        port = free_port()
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if log_path:
            log.close()
        server = cls(process, f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode} before answering")
            try:
                with urllib.request.urlopen(server.endpoint + "/", timeout=1):
                    return server
            except urllib.error.HTTPError:  # any HTTP answer means it is up
                return server
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(f"moto server on {server.endpoint} did not answer in {timeout} s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server's process group (its own, by the server's PID) and reap it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def create_bucket(self, prefix: str = "test") -> str:
        """Create a fresh bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name
