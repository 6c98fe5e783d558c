"""Where a dataset's files come from: local paths as they are, URLs through the node-local cache.

One object per dataset carries the store's options, the image cache and the annotation-index cache, so
that the readers (COCO, VOC) do not care whether ``data.root`` is a folder or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from ..config.schema import DataConfig
from ..errors import DataError
from .cache import ImageCache, Prefetcher
from .index import AnnotationIndex, load_or_build, local_identity, remote_identity
from .remote import RemoteFiles, is_url, join

__all__ = ["DataSource", "is_url", "join"]


class DataSource:
    """Reads for a dataset: ``open_image``, ``read_bytes``, ``index`` (cached), ``prefetch``.

    ``cache_dir`` holds the annotation indexes (for local and remote annotation files) and the images of
    remote roots (at most ``max_bytes``); empty = nothing cached.
    """

    def __init__(self, cache_dir: str = "", max_bytes: int = 0, storage_options: dict[str, Any] | None = None,
                 prefetch_threads: int = 0, prefetch_steps: int = 0):
        self.cache_dir = cache_dir
        self.prefetch_steps = prefetch_steps
        self.remote = RemoteFiles(storage_options)
        images = os.path.join(os.path.expanduser(cache_dir), "images") if cache_dir else ""
        self.images = ImageCache(images, max_bytes, self.remote)
        self.prefetcher = Prefetcher(self.images, prefetch_threads)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> DataSource:
        return cls(cfg.cache.dir, int(cfg.cache.max_gb * (1 << 30)), cfg.storage_options,
                   prefetch_threads=cfg.cache.prefetch_threads, prefetch_steps=cfg.cache.prefetch_steps)

    # --------------------------------------------------------------------------------------------------

    def open_image(self, path: str) -> BinaryIO:
        """A binary file of the image at ``path`` (a local path or a URL)."""
        if is_url(path):
            return self.images.open(path)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise DataError(f"Image file not found: {path}") from None
        except OSError as e:
            raise DataError(f"Cannot read image {path}: {e}") from None

    def read_bytes(self, path: str, what: str) -> bytes:
        """A whole (annotation) file; DataError naming it when missing or unreadable."""
        if is_url(path):
            return self.remote.read_bytes(path, what)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"{what} not found: {path}") from None
        except OSError as e:
            raise DataError(f"Cannot read {what.lower()} {path}: {e}") from None

    def read_many(self, paths: list[str], what: str) -> list[bytes]:
        if paths and is_url(paths[0]):
            return self.remote.read_many(paths, what)
        return [self.read_bytes(p, what) for p in paths]

    def check_folder(self, path: str, what: str) -> None:
        if is_url(path):
            self.remote.check_folder(path, what)
        elif not os.path.isdir(path):
            raise DataError(f"{what} not found: {path}")

    def list_folder(self, path: str) -> list[str]:
        """Names of the files directly in a folder; [] when it cannot be listed (for hints in messages)."""
        if is_url(path):
            try:
                return sorted(n for n in self.remote.listing(path, "Folder") if "/" not in n)
            except DataError:
                return []
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def identity(self, path: str, what: str) -> str:
        """The identity of a file that keys its cached index (see :mod:`elastic_det.data.index`)."""
        if is_url(path):
            return remote_identity(path, self.remote.info(path, what))
        try:
            return local_identity(path)
        except FileNotFoundError:
            raise DataError(f"{what} not found: {path}") from None
        except OSError as e:
            raise DataError(f"Cannot read {what.lower()} {path}: {e}") from None

    def file_identities(self, folder: str, names: list[str], what: str) -> list[str]:
        """``name:size:mtime-or-ETag`` of each file ``folder/name`` (one listing on object stores)."""
        if is_url(folder):
            listing = self.remote.listing(folder, what)
            out = []
            for name in names:
                info = listing.get(name)
                if info is None:
                    raise DataError(f"{what} not found: {join(folder, name)}")
                out.append(f"{name}:{remote_identity('', info)}")
            return out
        out = []
        for name in names:
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                raise DataError(f"{what} not found: {os.path.join(folder, name)}") from None
            out.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
        return out

    def index(self, kind: str, identity: str, build: Callable[[], AnnotationIndex]) -> AnnotationIndex:
        return load_or_build(self.cache_dir, kind, identity, build)

    def prefetch(self, paths: Iterable[str]) -> None:
        """Start filling the image cache with ``paths`` (URLs; local paths are ignored)."""
        self.prefetcher.submit(p for p in paths if is_url(p))
