"""``data.trace``: rank 0 records which dataset image ids every rank consumed at every global step."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...data.plan import split_share
from ..hook import Hook
from ..run_files import RunFiles

if TYPE_CHECKING:
    from ..runner import Runner


def next_attempt_path(existing: Sequence[str]) -> str:
    """``trace/attempt-K.jsonl`` with K one more than the highest attempt already in the work dir."""
    numbers = [int(n[len("attempt-"):-len(".jsonl")]) for n in existing
               if n.startswith("attempt-") and n.endswith(".jsonl") and n[8:-6].isdigit()]
    return f"trace/attempt-{max(numbers, default=-1) + 1}.jsonl"


class TraceHook(Hook):
    """One line per global step: ``{"step", "epoch", "world_size", "ids": [[rank 0 ids], [rank 1 ids], ...]}``.

    ``step`` is the step's index (0-based: the number of steps completed before it). The split over ranks is
    computed from the plan, the same function the ranks use to pick their share, so no gather is needed.
    """

    def __init__(self, files: RunFiles, relpath: str, image_ids: Sequence[int]) -> None:
        self.files = files
        self.relpath = relpath
        self.image_ids = image_ids

    def after_step(self, runner: Runner) -> None:
        step = runner.last_step
        world = runner.dist.world_size
        ids = [[self.image_ids[i] for i in split_share(step.indices, r, world)] for r in range(world)]
        line = {"step": step.index, "epoch": step.epoch, "world_size": world, "ids": ids}
        self.files.append_line(self.relpath, json.dumps(line))
