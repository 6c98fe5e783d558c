"""Datasets (COCO, VOC, synthetic shapes, plug-ins), transforms, the elastic batch plan and loaders.

The dataset contract that built-in and plug-in datasets fulfil is documented in
:mod:`elastic_det.data.dataset`; :class:`DetectionDataset` implements it from a list of records,
:class:`IndexedDataset` (COCO, VOC) from a cached annotation index. Files may be local or behind URLs
(:class:`DataSource`: node-local image cache, :mod:`elastic_det.data.index`).
"""

from .build import build_dataset
from .coco import CocoDataset
from .dataset import DetectionDataset, ImageRecord, load_image
from .indexed import IndexedDataset
from .loader import TrainSamples, build_train_loader, build_val_loader, detection_collate, sample_seed
from .plan import ElasticBatchPlan, aspect_groups, split_micro, split_share
from .shapes import ensure_shapes, generate_shapes
from .source import DataSource
from .transforms import build_transforms
from .voc import VocDataset, voc_classes

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
