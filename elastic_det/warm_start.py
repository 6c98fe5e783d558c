"""``python -m elastic_det.warm_start SOCKET``: the per-node warm-start server (elastic_det.launch.warm_server)."""

from .launch.warm_server import main
from .process import exit_now

if __name__ == "__main__":
    exit_now(main())  # the supervisor waits for this process before it exits
