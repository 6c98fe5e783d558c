"""Mask mAP (COCOeval ``segm``) beside box mAP: real pycocotools, a real gloo group, the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn

from elastic_det.config.schema import ModelConfig
from elastic_det.evaluation import evaluate, predict, predicts_masks, run_cocoeval
from elastic_det.evaluation.coco_eval import METRIC_NAMES, SEGM_METRIC_NAMES
from elastic_det.models.build import build_model

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64


def _gt() -> dict:
    """Three images: L-shaped polygons (their boxes are twice their area), an RLE disc, a crowd RLE."""
    images = [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    anns = []

    def add(image_id, segmentation, category_id=1, crowd=0):
        rle = (mask_utils.merge(mask_utils.frPyObjects(segmentation, H, W)) if isinstance(segmentation, list)
               else {**segmentation, "counts": segmentation["counts"].encode()})
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_id, "iscrowd": crowd,
                     "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)]})

    add(1, [[4, 4, 40, 4, 40, 12, 12, 12, 12, 40, 4, 40]])
    add(1, [[44, 20, 60, 20, 60, 44, 44, 44]], category_id=2)
    yy, xx = np.mgrid[:H, :W]
    disc = ((yy - 24) ** 2 + (xx - 30) ** 2 < 15 ** 2).astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(disc))
    add(2, {"size": [H, W], "counts": rle["counts"].decode()}, category_id=2)
    add(3, [[2, 2, 42, 2, 42, 38, 2, 38]])  # 40 x 36: the one medium object
    crowd = mask_utils.encode(np.asfortranarray(np.pad(np.ones((8, 20), np.uint8), ((40, 0), (44, 0)))))
    add(3, {"size": [H, W], "counts": crowd["counts"].decode()}, crowd=1)
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


GT = _gt()


def coco(data: dict = GT) -> COCO:
    c = COCO()
    c.dataset = json.loads(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


class MaskDataset:
    """The dataset contract for evaluation; image ``i`` is filled with ``i`` so the detector knows it."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.image_ids = [img["id"] for img in GT["images"]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        return (torch.full((3, round(H * self.scale), round(W * self.scale)), i, dtype=torch.uint8),
                {"image_id": self.image_ids[i]})

    def label_to_category_id(self, label: int) -> int:
        return label

    def coco_gt(self) -> COCO:
        return coco()


def loader(ds: MaskDataset, rank: int = 0, world_size: int = 1):
    for i in range(rank, len(ds), world_size):
        image, target = ds[i]
        yield [image], [target]


class MaskDetector(nn.Module):
    """Answers with the ground truth boxes and masks in the input's pixels; ``hollow``: masks of the
    ground truth's complement inside each box (right boxes, wrong masks)."""

    def __init__(self, hollow: bool = False):
        super().__init__()
        self.hollow = hollow
        self.gt = coco()

    def forward(self, images):
        out = []
        for image in images:
            image_id = GT["images"][int(image[0, 0, 0])]["id"]
            anns = [a for a in self.gt.imgToAnns[image_id] if not a["iscrowd"]]
            masks = torch.stack([torch.from_numpy(self.gt.annToMask(a)) for a in anns]).float()
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            if self.hollow:
                inside = torch.zeros_like(masks)
                for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
                    inside[k, y1:y2, x1:x2] = 1
                masks = inside - masks
            size = image.shape[-2:]
            masks = nn.functional.interpolate(masks[:, None], size=size, mode="nearest")
            boxes = boxes * torch.tensor([size[1] / W, size[0] / H] * 2)
            out.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns]),
                        "scores": torch.ones(len(anns)), "masks": masks})
        return out


def expected_perfect(metrics: dict) -> dict:
    """1.0 everywhere, -1 for the area ranges without ground truth (no object of 96 x 96 pixels here)."""
    return {k: -1.0 if k.endswith("_l") else 1.0 for k in metrics}


@pytest.mark.parametrize("scale", [1.0, 0.5])  # 0.5: what a resizing val transform hands the detector
def test_ground_truth_masks_score_one_also_from_a_resized_input(scale):
    ds = MaskDataset(scale)
    metrics = evaluate(MaskDetector(), ds, loader(ds), "cpu")
    assert tuple(metrics) == (*METRIC_NAMES, *SEGM_METRIC_NAMES)
    if scale == 1.0:
        assert metrics == pytest.approx(expected_perfect(metrics))
    else:  # masks come back to the original size by nearest resizing: close to, not exactly, the ground truth
        assert metrics["segm_mAP_50"] == pytest.approx(1.0) and metrics["segm_mAP"] > 0.8
        assert metrics["bbox_mAP"] == pytest.approx(1.0)


def test_segm_scores_the_masks_not_the_boxes():
    ds = MaskDataset()
    metrics = evaluate(MaskDetector(hollow=True), ds, loader(ds), "cpu")
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    assert metrics["segm_mAP"] < 0.2  # the L-shape's complement in its box overlaps it not at all


def test_results_carry_rle_and_no_detection_still_reports_segm():
    ds = MaskDataset()
    results = predict(MaskDetector(), ds, loader(ds), "cpu")
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    first = results[0]["segmentation"]
    assert first["size"] == [H, W] and isinstance(first["counts"], str)
    assert np.array_equal(mask_utils.decode({**first, "counts": first["counts"].encode()}),
                          coco().annToMask(GT["annotations"][0]))
    json.dumps(results)  # what --out writes
    empty = run_cocoeval(coco(), [], segm=True).metrics
    assert empty == {k: -1.0 if k.endswith("_l") else 0.0 for k in (*METRIC_NAMES, *SEGM_METRIC_NAMES)}
    assert tuple(run_cocoeval(coco(), []).metrics) == METRIC_NAMES  # a box model: no segm figures


def test_predicts_masks_knows_the_mask_models():
    tiny = ModelConfig(type="tiny_mask_rcnn", width=32, min_size=64, max_size=64)
    assert predicts_masks(build_model(tiny, 3))
    assert not predicts_masks(build_model(ModelConfig(type="tiny_fcos", width=32), 3))
    assert not predicts_masks(MaskDetector())


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        ds = MaskDataset()
        metrics = evaluate(MaskDetector(hollow=True), ds, loader(ds, rank, world_size), "cpu")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(metrics, f)
    finally:
        dist.destroy_process_group()


def test_distributed_mask_evaluation_matches_single_process(tmp_path):
    ds = MaskDataset()
    expected = evaluate(MaskDetector(hollow=True), ds, loader(ds), "cpu")
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.spawn(_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    assert json.loads((tmp_path / "rank0.json").read_text()) == expected
    assert json.loads((tmp_path / "rank1.json").read_text()) is None


def test_show_dir_draws_the_masks(tmp_path):
    from elastic_det.test import draw_predictions

    ds = MaskDataset()
    results = predict(MaskDetector(), ds, loader(ds), "cpu")
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    for name, res in (("masks", results), ("boxes", boxes_only)):
        draw_predictions(ds, res, {1: "a", 2: "b"}, str(tmp_path / name), 0.3, {i["id"]: i for i in GT["images"]})
    with_masks = np.array(Image.open(tmp_path / "masks" / "2.png"))
    without = np.array(Image.open(tmp_path / "boxes" / "2.png"))
    disc = coco().annToMask(GT["annotations"][2]).astype(bool)
    changed = (with_masks != without).any(-1)
    assert changed[24, 30] and changed[disc].mean() > 0.7 and not changed[~disc].any()  # box and label on top


@pytest.mark.slow
def test_cli_writes_rle_results_and_segm_metrics_after_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    work = tmp_path / "run"
    options = ["model.type=tiny_mask_rcnn", "model.width=32", "model.min_size=64", "model.max_size=64",
               f"data.shapes.cache_dir={tmp_path / 'cache'}", "data.shapes.num_train=16", "data.shapes.num_val=4",
               "data.shapes.image_size=64", "data.global_batch_size=4", "data.num_workers=0", "train.max_steps=3",
               "train.validate=false", "checkpoint.interval=3", "schedule.warmup_steps=0", "model.norm=group_norm"]
    train = subprocess.run([sys.executable, "-m", "elastic_det.train", "--work-dir", str(work), "--cfg-options",
                            *options], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    out, show = tmp_path / "results.json", tmp_path / "show"
    test = subprocess.run([sys.executable, "-m", "elastic_det.test", str(work / "config.yaml"), str(work),
                           "--out", str(out), "--show-dir", str(show), "--score-thr", "0.0"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert test.returncode == 0, test.stderr[-3000:]
    assert all(f"\n{name} " in test.stdout for name in SEGM_METRIC_NAMES), test.stdout
    results = json.loads(out.read_text())
    assert results, "no detection to check"
    assert all(r["segmentation"]["size"] == [64, 64] and isinstance(r["segmentation"]["counts"], str)
               for r in results)
    assert sorted(p.name for p in show.iterdir()) == [f"{i:06d}.png" for i in range(1, 5)]
