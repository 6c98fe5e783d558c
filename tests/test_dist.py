"""dist.wait_for_store: a rank that arrives before rank 0's store joins the moment it opens."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from elastic_det.engine.dist import wait_for_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_waits_for_the_store_and_then_joins_it():
    port, opened, joined = _free_port(), [], []

    def rank_1() -> None:
        assert wait_for_store("127.0.0.1", str(port), timeout=30)
        joined.append(time.monotonic())
        client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=30))
        client.set("rank_1", "here")

    thread = threading.Thread(target=rank_1)
    thread.start()
    time.sleep(0.3)  # rank 0 comes later: the store is not open yet
    opened.append(time.monotonic())
    server = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=30), wait_for_workers=False)
    thread.join(timeout=30)
    assert server.get("rank_1") == b"here"  # the probe connections did not disturb the store
    assert opened[0] <= joined[0] < opened[0] + 5  # at the store's opening, long before the 30 s timeout


def test_nothing_to_wait_for_without_an_address_or_with_the_agents_store(monkeypatch):
    assert wait_for_store("", "", timeout=30) is False
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    started = time.monotonic()
    assert wait_for_store("127.0.0.1", str(_free_port()), timeout=30) is False
    assert time.monotonic() - started < 1


def test_a_store_that_never_opens_is_left_to_the_process_group_after_the_timeout():
    started = time.monotonic()
    assert wait_for_store("127.0.0.1", str(_free_port()), timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 5
