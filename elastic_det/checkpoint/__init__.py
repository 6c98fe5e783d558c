"""Checkpoints: atomic commit through a manifest, verified discovery with fallback, async saving."""

import importlib
from typing import Any

_HOMES = {"AsyncSaver": "async_save", "snapshot_to_cpu": "async_save", "FORMAT_VERSION": "manifest",
          "Manifest": "manifest", "Checkpoint": "store", "CheckpointStore": "store",
          "StaleCheckpointError": "store", "step_dir": "store"}
"""Where each name of the package lives, imported on first use (PEP 562): the supervisor reads manifests
through the store without importing torch through the async saver."""

__all__ = ["FORMAT_VERSION", "AsyncSaver", "Checkpoint", "CheckpointStore", "Manifest", "StaleCheckpointError",
           "snapshot_to_cpu", "step_dir"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
