"""Checkpoints: atomic commit through a manifest, verified discovery with fallback, async saving."""

from .async_save import AsyncSaver, snapshot_to_cpu
from .manifest import FORMAT_VERSION, Manifest
from .store import Checkpoint, CheckpointStore, StaleCheckpointError, step_dir

__all__ = ["FORMAT_VERSION", "AsyncSaver", "Checkpoint", "CheckpointStore", "Manifest", "StaleCheckpointError",
           "snapshot_to_cpu", "step_dir"]
