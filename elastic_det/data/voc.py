"""Pascal VOC-format detection data: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``,
``ImageSets/Main/<split>.txt`` under a local folder or a URL prefix.

Box corners are taken as written (``xmin ymin xmax ymax`` as XYXY pixel coordinates, like mmdetection),
so a box with ``xmin == xmax`` has zero width: it is dropped, listed in ``degenerate_boxes`` and logged.
A non-finite corner or ``xmax < xmin`` (``ymax < ymin``) is an error naming the file and the object.
``difficult=1`` objects are not trained on and appear with ``iscrowd=1`` (ignored) in :meth:`coco_gt`.
The XML files of a split are parsed once per node into a cached index (see :mod:`elastic_det.data.index`).
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError
from .coco import check_boxes
from .index import AnnotationIndex, Strings
from .indexed import IndexedDataset
from .remote import join
from .source import DataSource


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


class VocDataset(IndexedDataset):
    """The images of ``root/ImageSets/Main/<split>.txt``.

    ``classes`` fixes the label order (label i = ``classes[i-1]``); when None, the sorted names found in
    the split's annotations. Evaluation data must use the classes of the training data: pass them.
    Image ids are the digits of the file ids (``BloodImage_00338`` -> 338, ``2008_000008`` -> 2008000008)
    when those are unique, else the 1-based line number in the split file.
    """

    def __init__(self, root: str, split: str, classes: list[str] | None = None, filter_empty: bool = False,
                 source: DataSource | None = None):
        source = source if source is not None else DataSource()
        self.root = root
        self.split = split
        index = voc_index(root, split, source)
        found = index.cat_names.tolist()
        if classes is None:
            classes = found
        if len(set(classes)) != len(classes):
            raise DataError(f"VOC classes must be unique, got {classes}")
        cat_label = np.array([classes.index(n) + 1 if n in classes else 0 for n in found], dtype=np.int64)
        missing = np.flatnonzero(cat_label[np.searchsorted(index.cat_id, index.ann_cat)] == 0)
        if len(missing):
            j = int(missing[0])
            image = int(np.searchsorted(index.ann_start, j, side="right") - 1)
            raise DataError(f"VOC annotation {self._xml(index, image)}: object {j - int(index.ann_start[image])} has "
                            f"class '{found[int(index.ann_cat[j])]}', which is not one of the classes {classes}.")
        super().__init__(index, root, classes, list(range(1, len(classes) + 1)), cat_label, source,
                         name=_split_file(root, split), filter_empty=filter_empty, gt_from_file=False)

    def _xml(self, index: AnnotationIndex, image: int) -> str:
        stem = index.files[image].removeprefix("JPEGImages/").removesuffix(".jpg")
        return join(self.root, f"Annotations/{stem}.xml")

    def describe_annotation(self, j: int, image: int) -> str:
        return (f"{self._xml(self.index, image)} object {j - int(self.index.ann_start[image])} "
                f"{np.asarray(self.index.ann_bbox[j]).tolist()}")


def voc_classes(root: str, split: str, source: DataSource | None = None) -> list[str]:
    """The sorted class names of the annotations of a split."""
    return voc_index(root, split, source if source is not None else DataSource()).cat_names.tolist()


def voc_index(root: str, split: str, source: DataSource) -> AnnotationIndex:
    """The (cached) index of a split, keyed by the split file and the identity of every XML it names."""
    names = read_split(root, split, source)
    xml_names = [f"{n}.xml" for n in names]
    identities = source.file_identities(join(root, "Annotations"), xml_names, "VOC annotation file")
    identity = hashlib.sha256("\n".join([root, split, *identities]).encode()).hexdigest()
    return source.index("voc", identity, lambda: _build_index(root, names, source))


def read_split(root: str, split: str, source: DataSource | None = None) -> list[str]:
    """The image file ids listed in ``root/ImageSets/Main/<split>.txt`` (first column)."""
    source = source if source is not None else DataSource()
    source.check_folder(root, "VOC dataset root")
    path = _split_file(root, split)
    try:
        text = source.read_bytes(path, "VOC split file").decode("utf-8")
    except DataError as e:
        if "not found" not in str(e):
            raise
        have = sorted(f[:-4] for f in source.list_folder(join(root, "ImageSets/Main")) if f.endswith(".txt"))
        raise DataError(f"VOC split file not found: {path} (splits found: {', '.join(have) or 'none'})") from None
    names = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"VOC split file {path} lists no images.")
    return names


def _split_file(root: str, split: str) -> str:
    return join(root, f"ImageSets/Main/{split}.txt")


def _build_index(root: str, names: list[str], source: DataSource) -> AnnotationIndex:
    paths = [join(root, f"Annotations/{n}.xml") for n in names]
    annotations = [_parse_xml(p, raw) for p, raw in zip(paths, source.read_many(paths, "VOC annotation file"),
                                                        strict=True)]
    class_names = sorted({o.name for a in annotations for o in a.objects})
    code = {c: i for i, c in enumerate(class_names)}
    widths, heights, boxes, cats, crowd, counts, owner = [], [], [], [], [], [], []
    for name, ann in zip(names, annotations, strict=True):
        width, height = ann.width, ann.height
        if width <= 0 or height <= 0:  # some VOC files carry <size> 0 0: read the header (no decoding)
            width, height = _image_size(join(root, f"JPEGImages/{name}.jpg"), source)
        widths.append(width)
        heights.append(height)
        counts.append(len(ann.objects))
        for k, obj in enumerate(ann.objects):
            boxes.append(obj.box)
            cats.append(code[obj.name])
            crowd.append(obj.difficult)
            owner.append((ann.path, k))
    bbox = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    check_boxes(bbox, lambda j: f"VOC annotation {owner[j][0]}: object {owner[j][1]}", "xyxy")
    ann_start = np.zeros(len(names) + 1, dtype=np.int64)
    np.cumsum(counts, out=ann_start[1:])
    return AnnotationIndex(
        box_format="xyxy", image_id=np.array(_image_ids(names), dtype=np.int64),
        width=np.array(widths, dtype=np.int64), height=np.array(heights, dtype=np.int64),
        files=Strings.from_list([f"JPEGImages/{n}.jpg" for n in names]), ann_start=ann_start,
        ann_id=np.arange(1, len(bbox) + 1, dtype=np.int64), ann_cat=np.array(cats, dtype=np.int64),
        ann_bbox=bbox, ann_area=(bbox[:, 2] - bbox[:, 0]) * (bbox[:, 3] - bbox[:, 1]),
        ann_crowd=np.array(crowd, dtype=bool), cat_id=np.arange(len(class_names), dtype=np.int64),
        cat_names=Strings.from_list(class_names),
    ).finish()


def _parse_xml(path: str, raw: bytes) -> _VocAnnotation:
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise DataError(f"VOC annotation {path} is not valid XML: {e}") from None
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


def _image_size(path: str, source: DataSource) -> tuple[int, int]:
    try:
        with source.open_image(path) as f, Image.open(f) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"Cannot read image {path}: {e}") from None
