"""COCO-format detection data (an image folder and an instances JSON file), read with pycocotools."""

from __future__ import annotations

import json
import os

import numpy as np
from pycocotools.coco import COCO

from ..errors import DataError
from .dataset import DetectionDataset, ImageRecord, log_degenerate, make_coco


class CocoDataset(DetectionDataset):
    """Images under ``image_root``, boxes from ``ann_file``; categories become labels 1..K by sorted id.

    Crowd annotations (``iscrowd=1``) are left out of the training targets and kept in :meth:`coco_gt`
    (the file as given), where COCOeval ignores detections matched to them. Boxes are clipped to the
    image; those with no width or height left are dropped, listed in ``degenerate_boxes`` and logged once.
    """

    def __init__(self, image_root: str, ann_file: str, filter_empty: bool = False):
        if not os.path.isfile(ann_file):
            raise DataError(f"COCO annotation file not found: {ann_file}")
        if not os.path.isdir(image_root):
            raise DataError(f"COCO image folder not found: {image_root} (annotations: {ann_file})")
        self.image_root = image_root
        self.ann_file = ann_file
        data = _read_json(ann_file)
        try:
            self._gt = make_coco(data)
        except (KeyError, TypeError) as e:
            raise DataError(f"COCO annotation file {ann_file} is malformed: {type(e).__name__}: {e}") from None
        categories = sorted(self._gt.cats.values(), key=lambda c: c["id"])
        if not categories:
            raise DataError(f"COCO annotation file {ann_file} has no categories.")
        label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self.degenerate_boxes: list[str] = []
        try:
            records = [self._record(img, label_of) for img in
                       (self._gt.imgs[i] for i in sorted(self._gt.imgs))]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"COCO annotation file {ann_file} is malformed: {type(e).__name__}: {e}") from None
        log_degenerate(ann_file, self.degenerate_boxes)
        super().__init__(records, [str(c["name"]) for c in categories], [c["id"] for c in categories],
                         filter_empty=filter_empty, source=ann_file)

    def _record(self, img: dict, label_of: dict[int, int]) -> ImageRecord:
        width, height = int(img["width"]), int(img["height"])
        if width <= 0 or height <= 0:
            raise ValueError(f"image {img['id']} has size {width}x{height}")
        boxes, labels, crowd_boxes, crowd_labels = [], [], [], []
        for ann in self._gt.imgToAnns.get(img["id"], []):
            if ann["category_id"] not in label_of:
                raise ValueError(f"annotation {ann['id']} has unknown category_id {ann['category_id']}")
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            label = label_of[ann["category_id"]]
            if ann.get("iscrowd", 0):
                crowd_boxes.append(box)
                crowd_labels.append(label)
            elif box[2] <= box[0] or box[3] <= box[1]:
                self.degenerate_boxes.append(f"image {img['id']} annotation {ann['id']} bbox {ann['bbox']}")
            else:
                boxes.append(box)
                labels.append(label)
        return ImageRecord(
            image_id=int(img["id"]), path=os.path.join(self.image_root, img["file_name"]),
            width=width, height=height,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array(labels, dtype=np.int64),
            crowd_boxes=np.array(crowd_boxes, dtype=np.float32).reshape(-1, 4),
            crowd_labels=np.array(crowd_labels, dtype=np.int64),
        )

    def coco_gt(self) -> COCO:
        """The annotation file as loaded: all its images, crowd boxes included."""
        return self._gt


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    except OSError as e:
        raise DataError(f"Cannot read COCO annotation file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DataError(f"COCO annotation file {path} must be a JSON object with 'images' and "
                        f"'categories' lists (and 'annotations').")
    data.setdefault("annotations", [])
    return data
