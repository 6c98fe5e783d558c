"""COCO mAP through the real pycocotools COCOeval, and distributed inference over a real gloo group.

The dataset, loader and detector here are small stand-ins for the contracts of elastic_det.data and
elastic_det.models; the code under test (elastic_det.evaluation) is the real thing.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from torch import nn

from elastic_det.evaluation import (
    coco_evaluate,
    evaluate,
    format_table,
    predict,
    predictions_to_coco,
    run_cocoeval,
)

REPO = Path(__file__).resolve().parents[1]
METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")
CATEGORY_IDS = {1: 3, 2: 7, 3: 12}  # label -> non-contiguous COCO category id
LABELS = {c: label for label, c in CATEGORY_IDS.items()}

GT = {
    "images": [{"id": 10, "width": 64, "height": 48, "file_name": "a.jpg"},
               {"id": 20, "width": 64, "height": 48, "file_name": "b.jpg"},
               {"id": 30, "width": 48, "height": 64, "file_name": "c.jpg"},
               {"id": 40, "width": 64, "height": 48, "file_name": "empty.jpg"},
               {"id": 50, "width": 64, "height": 64, "file_name": "d.jpg"}],
    "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}],
    "annotations": [],
}
# bbox (x, y, w, h) in original pixels; COCO area ranges: small < 32^2 <= medium < 96^2 <= large.
# Images are small to keep tensors tiny, so areas are given explicitly (COCOeval uses the "area" field of
# ground truth) and cover all three ranges.
_ANNS = [(10, 3, [2, 2, 10, 10], 100), (10, 7, [20, 10, 30, 30], 2000), (10, 12, [5, 20, 40, 25], 12000),
         (20, 3, [30, 20, 30, 25], 12000), (20, 7, [4, 6, 12, 10], 120),
         (20, 12, [0, 0, 64, 10], 640, 1),  # crowd: matching it neither helps nor hurts
         (30, 12, [10, 30, 20, 20], 3000), (30, 3, [25, 5, 20, 20], 2500),
         (50, 7, [8, 8, 40, 40], 16000), (50, 3, [50, 50, 12, 12], 144)]
for _i, (_img, _cat, _box, _area, *_crowd) in enumerate(_ANNS):
    GT["annotations"].append({"id": _i + 1, "image_id": _img, "category_id": _cat, "bbox": _box,
                              "area": _area, "iscrowd": _crowd[0] if _crowd else 0})


def make_coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_as_predictions(offset: float = 0.0) -> tuple[list[dict], list[int]]:
    """The non-crowd ground truth of every image as detections with score 1 (XYXY tensors)."""
    predictions, image_ids = [], []
    for img in GT["images"]:
        anns = [a for a in GT["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes = torch.tensor([[x + offset, y, x + w + offset, y + h] for x, y, w, h in
                              (a["bbox"] for a in anns)], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([LABELS[a["category_id"]] for a in anns], dtype=torch.int64)
        predictions.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))})
        image_ids.append(img["id"])
    return predictions, image_ids


# ----------------------------------------------------------------------------------------------------------
# coco_eval


def test_ground_truth_as_detections_scores_one():
    predictions, image_ids = gt_as_predictions()
    results = predictions_to_coco(predictions, image_ids, CATEGORY_IDS.__getitem__)
    metrics = coco_evaluate(make_coco(GT), results)
    assert tuple(metrics) == METRICS
    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0))


def test_shifted_boxes_score_zero():
    predictions, image_ids = gt_as_predictions(offset=500.0)
    metrics = coco_evaluate(make_coco(GT), predictions_to_coco(predictions, image_ids, CATEGORY_IDS.get))
    assert metrics == dict.fromkeys(metrics, 0.0)


def test_empty_results_score_zero(capsys):
    report = run_cocoeval(make_coco(GT), [])
    assert report.metrics == dict.fromkeys(report.metrics, 0.0)
    assert report.per_class == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert capsys.readouterr().out == ""  # COCOeval's prints are silenced


def test_label_to_category_mapping_is_applied():
    predictions, image_ids = gt_as_predictions()
    results = predictions_to_coco(predictions, image_ids, CATEGORY_IDS.__getitem__)
    assert {r["category_id"] for r in results} == {3, 7, 12}
    first = results[0]
    assert first == {"image_id": 10, "category_id": 3, "bbox": [2.0, 2.0, 10.0, 10.0], "score": 1.0}
    # Background detections (label 0) have no category and are dropped.
    background = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "labels": torch.tensor([0]),
                  "scores": torch.tensor([0.9])}
    assert predictions_to_coco([background], [10], CATEGORY_IDS.__getitem__) == []
    # Labels taken as category ids (1, 2, 3) match nothing: 3 is "cat", and label 3 is a bird.
    wrong = predictions_to_coco(predictions, image_ids, lambda label: label)
    assert coco_evaluate(make_coco(GT), wrong)["bbox_mAP"] == 0.0


def test_per_class_ap_and_table():
    predictions, image_ids = gt_as_predictions()
    dog = [r for r in predictions_to_coco(predictions, image_ids, CATEGORY_IDS.get) if r["category_id"] == 7]
    report = run_cocoeval(make_coco(GT), dog)
    assert report.per_class == {"cat": 0.0, "dog": pytest.approx(1.0), "bird": 0.0}
    assert 0.0 < report.metrics["bbox_mAP"] < 1.0
    table = format_table(report.metrics, report.per_class)
    assert "bbox_mAP_50" in table and "dog" in table and f"{report.metrics['bbox_mAP']:.4f}" in table
    assert "n/a" in format_table({"bbox_mAP": math.nan}) and "n/a" in format_table({"bbox_mAP_l": -1.0})


def test_evaluation_is_restricted_to_the_given_images():
    predictions, image_ids = gt_as_predictions()
    results = [r for r in predictions_to_coco(predictions, image_ids, CATEGORY_IDS.get) if r["image_id"] != 50]
    assert coco_evaluate(make_coco(GT), results)["bbox_mAP"] < 1.0  # image 50's boxes are missed
    assert coco_evaluate(make_coco(GT), results, image_ids=[10, 20, 30, 40])["bbox_mAP"] == pytest.approx(1.0)


def test_results_list_is_not_modified():
    predictions, image_ids = gt_as_predictions()
    results = predictions_to_coco(predictions, image_ids, CATEGORY_IDS.get)
    before = json.dumps(results)
    coco_evaluate(make_coco(GT), results)
    assert json.dumps(results) == before


# ----------------------------------------------------------------------------------------------------------
# inference: stand-ins for the dataset, loader and detector contracts


class StandInDataset:
    """``ds[i] -> (image, target)``; the image is filled with ``i`` so the stand-in detector knows it."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.image_ids = [img["id"] for img in GT["images"]]
        self.class_names = [c["name"] for c in GT["categories"]]
        self.num_classes = len(self.class_names) + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        img = GT["images"][i]
        h, w = round(img["height"] * self.scale), round(img["width"] * self.scale)
        return torch.full((3, h, w), i, dtype=torch.uint8), {"image_id": img["id"]}

    def label_to_category_id(self, label: int) -> int:
        return CATEGORY_IDS[label]

    def coco_gt(self) -> COCO:
        return make_coco(GT)


def shard_loader(ds: StandInDataset, rank: int = 0, world_size: int = 1, batch_size: int = 2):
    """The val loader contract: this rank's indices are range(rank, len, world_size)."""
    indices = list(range(rank, len(ds), world_size))
    for start in range(0, len(indices), batch_size):
        items = [ds[i] for i in indices[start:start + batch_size]]
        yield [img for img, _ in items], [t for _, t in items]


class StandInDetector(nn.Module):
    """Answers with each image's ground truth (plus noise when ``noisy``), in the input image's pixels."""

    def __init__(self, noisy: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.calls: list[tuple[bool, bool]] = []  # (training, inference mode) at each forward
        self.images_seen = 0
        rng = np.random.default_rng(0)
        self.answers = []
        for img in GT["images"]:
            anns = [a for a in GT["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=np.float32).reshape(-1, 4)
            labels = [LABELS[a["category_id"]] for a in anns]
            if noisy:
                boxes = boxes + rng.uniform(-4, 4, boxes.shape).astype(np.float32)
                extra = rng.uniform(0, 30, (3, 2)).astype(np.float32)
                boxes = np.concatenate([boxes, np.concatenate([extra, extra + 12], axis=1)])
                labels = labels + [1, 2, 3]
            scores = rng.uniform(0.05, 1.0, len(labels)) if noisy else np.ones(len(labels))
            self.answers.append((img["height"], img["width"], torch.from_numpy(boxes),
                                 torch.tensor(labels, dtype=torch.int64),
                                 torch.tensor(scores, dtype=torch.float32)))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        self.images_seen += len(images)
        out = []
        for image in images:
            height, width, boxes, labels, scores = self.answers[int(image[0, 0, 0])]
            sy, sx = image.shape[-2] / height, image.shape[-1] / width
            scale = torch.tensor([sx, sy, sx, sy]) * self.weight.detach()
            out.append({"boxes": boxes * scale, "labels": labels, "scores": scores})
        return out


def test_evaluate_single_process_restores_training_mode():
    model = StandInDetector().train()
    ds = StandInDataset()
    metrics = evaluate(model, ds, shard_loader(ds), "cpu")
    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0))
    assert model.calls and all(call == (False, True) for call in model.calls)
    assert model.training


def test_predictions_are_scaled_back_to_the_original_image():
    ds = StandInDataset(scale=0.5)  # what a resizing val transform hands the detector
    results = predict(StandInDetector(), ds, shard_loader(ds), "cpu")
    first = results[0]
    assert first["image_id"] == 10 and first["bbox"] == pytest.approx([2.0, 2.0, 10.0, 10.0])
    assert coco_evaluate(make_coco(GT), results) == pytest.approx(dict.fromkeys(METRICS, 1.0))


def test_bf16_autocast_runs():
    ds = StandInDataset()
    metrics = evaluate(StandInDetector(), ds, shard_loader(ds), "cpu", amp="bf16")
    assert metrics["bbox_mAP"] == pytest.approx(1.0)


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        ds = StandInDataset()
        model = nn.parallel.DistributedDataParallel(StandInDetector(noisy=True))
        metrics = evaluate(model, ds, shard_loader(ds, rank, world_size), "cpu")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"metrics": metrics, "images_seen": model.module.images_seen}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_matches_single_process(tmp_path):
    ds = StandInDataset()
    expected = evaluate(StandInDetector(noisy=True), ds, shard_loader(ds), "cpu")
    assert 0.1 < expected["bbox_mAP"] < 0.9  # noisy enough that a lost or doubled image would show

    # The test process hosts the rendezvous store on a free loopback port it holds (no bind race).
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    mp.spawn(_distributed_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["metrics"] == expected
    assert rank1["metrics"] is None
    assert (rank0["images_seen"], rank1["images_seen"]) == (3, 2)  # each rank predicted only its share


# ----------------------------------------------------------------------------------------------------------
# python -m elastic_det.test


def test_draw_predictions_writes_a_png_per_image(tmp_path):
    from PIL import Image

    from elastic_det.test import draw_predictions

    ds = StandInDataset()
    results = predict(StandInDetector(noisy=True), ds, shard_loader(ds), "cpu")
    for r in results:
        if r["image_id"] == 20:
            r["score"] = 0.1  # below the threshold: image 20 stays as it was
    names = {c["id"]: c["name"] for c in GT["categories"]}
    info = {img["id"]: img for img in GT["images"]}
    assert draw_predictions(ds, results, names, str(tmp_path / "show"), 0.3, info) == len(ds)
    files = sorted(p.name for p in (tmp_path / "show").iterdir())
    assert files == ["a.png", "b.png", "c.png", "d.png", "empty.png"]
    for index, name in ((0, "a.png"), (1, "b.png")):
        drawn = torch.from_numpy(np.array(Image.open(tmp_path / "show" / name))).permute(2, 0, 1)
        original = ds[index][0].expand(3, -1, -1)
        assert drawn.shape == original.shape
        assert torch.equal(drawn, original) == (name == "b.png")


def _run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def test_cli_bad_config_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = _run_module("-m", "elastic_det.test", str(missing), str(tmp_path))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr


def _metrics_from_table(stdout: str) -> dict[str, float]:
    """The metrics printed by format_table; "n/a" (no ground truth in that area range) as -1."""
    rows = re.finditer(r"^(bbox_mAP\w*)\s+([\d.]+|n/a)$", stdout, re.MULTILINE)
    return {m[1]: -1.0 if m[2] == "n/a" else float(m[2]) for m in rows}


@pytest.mark.slow
def test_cli_end_to_end_after_training(tmp_path):
    for module in ("elastic_det.train", "elastic_det.models.build", "elastic_det.data.build",
                   "elastic_det.data.loader", "elastic_det.data.transforms"):
        pytest.importorskip(module)
    work = tmp_path / "run"
    options = [f"data.shapes.cache_dir={tmp_path / 'cache'}", "data.shapes.num_train=32",
               "data.shapes.num_val=8", "data.global_batch_size=4", "data.val_batch_size=4",
               "data.num_workers=0", "train.max_steps=5", "train.validate=false", "checkpoint.interval=5",
               "schedule.warmup_steps=0", "log.interval=1"]
    train = _run_module("-m", "elastic_det.train", "--work-dir", str(work), "--cfg-options", *options)
    assert train.returncode == 0, train.stderr[-3000:]
    config = str(work / "config.yaml")

    # The trainer's own metrics.jsonl through elastic_det.goodput.curve.
    from elastic_det.goodput import curve as plot

    series = plot.extract_series(plot.read_metrics(str(work / "metrics.jsonl")))
    assert series.train_steps == [1, 2, 3, 4, 5] and series.steps_of("checkpoint") == [5]
    assert plot.main([str(work), "-o", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes().startswith(b"\x89PNG")

    show = tmp_path / "show"
    single = _run_module("-m", "elastic_det.test", config, str(work), "--show-dir", str(show),
                         "--score-thr", "0.0", "--out", str(tmp_path / "single.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    metrics = _metrics_from_table(single.stdout)
    assert tuple(metrics) == METRICS
    pngs = sorted(show.glob("*.png"))
    assert len(pngs) == 8 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)

    # Two ranks under torchrun: the same detections, gathered on rank 0.
    double = _run_module("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "elastic_det.test", config, str(work), "--out", str(tmp_path / "double.json"))
    assert double.returncode == 0, double.stderr[-3000:]
    assert _metrics_from_table(double.stdout) == pytest.approx(metrics, abs=2e-4)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("single", "double"))
    assert len(one) == len(two) > 0
    for a, b in zip(one, two, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-4)

    # A checkpoint that is not there: one paragraph naming it, exit 2.
    missing = tmp_path / "no-such-run"
    proc = _run_module("-m", "elastic_det.test", config, str(missing))
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
