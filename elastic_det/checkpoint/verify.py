"""Reading a checkpoint's data: size and sha256 against its manifest, then ``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from ..errors import StorageError
from ..storage import WorkDir, describe_error
from .manifest import Manifest

_READ_CHUNK = 8 << 20


class InvalidCheckpoint(Exception):
    """A checkpoint that cannot be used; ``str()`` is the reason."""


def read_verified(wd: WorkDir, relpath: str, manifest: Manifest, map_location: Any) -> Any:
    """Verify size and sha256 of the data object against the manifest, then load it weights-only."""
    try:
        size = wd.size(relpath)
    except FileNotFoundError:
        raise InvalidCheckpoint(f"data object {manifest.data} is missing") from None
    except StorageError as e:
        raise InvalidCheckpoint(str(e)) from None
    if size != manifest.size:
        raise InvalidCheckpoint(f"data object {manifest.data} has {size} bytes but the manifest records "
                       f"{manifest.size} (truncated or replaced)")
    state, sha256 = read_unverified(wd, relpath, map_location)
    if sha256 != manifest.sha256:
        raise InvalidCheckpoint(f"data object {manifest.data} has sha256 {sha256[:16]}... but the manifest records "
                       f"{manifest.sha256[:16]}... (corrupted)")
    return state


def read_unverified(wd: WorkDir, relpath: str, map_location: Any) -> tuple[Any, str]:
    """``(torch.load(weights_only=True) of relpath, its sha256)``; loading never executes code.

    Locally the file is hashed by streaming and loaded from its path; remote objects are read once into
    memory. The object is hashed before it is unpickled, and the state is only returned when the caller
    has compared that hash.
    """
    try:
        if wd.is_local:
            source: Any = wd.path(relpath)
            sha256 = sha256_file(source)
        else:
            blob = wd.read_bytes(relpath)
            sha256 = hashlib.sha256(blob).hexdigest()
            source = io.BytesIO(blob)
    except (OSError, StorageError) as e:
        raise InvalidCheckpoint(f"cannot read {relpath}: {describe_error(e)}") from None
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for a bad zip, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidCheckpoint(f"torch.load(weights_only=True) failed: {type(e).__name__}: {first}") from None
    return state, sha256


def sha256_file(path: str) -> str:
    sha = hashlib.sha256()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
    return sha.hexdigest()
