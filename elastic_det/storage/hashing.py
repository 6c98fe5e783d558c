"""A writer that counts and hashes the bytes it passes on, so a checkpoint's sha256 costs no re-read."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

_HASH_IN_THREAD_MIN = 1 << 20
_WRITEBACK_EVERY = 32 << 20


class HashingWriter:
    """Forwards writes to ``raw`` while counting bytes and computing their sha256.

    Large chunks are hashed in a helper thread while ``raw.write`` runs (both release the GIL), and the
    write returns only after both finish, so a caller's buffer is never read after it was handed back.

    ``error`` keeps the first exception raised by ``raw.write``: a serializer that calls ``write`` (such as
    ``torch.save``'s zip writer) may replace it by an error of its own while unwinding, and the caller
    wants the storage failure, not its consequence.

    With ``writeback_fd`` (the file descriptor behind ``raw``, a local file), the kernel is asked to start
    writing each 32 MB to disk as soon as it is written (``posix_fadvise(DONTNEED)`` starts asynchronous
    writeback), so the final ``fsync`` waits for the tail only instead of for the whole file.
    """

    def __init__(self, raw: BinaryIO, writeback_fd: int | None = None):
        self._raw = raw
        self._sha = hashlib.sha256()
        self._pool: ThreadPoolExecutor | None = None
        self._fd = writeback_fd if hasattr(os, "posix_fadvise") else None
        self._written_back = 0
        self.size = 0
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _HASH_IN_THREAD_MIN:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
            hashed = self._pool.submit(self._sha.update, view)
            try:
                self._write(view)
            finally:
                hashed.result()
        else:
            self._sha.update(view)
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

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
