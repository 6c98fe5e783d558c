"""The dataset contract every dataset (built-in or plug-in) fulfils, and a base class that implements it.

A detection dataset is a map-style dataset with

- ``__len__()`` and ``__getitem__(index) -> (image, target)``: ``image`` is a
  ``torchvision.tv_tensors.Image`` (uint8, CHW, RGB); ``target`` is
  ``{"boxes": tv_tensors.BoundingBoxes (XYXY, canvas_size=(h, w)), "labels": int64 tensor (n,),
  "image_id": int}``, plus ``"masks": tv_tensors.Mask`` (n, h, w) uint8 when the dataset loads
  segmentations (one mask per box, decoded per sample). Labels are contiguous, ``1..K``; 0 is the
  background of torchvision detectors.
  Only boxes to train on are in the target: crowd / difficult boxes and degenerate boxes are not.
- ``image_ids: list[int]``: the stable dataset image id of each index (traces and evaluation use it).
- ``class_names: list[str]``: label ``i`` is ``class_names[i - 1]``; ``num_classes`` (property) is
  ``K + 1``.
- ``label_to_category_id(label) -> int``: the category id that evaluation results are reported under.
- ``coco_gt() -> pycocotools.coco.COCO``: the ground truth for COCOeval, crowd / difficult boxes included
  with ``iscrowd=1`` (COCOeval ignores detections matched to them). It may hold more images than the
  dataset (an official COCO file); evaluation restricts itself to ``image_ids``.
- ``aspect_ratios() -> list[float]``: width / height per index, from the annotations, without decoding
  images (used to group batches by aspect ratio).
- Bad input raises :class:`elastic_det.errors.DataError` with a message naming the file: at construction
  for missing or malformed annotations, when the image is loaded for a missing or corrupt image.

Building a built-in dataset imports neither torch nor torchvision: the supervisor builds the datasets to
check the data before torchrun starts, and that check is on the critical path of every relaunch (the two
imports take ~2.5 s here). They are imported by the first sample (:func:`load_image`, :func:`make_target`).

:class:`DetectionDataset` implements all of this from a list of :class:`ImageRecord`; a plug-in can
subclass it and only build the records.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from ..errors import DataError

if TYPE_CHECKING:
    from torchvision import tv_tensors

logger = logging.getLogger(__name__)


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


@dataclass
class ImageRecord:
    """One image and its boxes, in absolute XYXY pixel coordinates."""

    image_id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)  # (n, 4) float32, the boxes trained on
    labels: np.ndarray = field(default_factory=_empty_labels)  # (n,) int64 in 1..K
    crowd_boxes: np.ndarray = field(default_factory=_empty_boxes)  # ignored by training, iscrowd=1 in GT
    crowd_labels: np.ndarray = field(default_factory=_empty_labels)


class DetectionDataset:
    """The dataset contract (see the module docstring) implemented over :class:`ImageRecord` s.

    ``category_ids[i - 1]`` is the category id of label ``i``. ``filter_empty`` drops the records without
    training boxes (for training; evaluation keeps them, they count for false positives).
    """

    def __init__(self, records: Sequence[ImageRecord], class_names: Sequence[str],
                 category_ids: Sequence[int], filter_empty: bool = False, source: str = ""):
        if len(class_names) != len(category_ids):
            raise ValueError("class_names and category_ids must have the same length")
        self.source = source
        self.class_names = list(class_names)
        self._category_ids = [int(c) for c in category_ids]
        self._label_of_category = {c: i + 1 for i, c in enumerate(self._category_ids)}
        if filter_empty:
            records = [r for r in records if len(r.boxes)]
        self.records = list(records)
        self.image_ids = [r.image_id for r in self.records]
        if len(set(self.image_ids)) != len(self.image_ids):
            raise DataError(f"{source or type(self).__name__}: image ids are not unique")
        self._coco_gt: COCO | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict]:
        record = self.records[index]
        image = load_image(record.path, expected_size=(record.width, record.height))
        return image, make_target(record.boxes.copy(), record.labels.copy(), record.image_id,
                                  (record.height, record.width))

    @property
    def num_classes(self) -> int:
        """Number of classes including the background (label 0)."""
        return len(self.class_names) + 1

    def label_to_category_id(self, label: int) -> int:
        if not 1 <= label <= len(self._category_ids):
            raise ValueError(f"label {label} is outside 1..{len(self._category_ids)}")
        return self._category_ids[label - 1]

    def category_id_to_label(self, category_id: int) -> int:
        return self._label_of_category[category_id]

    def aspect_ratios(self) -> list[float]:
        return [r.width / r.height for r in self.records]

    def coco_gt(self) -> COCO:
        """The records as COCO ground truth (built once, then cached)."""
        if self._coco_gt is None:
            self._coco_gt = make_coco(records_to_coco_dict(self.records, self.class_names,
                                                           self._category_ids))
        return self._coco_gt


def records_to_coco_dict(records: Sequence[ImageRecord], class_names: Sequence[str],
                         category_ids: Sequence[int]) -> dict:
    images, annotations = [], []
    for r in records:
        images.append({"id": r.image_id, "file_name": r.path, "width": r.width, "height": r.height})
        for boxes, labels, crowd in ((r.boxes, r.labels, 0), (r.crowd_boxes, r.crowd_labels, 1)):
            for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": r.image_id,
                                    "category_id": category_ids[label - 1], "bbox": [x1, y1, w, h],
                                    "area": w * h, "iscrowd": crowd})
    categories = [{"id": c, "name": n} for c, n in zip(category_ids, class_names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(dataset: dict) -> COCO:
    """A ``COCO`` object over an in-memory dict, without pycocotools' prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_image(path: str, expected_size: tuple[int, int] | None = None,
               opener: Callable[[str], BinaryIO] | None = None) -> tv_tensors.Image:
    """Decode ``path`` as RGB uint8 CHW; a missing, corrupt or wrongly sized file raises DataError.

    ``expected_size`` is (width, height) from the annotation: boxes are in those coordinates, so an image
    of another size would silently train on wrong boxes. ``opener(path)`` returns the file to decode (e.g.
    through the node-local cache of a remote root; it raises the taxonomy's errors itself).
    """
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(opener(path)) if opener is not None else path
            im = stack.enter_context(Image.open(source))
            array = np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"Image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"Cannot read image {path}: {e}") from None
    height, width = array.shape[:2]
    if expected_size is not None and expected_size != (width, height):
        raise DataError(f"Image {path} is {width}x{height} pixels but its annotation says "
                        f"{expected_size[0]}x{expected_size[1]}.")
    torch, tv_tensors = _torch()
    return tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous())


def make_target(boxes: np.ndarray, labels: np.ndarray, image_id: int, canvas_size: tuple[int, int]) -> dict:
    """The training target of one image: XYXY float32 ``boxes`` on a (height, width) canvas, int64 labels."""
    torch, tv_tensors = _torch()
    return {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.astype(np.float32, copy=False)),
                                              format="XYXY", canvas_size=canvas_size),
            "labels": torch.from_numpy(labels),
            "image_id": image_id}


def make_masks(masks: np.ndarray) -> tv_tensors.Mask:
    """(n, height, width) uint8 instance masks as a ``tv_tensors.Mask`` (transformed with the image)."""
    torch, tv_tensors = _torch()
    return tv_tensors.Mask(torch.from_numpy(masks))


def _torch():
    """torch and torchvision's tv_tensors, imported by the first sample rather than by building the dataset
    (see the module docstring)."""
    import torch
    from torchvision import tv_tensors

    return torch, tv_tensors


def log_degenerate(source: str, dropped: Sequence[str]) -> None:
    """One warning for all the degenerate boxes of a dataset."""
    if dropped:
        shown = "; ".join(dropped[:5]) + ("; ..." if len(dropped) > 5 else "")
        logger.warning("%s: dropped %d degenerate box(es) with zero width or height: %s",
                       source, len(dropped), shown)
