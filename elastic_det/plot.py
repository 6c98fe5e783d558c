"""``python -m elastic_det.plot WORK_DIR``: loss and mAP curves from metrics.jsonl (elastic_det.goodput.curve)."""

import sys

from .goodput.curve import main

if __name__ == "__main__":
    sys.exit(main())
