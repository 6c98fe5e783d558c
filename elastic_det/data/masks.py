"""Instance masks in the annotation index: COCO ``segmentation`` kept compact, decoded per sample.

A COCO segmentation is a list of polygons (``[[x1, y1, x2, y2, ...], ...]``), an uncompressed RLE
(``{"size": [h, w], "counts": [int, ...]}``, crowd regions) or a compressed one (``"counts": "string"``).
The index keeps them as flat arrays that are memory-mapped like the boxes:

* ``seg_poly_start`` (m + 1,): annotation ``j``'s polygons are ``seg_poly_start[j]:seg_poly_start[j + 1]``;
* ``poly_start`` (P + 1,): polygon ``p``'s coordinates are ``poly_xy[poly_start[p]:poly_start[p + 1]]``;
* ``poly_xy`` float64: the coordinates as written (float64, so that a decoded mask equals pycocotools'
  ``annToMask`` bit for bit: its rasteriser rounds ``5 * x``, where float32 would move a point across);
* ``rle`` (a :class:`~elastic_det.data.index.Strings`): the compressed RLE counts of annotation ``j``,
  empty for polygon annotations. Uncompressed RLEs are compressed once, by pycocotools, when indexed.

Nothing is decoded when the index is built or opened; :func:`decode_masks` rasterises the masks of one
image (pycocotools ``frPyObjects`` / ``merge`` / ``decode``), so memory grows with one sample, not the set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import DataError

POLYGON_HELP = ("a polygon is a list [x1, y1, x2, y2, ...] of at least 3 points (6 finite numbers), an even "
                "count; an RLE is {\"size\": [height, width], \"counts\": ...}")


@dataclass
class Segmentations:
    """The flat arrays of the segmentations of ``m`` annotations (see the module docstring)."""

    seg_poly_start: np.ndarray  # int64 (m + 1,)
    poly_start: np.ndarray  # int64 (P + 1,)
    poly_xy: np.ndarray  # float64 (C,)
    rle: list[str]  # m entries; "" for polygon annotations


def parse_segmentations(segs: Sequence[Any], heights: np.ndarray, widths: np.ndarray,
                        name: Callable[[int], str]) -> Segmentations:
    """Check and flatten the ``segmentation`` of every annotation (``heights[j]``/``widths[j]``: its image).

    A bad one (missing, empty, an odd or short polygon, a non-finite number, an RLE of another size) is a
    DataError naming the annotation (``name(j)``).
    """
    seg_count = np.zeros(len(segs), dtype=np.int64)
    lengths: list[int] = []
    coords: list[Sequence[Any]] = []
    rle = [""] * len(segs)
    for j, seg in enumerate(segs):
        if isinstance(seg, list):
            if not seg:
                _bad(name(j), "is an empty polygon list")
            for k, poly in enumerate(seg):
                if not isinstance(poly, list):
                    _bad(name(j), f"has polygon {k} of type {type(poly).__name__}, not a list of numbers")
                if len(poly) < 6 or len(poly) % 2:
                    what = "no coordinates" if not poly else (
                        f"an odd number of coordinates ({len(poly)})" if len(poly) % 2
                        else f"{len(poly) // 2} point(s)")
                    _bad(name(j), f"has polygon {k} with {what}")
                lengths.append(len(poly))
                coords.append(poly)
            seg_count[j] = len(seg)
        elif isinstance(seg, dict):
            rle[j] = _compressed_rle(seg, int(heights[j]), int(widths[j]), name(j))
        elif seg is None:
            _bad(name(j), "has no segmentation (data.masks is true: every annotation needs one)")
        else:
            _bad(name(j), f"has a segmentation of type {type(seg).__name__}")
    poly_start = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=poly_start[1:])
    try:
        poly_xy = np.fromiter((v for poly in coords for v in poly), dtype=np.float64, count=int(poly_start[-1]))
        finite = bool(np.isfinite(poly_xy).all())
    except (TypeError, ValueError):
        finite = False
        poly_xy = np.zeros(0)
    seg_poly_start = np.zeros(len(segs) + 1, dtype=np.int64)
    np.cumsum(seg_count, out=seg_poly_start[1:])
    if not finite:
        _first_non_numeric(segs, name)
    return Segmentations(seg_poly_start, poly_start, poly_xy, rle)


def _first_non_numeric(segs: Sequence[Any], name: Callable[[int], str]) -> None:
    """The error for the first polygon with a value that is not a finite number (the slow path)."""
    for j, seg in enumerate(segs):
        for k, poly in enumerate(seg if isinstance(seg, list) else []):
            for v in poly:
                if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
                    _bad(name(j), f"has polygon {k} with the value {v!r}: coordinates must be finite numbers")
    raise AssertionError("a polygon coordinate did not convert to float64, but none is bad")


def _compressed_rle(seg: dict, height: int, width: int, where: str) -> str:
    size, counts = seg.get("size"), seg.get("counts")
    if not isinstance(size, list) or len(size) != 2 or [int(v) for v in size] != [height, width]:
        _bad(where, f"has an RLE of size {size!r}, but its image is [{height}, {width}] (height, width)")
    if isinstance(counts, str):
        return counts
    if not isinstance(counts, list) or not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                                                         for c in counts):
        _bad(where, "has an RLE whose counts are neither a string nor a list of non-negative integers")
    if sum(counts) != height * width:
        _bad(where, f"has an RLE whose counts sum to {sum(counts)}, not height x width = {height * width}")
    return mask_utils.frPyObjects(seg, height, width)["counts"].decode("ascii")


def _bad(where: str, what: str) -> None:
    raise DataError(f"{where} {what}: {POLYGON_HELP}.")


# ----------------------------------------------------------------------------------------------------------
# Per annotation: pycocotools' view (COCO ground truth) and the decoded masks of one image


def segmentation(index: Any, j: int) -> list[list[float]] | dict[str, Any]:
    """Annotation ``j`` of ``index`` in COCO's form: polygons as lists, RLE as ``{"size", "counts"}``."""
    rle = index.rle[j]
    if rle:
        image = int(np.searchsorted(index.ann_start, j, "right")) - 1
        return {"size": [int(index.height[image]), int(index.width[image])], "counts": rle}
    starts = index.poly_start[index.seg_poly_start[j]:index.seg_poly_start[j + 1] + 1].tolist()
    return [np.asarray(index.poly_xy[a:b]).tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def decode_masks(index: Any, annotations: Sequence[int], height: int, width: int) -> np.ndarray:
    """The (n, height, width) uint8 masks of ``annotations`` (positions in ``index``), as pycocotools'
    ``annToMask`` gives them."""
    rles = []
    for j in annotations:
        counts = index.rle[int(j)]
        if counts:
            rles.append({"size": [height, width], "counts": counts.encode("ascii")})
            continue
        a, b = int(index.seg_poly_start[j]), int(index.seg_poly_start[j + 1])
        starts = np.asarray(index.poly_start[a:b + 1])
        polygons = [np.asarray(index.poly_xy[s:e]) for s, e in zip(starts[:-1], starts[1:], strict=True)]
        rles.append(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(n, h, w) binary masks as COCO compressed RLEs with ``counts`` as str (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def decode_rles(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """COCO RLEs (``counts`` str or bytes) as (n, height, width) uint8 masks."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    ready = [{"size": list(r["size"]), "counts": r["counts"].encode("ascii") if isinstance(r["counts"], str)
              else r["counts"]} for r in rles]
    return np.ascontiguousarray(mask_utils.decode(ready).transpose(2, 0, 1))
