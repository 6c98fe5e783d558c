"""``python -m elastic_det.supervise [OPTIONS] -- COMMAND``: the supervisor (elastic_det.launch.supervisor)."""

from .launch.supervisor import main
from .process import exit_now

if __name__ == "__main__":
    # a scheduler relaunches only once this process is gone; every file is closed and every child waited for
    exit_now(main())
