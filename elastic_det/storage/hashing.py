"""A writer that counts and digests the bytes it passes on, so a checkpoint's digest costs no re-read.

The digests (``hash_alg``):

* ``sha256``: what format-1 checkpoint manifests record; still the default of :meth:`WorkDir.write_atomic`.
* ``crc32/64MiB``: the CRC-32 (zlib) of each 64 MiB chunk of the bytes, as 8 hex digits per chunk, in order.
* ``crc32/zip``: for a zip archive such as ``torch.save`` writes. The zip writer already computes the CRC-32
  of every record and stores it in the archive's directory; every record of at least 1 MiB whose bytes went
  out in one write is covered by that CRC, and the digest is the CRC-32 of all the other bytes (headers,
  small records, the directory holding the CRCs) followed by each covered region and its CRC::

      "<crc of the rest, 8 hex>[ <offset>+<length>:<crc, 8 hex>]..."

  Verifying needs no zip parsing: one CRC per listed region, one for the rest. Writing costs a CRC of the
  small writes only (15 MB of 335 MB for a Faster R-CNN state) instead of the whole file.

All are integrity checks against accidental damage, not signatures (neither is a sha256 beside the data it
describes). Size is checked separately, so truncation is always caught; a CRC-32 catches every burst of up
to 32 flipped bits in what it covers, every one or two flipped bits in up to 512 MiB (Hamming distance 3),
and other damage with probability 1 - 2^-32. zlib's CRC-32 runs at 3.5 GB/s on one core here (sha256 1.7
with SHA-NI, blake2b 0.8, md5 0.7) and releases the GIL.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import re
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Protocol

SHA256 = "sha256"
CRC32_CHUNKED = "crc32/64MiB"
CRC32_ZIP = "crc32/zip"
HASH_ALGS = (SHA256, CRC32_CHUNKED, CRC32_ZIP)

CRC_CHUNK = 64 << 20
_HASH_IN_THREAD_MIN = 1 << 20
_WRITEBACK_EVERY = 32 << 20
_ZIP_TAIL_MAX = 64 << 20  # the zip directory must be within the last this many bytes of small writes
_REGION = re.compile(r" (\d+)\+(\d+):([0-9a-f]{8})")
_REGION_DIGEST = re.compile(r"[0-9a-f]{8}(?: \d+\+\d+:[0-9a-f]{8})*")


class Digest(Protocol):
    def update(self, data: Any) -> None: ...

    def hexdigest(self) -> str: ...


class ChunkedCrc32:
    """The ``crc32/64MiB`` digest (see the module docstring), fed incrementally like a hashlib object."""

    def __init__(self) -> None:
        self._crcs: list[int] = []
        self._crc = 0
        self._filled = 0  # bytes in the current chunk

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            take = min(view.nbytes, CRC_CHUNK - self._filled)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == CRC_CHUNK:
                self._crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def hexdigest(self) -> str:
        crcs = self._crcs + ([self._crc] if self._filled or not self._crcs else [])
        return "".join(f"{crc:08x}" for crc in crcs)


class RegionCrc32:
    """Recomputes a ``crc32/zip`` digest: the CRC-32 of each given region and one of all other bytes."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self._regions = regions
        self._crcs = [0] * len(regions)
        self._rest = 0
        self._pos = 0
        self._next = 0  # index of the first region that does not end before _pos

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            take, index = view.nbytes, None
            while self._next < len(self._regions) and self._end(self._next) <= self._pos:
                self._next += 1
            if self._next < len(self._regions):
                start, length = self._regions[self._next]
                if self._pos >= start:
                    take, index = min(take, start + length - self._pos), self._next
                else:
                    take = min(take, start - self._pos)
            part, view = view[:take], view[take:]
            if index is None:
                self._rest = zlib.crc32(part, self._rest)
            else:
                self._crcs[index] = zlib.crc32(part, self._crcs[index])
            self._pos += take

    def _end(self, index: int) -> int:
        start, length = self._regions[index]
        return start + length

    def hexdigest(self) -> str:
        regions = [(offset, length, crc) for (offset, length), crc in zip(self._regions, self._crcs, strict=True)]
        return format_region_digest(self._rest, regions)


def format_region_digest(rest: int, regions: list[tuple[int, int, int]]) -> str:
    return f"{rest:08x}" + "".join(f" {offset}+{length}:{crc:08x}" for offset, length, crc in regions)


def parse_region_digest(digest: str, size: int) -> list[tuple[int, int, int]]:
    """The ``(offset, length, crc)`` regions of a ``crc32/zip`` digest of ``size`` bytes; ValueError when it is
    not one (malformed, regions out of order, overlapping or past the end)."""
    if not _REGION_DIGEST.fullmatch(digest):
        raise ValueError("is not '<8 hex>[ <offset>+<length>:<8 hex>]...'")
    regions = [(int(o), int(n), int(c, 16)) for o, n, c in _REGION.findall(digest)]
    end = 0
    for offset, length, _ in regions:
        if offset < end or length == 0 or offset + length > size:
            raise ValueError("has regions out of order, overlapping, empty or past the end of the data")
        end = offset + length
    return regions


def new_digest(hash_alg: str, recorded: str = "", size: int = 0) -> Digest:
    """A fresh digest object for ``hash_alg`` (one of :data:`HASH_ALGS`). For ``crc32/zip`` it recomputes
    the ``recorded`` digest of ``size`` bytes (the regions come from it)."""
    if hash_alg == SHA256:
        return hashlib.sha256()
    if hash_alg == CRC32_CHUNKED:
        return ChunkedCrc32()
    if hash_alg == CRC32_ZIP:
        return RegionCrc32([(o, n) for o, n, _ in parse_region_digest(recorded, size)])
    raise ValueError(f"unknown hash_alg {hash_alg!r}; known: {', '.join(HASH_ALGS)}")


def check_digest(hash_alg: str, digest: str, size: int) -> None:
    """ValueError saying what is wrong when ``digest`` cannot be a ``hash_alg`` digest of ``size`` bytes."""
    if hash_alg == CRC32_ZIP:
        parse_region_digest(digest, size)
        return
    if hash_alg not in (SHA256, CRC32_CHUNKED):
        raise ValueError(f"unknown hash_alg {hash_alg!r}; known: {', '.join(HASH_ALGS)}")
    digits = 64 if hash_alg == SHA256 else 8 * max(1, -(-size // CRC_CHUNK))
    if not re.fullmatch(rf"[0-9a-f]{{{digits}}}", digest):
        raise ValueError(f"is not {digits} hex digits")


class ZipRecordCrc:
    """The writing side of ``crc32/zip``: small writes are CRC'd, large ones only noted; at the end the
    zip directory (in the last small writes) says which CRC covers each large write."""

    def __init__(self) -> None:
        self._rest = 0
        self._skipped: list[tuple[int, int]] = []  # (offset, length) of the large writes
        self._tail: deque[bytes] = deque()  # the small writes since the last large one (at most _ZIP_TAIL_MAX)
        self._tail_bytes = 0

    def small(self, view: memoryview) -> None:
        self._rest = zlib.crc32(view, self._rest)
        self._tail.append(bytes(view))
        self._tail_bytes += view.nbytes
        while self._tail_bytes > _ZIP_TAIL_MAX:
            self._tail_bytes -= len(self._tail.popleft())

    def large(self, offset: int, length: int) -> None:
        self._skipped.append((offset, length))
        self._tail.clear()
        self._tail_bytes = 0

    def hexdigest(self, size: int) -> str | None:
        """The digest, or None when the bytes are not a zip whose directory holds a CRC-32 for each large
        write as one whole stored record (the caller then digests the bytes some other way)."""
        tail = b"".join(self._tail)
        try:
            with zipfile.ZipFile(_TailFile(tail, size)) as archive:
                members = sorted(archive.infolist(), key=lambda info: info.header_offset)
                directory = archive.start_dir
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, IndexError):
            return None
        starts = [info.header_offset for info in members]
        regions = []
        for offset, length in self._skipped:
            i = bisect.bisect_left(starts, offset) - 1
            if i < 0:
                return None
            info = members[i]
            end = starts[i + 1] if i + 1 < len(members) else directory
            if (info.compress_type != zipfile.ZIP_STORED or info.compress_size != length or info.file_size != length
                    or offset < info.header_offset + 30 + len(info.orig_filename) or offset + length > end
                    or info.CRC == 0):  # 0: the writer did not compute CRCs (torch's set_crc32_options(False))
                return None
            regions.append((offset, length, info.CRC))
        return format_region_digest(self._rest, regions)


class _TailFile(io.RawIOBase):
    """The last bytes of a file of ``size`` bytes, for :class:`zipfile.ZipFile` to read its directory from."""

    def __init__(self, tail: bytes, size: int) -> None:
        self._tail, self._start, self._size, self._pos = tail, size - len(tail), size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        if self._pos < 0:
            raise OSError("seek before the start")
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if self._pos < self._start:
            raise OSError("read before the kept tail")
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        data = self._tail[self._pos - self._start:end - self._start]
        self._pos += len(data)
        return data


class HashingWriter:
    """Forwards writes to ``raw`` while counting bytes and computing their digest (``hash_alg``).

    Large chunks are hashed in a helper thread while ``raw.write`` runs (both release the GIL), and the
    write returns only after both finish, so a caller's buffer is never read after it was handed back
    (``torch.save`` hands out buffers it frees afterwards, e.g. the CPU copy of a CUDA storage).

    ``error`` keeps the first exception raised by ``raw.write``: a serializer that calls ``write`` (such as
    ``torch.save``'s zip writer) may replace it by an error of its own while unwinding, and the caller
    wants the storage failure, not its consequence.

    With ``writeback_fd`` (the file descriptor behind ``raw``, a local file), the kernel is asked to start
    writing each 32 MB to disk as soon as it is written (``posix_fadvise(DONTNEED)`` starts asynchronous
    writeback), so the final ``fsync`` waits for the tail only instead of for the whole file.
    """

    def __init__(self, raw: BinaryIO, writeback_fd: int | None = None, hash_alg: str = SHA256):
        self._raw = raw
        self._zip = ZipRecordCrc() if hash_alg == CRC32_ZIP else None
        self._digest = new_digest(hash_alg) if self._zip is None else None
        self._pool: ThreadPoolExecutor | None = None
        self._fd = writeback_fd if hasattr(os, "posix_fadvise") else None
        self._written_back = 0
        self.hash_alg = hash_alg
        self.size = 0
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._zip is not None:
            if view.nbytes >= _HASH_IN_THREAD_MIN:
                self._zip.large(self.size, view.nbytes)
            else:
                self._zip.small(view)
            self._write(view)
        elif view.nbytes >= _HASH_IN_THREAD_MIN:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="checksum")
            hashed = self._pool.submit(self._digest.update, view)
            try:
                self._write(view)
            finally:
                hashed.result()
        else:
            self._digest.update(view)
            self._write(view)
        self.size += view.nbytes
        if self._fd is not None and self.size - self._written_back >= _WRITEBACK_EVERY:
            self._start_writeback()
        return view.nbytes

    def _write(self, view: memoryview) -> None:
        try:
            self._raw.write(view)
        except BaseException as e:
            if self.error is None:
                self.error = e
            raise

    def _start_writeback(self) -> None:
        self._raw.flush()
        try:
            os.posix_fadvise(self._fd, self._written_back, self.size - self._written_back, os.POSIX_FADV_DONTNEED)
        except OSError:  # a file system without it: the final fsync does all the work, as without this
            self._fd = None
        self._written_back = self.size

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str | None:
        """The digest by ``hash_alg``; for ``crc32/zip`` None when the bytes are not such a zip."""
        if self._zip is not None:
            return self._zip.hexdigest(self.size)
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
