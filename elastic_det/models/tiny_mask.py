"""``tiny_mask_rcnn``: a CPU-sized Mask R-CNN (ResNet-18 + slim FPN) for the tests and demos.

Two changes to torchvision's Mask R-CNN make its loss independent of how a batch is split across ranks and
micro-batches, as ``tiny_retinanet``'s is, so that a resume at another world size continues the loss curve:

* the losses are computed per image and averaged (torchvision averages over the sampled anchors and
  proposals of the whole batch, so an image's weight depends on the other images beside it);
* the anchor and proposal samplers take every candidate (``batch_size_per_image`` larger than the
  candidates of an image), so no random draw from the global generator, whose stream depends on the
  rank and the restart, decides which ones count.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from .tiny import norm_factory

ALL_CANDIDATES = 1 << 20
"""``batch_size_per_image`` of both samplers: more than the anchors or proposals of any image."""


class PerImageMaskRCNN(MaskRCNN):
    """Mask R-CNN whose training losses are the mean over images of each image's own losses."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if not self.training:
            return super().forward(images, targets)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        per_image = []
        for i, target in enumerate(targets):
            one = ImageList(batch.tensors[i:i + 1], [batch.image_sizes[i]])
            feats = OrderedDict((name, f[i:i + 1]) for name, f in features.items())
            proposals, rpn_losses = self.rpn(one, feats, [target])
            _, roi_losses = self.roi_heads(feats, proposals, one.image_sizes, [target])
            per_image.append({**rpn_losses, **roi_losses})
        return {k: torch.stack([losses[k] for losses in per_image]).mean() for k in per_image[0]}


def tiny_mask_rcnn(num_classes: int, width: int, norm: str, min_size: int, max_size: int) -> MaskRCNN:
    body = resnet18(weights=None, norm_layer=norm_factory(norm))
    backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=width)  # + max-pooled "pool"
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    levels = ["0", "1", "2"]
    return PerImageMaskRCNN(
        backbone, None, min_size=min_size, max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=ALL_CANDIDATES, box_batch_size_per_image=ALL_CANDIDATES,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(width * 7 * 7, 128),
        box_predictor=FastRCNNPredictor(128, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2),
        mask_head=MaskRCNNHeads(width, [width, width], 1),
        mask_predictor=MaskRCNNPredictor(width, width, num_classes),
        box_score_thresh=0.05, box_detections_per_img=100,
    )
