"""Reading a checkpoint's data: size and digest against its manifest, then ``torch.load(weights_only=True)``.

A file that ``weights_only`` loading refuses gets a message that says what was found (a pickled object of
some type, a file that is not a PyTorch checkpoint, a damaged archive), free of torch's own advice: loading
an untrusted checkpoint with ``weights_only=False`` would run whatever it holds.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any

from ..errors import StorageError, StorageUnavailableError
from ..storage import WorkDir, describe_error
from ..storage.hashing import CRC32_CHUNKED, CRC32_ZIP, CRC_CHUNK, SHA256, Digest, new_digest, parse_region_digest
from .manifest import Manifest

_READ_CHUNK = 8 << 20
HEAD = 16
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save before 1.6: pickled magic number
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", re.S)
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class InvalidCheckpoint(Exception):
    """A checkpoint that cannot be used; ``str()`` is the reason."""


def read_verified(wd: WorkDir, relpath: str, manifest: Manifest, map_location: Any) -> Any:
    """Verify size and digest (``manifest.hash_alg``) of the data object against the manifest, then load it
    weights-only.

    :class:`InvalidCheckpoint` when the object is missing, truncated, corrupted or refused;
    :class:`StorageUnavailableError` when the store fails for now (the checkpoint may be fine).
    """
    try:
        size = wd.size(relpath)
    except FileNotFoundError:
        raise InvalidCheckpoint(f"data object {manifest.data} is missing") from None
    except StorageError as e:
        raise InvalidCheckpoint(str(e)) from None
    if size != manifest.size:
        raise InvalidCheckpoint(f"data object {manifest.data} has {size} bytes but the manifest records "
                                f"{manifest.size} (truncated or replaced)")
    state, digest = read_unverified(wd, relpath, map_location, expected_size=size, hash_alg=manifest.hash_alg,
                                    recorded=manifest.digest)
    check_digest(digest, manifest)
    return state


def check_digest(digest: str, manifest: Manifest) -> None:
    """:class:`InvalidCheckpoint` naming where the data differs when ``digest`` is not the manifest's."""
    if digest != manifest.digest:
        raise InvalidCheckpoint(f"data object {manifest.data} does not match its {manifest.hash_alg} "
                                f"{_mismatch(digest, manifest)} (corrupted)")


def digest_bytes(blob: bytes, manifest: Manifest) -> str:
    """The digest of ``blob`` by the manifest's algorithm."""
    hasher = new_digest(manifest.hash_alg, manifest.digest, len(blob))
    hasher.update(blob)
    return hasher.hexdigest()


def load_weights_only(source: Any, head: bytes, map_location: Any) -> Any:
    """``torch.load(source, weights_only=True)``; :class:`InvalidCheckpoint` saying what a refused file holds.
    Call it only after the digest was compared."""
    import torch  # here, not at the top: the supervisor lists manifests without importing torch

    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            IndexError, UnicodeDecodeError, OSError) as e:  # what torch.load raises for bad content
        raise InvalidCheckpoint(describe_refusal(e, head)) from None


def _mismatch(found: str, manifest: Manifest) -> str:
    recorded = manifest.digest
    if manifest.hash_alg == CRC32_ZIP:
        found_regions = parse_region_digest(found, manifest.size)
        for (offset, length, crc), (_, _, expected) in zip(found_regions, parse_region_digest(recorded, manifest.size),
                                                           strict=True):
            if crc != expected:
                return f"in bytes {offset}-{offset + length} (CRC-32 {crc:08x} but the zip records {expected:08x})"
        return f"outside its zip records (CRC-32 {found[:8]} but the manifest records {recorded[:8]})"
    if manifest.hash_alg == CRC32_CHUNKED and len(found) == len(recorded):
        bad = next(i for i in range(0, len(recorded), 8) if found[i:i + 8] != recorded[i:i + 8]) // 8
        end = min((bad + 1) * CRC_CHUNK, manifest.size)
        return (f"in bytes {bad * CRC_CHUNK}-{end} ({found[bad * 8:bad * 8 + 8]} but the manifest records "
                f"{recorded[bad * 8:bad * 8 + 8]})")
    return f"({found[:16]}... but the manifest records {recorded[:16]}...)"


def read_unverified(wd: WorkDir, relpath: str, map_location: Any, expected_size: int | None = None,
                    hash_alg: str = SHA256, recorded: str = "") -> tuple[Any, str]:
    """``(torch.load(weights_only=True) of relpath, its hex digest by hash_alg)``; loading never executes code.
    ``recorded``: the manifest's digest, which a ``crc32/zip`` digest takes its regions from.

    Locally the file is hashed by streaming and loaded from its path; remote objects are read once into
    memory. The object is hashed before it is unpickled, and the state is only returned when the caller
    has compared that hash. A remote read that returns fewer bytes than ``expected_size`` is a failing
    store (:class:`StorageUnavailableError`), not a broken checkpoint.
    """
    try:
        if wd.is_local:
            source: Any = wd.path(relpath)
            digest, head = digest_file(source, new_digest(hash_alg, recorded, expected_size or 0))
        else:
            blob = wd.read_bytes(relpath)
            if expected_size is not None and len(blob) != expected_size:
                raise StorageUnavailableError(f"Cannot read {wd.path(relpath)}: the store returned {len(blob)} "
                                              f"of its {expected_size} bytes (retryable)")
            hasher = new_digest(hash_alg, recorded, len(blob))
            hasher.update(blob)
            digest, head = hasher.hexdigest(), blob[:HEAD]
            source = io.BytesIO(blob)
    except (OSError, StorageError) as e:
        raise InvalidCheckpoint(f"cannot read {relpath}: {describe_error(e)}") from None
    return load_weights_only(source, head, map_location), digest


def describe_refusal(error: BaseException, head: bytes) -> str:
    """What a file refused by ``torch.load(weights_only=True)`` holds, in one sentence without torch's
    advice (no escape codes, never the suggestion to load it with ``weights_only=False``)."""
    text = str(error)
    found = _GLOBAL.search(text)
    if found:
        return (f"it contains a pickled object of type {found.group(1)}, which a checkpoint never holds (only "
                f"tensors and plain data); it was refused, and nothing in it ran")
    if not head:
        return "it is empty, not a PyTorch checkpoint"
    if not head.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)):
        return f"it is not a PyTorch checkpoint (first bytes: {_show(head)})"
    if head.startswith(_ZIP_MAGIC) and ("data.pkl" in text or "not in a subdirectory" in text):
        return "it is a zip archive but not a PyTorch checkpoint (no pickled state in it)"
    if "central directory" in text or isinstance(error, EOFError):
        return "it is a damaged PyTorch checkpoint (its zip archive is truncated or overwritten)"
    reason = _UNPICKLER_REASON.search(text)
    detail = _clean(reason.group(1) if reason else text.strip().splitlines()[0] if text.strip() else "")
    return f"it holds content that a checkpoint never holds ({type(error).__name__}{': ' + detail if detail else ''})"


def _show(head: bytes) -> str:
    printable = head.decode("ascii", "replace")
    if all(32 <= b < 127 for b in head):
        return repr(printable)
    return " ".join(f"{b:02x}" for b in head)


def _clean(text: str) -> str:
    """One line of printable text with no escape codes and no advice about ``weights_only``."""
    text = _ESCAPE.sub("", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if "weights_only" not in s]
    return " ".join(sentences)[:200]


def digest_file(path: str, digest: Digest) -> tuple[str, bytes]:
    """``(hex digest, first bytes)`` of a local file, streamed through ``digest``."""
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    head = b""
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if not head:
                head = bytes(view[:HEAD])[:n]
            digest.update(view[:n])
    return digest.hexdigest(), head
