"""Which committed checkpoints retention keeps after a new commit."""

from __future__ import annotations

from .manifest import Manifest


def steps_to_keep(committed: dict[int, Manifest], new_step: int, keep_last: int, keep_every: int,
                  keep_best: str) -> set[int]:
    """The new step, the newest ``keep_last`` (0 = all), every multiple of ``keep_every`` and the best by
    ``keep_best`` (a metric name; ``min:name`` when lower is better)."""
    newest_first = sorted(committed, reverse=True)
    keep = {new_step}
    keep.update(newest_first[:keep_last] if keep_last > 0 else newest_first)
    if keep_every > 0:
        keep.update(s for s in newest_first if s % keep_every == 0)
    best = best_step(committed, keep_best)
    if best is not None:
        keep.add(best)
    return keep


def best_step(committed: dict[int, Manifest], keep_best: str) -> int | None:
    if not keep_best:
        return None
    lower_is_better = keep_best.startswith("min:")
    name = keep_best.split(":", 1)[1] if ":" in keep_best else keep_best
    scored = [(m.metrics[name], step) for step, m in committed.items() if name in m.metrics]
    if not scored:
        return None
    if lower_is_better:
        return min(scored, key=lambda item: (item[0], -item[1]))[1]
    return max(scored)[1]
