"""``python -m elastic_det.report WORK_DIR``: the goodput report (elastic_det.goodput.report)."""

import sys

from .goodput.report import main

if __name__ == "__main__":
    sys.exit(main())
