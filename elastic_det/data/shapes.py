"""A synthetic COCO-format detection set: rectangles, ellipses and triangles on a textured background.

Deterministic by seed (image ``i`` of a split depends only on ``(seed, split, i)``), written atomically:
the set is generated in a temporary sibling folder and moved into place with one ``os.replace``, so a
crash never leaves a half set under the final name, and concurrent generators (several ranks on one
host) each build a full copy and the first to finish wins.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from ..config.schema import ShapesConfig
from .masks import encode_masks

logger = logging.getLogger(__name__)

CATEGORIES = ["rectangle", "ellipse", "triangle"]
GENERATOR_VERSION = 3  # part of the cache folder name: bump it when the images change
_SPLIT_CODES = {"train": 0, "val": 1}
_STALE_TEMP_SECONDS = 3600
MIN_SIDE = 16  # px; smaller shapes are hard to tell apart at 128 px


def ensure_shapes(cfg: ShapesConfig) -> str:
    """The folder of the set described by ``cfg`` under ``cfg.cache_dir``, generated on first use."""
    cache_dir = os.path.expanduser(cfg.cache_dir)
    name = (f"shapes-v{GENERATOR_VERSION}-train{cfg.num_train}-val{cfg.num_val}-size{cfg.image_size}"
            f"-obj{cfg.max_objects}-seed{cfg.seed}")
    out_dir = os.path.join(cache_dir, name)
    if not os.path.isdir(out_dir):
        _remove_stale_temps(cache_dir, name)
        start = time.perf_counter()
        generate_shapes(out_dir, cfg.num_train, cfg.num_val, cfg.image_size, cfg.max_objects, cfg.seed)
        logger.info("Generated the shapes set %s in %.1f s", out_dir, time.perf_counter() - start)
    return out_dir


def generate_shapes(out_dir: str, num_train: int, num_val: int, image_size: int, max_objects: int,
                    seed: int) -> None:
    """Write ``train/``, ``val/`` (JPEG, quality 95) and ``annotations/{train,val}.json`` under ``out_dir``.

    If ``out_dir`` exists when the set is finished (another process was first), it is left as it is.
    """
    if image_size < 32 or max_objects < 1 or num_train < 0 or num_val < 0:
        raise ValueError(f"shapes set needs image_size >= 32, max_objects >= 1, counts >= 0; got "
                         f"{image_size}, {max_objects}, {num_train}, {num_val}")
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, count in (("train", num_train), ("val", num_val)):
            coco = _write_split(os.path.join(tmp, split), split, count, image_size, max_objects, seed)
            with open(os.path.join(tmp, "annotations", f"{split}.json"), "w", encoding="utf-8") as f:
                json.dump(coco, f)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):
                raise
            # Another process finished the same set first; ours is identical and redundant.
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _write_split(folder: str, split: str, count: int, image_size: int, max_objects: int, seed: int) -> dict:
    os.makedirs(folder)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed % 2**64, _SPLIT_CODES[split], i])
        image, _, boxes, labels, areas, masks = render_image(rng, image_size, max_objects, True)  # True: with masks
        image_id = i + 1
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(image).save(os.path.join(folder, file_name), quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        rles = encode_masks(masks)
        for (x1, y1, x2, y2), label, area, rle in zip(boxes, labels, areas, rles, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0,
                                "segmentation": rle})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def render_image(rng: np.random.Generator, size: int, max_objects: int, with_masks: bool = False) -> tuple:
    """One image: ``(image, background, boxes, labels, areas)``, and ``masks`` when ``with_masks``.

    ``image`` and ``background`` are (size, size, 3) uint8; boxes are XYXY, tight around each shape's
    pixels (computed from its mask, so they match the rasterisation exactly); labels are 1-based
    category ids; areas are pixel counts. A shape is placed only where it overlaps no earlier one by
    more than a third of either box, so every object stays mostly visible. ``masks`` (n, size, size) uint8
    are the pixels each shape shows in the image: its exact rasterisation less what later shapes cover.
    """
    background = _background(rng, size)
    image = background.copy()
    boxes: list[list[int]] = []
    labels: list[int] = []
    areas: list[int] = []
    owner = np.zeros((size, size), dtype=np.int64)  # 1 + the shape that paints each pixel last; 0: background
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(1, len(CATEGORIES) + 1))
            mask = _shape_mask(rng, size, label)
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            if all(_overlap_ok(box, other) for other in boxes):
                break
        else:
            continue
        colour = _shape_colour(rng, background[mask].mean(axis=0))
        texture = rng.integers(-10, 11, size=(len(xs), 3), dtype=np.int16)
        image[ys, xs] = np.clip(colour + texture, 0, 255).astype(np.uint8)
        boxes.append(box)
        labels.append(label)
        areas.append(len(xs))
        owner[ys, xs] = len(boxes)
    if not with_masks:
        return image, background, boxes, labels, areas
    masks = (owner[None] == np.arange(1, len(boxes) + 1)[:, None, None]).astype(np.uint8)
    return image, background, boxes, labels, areas, masks


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A base colour with low-frequency blotches (a bilinearly upsampled 6x6 grid) and pixel noise."""
    base = rng.uniform(40, 215, size=3)
    grid = np.clip(base + rng.normal(0.0, 18.0, size=(6, 6, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-8, 9, size=(size, size, 3), dtype=np.int16)
    return np.clip(blotches + noise, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """A boolean mask of one shape, 16 px to 60% of the image per side, aspect ratio within 1:2.5."""
    largest = int(0.6 * size)
    w = int(rng.integers(MIN_SIDE, largest + 1))
    h = int(np.clip(round(w * np.exp(rng.uniform(-np.log(2.5), np.log(2.5)))), MIN_SIDE, largest))
    x0 = int(rng.integers(0, size - w + 1))
    y0 = int(rng.integers(0, size - h + 1))
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if CATEGORIES[label - 1] == "rectangle":
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=1)
    elif CATEGORIES[label - 1] == "ellipse":
        draw.ellipse([x0, y0, x0 + w - 1, y0 + h - 1], fill=1)
    else:
        apex = x0 + int(rng.integers(0, w))
        points = [(apex, y0), (x0, y0 + h - 1), (x0 + w - 1, y0 + h - 1)]
        if rng.random() < 0.5:  # upside down
            points = [(x, 2 * y0 + h - 1 - y) for x, y in points]
        draw.polygon(points, fill=1)
    return np.array(canvas, dtype=bool)


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A saturated colour far from the background under the shape."""
    for _ in range(10):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background_mean).sum() > 150:
            return colour
    return np.where(background_mean > 127, 20.0, 235.0)


def _overlap_ok(a: list[int], b: list[int]) -> bool:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return True
    inter = iw * ih
    return inter <= ((a[2] - a[0]) * (a[3] - a[1])) / 3 and inter <= ((b[2] - b[0]) * (b[3] - b[1])) / 3


def _remove_stale_temps(cache_dir: str, name: str) -> None:
    """Delete temporary folders of crashed generators (older than an hour; a live one takes seconds)."""
    if not os.path.isdir(cache_dir):
        return
    now = time.time()
    for entry in os.scandir(cache_dir):
        if entry.name.startswith(f".{name}.tmp-") and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except FileNotFoundError:
                pass
