"""``build_model``: a torchvision detector (or a user's own) from ``cfg.model``.

``model.type`` names one of the builders below or a plug-in ``package.module:function`` called as
``function(cfg.model, num_classes)``. ``num_classes`` counts the background (labels are 1..K).
"""

from __future__ import annotations

import importlib
import logging
import urllib.error
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torchvision.models import get_weight
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    fcos_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    retinanet_resnet50_fpn,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead
from torchvision.ops.misc import FrozenBatchNorm2d

from ..config.schema import ModelConfig
from ..errors import ConfigError, UserError
from .tiny import tiny_fcos, tiny_retinanet
from .tiny_mask import tiny_mask_rcnn

log = logging.getLogger(__name__)

TORCHVISION_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "faster_rcnn_r50_fpn": fasterrcnn_resnet50_fpn,
    "retinanet_r50_fpn": retinanet_resnet50_fpn,
    "fcos_r50_fpn": fcos_resnet50_fpn,
    "ssdlite320_mobilenet_v3": ssdlite320_mobilenet_v3_large,
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
}
TINY_BUILDERS = {"tiny_fcos": tiny_fcos, "tiny_retinanet": tiny_retinanet, "tiny_mask_rcnn": tiny_mask_rcnn}


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    num_classes = cfg.num_classes or num_classes
    if ":" in cfg.type:
        model = _import(cfg.type)(cfg, num_classes)
    elif cfg.type in TINY_BUILDERS:
        if cfg.width % 32:
            raise ConfigError(f"model.width={cfg.width}: the tiny models' heads use GroupNorm(32), so the width "
                              "must be a multiple of 32.")
        model = TINY_BUILDERS[cfg.type](num_classes, cfg.width, cfg.norm, cfg.min_size, cfg.max_size)
    elif cfg.type in TORCHVISION_BUILDERS:
        model = _torchvision_detector(cfg, num_classes)
    else:
        known = ", ".join([*TINY_BUILDERS, *TORCHVISION_BUILDERS])
        raise ConfigError(f"Unknown model.type '{cfg.type}'. Choose one of {known}, "
                          "or give a plug-in as package.module:function.")
    if cfg.norm == "frozen_bn":
        model = freeze_batch_norm(model)
    elif cfg.norm == "sync_bn":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _import(path: str) -> Callable[..., nn.Module]:
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.type '{path}': cannot import {attr!r} from {module_name!r}: {e}") from None


def _weights(name: str, key: str):
    if not name:
        return None
    try:
        return get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(f"{key} '{name}' is not a torchvision weights name "
                          "(e.g. FasterRCNN_ResNet50_FPN_Weights.COCO_V1).") from None


def _torchvision_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    weights = _weights(cfg.weights, "model.weights")
    weights_backbone = _weights(cfg.weights_backbone, "model.weights_backbone")
    kwargs = {"weights_backbone": weights_backbone}
    if cfg.type != "ssdlite320_mobilenet_v3":
        kwargs.update(min_size=cfg.min_size, max_size=cfg.max_size,
                      trainable_backbone_layers=cfg.trainable_backbone_layers)
    builder = TORCHVISION_BUILDERS[cfg.type]
    try:
        if weights is None:
            return builder(weights=None, num_classes=num_classes, **kwargs)
        model = builder(weights=weights, **kwargs)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(
            f"Cannot fetch torchvision weights for model '{cfg.type}' ({e}). This machine may be offline: "
            f"put the file in {torch.hub.get_dir()}/checkpoints, or set model.weights='' and "
            "model.weights_backbone='' to train from scratch."
        ) from None
    if len(weights.meta["categories"]) != num_classes:
        _replace_classifier(model, cfg.type, num_classes)
    return model


def _replace_classifier(model: nn.Module, model_type: str, num_classes: int) -> None:
    """Fine-tuning pretrained weights on another label set: a fresh classification layer."""
    if model_type in ("faster_rcnn_r50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"):
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
        if model.roi_heads.mask_predictor is not None:
            old = model.roi_heads.mask_predictor
            model.roi_heads.mask_predictor = MaskRCNNPredictor(old.conv5_mask.in_channels,
                                                               old.conv5_mask.out_channels, num_classes)
    elif model_type == "retinanet_r50_fpn":
        old = model.head.classification_head
        num_anchors = old.num_anchors
        model.head.classification_head = RetinaNetClassificationHead(
            old.conv[0][0].in_channels, num_anchors, num_classes)
    elif model_type == "fcos_r50_fpn":
        old = model.head.classification_head
        model.head.classification_head = FCOSClassificationHead(
            old.conv[0].in_channels, old.num_anchors, num_classes)
    elif model_type == "ssdlite320_mobilenet_v3":
        old = model.head.classification_head.module_list
        in_channels = [m[0][0].in_channels for m in old]
        num_anchors = model.anchor_generator.num_anchors_per_location()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        model.head.classification_head = SSDLiteClassificationHead(in_channels, num_anchors, num_classes, norm)
    log.info("Replaced the classification layer of %s for %d classes", model_type, num_classes)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by FrozenBatchNorm2d carrying the same statistics."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        frozen.weight.copy_(module.weight.detach())
        frozen.bias.copy_(module.bias.detach())
        frozen.running_mean.copy_(module.running_mean)
        frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        setattr(module, name, freeze_batch_norm(child))
    return module


def batch_dependent_layers(model: nn.Module) -> list[str]:
    """Names of layers whose output in training depends on the per-device batch (plain BatchNorm)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            and m.training and m.track_running_stats]
