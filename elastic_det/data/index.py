"""The annotation index: a parsed annotation set as a few flat numpy arrays, cached on local disk.

Parsing COCO's ``instances_train2017.json`` (118k images, 860k boxes) takes tens of seconds and gigabytes
per process; under elastic training every process of every node would pay that again at every restart.
The index is built once per node from the parsed file, written atomically (a temp folder renamed into
place) under ``<cache dir>/index/``, and opened afterwards with ``np.load(mmap_mode="r")``: a restart costs
milliseconds, and the processes of a node share the same page-cache pages instead of holding a copy each.

**Key.** An index is found by the identity of its source, never by its name alone:

* a local file: path, size, mtime (ns) and the sha256 of its first and last MiB. Size and mtime change on
  every ordinary rewrite; the head/tail hash catches a different file copied in with its size and mtime
  preserved (``cp -p``, ``rsync -t``) at the cost of reading 2 MiB (a full sha256 of 450 MB would cost a
  second or more on every start, which is what the index is there to avoid);
* an object in a store: URL, size and ETag (the store's content tag, new on every write of the object),
  from one HEAD request;
* a VOC set: the split file's content and the identity (size + mtime or ETag) of every XML it names.

The format version is part of the key, so a changed parser never reads an old index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

from .cache import FULL_ERRNOS

logger = logging.getLogger(__name__)

INDEX_VERSION = 2
_EDGE_BYTES = 1 << 20


@dataclass
class Strings:
    """A list of strings as one UTF-8 blob and offsets (mmap-friendly, no Python objects per entry)."""

    blob: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len + 1

    @classmethod
    def from_list(cls, items: Sequence[str]) -> Strings:
        encoded = [s.encode("utf-8") for s in items]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8")

    def tolist(self) -> list[str]:
        data = bytes(self.blob)
        bounds = self.offsets.tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class AnnotationIndex:
    """Images and their annotations. Annotations of image ``i`` are ``ann_start[i]:ann_start[i + 1]``.

    ``has_masks``: the segmentation arrays are there (see :mod:`elastic_det.data.masks`).
    ``ann_bbox`` holds the numbers as written in the file: ``[x, y, w, h]`` for COCO (``box_format ==
    "xywh"``), ``[xmin, ymin, xmax, ymax]`` for VOC (``"xyxy"``). ``ann_cat`` holds a value of ``cat_id``
    (COCO category ids; VOC: the position of the class name in ``cat_names``).
    """

    box_format: str
    image_id: np.ndarray  # int64 (n,)
    width: np.ndarray  # int64 (n,)
    height: np.ndarray  # int64 (n,)
    files: Strings  # image file name relative to the image root
    ann_start: np.ndarray  # int64 (n + 1,)
    ann_id: np.ndarray  # int64 (m,)
    ann_cat: np.ndarray  # int64 (m,)
    ann_bbox: np.ndarray  # float64 (m, 4)
    ann_area: np.ndarray  # float64 (m,)
    ann_crowd: np.ndarray  # bool (m,): COCO iscrowd, VOC difficult
    cat_id: np.ndarray  # int64 (k,), ascending
    cat_names: Strings
    # Segmentations (COCO with masks, see elastic_det.data.masks); None in an index of boxes only:
    seg_poly_start: np.ndarray | None = None  # int64 (m + 1,): polygons of each annotation
    poly_start: np.ndarray | None = None  # int64 (P + 1,): coordinates of each polygon
    poly_xy: np.ndarray | None = None  # float64 (C,)
    rle: Strings | None = None  # compressed RLE counts per annotation ("" for polygons)
    # Derived when built (see finish), so that opening a cached index does no per-annotation work:
    trained_count: np.ndarray | None = None  # int64 (n,): boxes to train on per image
    degenerate: np.ndarray | None = None  # int64 (d,): non-crowd annotations with no width or height left

    def finish(self) -> AnnotationIndex:
        """Fill the derived arrays (boxes clipped to their image, crowd boxes not trained on)."""
        image_of = self.image_of_annotation()
        boxes = clip_boxes(self.ann_bbox, self.box_format, self.width[image_of], self.height[image_of])
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        crowd = np.asarray(self.ann_crowd, dtype=bool)
        self.trained_count = np.bincount(image_of[valid & ~crowd], minlength=len(self.image_id)).astype(np.int64)
        self.degenerate = np.flatnonzero(~valid & ~crowd).astype(np.int64)
        return self

    @property
    def has_masks(self) -> bool:
        return self.rle is not None

    def image_of_annotation(self) -> np.ndarray:
        """The image position of every annotation, (m,) int64."""
        return np.repeat(np.arange(len(self.image_id)), np.diff(self.ann_start))

    def arrays(self) -> Iterator[tuple[str, np.ndarray]]:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Strings):
                yield f"{f.name}.blob", value.blob
                yield f"{f.name}.offsets", value.offsets
            elif isinstance(value, np.ndarray):
                yield f.name, value


def clip_boxes(bbox: np.ndarray, box_format: str, width: np.ndarray | int, height: np.ndarray | int) -> np.ndarray:
    """Raw boxes of the file as XYXY float64, clipped to the image."""
    bbox = np.asarray(bbox)
    x1, y1 = bbox[:, 0], bbox[:, 1]
    x2, y2 = (x1 + bbox[:, 2], y1 + bbox[:, 3]) if box_format == "xywh" else (bbox[:, 2], bbox[:, 3])
    return np.stack([np.maximum(x1, 0.0), np.maximum(y1, 0.0), np.minimum(x2, width), np.minimum(y2, height)],
                    axis=1).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------------
# On disk: a folder with one .npy per array and meta.json, renamed into place when complete.


def save(index: AnnotationIndex, folder: str) -> None:
    """Write ``index`` to ``folder`` atomically; if another process wrote it first, keep theirs."""
    if index.trained_count is None:
        index.finish()
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        for name, array in index.arrays():
            with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"version": INDEX_VERSION, "box_format": index.box_format}, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(tmp, folder)  # fails when folder exists: the first complete index wins
        except OSError:
            if not os.path.isdir(folder):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load(folder: str) -> AnnotationIndex:
    """The index in ``folder``, its arrays memory-mapped read-only (shared between processes)."""
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("version") != INDEX_VERSION:
        raise ValueError(f"index version {meta.get('version')} is not {INDEX_VERSION}")

    def array(name: str) -> np.ndarray:
        return np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r", allow_pickle=False)

    kwargs: dict = {"box_format": meta["box_format"]}
    for f in fields(AnnotationIndex):
        if f.name == "box_format":
            continue
        optional = "None" in str(f.type)
        if "Strings" in str(f.type):
            if not (optional and not os.path.exists(os.path.join(folder, f"{f.name}.blob.npy"))):
                kwargs[f.name] = Strings(array(f"{f.name}.blob"), array(f"{f.name}.offsets"))
        elif not (optional and not os.path.exists(os.path.join(folder, f"{f.name}.npy"))):
            kwargs[f.name] = array(f.name)
    return AnnotationIndex(**kwargs)


def load_or_build(cache_dir: str, kind: str, identity: str, build: Callable[[], AnnotationIndex]) -> AnnotationIndex:
    """The cached index of ``identity`` or, the first time, ``build()`` (then cached).

    Processes of a node that start together wait for the first one's build (an ``flock``) instead of
    parsing the same file each. Without a usable cache dir (empty, full, not writable) the index is built
    in memory with one warning; bad input raised by ``build`` propagates and nothing is cached.
    """
    if not cache_dir:
        return build()
    root = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "index")
    key = hashlib.sha256(f"v{INDEX_VERSION}\n{identity}".encode()).hexdigest()[:32]
    folder = os.path.join(root, f"{kind}-{key}")
    index = _try_load(folder)
    if index is not None:
        return index
    try:
        os.makedirs(root, exist_ok=True)
        lock_fd = os.open(f"{folder}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        logger.warning("Cannot use the index cache %s (%s): parsing the annotations in memory.", root,
                       os.strerror(e.errno or 0))
        return build()
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        index = _try_load(folder)
        if index is not None:
            return index
        index = build()
        try:
            save(index, folder)
        except OSError as e:
            level = logging.WARNING if e.errno in FULL_ERRNOS else logging.ERROR
            logger.log(level, "Could not cache the annotation index in %s (%s); the next start parses the "
                       "annotations again.", folder, os.strerror(e.errno or 0))
        return index
    finally:
        os.close(lock_fd)


def _try_load(folder: str) -> AnnotationIndex | None:
    if not os.path.isdir(folder):
        return None
    try:
        return load(folder)
    except (OSError, ValueError, KeyError) as e:
        logger.warning("Annotation index %s is unreadable (%s); building it again.", folder, e)
        with contextlib.suppress(OSError):
            os.rename(folder, f"{folder}.broken-{os.getpid()}")
        shutil.rmtree(f"{folder}.broken-{os.getpid()}", ignore_errors=True)
        return None


def local_identity(path: str) -> str:
    """Path, size, mtime and the sha256 of the first and last MiB of a local file (see the module doc)."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_EDGE_BYTES))
        if st.st_size > _EDGE_BYTES:
            f.seek(max(st.st_size - _EDGE_BYTES, _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))
    return f"file:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{digest.hexdigest()}"


def remote_identity(url: str, info: dict) -> str:
    """URL, size and ETag (or modification time where the store has no ETag) of a stored object."""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{url}:{info.get('size')}:{tag}"
