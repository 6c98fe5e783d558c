"""The training state: what a checkpoint holds, how it is built from the parts and restored into them.

One module for both directions, shared by the trainer (save, resume), ``model.load_from`` and
``elastic_det.test`` (weights only). The state holds tensors and plain data only, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ..checkpoint.store import Checkpoint, CheckpointStore
from ..data.plan import Progress
from ..errors import CheckpointError, InfrastructureError, StorageUnavailableError, UserError
from ..models.weights import load_model_state
from ..storage import WorkDir
from . import dist
from .ema import ModelEMA, averaged_weights
from .optim import restore_scheduler

log = logging.getLogger(__name__)

TRAINING_KEYS = ("model", "optimizer", "scheduler", "progress")


@dataclass
class TrainingParts:
    """Everything a training checkpoint restores into (the model not yet wrapped in DDP)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    ema: ModelEMA | None = None  # the averaged weights (ema.enabled)


def build_state(parts: TrainingParts, progress: Progress, hook_states: dict[str, dict],
                meta: dict[str, Any]) -> dict[str, Any]:
    """Everything a resume needs, as tensors and plain data."""
    return {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else {},
        "progress": progress.state_dict(),
        "hooks": hook_states,
        "meta": meta,
        **({"ema": parts.ema.state_dict()} if parts.ema is not None else {}),
    }


def restore(checkpoint: Checkpoint, parts: TrainingParts, base_lr: float, seed: int,
            optimizer_type: str) -> tuple[Progress, dict[str, dict]]:
    """Load ``checkpoint`` into ``parts``; returns the progress cursor and the hooks' states.

    ``base_lr`` is this run's learning rate (it may scale with the world size); a changed ``seed`` is
    taken with a warning (the data order changes from the resumed step on).
    """
    state = checkpoint.state
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"Checkpoint {checkpoint.location} lacks {', '.join(missing)}: it is not a "
                              "training checkpoint (use model.load_from for weights only).")
    load_model_state(parts.model, state["model"], checkpoint.location)
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"Checkpoint {checkpoint.location}: optimizer state does not fit "
                              f"optimizer.type={optimizer_type}: {e}") from None
    restore_scheduler(parts.scheduler, state["scheduler"], base_lr)
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    progress = Progress.from_state_dict(state["progress"])
    if parts.ema is not None:
        if isinstance(state.get("ema"), dict):
            parts.ema.load_state_dict(state["ema"], checkpoint.location)
        else:
            parts.ema.load_state_dict({"model": state["model"], "updates": 0}, checkpoint.location)
            log.warning("Checkpoint %s has no averaged weights (saved without ema.enabled): the average starts "
                        "from its weights at step %d, update counter 0", checkpoint.location, progress.global_step)
    elif isinstance(state.get("ema"), dict):
        log.info("ema.enabled is false: the checkpoint's averaged weights are not used (nor saved again)")
    if progress.seed != seed:
        log.warning("seed %d differs from the checkpoint's %d: the data order changes from here on",
                    seed, progress.seed)
        progress.seed = seed
    log.info("Resumed from %s at global step %d", checkpoint.location, progress.global_step)
    return progress, state.get("hooks", {})


def saved_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The config the checkpoint was trained with, as plain data ({} for a checkpoint without one)."""
    text = checkpoint.state.get("meta", {}).get("config", "")
    return OmegaConf.to_container(OmegaConf.create(text)) if text else {}


def load_checkpoint(path: str, storage_options: dict, timeout: float = 10.0) -> Checkpoint:
    """A checkpoint given by path: a work dir (its newest), a step directory, a manifest or a bare file."""
    parent = path if not path.endswith((".pt", ".pth", ".json")) else os.path.dirname(path) or "."
    return CheckpointStore(WorkDir(parent, storage_options, timeout=timeout)).load(path)


def load_weights(model: nn.Module, path: str, storage_options: dict, timeout: float = 10.0,
                 weights: str = "auto") -> Checkpoint:
    """Load only the model weights of a checkpoint or an export (``model.load_from``, evaluation).

    ``weights``: ``auto`` takes the averaged weights of a checkpoint trained with ``ema.enabled`` and the
    raw ones otherwise; ``ema`` insists on the average, ``raw`` takes the trained weights. Which one was
    loaded: :func:`weights_kind`.
    """
    checkpoint = load_checkpoint(path, storage_options, timeout)
    state = checkpoint.state
    averaged = averaged_weights(state)
    if weights == "ema" and averaged is None:
        raise CheckpointError(f"Checkpoint {checkpoint.location} has no averaged weights (it was not trained "
                              "with ema.enabled=true); use the raw weights.")
    if weights != "raw" and averaged is not None:
        load_model_state(model, averaged, f"{checkpoint.location} (averaged weights)")
        return checkpoint
    raw = state.get("model", state if all(torch.is_tensor(v) for v in state.values()) else None)
    if not raw:
        raise CheckpointError(f"Checkpoint {checkpoint.location} has no 'model' weights (keys: "
                              f"{', '.join(sorted(state)) or 'none'}).")
    load_model_state(model, raw, checkpoint.location)
    return checkpoint


def weights_kind(checkpoint: Checkpoint, weights: str = "auto") -> str:
    """``ema`` or ``raw``: what :func:`load_weights` loads from ``checkpoint`` for ``weights``."""
    return "ema" if weights != "raw" and averaged_weights(checkpoint.state) is not None else "raw"


def find_checkpoint(store: CheckpointStore, resume: str) -> Checkpoint | None:
    """The checkpoint to resume from (``--resume auto|none|PATH``), the same on every rank.

    Rank 0 decides (falling back past broken ones); the others load that one. An error on any rank (bad
    input, exit 2, or a store failing mid-read, exit 75) reaches every rank as the same error, so each ends
    with the same one-paragraph message and exit code. With ``auto`` the other ranks load the newest
    committed checkpoint while rank 0 decides (a restart does not wait for two loads in a row), and keep
    it when rank 0 chose the same. With the store's node copies, each node reads it from an object store
    once: the node's other ranks wait for that read and load the copy.
    """
    if resume == "none":
        return None
    early = _newest_committed(store) if resume == "auto" and not dist.is_main() else None
    checkpoint = None
    choice: tuple[str, ...] | None = None
    if dist.is_main():
        try:
            checkpoint = store.load_latest() if resume == "auto" else store.load(resume)
            choice = ("ok", checkpoint.location) if checkpoint is not None else None
        except (UserError, InfrastructureError) as e:
            dist.broadcast_object(_as_choice(e))
            raise
    choice = dist.broadcast_object(choice)
    if choice is None:
        return None
    if choice[0] == "error":
        raise _error_of(choice)
    if dist.is_main():
        mine: Checkpoint | None = checkpoint
        error: tuple[str, ...] | None = None
    else:
        mine, error = early if early is not None and early.location == choice[1] else None, None
        if mine is None:
            try:
                mine = store.load(choice[1])
            except (UserError, InfrastructureError) as e:
                error = _as_choice(e)
    first = next((e for e in dist.all_gather_objects(error) if e is not None), None)
    if first is not None:
        raise _error_of(first)
    return mine


def _as_choice(error: UserError | InfrastructureError) -> tuple[str, ...]:
    return ("error", "infrastructure" if isinstance(error, InfrastructureError) else "user", str(error))


def _error_of(choice: tuple[str, ...]) -> Exception:
    """The error another rank met, as this rank's own: the same message and exit code."""
    return StorageUnavailableError(choice[2]) if choice[1] == "infrastructure" else CheckpointError(choice[2])


def _newest_committed(store: CheckpointStore) -> Checkpoint | None:
    """A guess at rank 0's choice: the newest committed checkpoint, or None when it does not load (then the
    rank loads rank 0's choice after all; rank 0 reports what was wrong)."""
    try:
        step = store.newest_committed_step()
        return store.load(store.location(step)) if step is not None else None
    except (UserError, InfrastructureError, OSError):
        return None
