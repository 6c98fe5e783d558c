"""The hook API: small objects called around the run, each epoch and each global step.

Hooks run in list order. A hook with state worth resuming returns it from ``state_dict`` and gets it back
from ``load_state_dict``; it is saved in every checkpoint under the hook's class name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Runner


class Hook:
    def before_run(self, runner: Runner) -> None: ...

    def after_run(self, runner: Runner) -> None: ...

    def before_epoch(self, runner: Runner) -> None: ...

    def after_epoch(self, runner: Runner) -> None: ...

    def before_step(self, runner: Runner) -> None: ...

    def after_step(self, runner: Runner) -> None: ...

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
