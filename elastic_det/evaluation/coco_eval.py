"""COCO box and mask mAP with pycocotools' own ``COCOeval``, under mmdetection's metric names.

pycocotools prints progress on stdout; here it is silenced, and :func:`format_table` gives the summary.
COCOeval reports -1.0 for an area range without any ground truth box (e.g. ``bbox_mAP_l`` on a set of small
objects); those values are passed through unchanged, as mmdetection does.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
"""The first six entries of ``COCOeval.stats``, in order."""
SEGM_METRIC_NAMES = tuple(name.replace("bbox", "segm") for name in METRIC_NAMES)
"""The same for ``iouType="segm"`` (mask IoU), evaluated when the results carry a ``segmentation``."""


@dataclass
class CocoReport:
    metrics: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)  # category name -> AP@[.5:.95]; nan: no GT


def predictions_to_coco(
    predictions: Sequence[dict[str, Any]],
    image_ids: Sequence[int],
    label_to_category_id: Callable[[int], int],
) -> list[dict[str, Any]]:
    """Detector outputs (``boxes`` XYXY, ``labels``, ``scores``; tensors or arrays) as COCO results.

    ``image_ids[i]`` is the image of ``predictions[i]``; boxes must already be in that image's original
    coordinates. Each result is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, plus
    ``"segmentation"`` (a COCO RLE) where the prediction has ``segmentations`` (one RLE per box).
    Label 0 is the background: sigmoid heads (FCOS, RetinaNet) keep a logit for it and may emit it, but it
    has no category, so those detections are dropped.
    """
    category_of: dict[int, int] = {}
    results = []
    for pred, image_id in zip(predictions, image_ids, strict=True):
        boxes = _numpy(pred["boxes"]).reshape(-1, 4).astype(np.float64)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        labels = _numpy(pred["labels"]).reshape(-1).tolist()
        scores = _numpy(pred["scores"]).reshape(-1).astype(np.float64).tolist()
        segmentations = pred.get("segmentations")
        for k, (box, label, score) in enumerate(zip(xywh, labels, scores, strict=True)):
            label = int(label)
            if label == 0:
                continue
            if label not in category_of:
                category_of[label] = int(label_to_category_id(label))
            results.append({"image_id": int(image_id), "category_id": category_of[label], "bbox": box,
                            "score": score})
            if segmentations is not None:
                results[-1]["segmentation"] = segmentations[k]
    return results


def coco_evaluate(coco_gt: COCO, results: list[dict[str, Any]],
                  image_ids: Sequence[int] | None = None, segm: bool | None = None) -> dict[str, float]:
    """``bbox_mAP``, ``bbox_mAP_50``, ``bbox_mAP_75`` and ``bbox_mAP_s/m/l`` of ``results`` on ``coco_gt``;
    ``segm_mAP`` ... ``segm_mAP_l`` too when ``segm`` (None: when a result carries a mask; pass True for a
    model that predicts masks, so that no detection at all still reports them). ``coco_gt`` must then
    have segmentations.

    ``image_ids`` restricts the evaluation to those images (a dataset may use part of a COCO file);
    None evaluates every image of ``coco_gt``.
    """
    return run_cocoeval(coco_gt, results, image_ids, segm).metrics


def run_cocoeval(coco_gt: COCO, results: list[dict[str, Any]],
                 image_ids: Sequence[int] | None = None, segm: bool | None = None) -> CocoReport:
    """:func:`coco_evaluate` plus the box AP of every category. ``results`` is not modified.

    Boxes and masks are evaluated apart (as mmdetection does): pycocotools' ``loadRes`` takes a result's
    area from its box when it has one, while the area ranges of ``segm_mAP_s/m/l`` need the mask's area.
    """
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    evaluator = _cocoeval(coco_gt, boxes, image_ids, "bbox")
    metrics = {name: float(evaluator.stats[i]) for i, name in enumerate(METRIC_NAMES)}
    if segm or (segm is None and any("segmentation" in r for r in results)):
        masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        segm = _cocoeval(coco_gt, masks, image_ids, "segm")
        metrics.update({name: float(segm.stats[i]) for i, name in enumerate(SEGM_METRIC_NAMES)})
    return CocoReport(metrics, _per_class_ap(coco_gt, evaluator))


def _cocoeval(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int] | None,
              iou_type: str) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = _load_results(coco_gt, results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _load_results(coco_gt: COCO, results: list[dict[str, Any]]) -> COCO:
    if results:
        return coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it gets
    # loadRes cannot take an empty list (it looks at results[0]); no detections is a valid answer: mAP 0.
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                       "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def _per_class_ap(coco_gt: COCO, evaluator: COCOeval) -> dict[str, float]:
    # precision: [IoU thresholds, recall thresholds, categories, area ranges, max detections]; -1 = no GT.
    precision = evaluator.eval["precision"]
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else math.nan
    return out


def format_table(metrics: dict[str, float], per_class: dict[str, float] | None = None) -> str:
    """The metrics (and optionally the AP per class) as an aligned plain-text table."""
    rows = [("metric", "value")] + [(k, _fmt(v)) for k, v in metrics.items()]
    text = _table(rows)
    if per_class:
        text += "\n\n" + _table([("category", "AP")] + [(k, _fmt(v)) for k, v in per_class.items()])
    return text


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value:>7}" for name, value in rows]
    lines.insert(1, "-" * (width + 9))
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) or value < 0 else f"{value:.4f}"  # COCOeval: -1 = no ground truth


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)
