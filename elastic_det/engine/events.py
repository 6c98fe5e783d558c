"""The run's event stream: the runner and its hooks publish each thing that happens once, as an
:class:`Event`; writers subscribe and turn events into their own records.

The writers are ``metrics.jsonl`` and the console (``engine.writers``), TensorBoard, the goodput ledger
(``goodput.ledger``, subscribed by the ``elastic_det.train`` entry point: the engine does not import the
goodput stack) and the grace check. A writer is any callable taking an ``Event``; it picks the kinds it
knows and ignores the rest. Publishing happens on every rank (the writers decide whether they write on
this one); it never raises because of a writer that failed: a writer's exception is logged and the run
goes on, since no log line is worth a training step.

Kinds and their fields (``step`` is global steps completed; ``time`` is the wall clock):

=====================  ====================================================================================
kind                   fields
=====================  ====================================================================================
imports_done,          one-off phases of the attempt (ledger marks); ``restore_done``: ``load_seconds``
dist_ready,
restore_done
start, resume          the run starts or resumes here (``metrics.jsonl`` events; see DESIGN.md)
fallback               a checkpoint was skipped at restore: ``checkpoint``, ``reason``
loop_start             the training loop starts: ``max_steps``
step                   one global step done: ``step_time``, ``data_time``, ``world_size``
train                  a train record (every ``log.interval`` steps): the averaged losses, lr, timing
eval_start, eval_end   around an evaluation; ``eval_end``: ``seconds``
val                    evaluation results (rank 0): the COCO metrics
checkpoint_start       a save starts blocking the loop: ``reason``
checkpoint_end         the loop may go on: ``reason``, ``seconds`` blocked, ``committed`` (None: the async
                       saver has it)
checkpoint             a checkpoint was committed: ``reason``, ``seconds``, ``path``
checkpoint_failed      a save failed: ``reason``, ``error``, ``failures`` or ``final``, ``seconds``
preempt                stopped by a preemption signal after its checkpoint: ``signal``, ``world_size``
nonfinite_skip         a step's update was dropped for a non-finite loss (``train.nonfinite=skip``):
                       ``terms``, ``in_a_row``, ``skipped`` (in all)
done                   training finished: ``world_size``
run_end                the loop ended: ``how`` (done, preempted, failed), ``signal``, ``error``
=====================  ====================================================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    kind: str
    step: int
    time: float
    fields: dict[str, Any] = field(default_factory=dict)


Writer = Callable[[Event], None]


class EventStream:
    def __init__(self) -> None:
        self._writers: list[Writer] = []

    def subscribe(self, writer: Writer) -> Writer:
        self._writers.append(writer)
        return writer

    def publish(self, kind: str, step: int = -1, *, at: float | None = None, **fields: Any) -> Event:
        event = Event(kind, step, time.time() if at is None else at, fields)
        for writer in self._writers:
            try:
                writer(event)
            except Exception:
                log.exception("The %s writer failed on a %s event; the run goes on.", _name(writer), kind)
        return event


def _name(writer: Writer) -> str:
    return getattr(writer, "__qualname__", None) or type(writer).__name__
