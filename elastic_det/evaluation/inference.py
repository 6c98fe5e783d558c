"""Distributed inference over the val set: every rank predicts its share, rank 0 gathers and scores.

Boxes come out of the detector in the coordinates of the image it was given. When the val transforms
resized that image, the boxes are scaled back to the original size recorded in the COCO ground truth
(``coco_gt.imgs[id]["width"/"height"]``), the frame the annotations live in. Predicted masks (Mask
R-CNN's per-pixel probabilities) are thresholded at 0.5 and encoded as COCO RLE on the rank that predicted
them, so what is gathered stays small; they are resized (nearest) to the original size the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from torch import nn

from ..data.masks import decode_rles, encode_masks
from ..models.amp import autocast
from .coco_eval import coco_evaluate, predictions_to_coco

MASK_THRESHOLD = 0.5


def evaluate(model: nn.Module, dataset: Any, loader: Iterable, device: torch.device | str,
             amp: str = "none") -> dict[str, float] | None:
    """COCO box mAP of ``model`` on ``dataset`` on rank 0, and mask mAP (``segm_*``) for a model that
    predicts masks; None on the other ranks.

    Every rank must call it (it gathers with a collective when a process group is initialized).
    ``loader`` yields ``(images, targets)`` for this rank's share, each target with its ``image_id``.
    """
    coco_gt = dataset.coco_gt() if _rank() == 0 else None
    results = predict(model, dataset, loader, device, amp, coco_gt=coco_gt)
    if results is None:
        return None
    return coco_evaluate(coco_gt, results, dataset.image_ids, segm=predicts_masks(model) or None)


def predicts_masks(model: nn.Module) -> bool:
    """Whether ``model`` is a Mask R-CNN (torchvision's ``roi_heads`` with a mask branch): it reports the
    ``segm_*`` figures even with no detection. For other models they follow from their results (``None``)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    roi_heads = getattr(model, "roi_heads", None)
    return bool(roi_heads is not None and getattr(roi_heads, "has_mask", lambda: False)())


def predict(model: nn.Module, dataset: Any, loader: Iterable, device: torch.device | str,
            amp: str = "none", coco_gt: COCO | None = None) -> list[dict[str, Any]] | None:
    """COCO-format detections of every rank's share, sorted by image id, on rank 0; None elsewhere.

    ``coco_gt`` (rank 0 only; default ``dataset.coco_gt()``) gives the original image sizes.
    """
    local = _run_model(model, loader, torch.device(device), amp)
    gathered = _gather_to_rank0(local)
    if gathered is None:
        return None
    coco_gt = coco_gt if coco_gt is not None else dataset.coco_gt()
    by_id = {p["image_id"]: p for p in gathered}  # one entry per image even if a loader repeated one
    image_ids = sorted(by_id)
    predictions = [_to_original_size(by_id[i], coco_gt.imgs.get(i, {})) for i in image_ids]
    return predictions_to_coco(predictions, image_ids, dataset.label_to_category_id)


def _run_model(model: nn.Module, loader: Iterable, device: torch.device, amp: str) -> list[dict[str, Any]]:
    """Per image: id, input size and the detections as numpy arrays (cheap to pickle, device-free)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module  # plain forward: no DDP buffer broadcast or gradient hooks
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), autocast(amp, device):
            for images, targets in loader:
                sizes = [tuple(img.shape[-2:]) for img in images]
                detections = model([img.to(device, non_blocking=True) for img in images])
                for det, target, size in zip(detections, targets, sizes, strict=True):
                    out.append({"image_id": int(target["image_id"]), "input_hw": size,
                                "boxes": det["boxes"].float().cpu().numpy(),
                                "labels": det["labels"].cpu().numpy(),
                                "scores": det["scores"].float().cpu().numpy()})
                    if "masks" in det:
                        binary = (det["masks"][:, 0] > MASK_THRESHOLD).to(torch.uint8).cpu().numpy()
                        out[-1]["segmentations"] = encode_masks(binary)
    finally:
        model.train(was_training)
    return out


def _to_original_size(pred: dict[str, Any], image_info: dict[str, Any]) -> dict[str, Any]:
    height, width = image_info.get("height"), image_info.get("width")
    in_h, in_w = pred["input_hw"]
    if not height or not width or (height, width) == (in_h, in_w):
        return pred
    scale = np.array([width / in_w, height / in_h, width / in_w, height / in_h], dtype=np.float32)
    resized = {**pred, "boxes": pred["boxes"] * scale}
    if pred.get("segmentations"):
        masks = torch.from_numpy(decode_rles(pred["segmentations"], in_h, in_w))
        masks = torch.nn.functional.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")
        resized["segmentations"] = encode_masks(masks[:, 0].to(torch.uint8).numpy())
    return resized


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _gather_to_rank0(local: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if not (dist.is_available() and dist.is_initialized()):
        return local
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    return [p for part in parts for p in part]
