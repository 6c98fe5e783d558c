"""COCO box and mask mAP (pycocotools COCOeval) and distributed inference over the val set."""

from .coco_eval import CocoReport, coco_evaluate, format_table, predictions_to_coco, run_cocoeval
from .inference import evaluate, predict, predicts_masks

__all__ = ["CocoReport", "coco_evaluate", "evaluate", "format_table", "predict", "predictions_to_coco",
           "predicts_masks", "run_cocoeval"]
