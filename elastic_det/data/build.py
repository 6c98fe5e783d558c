"""``build_dataset``: the dataset of a split from ``cfg.data``, built-in or plug-in."""

from __future__ import annotations

import difflib
import importlib
import os
from typing import Any

from ..config.schema import DataConfig
from ..errors import DataError
from .coco import CocoDataset
from .shapes import ensure_shapes
from .source import DataSource
from .voc import VocDataset, voc_classes

BUILTIN_TYPES = ("shapes", "coco", "voc")
SPLITS = ("train", "val")

# What build_dataset checks a plug-in's dataset for (the contract in elastic_det.data.dataset).
REQUIRED_ATTRIBUTES = ("__len__", "__getitem__", "image_ids", "class_names", "num_classes",
                       "label_to_category_id", "coco_gt", "aspect_ratios")


def build_dataset(cfg: DataConfig, split: str, source: DataSource | None = None) -> Any:
    """The ``train`` or ``val`` dataset. Training drops images without boxes when ``cfg.filter_empty``;
    evaluation always keeps them.

    Paths may be URLs (``s3://...``): files are read with ``cfg.storage_options`` and cached under
    ``cfg.cache.dir`` (``source`` overrides both).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split == "train"
    filter_empty = cfg.filter_empty and train
    source = source if source is not None else DataSource.from_config(cfg)
    if cfg.type == "shapes":
        root = ensure_shapes(cfg.shapes)
        return CocoDataset(os.path.join(root, split), os.path.join(root, "annotations", f"{split}.json"),
                           filter_empty=filter_empty, source=DataSource(),  # tiny: not worth a cache entry
                           masks=bool(cfg.masks))
    if cfg.type == "coco":
        ann_key = "train_ann" if train else "val_ann"
        ann_file = getattr(cfg, ann_key)
        if not ann_file:
            raise DataError(f"data.type is coco but data.{ann_key} is not set (the {split} annotation file).")
        if not cfg.root:
            raise DataError("data.type is coco but data.root (the image folder) is not set.")
        image_root = cfg.root if train else (cfg.val_root or cfg.root)
        return CocoDataset(image_root, ann_file, filter_empty=filter_empty, source=source, masks=bool(cfg.masks))
    if cfg.type == "voc":
        if not cfg.root:
            raise DataError("data.type is voc but data.root (the VOC folder) is not set.")
        # Without explicit classes, both splits use the training split's: labels must mean the same.
        classes = list(cfg.classes) or (None if train else voc_classes(cfg.root, cfg.train_split, source))
        return VocDataset(cfg.root, cfg.train_split if train else cfg.val_split, classes=classes,
                          filter_empty=filter_empty, source=source)
    if ":" in cfg.type:
        return _build_plugin(cfg, split)
    close = difflib.get_close_matches(cfg.type, BUILTIN_TYPES, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"Unknown data.type '{cfg.type}': use shapes, coco, voc or package.module:function.{hint}")


def _build_plugin(cfg: DataConfig, split: str) -> Any:
    module_name, _, function_name = cfg.type.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"data.type '{cfg.type}': cannot import module '{module_name}': {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"data.type '{cfg.type}': module '{module_name}' has no function '{function_name}'.")
    dataset = function(cfg, split)
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(dataset, a)]
    if missing:
        raise DataError(f"data.type '{cfg.type}': the {split} dataset it returned lacks {', '.join(missing)} "
                        f"(see the dataset contract in elastic_det/data/dataset.py).")
    return dataset
