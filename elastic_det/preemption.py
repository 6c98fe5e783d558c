"""Preemption signals only set a flag; the runner acts on it at the next step boundary.

SIGTERM (Kubernetes, torchrun shutdown), SIGINT, SIGUSR1 and SIGUSR2 (Slurm ``--signal``). Doing the save
inside the handler would race with the step and with other ranks; instead all ranks agree on the flag with
a collective after each step and save from the main loop. A second signal changes nothing.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if not self._event.is_set():
            self.signal_name = signal.Signals(signum).name
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

