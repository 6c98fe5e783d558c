"""The rendezvous store no training node hosts: torch's own ``TCPStore``, served by a small long-lived process.

    python -m elastic_det.store --host 0.0.0.0 --port 29400

Every torchrun agent then points at it with ``--rdzv-backend c10d --rdzv-endpoint STORE_HOST:29400
--rdzv-conf is_host=false,...``: no agent hosts the store, so losing any training node (the first one
started included) costs a rendezvous round, not the job. Run it on stable capacity (an on-demand node, a
Slurm login or service host); see docs/deploy.md.

The store holds rendezvous state only (who is in which round); checkpoints hold the training state. When
this process dies and is started again with no state, every agent's next store call fails, torchrun stops,
and the supervisor starts it again: the agents meet in a new rendezvous and resume from the newest
checkpoint, with no step by hand (``tests/test_store.py``).

Exit codes: 0 stopped by SIGTERM/SIGINT; 2 bad arguments; 75 the port cannot be bound now (another store,
or a socket not yet released: retryable).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta

from ..errors import INFRASTRUCTURE_EXIT_CODE, USER_ERROR_EXIT_CODE

log = logging.getLogger(__name__)

DEFAULT_PORT = 29400


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m elastic_det.store",
                                     description="Serve the rendezvous store (torch's TCPStore) for torchrun "
                                                 "agents that all run with --rdzv-conf is_host=false.")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on [0.0.0.0]")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port [{DEFAULT_PORT}]")
    return parser.parse_args(argv)


def serve(host: str, port: int, stop: threading.Event) -> int:
    """Serve a ``TCPStore`` on ``host:port`` until ``stop`` is set; the exit code."""
    if not 0 < port < 65536:
        print(f"elastic_det.store: error: --port {port} is not a TCP port (1-65535).", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    from torch.distributed import TCPStore

    try:
        store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"elastic_det.store: error: cannot listen on {host}:{port} ({first}); another store may hold "
              "the port, or the previous one's socket is not yet released: start it again (exit 75, "
              "retryable).", file=sys.stderr)
        return INFRASTRUCTURE_EXIT_CODE
    print(f"elastic_det.store: serving the rendezvous store (torch TCPStore) on {host}:{store.port}; agents: "
          f"--rdzv-backend c10d --rdzv-endpoint <this host>:{store.port} --rdzv-conf is_host=false",
          file=sys.stderr, flush=True)
    while not stop.wait(1.0):  # a timed wait: the signal handlers run between waits
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return serve(args.host, args.port, stop)
