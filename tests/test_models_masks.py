"""The mask models: torchvision's Mask R-CNNs by name, and ``tiny_mask_rcnn``, whose loss does not depend on
how a batch is split (what the elastic mask test relies on)."""

from __future__ import annotations

import pytest
import torch

from elastic_det.config.schema import ModelConfig
from elastic_det.models.build import _replace_classifier, build_model


def batch(n: int = 4, size: int = 64):
    gen = torch.Generator().manual_seed(0)
    images, targets = [], []
    for k in range(n):
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 5:30, 5:25] = 1
        masks[1, 30:60, 20 + k:50] = 1
        images.append(torch.rand(3, size, size, generator=gen))
        targets.append({"boxes": torch.tensor([[5.0, 5, 25, 30], [20.0 + k, 30, 50, 60]]),
                        "labels": torch.tensor([1, 2]), "masks": masks})
    return images, targets


def test_tiny_mask_rcnn_loss_is_the_mean_of_its_splits_and_draws_nothing_random():
    torch.manual_seed(0)
    model = build_model(ModelConfig(type="tiny_mask_rcnn", width=32, norm="group_norm", min_size=64, max_size=64), 3)
    images, targets = batch()
    with torch.no_grad():
        whole = model(images, targets)
        assert set(whole) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        first, second = model(images[:3], targets[:3]), model(images[3:], targets[3:])
        torch.manual_seed(12345)  # another generator state: the samplers take every candidate
        again = model(images, targets)
    for key, value in whole.items():
        assert float(value) == pytest.approx((3 * float(first[key]) + float(second[key])) / 4, rel=1e-5), key
        assert float(again[key]) == float(value), key
    model.eval()
    with torch.no_grad():
        (out,) = model(images[:1])
    assert out["masks"].shape[1:] == (1, 64, 64)


@pytest.mark.parametrize("model_type", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_torchvision_mask_rcnns_by_name_and_a_new_label_set(model_type):
    model = build_model(ModelConfig(type=model_type, min_size=64, max_size=64), 5)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 5
    _replace_classifier(model, model_type, 3)  # what fine-tuning COCO weights on another label set does
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 64, 64)])
    assert {"boxes", "labels", "scores", "masks"} <= set(out)
