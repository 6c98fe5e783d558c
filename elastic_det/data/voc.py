"""Pascal VOC-format detection data: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``,
``ImageSets/Main/<split>.txt``.

Box corners are taken as written (``xmin ymin xmax ymax`` as XYXY pixel coordinates, like mmdetection),
so a box with ``xmin == xmax`` has zero width: it is dropped, listed in ``degenerate_boxes`` and logged.
``difficult=1`` objects are not trained on and appear with ``iscrowd=1`` (ignored) in :meth:`coco_gt`.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError
from .dataset import DetectionDataset, ImageRecord, log_degenerate


@dataclass
class _VocObject:
    name: str
    box: list[float]
    difficult: bool


@dataclass
class _VocAnnotation:
    path: str
    width: int
    height: int
    objects: list[_VocObject]


class VocDataset(DetectionDataset):
    """The images of ``root/ImageSets/Main/<split>.txt``.

    ``classes`` fixes the label order (label i = ``classes[i-1]``); when None, the sorted names found in
    the split's annotations. Evaluation data must use the classes of the training data: pass them.
    Image ids are the digits of the file ids (``BloodImage_00338`` -> 338, ``2008_000008`` -> 2008000008)
    when those are unique, else the 1-based line number in the split file.
    """

    def __init__(self, root: str, split: str, classes: list[str] | None = None, filter_empty: bool = False):
        self.root = root
        self.split = split
        names = read_split(root, split)
        annotations = [_parse_xml(os.path.join(root, "Annotations", f"{n}.xml")) for n in names]
        if classes is None:
            classes = sorted({o.name for a in annotations for o in a.objects})
        if len(set(classes)) != len(classes):
            raise DataError(f"VOC classes must be unique, got {classes}")
        label_of = {c: i + 1 for i, c in enumerate(classes)}
        ids = _image_ids(names)
        self.degenerate_boxes: list[str] = []
        records = [self._record(image_id, name, ann, label_of)
                   for image_id, name, ann in zip(ids, names, annotations, strict=True)]
        source = _split_file(root, split)
        log_degenerate(source, self.degenerate_boxes)
        super().__init__(records, classes, list(range(1, len(classes) + 1)), filter_empty=filter_empty,
                         source=source)

    def _record(self, image_id: int, name: str, ann: _VocAnnotation, label_of: dict[str, int]) -> ImageRecord:
        image_path = os.path.join(self.root, "JPEGImages", f"{name}.jpg")
        width, height = ann.width, ann.height
        if width <= 0 or height <= 0:  # some VOC files carry <size> 0 0: read the header (no decoding)
            width, height = _image_size(image_path)
        boxes, labels, crowd_boxes, crowd_labels = [], [], [], []
        for k, obj in enumerate(ann.objects):
            if obj.name not in label_of:
                raise DataError(f"VOC annotation {ann.path}: object {k} has class '{obj.name}', which is not "
                                f"one of the classes {list(label_of)}.")
            x1, y1, x2, y2 = obj.box
            box = [max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                self.degenerate_boxes.append(f"{ann.path} object {k} {obj.box}")
            elif obj.difficult:
                crowd_boxes.append(box)
                crowd_labels.append(label_of[obj.name])
            else:
                boxes.append(box)
                labels.append(label_of[obj.name])
        return ImageRecord(
            image_id=image_id, path=image_path, width=width, height=height,
            boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.array(labels, dtype=np.int64),
            crowd_boxes=np.array(crowd_boxes, dtype=np.float32).reshape(-1, 4),
            crowd_labels=np.array(crowd_labels, dtype=np.int64),
        )


def voc_classes(root: str, split: str) -> list[str]:
    """The sorted class names of the annotations of a split."""
    names = read_split(root, split)
    annotations = (_parse_xml(os.path.join(root, "Annotations", f"{n}.xml")) for n in names)
    return sorted({o.name for a in annotations for o in a.objects})


def read_split(root: str, split: str) -> list[str]:
    """The image file ids listed in ``root/ImageSets/Main/<split>.txt`` (first column)."""
    if not os.path.isdir(root):
        raise DataError(f"VOC dataset root not found: {root}")
    path = _split_file(root, split)
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt")) if os.path.isdir(folder) else []
        raise DataError(f"VOC split file not found: {path} (splits found: {', '.join(have) or 'none'})")
    with open(path, encoding="utf-8") as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise DataError(f"VOC split file {path} lists no images.")
    return names


def _split_file(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def _parse_xml(path: str) -> _VocAnnotation:
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise DataError(f"VOC annotation file not found: {path}") from None
    except ET.ParseError as e:
        raise DataError(f"VOC annotation {path} is not valid XML: {e}") from None
    except OSError as e:
        raise DataError(f"Cannot read VOC annotation {path}: {e}") from None
    root = tree.getroot()
    try:
        size = root.find("size")
        width = int(float(size.findtext("width", "0"))) if size is not None else 0
        height = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects = []
        for obj in root.findall("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise ValueError("an object without <name>")
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise ValueError(f"object '{name}' without <bndbox>")
            box = [float(_required(bndbox, k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(float(obj.findtext("difficult") or 0)) == 1
            objects.append(_VocObject(name, box, difficult))
    except ValueError as e:
        raise DataError(f"VOC annotation {path} is malformed: {e}") from None
    return _VocAnnotation(path, width, height, objects)


def _required(element: ET.Element, tag: str) -> str:
    text = element.findtext(tag)
    if text is None or not text.strip():
        raise ValueError(f"<bndbox> without <{tag}>")
    return text


def _image_ids(names: list[str]) -> list[int]:
    digits = ["".join(re.findall(r"\d", n)) for n in names]
    if all(digits):
        ids = [int(d) for d in digits]
        if len(set(ids)) == len(ids) and max(ids) < 2**53:
            return ids
    return list(range(1, len(names) + 1))


def _image_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DataError(f"Image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"Cannot read image {path}: {e}") from None
