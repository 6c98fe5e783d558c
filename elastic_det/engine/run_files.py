"""The files rank 0 writes into the work dir as it goes: text log, ``metrics.jsonl``, ledger, data trace.

On a local (or shared) file system they are appended in place. An object store has no append, so they
are written to a local mirror and uploaded whole at every checkpoint and at exit; the work dir then
always holds the logs up to the last commit. A resumed run on a new machine first downloads what the
work dir already has, so the history continues in one file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from typing import TextIO

from ..records import HISTORY, TEXT_LOG
from ..storage import WorkDir

log = logging.getLogger(__name__)



class RunFiles:
    def __init__(self, work_dir: WorkDir, enabled: bool, mirror_root: str = "~/.cache/elastic_det/runs") -> None:
        self.work_dir = work_dir
        self.enabled = enabled  # rank 0 only
        if work_dir.is_local:
            self.local_root = work_dir.path("")
        else:
            digest = hashlib.sha256(work_dir.url.encode()).hexdigest()[:16]
            self.local_root = os.path.join(os.path.expanduser(mirror_root), digest)
        self._lock = threading.Lock()
        self._files: dict[str, TextIO] = {}
        if enabled:
            os.makedirs(self.local_root, exist_ok=True)
            if not work_dir.is_local:
                for relpath in HISTORY:
                    self._download(relpath)

    def local_path(self, relpath: str) -> str:
        return os.path.join(self.local_root, relpath)

    def _download(self, relpath: str) -> None:
        local = self.local_path(relpath)
        if self.work_dir.exists(relpath):
            with open(local, "wb") as f:
                f.write(self.work_dir.read_bytes(relpath))
        elif os.path.exists(local):
            os.remove(local)  # a mirror of another run with the same URL: the work dir is the truth

    def append_line(self, relpath: str, line: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            f = self._files.get(relpath)
            if f is None:
                path = self.local_path(relpath)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                f = self._files[relpath] = open(path, "a", encoding="utf-8")
            f.write(line + "\n")
            f.flush()

    def sync(self) -> None:
        """Upload the mirrored files to an object-store work dir (no-op on a file system)."""
        if not self.enabled or self.work_dir.is_local:
            return
        with self._lock:
            for f in self._files.values():
                f.flush()
            names = list(self._files)
        for relpath in names:
            try:
                self.work_dir.upload_file(self.local_path(relpath), relpath)
            except Exception as e:  # logs are a convenience; never fail training over them
                log.warning("Could not upload %s to %s: %s", relpath, self.work_dir.url, e)

    def close(self) -> None:
        self.sync()
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


class _RunFileHandler(logging.Handler):
    def __init__(self, files: RunFiles) -> None:
        super().__init__()
        self.files = files

    def emit(self, record: logging.LogRecord) -> None:
        self.files.append_line(TEXT_LOG, self.format(record))


def setup_text_logging(files: RunFiles | None, rank: int) -> None:
    """Console logging (rank 0 at INFO, other ranks warnings only) and, on rank 0, ``WORK_DIR/train.log``."""
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console: logging.Handler = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if files is not None and files.enabled:
        handler = _RunFileHandler(files)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
