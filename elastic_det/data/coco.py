"""COCO-format detection data: an image folder and an instances JSON file, each a local path or a URL.

The JSON file is parsed once per node into an :class:`~elastic_det.data.index.AnnotationIndex` (cached by
the file's identity); later starts memory-map it. Evaluation gets a pycocotools ``COCO`` of the file,
built from the index when it is first asked for.
"""

from __future__ import annotations

import json
import logging
from operator import itemgetter
from typing import Any

import numpy as np

from ..errors import DataError
from .index import AnnotationIndex, Strings
from .indexed import IndexedDataset
from .masks import parse_segmentations
from .source import DataSource

logger = logging.getLogger(__name__)


class CocoDataset(IndexedDataset):
    """Images under ``image_root``, boxes from ``ann_file``; categories become labels 1..K by sorted id.

    Crowd annotations (``iscrowd=1``) are left out of the training targets and kept in :meth:`coco_gt`
    (the file as given), where COCOeval ignores detections matched to them. Boxes are clipped to the
    image; those with no width or height left are dropped, listed in ``degenerate_boxes`` and logged once.
    A box with a non-finite coordinate or a negative width or height is an error naming the annotation.
    ``masks``: targets carry the instance masks of the ``segmentation`` fields too (a separate index).
    """

    def __init__(self, image_root: str, ann_file: str, filter_empty: bool = False, source: DataSource | None = None,
                 masks: bool = False):
        source = source if source is not None else DataSource()
        identity = source.identity(ann_file, "COCO annotation file")
        source.check_folder(image_root, "COCO image folder")
        self.ann_file = ann_file
        index = source.index("coco-masks" if masks else "coco", identity,
                             lambda: parse_coco(source.read_bytes(ann_file, "COCO annotation file"), ann_file, masks))
        names = index.cat_names.tolist()
        super().__init__(index, image_root, names, index.cat_id.tolist(), np.arange(1, len(names) + 1), source,
                         name=ann_file, filter_empty=filter_empty, gt_from_file=True)


def parse_coco(raw: bytes, path: str, masks: bool = False) -> AnnotationIndex:
    """The index of a COCO instances file (with its segmentations when ``masks``); DataError naming the file
    (and annotation) for bad input."""
    try:
        text = raw.decode("utf-8")
        del raw  # the only reference: at most the text and the parsed objects are held at once
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    del text
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DataError(f"COCO annotation file {path} must be a JSON object with 'images' and "
                        f"'categories' lists (and 'annotations').")
    try:
        return _index(data, path, masks)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"COCO annotation file {path} is malformed: {type(e).__name__}: {e}") from None


def _index(data: dict[str, Any], path: str, masks: bool) -> AnnotationIndex:
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if not categories:
        raise DataError(f"COCO annotation file {path} has no categories.")
    cat_id = np.array([int(c["id"]) for c in categories], dtype=np.int64)
    images = sorted(data["images"], key=lambda im: im["id"])
    image_id = np.array([int(im["id"]) for im in images], dtype=np.int64)
    width = np.array([int(im["width"]) for im in images], dtype=np.int64)
    height = np.array([int(im["height"]) for im in images], dtype=np.int64)
    if len(np.unique(image_id)) != len(image_id):
        raise DataError(f"COCO annotation file {path}: image ids are not unique")
    bad = np.flatnonzero((width <= 0) | (height <= 0))
    if len(bad):
        raise ValueError(f"image {image_id[bad[0]]} has size {width[bad[0]]}x{height[bad[0]]}")

    anns = data.get("annotations") or []
    # One C-level pass per field (itemgetter + map), then numpy; a Python loop per field costs seconds.
    ints = np.array(list(map(itemgetter("image_id", "id", "category_id"), anns)), dtype=np.int64).reshape(-1, 3)
    bbox = np.array(list(map(itemgetter("bbox"), anns)), dtype=np.float64)
    if len(anns) and (bbox.ndim != 2 or bbox.shape[1] != 4):
        raise ValueError("every annotation's bbox must hold 4 numbers [x, y, width, height]")
    bbox = bbox.reshape(-1, 4)
    area = np.fromiter((a.get("area", 0.0) for a in anns), dtype=np.float64, count=len(anns))
    crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=bool, count=len(anns))
    segs = [a.get("segmentation") for a in anns] if masks else []
    del anns
    ann_image = ints[:, 0]
    position = np.searchsorted(image_id, ann_image)
    known = (position < len(image_id)) & (image_id[np.minimum(position, len(image_id) - 1)] == ann_image)
    if not known.all():
        logger.warning("%s: %d annotation(s) refer to image ids that are not in 'images' (e.g. %d); they are "
                       "left out.", path, int((~known).sum()), int(ann_image[~known][0]))
    keep = np.flatnonzero(known)
    order = keep[np.argsort(position[keep], kind="stable")]  # grouped by image, file order within an image
    position, ann_id, ann_cat = position[order], ints[order, 1], ints[order, 2]
    bbox, area, crowd = bbox[order], area[order], crowd[order]
    unknown = np.flatnonzero(~np.isin(ann_cat, cat_id))
    if len(unknown):
        j = unknown[0]
        raise ValueError(f"annotation {ann_id[j]} has unknown category_id {ann_cat[j]}")
    def name(j: int) -> str:
        return f"COCO annotation file {path}: annotation {ann_id[j]} (image {ann_image[order[j]]})"

    check_boxes(bbox, name, "xywh")
    seg: dict[str, Any] = {}
    if masks:
        parsed = parse_segmentations([segs[k] for k in order.tolist()], height[position], width[position], name)
        del segs
        seg = {"seg_poly_start": parsed.seg_poly_start, "poly_start": parsed.poly_start,
               "poly_xy": parsed.poly_xy, "rle": Strings.from_list(parsed.rle)}

    ann_start = np.zeros(len(image_id) + 1, dtype=np.int64)
    np.cumsum(np.bincount(position, minlength=len(image_id)), out=ann_start[1:])
    return AnnotationIndex(
        box_format="xywh", image_id=image_id, width=width, height=height,
        files=Strings.from_list([str(im["file_name"]) for im in images]), ann_start=ann_start,
        ann_id=ann_id, ann_cat=ann_cat, ann_bbox=bbox, ann_area=area, ann_crowd=crowd,
        cat_id=cat_id, cat_names=Strings.from_list([str(c["name"]) for c in categories]), **seg,
    ).finish()


def check_boxes(bbox: np.ndarray, name: Any, box_format: str) -> None:
    """DataError for the first box with a non-finite number or a negative width or height.

    ``name(j)`` names annotation ``j`` in the message. Zero-size boxes pass (they are dropped and counted).
    """
    finite = np.isfinite(bbox).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(f"{name(bad[0])} has a non-finite box {bbox[bad[0]].tolist()}{_more(bad)}: every "
                        f"coordinate must be a finite number.")
    if box_format == "xywh":
        w, h, layout = bbox[:, 2], bbox[:, 3], "[x, y, width, height]"
        hint = "; a converter that wrote [x1, y1, x2, y2] produces this"
    else:
        w, h, layout = bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1], "xmin ymin xmax ymax"
        hint = ""
    negative = (w < 0) | (h < 0)
    if negative.any():
        bad = np.flatnonzero(negative)
        raise DataError(f"{name(bad[0])} has a box with negative width or height {bbox[bad[0]].tolist()}"
                        f"{_more(bad)} (boxes are {layout}{hint}).")


def _more(bad: np.ndarray) -> str:
    return f" (and {len(bad) - 1} more such box(es))" if len(bad) > 1 else ""
