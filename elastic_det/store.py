"""``python -m elastic_det.store [--host H] [--port P]``: the external rendezvous store (elastic_det.launch.store)."""

from .launch.store import main
from .process import exit_now

if __name__ == "__main__":
    exit_now(main())
