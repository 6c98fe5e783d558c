"""Small, fast detectors for the embedded default and the tests: ResNet-18 + slim FPN + FCOS/RetinaNet head.

Trained from scratch; a few hundred steps on 128 px images on two CPU cores are enough for the shapes set.
The heads use GroupNorm; the backbone's normalisation is ``model.norm`` (see ``norm_factory``).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

STRIDES = (8, 16, 32, 64, 128)


def norm_factory(norm: str) -> type[nn.Module] | partial:
    """The backbone normalisation layer for ``model.norm``.

    ``auto`` is BatchNorm: from scratch it trains this backbone about three times faster than GroupNorm
    (shapes val mAP 0.62 vs 0.22 after 300 steps), but its statistics follow the per-device batch; choose
    ``group_norm`` for a world-size-invariant run.
    """
    if norm == "group_norm":
        return partial(nn.GroupNorm, 16)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    return nn.BatchNorm2d  # auto, bn, sync_bn (converted after building)


def _backbone(width: int, norm: str) -> BackboneWithFPN:
    body = resnet18(weights=None, norm_layer=norm_factory(norm))
    return BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=width,
        extra_blocks=LastLevelP6P7(width, width),
    )


def tiny_fcos(num_classes: int, width: int, norm: str, min_size: int, max_size: int) -> FCOS:
    anchors = AnchorGenerator(sizes=tuple((s,) for s in STRIDES), aspect_ratios=((1.0,),) * len(STRIDES))
    head = FCOSHead(width, num_anchors=1, num_classes=num_classes, num_convs=4)
    return FCOS(_backbone(width, norm), num_classes, min_size=min_size, max_size=max_size,
                anchor_generator=anchors, head=head, score_thresh=0.05, detections_per_img=100)


def tiny_retinanet(num_classes: int, width: int, norm: str, min_size: int, max_size: int) -> RetinaNet:
    """RetinaNet normalises its loss per image, so a loss on a split batch equals the whole batch's mean:
    the model the elastic-determinism tests compare losses with."""
    sizes = tuple((s * 4 // 2, s * 4) for s in STRIDES)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(STRIDES))
    head = RetinaNetHead(width, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 16))
    return RetinaNet(_backbone(width, norm), num_classes, min_size=min_size, max_size=max_size,
                     anchor_generator=anchors, head=head, score_thresh=0.05, detections_per_img=100)
