"""``python -m elastic_det.torchrun ARGS``: torchrun without its teardown (elastic_det.launch.torchrun)."""

import sys

from .launch.torchrun import run_and_exit

if __name__ == "__main__":
    run_and_exit(sys.argv[1:])
