"""Datasets (COCO, VOC, synthetic shapes, plug-ins), transforms, the elastic batch plan and loaders.

The dataset contract that built-in and plug-in datasets fulfil is documented in
:mod:`elastic_det.data.dataset`; :class:`DetectionDataset` implements it from a list of records,
:class:`IndexedDataset` (COCO, VOC) from a cached annotation index. Files may be local or behind URLs
(:class:`DataSource`: node-local image cache, :mod:`elastic_det.data.index`).
"""

import importlib
from typing import Any

_HOMES = {
    "build_dataset": "build", "CocoDataset": "coco", "DetectionDataset": "dataset", "ImageRecord": "dataset",
    "load_image": "dataset", "IndexedDataset": "indexed", "TrainSamples": "loader",
    "build_train_loader": "loader", "build_val_loader": "loader", "detection_collate": "loader",
    "sample_seed": "loader", "ElasticBatchPlan": "plan", "aspect_groups": "plan", "split_micro": "plan",
    "split_share": "plan", "ensure_shapes": "shapes", "generate_shapes": "shapes", "DataSource": "source",
    "build_transforms": "transforms", "VocDataset": "voc", "voc_classes": "voc",
}
"""Where each name of the package lives. They are imported on first use (PEP 562) so that checking the
data (``build_dataset``, the supervisor's pre-flight) does not import torch through the loaders."""


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "CocoDataset",
    "DataSource",
    "DetectionDataset",
    "ElasticBatchPlan",
    "ImageRecord",
    "IndexedDataset",
    "TrainSamples",
    "VocDataset",
    "aspect_groups",
    "build_dataset",
    "build_train_loader",
    "build_transforms",
    "build_val_loader",
    "detection_collate",
    "ensure_shapes",
    "generate_shapes",
    "load_image",
    "sample_seed",
    "split_micro",
    "split_share",
    "voc_classes",
]
