"""A dataset over an :class:`AnnotationIndex`: the dataset contract without a Python object per image.

Training targets are derived per sample from the index's arrays (memory-mapped, shared by the processes
of a node): boxes clipped to the image, crowd / difficult boxes and boxes with no width or height left
out. What is computed at construction is vectorised over all annotations, so building the dataset of a
COCO-sized index takes milliseconds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pycocotools.coco import COCO

from .dataset import load_image, log_degenerate, make_coco, make_masks, make_target
from .index import AnnotationIndex, clip_boxes
from .masks import decode_masks, segmentation
from .remote import is_url, join
from .source import DataSource

if TYPE_CHECKING:
    from torchvision import tv_tensors

logger = logging.getLogger(__name__)


class IndexedDataset:
    """The dataset contract (see :mod:`elastic_det.data.dataset`) over an annotation index.

    ``cat_label[j]`` is the label (1..K) of ``index.cat_id[j]``; ``category_ids[label - 1]`` the category
    id it is evaluated under. ``gt_from_file``: :meth:`coco_gt` is the annotation file as given (COCO);
    otherwise the boxes as trained plus the crowd ones (VOC).
    """

    def __init__(self, index: AnnotationIndex, image_root: str, class_names: Sequence[str],
                 category_ids: Sequence[int], cat_label: np.ndarray, source: DataSource, name: str,
                 filter_empty: bool = False, gt_from_file: bool = True):
        self.index = index
        self.image_root = image_root
        self.class_names = list(class_names)
        self._category_ids = [int(c) for c in category_ids]
        self._cat_label = np.asarray(cat_label, dtype=np.int64)
        self.files = source
        self.source = name
        self._gt_from_file = gt_from_file
        self._coco_gt: COCO | None = None
        if index.trained_count is None:
            index.finish()
        self.degenerate_boxes = [self.describe_annotation(int(j), int(np.searchsorted(index.ann_start, j, "right")) - 1)
                                 for j in index.degenerate]
        log_degenerate(name, self.degenerate_boxes)
        ids = np.asarray(index.image_id)
        self._keep = np.flatnonzero(np.asarray(index.trained_count) > 0) if filter_empty else np.arange(len(ids))
        self.image_ids: list[int] = ids[self._keep].tolist()

    def describe_annotation(self, j: int, image: int) -> str:
        """How messages name annotation ``j`` (of image position ``image``)."""
        return (f"image {int(self.index.image_id[image])} annotation {int(self.index.ann_id[j])} "
                f"bbox {np.asarray(self.index.ann_bbox[j]).tolist()}")

    # --------------------------------------------------------------------------------------------------
    # The contract

    def __len__(self) -> int:
        return len(self._keep)

    def image_path(self, i: int) -> str:
        """The local path or URL of image ``i``."""
        return join(self.image_root, self.index.files[int(self._keep[i])])

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict]:
        j = int(self._keep[i])
        width, height = int(self.index.width[j]), int(self.index.height[j])
        boxes, labels, crowd, positions = self._annotations(j)
        image = load_image(self.image_path(i), expected_size=(width, height), opener=self.files.open_image)
        target = make_target(boxes[~crowd], labels[~crowd], int(self.index.image_id[j]), (height, width))
        if self.index.has_masks:
            target["masks"] = make_masks(decode_masks(self.index, positions[~crowd], height, width))
        return image, target

    def _annotations(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Clipped XYXY boxes with some width and height, their labels, crowd flags and annotation positions
        in the index, of image ``j``."""
        s, e = int(self.index.ann_start[j]), int(self.index.ann_start[j + 1])
        boxes = clip_boxes(np.asarray(self.index.ann_bbox[s:e]), self.index.box_format,
                           int(self.index.width[j]), int(self.index.height[j]))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        labels = self._cat_label[np.searchsorted(self.index.cat_id, self.index.ann_cat[s:e])]
        crowd = np.asarray(self.index.ann_crowd[s:e], dtype=bool)
        return boxes[valid], labels[valid].astype(np.int64), crowd[valid], np.arange(s, e)[valid]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    def label_to_category_id(self, label: int) -> int:
        if not 1 <= label <= len(self._category_ids):
            raise ValueError(f"label {label} is outside 1..{len(self._category_ids)}")
        return self._category_ids[label - 1]

    def category_id_to_label(self, category_id: int) -> int:
        return self._category_ids.index(category_id) + 1

    def aspect_ratios(self) -> list[float]:
        keep = self._keep
        return (np.asarray(self.index.width)[keep] / np.asarray(self.index.height)[keep]).tolist()

    @property
    def prefetch_steps(self) -> int:
        """How many loader batches ahead :meth:`prefetch` is worth calling (0: images are local)."""
        return self.files.prefetch_steps if is_url(self.image_root) else 0

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start fetching the images of ``indices`` into the node-local cache (remote roots only)."""
        self.files.prefetch(self.image_path(i) for i in indices)

    def stop_prefetch(self) -> None:
        """Drop the fetches not started yet (the loader that asked for them is done)."""
        self.files.prefetcher.close()

    # --------------------------------------------------------------------------------------------------
    # Ground truth for COCOeval (built on first use: only evaluation needs it)

    def coco_gt(self) -> COCO:
        if self._coco_gt is None:
            self._coco_gt = make_coco(self._gt_dict())
        return self._coco_gt

    def _gt_dict(self) -> dict:
        index = self.index
        images_at = range(len(index.image_id)) if self._gt_from_file else self._keep.tolist()
        files = index.files.tolist()
        images = [{"id": int(index.image_id[j]), "file_name": files[j], "width": int(index.width[j]),
                   "height": int(index.height[j])} for j in images_at]
        annotations = []
        if self._gt_from_file:
            image_of = index.image_of_annotation().tolist()
            ids, image_ids = index.ann_id.tolist(), index.image_id.tolist()
            for j, (cat, bbox, area, crowd) in enumerate(zip(index.ann_cat.tolist(), index.ann_bbox.tolist(),
                                                             index.ann_area.tolist(), index.ann_crowd.tolist(),
                                                             strict=True)):
                annotations.append({"id": ids[j], "image_id": image_ids[image_of[j]], "category_id": cat,
                                    "bbox": bbox, "area": area, "iscrowd": int(crowd)})
                if index.has_masks:
                    annotations[-1]["segmentation"] = segmentation(index, j)
        else:
            for j in images_at:
                boxes, labels, crowd, _ = self._annotations(j)
                order = np.argsort(crowd, kind="stable")  # trained boxes first, then the ignored ones
                for (x1, y1, x2, y2), label, c in zip(boxes[order].tolist(), labels[order].tolist(),
                                                      crowd[order].tolist(), strict=True):
                    w, h = x2 - x1, y2 - y1
                    annotations.append({"id": len(annotations) + 1, "image_id": int(index.image_id[j]),
                                        "category_id": self._category_ids[label - 1], "bbox": [x1, y1, w, h],
                                        "area": w * h, "iscrowd": int(c)})
        categories = [{"id": c, "name": n} for c, n in zip(self._category_ids, self.class_names, strict=True)]
        return {"images": images, "annotations": annotations, "categories": categories}
