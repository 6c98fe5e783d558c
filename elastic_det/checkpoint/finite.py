"""The last line of defence of guarantee 7: a state with a NaN or infinite tensor is never committed.

``CheckpointStore.save`` calls :func:`check_finite` before it writes anything (so before the manifest, the
commit): a parameter, buffer, averaged weight or optimizer moment that is not finite refuses the save with
:class:`NonFiniteStateError`, and the newest committed checkpoint stays the newest. One reduction per tensor
(``isfinite(t).all()``) and one host read at the end: a few milliseconds per 100 MB on a CPU (see
bench/checkpoint.py), done by the save thread for an async save.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..errors import NonFiniteStateError

SHOWN = 6
"""How many of the non-finite tensors the error names."""


def nonfinite_tensors(state: Any) -> list[str]:
    """Dotted names (``model.head.weight``, ``optimizer.state.3.exp_avg``) of the floating-point tensors of
    ``state`` that hold a NaN or an infinity, in the order they appear."""
    import torch

    named = [(name, t) for name, t in _tensors(state, "") if t.is_floating_point() or t.is_complex()]
    by_device: dict[Any, list[tuple[str, Any]]] = {}
    for name, t in named:
        by_device.setdefault(t.device, []).append((name, t))
    bad = set()
    for items in by_device.values():  # one host read per device
        ok = torch.stack([torch.isfinite(t).all() for _, t in items]).tolist()
        bad.update(name for (name, _), fine in zip(items, ok, strict=True) if not fine)
    return [name for name, _ in named if name in bad]


def check_finite(state: Any, step: int, where: str) -> None:
    """Raise :class:`NonFiniteStateError` naming the non-finite tensors of ``state`` (the step at ``where``)."""
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:SHOWN]) + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")
        raise NonFiniteStateError(
            f"Refusing to commit checkpoint step {step} to {where}: {len(bad)} tensor(s) of the training state "
            f"are not finite (NaN or inf): {shown}. Nothing was written; the newest committed checkpoint "
            f"stays the newest. Training has diverged: lower optimizer.lr, enable optimizer.clip_grad_norm, "
            f"or look at the data of the steps before {step}.")


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{name}.{i}" if name else str(i))
