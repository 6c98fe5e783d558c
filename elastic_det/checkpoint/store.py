"""Checkpoints in a work dir: atomic commit, verified discovery with fallback, retention.

Layout, identical on local disk and object stores::

    WORK_DIR/checkpoints/step-00000100/state-3f9a0c1e.pt     the data (torch.save of the state dict)
    WORK_DIR/checkpoints/step-00000100/manifest.json         the commit (see manifest.py)

The data object gets a fresh name per attempt, so a stale writer can never overwrite committed data. The
manifest is created last and exclusively: a step directory without a valid manifest was never committed
and is skipped (and cleaned up later by retention).

Retention deletes what it drops before ``save`` returns (manifest first); locally the disk space of the
deleted files is freed in the background (see reclaim.py: 50-80 ms per 335 MB that a save no longer waits for).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec

from ..errors import CheckpointError, StorageError, StorageUnavailableError, WorkDirOwnedError
from ..storage import STORAGE_FAILURES, WorkDir, describe_error, storage_error
from ..storage.hashing import CRC32_ZIP
from .finite import check_finite
from .manifest import Manifest, versions
from .node_copy import NodeCopies
from .reclaim import Reclaimer
from .retention import steps_to_keep
from .verify import InvalidCheckpoint, read_unverified, read_verified

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_META_KEYS = frozenset({"config_hash", "world_size", "reason", "metrics"})

HASH_ALG = CRC32_ZIP
"""The digest new checkpoints record: the CRC-32s torch.save's zip writer computes anyway, plus one of the
remaining bytes (see :mod:`elastic_det.storage.hashing`). A sha256 cost 0.2 s of CPU per 335 MB here, on the
save's critical path. Manifests that record sha256 are still verified with it."""


class StaleCheckpointError(WorkDirOwnedError):
    """A save refused because a newer checkpoint is already committed (this process is a stale attempt,
    or another run writes to the same work dir): final, exit code 3."""


@dataclass
class Checkpoint:
    manifest: Manifest
    location: str  # full path or URL of the step directory (or of the file, for a bare .pt)
    state: dict


def step_dir(step: int) -> str:
    """The step directory of ``step``, relative to the work dir."""
    return f"{CHECKPOINTS}/step-{step:08d}"


class CheckpointStore:
    """Saves and finds checkpoints in ``work_dir`` (see the module docstring for the layout).

    Retention after each commit keeps the newest ``keep_last`` (0 = all), every step divisible by
    ``keep_every`` (0 = off), and the best by ``manifest.metrics[keep_best]`` (higher is better; prefix
    ``min:`` for lower-is-better metrics such as ``min:loss``). ``on_event`` receives fallback events.
    ``node_copies``: where the data of a checkpoint on an object store is copied for the node's other ranks.
    """

    def __init__(self, work_dir: WorkDir, keep_last: int = 2, keep_every: int = 0, keep_best: str = "",
                 on_event: Callable[[dict], None] = lambda event: None, node_copies: NodeCopies | None = None):
        self.work_dir = work_dir
        self.node_copies = node_copies  # remote checkpoints read once per node (node_copy.py)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.on_event = on_event
        self._rejected: dict[int, str] = {}  # steps load_latest found unusable in this process
        self._manifests: dict[int, Manifest] = {}  # parsed committed manifests (immutable once valid)
        self._lock = threading.Lock()
        self._reclaimer = Reclaimer()  # frees the space of locally deleted files in the background

    # ------------------------------------------------------------------------------------------------
    # Save

    def save(self, step: int, state: dict, meta: dict) -> Manifest:
        """Write ``state`` for global step ``step`` and commit it; then apply retention.

        ``meta`` may carry ``config_hash``, ``world_size``, ``reason`` and ``metrics``. Raises
        :class:`StaleCheckpointError` (exit 3: stop now) when a newer checkpoint is committed,
        :class:`StorageError` (final) or :class:`StorageUnavailableError` (retryable) when the store fails,
        :class:`NonFiniteStateError` (final) when a tensor of ``state`` is NaN or infinite (checked before
        anything is written); nothing is committed then and older checkpoints are untouched.
        """
        unknown = set(meta) - _META_KEYS
        if unknown:
            raise ValueError(f"unknown checkpoint meta keys {sorted(unknown)}; allowed: {sorted(_META_KEYS)}")
        check_finite(state, step, self.work_dir.url)
        with self._lock:
            rel = step_dir(step)
            self._reclaimer.wait()  # the space of the files deleted by the previous retention is free
            scan = self._scan()
            self._refuse_if_stale(step, scan)
            if step in self._rejected and MANIFEST in scan.get(step, ()):
                # found broken at resume (e.g. a checksum mismatch): its manifest was never a valid commit
                log.warning("Replacing broken checkpoint step %d in %s", step, self.work_dir.path(rel))
                self.work_dir.delete(f"{rel}/{MANIFEST}")
                self._manifests.pop(step, None)
                scan[step].discard(MANIFEST)
            if MANIFEST in scan.get(step, ()):
                existing = self._valid_manifest(step)
                if existing is not None:
                    log.warning("Checkpoint step %d is already committed in %s (by another writer); "
                                "keeping it", step, self.work_dir.path(rel))
                    return existing
            data_name = f"state-{uuid.uuid4().hex[:8]}.pt"
            size, hash_alg, digest = self.work_dir.write_atomic_digest(
                f"{rel}/{data_name}", lambda f: torch_save(state, f), HASH_ALG)
            manifest = Manifest(
                step=step, data=data_name, size=size, hash_alg=hash_alg, digest=digest,
                config_hash=str(meta.get("config_hash", "")), versions=dict(versions()),
                world_size=int(meta.get("world_size", 0)), reason=str(meta.get("reason", "interval")),
                created=time.time(),
                metrics={str(k): float(v) for k, v in (meta.get("metrics") or {}).items()},
            )
            try:
                self._refuse_if_stale(step, self._scan())
            except BaseException:
                self._delete_quietly(f"{rel}/{data_name}")
                raise
            try:
                committed = self._commit(manifest)
            except STORAGE_FAILURES:
                # The manifest may have landed before the error (e.g. a lost response): then it is
                # committed. Otherwise the data stays as debris for retention: deleting it could
                # orphan a manifest that does exist.
                if not self._names(step, data_name):
                    raise
                committed = manifest
            if committed is not manifest:
                self._delete_quietly(f"{rel}/{data_name}")
                return committed
            self._manifests[step] = manifest
            self._rejected.pop(step, None)
            try:
                self._apply_retention(step)
            except STORAGE_FAILURES as e:  # the checkpoint is committed; a later save removes leftovers
                log.warning("Checkpoint retention after step %d failed in %s: %s", step, self.work_dir.url,
                            describe_error(e))
            return manifest

    def _commit(self, manifest: Manifest) -> Manifest:
        """Create the manifest exclusively; the existing one when another writer committed this step."""
        rel = f"{step_dir(manifest.step)}/{MANIFEST}"
        text = manifest.to_json().encode()
        for _ in range(2):
            if self.work_dir.create_exclusive(rel, text):
                return manifest
            existing = self._valid_manifest(manifest.step)
            if existing is not None:
                log.warning("Checkpoint step %d was committed concurrently by another writer in %s; "
                            "keeping that one", manifest.step, self.work_dir.url)
                return existing
            log.warning("Replacing the invalid manifest of step %d in %s (it was never a valid commit)",
                        manifest.step, self.work_dir.url)
            self.work_dir.delete(rel)
        raise StorageUnavailableError(f"Cannot commit checkpoint step {manifest.step} in {self.work_dir.url}: "
                                      f"its manifest keeps being replaced by another writer")

    def _refuse_if_stale(self, step: int, scan: dict[int, set[str]]) -> None:
        for other in sorted(scan, reverse=True):
            if other <= step:
                return
            if other in self._rejected or MANIFEST not in scan[other]:
                continue
            if self._valid_manifest(other) is not None:
                raise StaleCheckpointError(
                    f"Refusing to commit checkpoint step {step} to {self.work_dir.url}: step {other} is "
                    f"already committed there, so this process is a stale attempt of the job (a newer one "
                    f"is writing to the same work dir). Stop this process; the newer attempt continues.")

    # ------------------------------------------------------------------------------------------------
    # Retention

    def _apply_retention(self, new_step: int) -> None:
        """Delete the older steps retention drops, and debris. Only steps older than ``new_step`` are
        touched, and only after it was committed: a kill at any point leaves ``new_step`` committed."""
        scan = self._scan()
        for step in set(self._manifests) - set(scan):
            del self._manifests[step]
        committed: dict[int, Manifest] = {}
        for step, names in scan.items():
            if step <= new_step and MANIFEST in names and step not in self._rejected:
                manifest = self._manifests.get(step) or self._parse_manifest(step)
                if manifest is not None:
                    committed[step] = manifest
        keep = steps_to_keep(committed, new_step, self.keep_last, self.keep_every, self.keep_best)
        for step in sorted(s for s in scan if s < new_step and s not in keep):
            self._delete_step(step, scan[step])
        for step in sorted(s for s in keep if s < new_step and s in committed):
            # debris of a write killed before this step was committed again: temp files, orphaned data
            for name in scan[step] - {MANIFEST, committed[step].data}:
                self._delete_quietly(f"{step_dir(step)}/{name}")

    def _delete_step(self, step: int, names: set[str]) -> None:
        """Delete the manifest first, so a half-deleted checkpoint never looks committed."""
        rel = step_dir(step)
        if MANIFEST in names:
            self.work_dir.delete(f"{rel}/{MANIFEST}")
        self._manifests.pop(step, None)
        self._delete(rel)
        log.info("Deleted checkpoint step %d from %s (retention)", step, self.work_dir.url)

    def _delete(self, relpath: str) -> None:
        """Delete a file or tree; locally its space is freed in the background (see reclaim.py)."""
        if not self.work_dir.is_local:
            self.work_dir.delete(relpath, recursive=True)
            return
        try:
            self._reclaimer.remove_tree(self.work_dir.path(relpath))
        except OSError as e:
            raise storage_error(f"Cannot delete {self.work_dir.path(relpath)}", e) from e

    def wait_for_retention(self) -> None:
        """Block until the disk space of the checkpoints deleted so far is free (deleted they are already)."""
        self._reclaimer.wait()

    # ------------------------------------------------------------------------------------------------
    # Discovery and loading

    def location(self, step: int) -> str:
        """The full path or URL of the step directory of ``step``."""
        return self.work_dir.path(step_dir(step))

    def committed_steps(self) -> list[int]:
        """Committed steps, ascending, without loading any state.

        A step counts when its manifest parses and names a data object that exists with the recorded
        size (what a commit guarantees; the sha256 is checked only when a checkpoint is loaded). One
        listing plus one small read per step not seen before by this store.
        """
        return [step for step, names in sorted(self._scan().items())
                if MANIFEST in names and step not in self._rejected and self._valid_manifest(step) is not None]

    def newest_committed_step(self) -> int | None:
        """The newest committed step (see :meth:`committed_steps`); None when nothing is committed."""
        for step, names in sorted(self._scan().items(), reverse=True):
            if MANIFEST in names and step not in self._rejected and self._valid_manifest(step) is not None:
                return step
        return None

    def _manifest_steps(self) -> list[int]:
        """Steps that have a manifest file, ascending (nothing verified)."""
        return sorted(step for step, names in self._scan().items() if MANIFEST in names)

    def load_latest(self, map_location: Any = "cpu") -> Checkpoint | None:
        """The newest checkpoint that verifies; None when nothing usable is committed.

        Each newer step directory that does not verify (no manifest, unparseable manifest, size or sha256
        mismatch, load error) is reported through ``on_event`` as a ``fallback`` event and skipped. A store
        that fails for now raises :class:`StorageUnavailableError` instead: a checkpoint that could not be
        read is never taken for a broken one.
        """
        for step in sorted(self._scan(), reverse=True):
            rel = step_dir(step)
            try:
                return self._load_step(self.work_dir, rel, step, map_location)
            except InvalidCheckpoint as e:
                reason = str(e)
                location = self.location(step)
                self._rejected[step] = reason
                self._manifests.pop(step, None)
                log.warning("Skipping checkpoint %s: %s", location, reason)
                self.on_event({"event": "fallback", "checkpoint": location, "reason": reason, "step": step})
        return None

    def load(self, path_or_url: str, map_location: Any = "cpu") -> Checkpoint:
        """Load an explicitly named checkpoint; :class:`CheckpointError` names it and the reason.

        Accepts a step directory, its ``manifest.json``, a work dir (its newest committed checkpoint, no
        fallback), or a bare ``.pt``/``.pth`` file such as a weights export (loaded without a manifest; a
        state without a ``model`` key is taken as the model's state dict).
        """
        target = path_or_url.rstrip("/") or path_or_url
        parent, name = _split(target)
        try:
            if name == MANIFEST:
                return self._load_explicit_step(self._open(parent), parent, map_location)
            if name.endswith((".pt", ".pth")):
                wd = self._open(parent)
                manifest = self._manifest_in(wd)
                if manifest is not None and manifest.data == name:
                    return self._load_explicit_step(wd, parent, map_location)
                return self._load_bare(wd, name, map_location)
            wd = self._open(target)
            if wd.exists(MANIFEST):
                return self._load_explicit_step(wd, target, map_location)
            steps = CheckpointStore(wd)._manifest_steps()
            if steps:
                return self._load_explicit_step(wd, wd.path(step_dir(steps[-1])), map_location,
                                                rel=step_dir(steps[-1]))
            if not wd.exists(""):
                raise CheckpointError(f"Cannot load checkpoint {path_or_url}: it does not exist.")
            raise CheckpointError(f"Cannot load checkpoint {path_or_url}: it is neither a checkpoint directory "
                                  f"(no {MANIFEST}) nor a work dir with committed checkpoints "
                                  f"({CHECKPOINTS}/step-*/{MANIFEST}), nor a .pt file.")
        except StorageError as e:
            raise CheckpointError(f"Cannot load checkpoint {path_or_url}: {e}") from e

    def _load_explicit_step(self, wd: WorkDir, location: str, map_location: Any, rel: str = "") -> Checkpoint:
        match = _STEP_DIR.match((rel or location).rstrip("/").rsplit("/", 1)[-1])
        try:
            return self._load_step(wd, rel, int(match.group(1)) if match else None, map_location)
        except InvalidCheckpoint as e:
            raise CheckpointError(f"Cannot load checkpoint {location}: {e}. An explicitly named checkpoint "
                                  f"is never replaced by another one; name a different one, or resume "
                                  f"with 'auto' to fall back to the newest one that verifies.") from None

    def _load_step(self, wd: WorkDir, rel: str, step: int | None, map_location: Any) -> Checkpoint:
        prefix = f"{rel}/" if rel else ""
        try:
            raw = wd.read_bytes(prefix + MANIFEST)
        except FileNotFoundError:
            raise InvalidCheckpoint(f"no {MANIFEST}: the write never committed (e.g. killed mid-write)") from None
        except StorageError as e:
            raise InvalidCheckpoint(str(e)) from None
        try:
            manifest = Manifest.from_json(raw)
        except ValueError as e:
            raise InvalidCheckpoint(str(e)) from None
        if step is not None and manifest.step != step:
            raise InvalidCheckpoint(f"{MANIFEST} says step {manifest.step}, the directory is step {step}")
        if self.node_copies is not None and self.node_copies.enabled and not wd.is_local:
            state = self.node_copies.read_verified(wd, prefix + manifest.data, manifest, map_location)
        else:
            state = read_verified(wd, prefix + manifest.data, manifest, map_location)
        if not isinstance(state, dict):
            raise InvalidCheckpoint(f"the data holds a {type(state).__name__}, not a state dict")
        return Checkpoint(manifest=manifest, location=wd.path(rel), state=state)

    def _load_bare(self, wd: WorkDir, name: str, map_location: Any) -> Checkpoint:
        location = wd.path(name)
        try:
            size = wd.size(name)
        except FileNotFoundError:
            raise CheckpointError(f"Cannot load checkpoint {location}: it does not exist.") from None
        try:
            state, sha256 = read_unverified(wd, name, map_location)
        except InvalidCheckpoint as e:
            raise CheckpointError(f"Cannot load checkpoint {location}: {e}.") from None
        if not (isinstance(state, dict) and "model" in state):
            state = {"model": state}
        manifest = Manifest(step=_step_of(state), data=name, size=size, sha256=sha256, reason="external")
        return Checkpoint(manifest=manifest, location=location, state=state)

    def export_weights(self, checkpoint: Checkpoint, relpath_or_url: str, weights: str = "auto") -> str:
        """Write the model weights only, atomically, for inference or fine-tuning; returns which: ``ema``
        (the averaged weights, ``state["ema"]["model"]``, which ``auto`` prefers when the run had
        ``ema.enabled``) or ``raw`` (``state["model"]``).

        A relative path is inside the work dir; an absolute path or URL is written where it points.
        """
        ema = checkpoint.state.get("ema")
        averaged = ema.get("model") if isinstance(ema, dict) else None
        if weights == "ema" and averaged is None:
            raise CheckpointError(f"Checkpoint {checkpoint.location} has no averaged weights to export.")
        kind = "ema" if weights != "raw" and averaged is not None else "raw"
        if kind == "raw" and "model" not in checkpoint.state:
            raise CheckpointError(f"Checkpoint {checkpoint.location} has no 'model' entry to export.")
        if fsspec.core.split_protocol(relpath_or_url)[0] is None and not os.path.isabs(relpath_or_url):
            wd, name = self.work_dir, relpath_or_url
        else:
            parent, name = _split(relpath_or_url)
            wd = self._open(parent)
        wd.write_atomic(name, lambda f: torch_save(averaged if kind == "ema" else checkpoint.state["model"], f))
        return kind

    # ------------------------------------------------------------------------------------------------
    # Helpers

    def _open(self, url: str) -> WorkDir:
        """A WorkDir for another location, with this store's storage options when the protocol matches."""
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        options = self.work_dir.storage_options if protocol == self.work_dir.protocol else None
        return WorkDir(url, options)

    def _scan(self) -> dict[int, set[str]]:
        """Step -> names of the files in its step directory (one listing on object stores)."""
        steps: dict[int, set[str]] = {}
        if self.work_dir.is_local:  # empty step directories exist only on file systems
            for name in self.work_dir.listdir(CHECKPOINTS):
                match = _STEP_DIR.match(name)
                if match:
                    steps.setdefault(int(match.group(1)), set())
        for relpath in self.work_dir.find(CHECKPOINTS):
            directory, _, name = relpath.rpartition("/")
            match = _STEP_DIR.match(directory)
            if match:
                steps.setdefault(int(match.group(1)), set()).add(name)
        return steps

    def _parse_manifest(self, step: int) -> Manifest | None:
        """The manifest of ``step``; None when missing or invalid. A store failing for now raises."""
        cached = self._manifests.get(step)
        if cached is not None:
            return cached
        try:
            manifest = Manifest.from_json(self.work_dir.read_bytes(f"{step_dir(step)}/{MANIFEST}"))
        except (FileNotFoundError, ValueError, StorageError):
            return None
        return manifest if manifest.step == step else None

    def _valid_manifest(self, step: int) -> Manifest | None:
        """The manifest of ``step`` when it parses and its data object exists with the recorded size.

        A valid one is remembered (a committed manifest never changes). A store that fails for now
        raises :class:`StorageUnavailableError`: a stale-writer check must not pass because a read failed.
        """
        manifest = self._parse_manifest(step)
        if manifest is None:
            return None
        if step in self._manifests:
            return manifest
        try:
            size = self.work_dir.size(f"{step_dir(step)}/{manifest.data}")
        except (FileNotFoundError, StorageError):
            return None
        if size != manifest.size:
            return None
        self._manifests[step] = manifest
        return manifest

    def _names(self, step: int, data_name: str) -> bool:
        """Whether the stored manifest of ``step`` names ``data_name`` (False when it cannot be read)."""
        self._manifests.pop(step, None)
        try:
            manifest = self._parse_manifest(step)
        except StorageUnavailableError:
            return False
        return manifest is not None and manifest.data == data_name

    @staticmethod
    def _manifest_in(wd: WorkDir) -> Manifest | None:
        try:
            return Manifest.from_json(wd.read_bytes(MANIFEST))
        except (FileNotFoundError, ValueError, StorageError):
            return None

    def _delete_quietly(self, relpath: str) -> None:
        try:
            self._delete(relpath)
        except StorageError as e:
            log.warning("Could not delete %s: %s", self.work_dir.path(relpath), e)


def _split(target: str) -> tuple[str, str]:
    """``(parent, name)`` of a local path or URL."""
    if fsspec.core.split_protocol(target)[0] is None:
        target = os.path.abspath(os.path.expanduser(target))
        return os.path.dirname(target), os.path.basename(target)
    parent, _, name = target.rstrip("/").rpartition("/")
    return parent, name


def _step_of(state: dict) -> int:
    """The global step recorded in a state without a manifest (0 when there is none)."""
    for container in (state, state.get("progress"), state.get("cursor"), state.get("meta")):
        if isinstance(container, dict):
            for key in ("global_step", "step"):
                value = container.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    return 0


def torch_save(obj: Any, f: BinaryIO) -> None:
    """``torch.save``, with torch imported by the first save: listing and checking manifests (the
    supervisor's progress check between attempts) needs no torch, whose import takes seconds."""
    import torch

    torch.save(obj, f)
