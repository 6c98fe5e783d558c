"""``python -m elastic_det.test CONFIG CHECKPOINT_OR_WORK_DIR [--show-dir DIR] [--out results.json] ...``

Evaluates a checkpoint (COCO box mAP on the val split of CONFIG, and mask mAP for a model that predicts
masks) and prints the metrics table. The second
argument is a work dir (its newest committed checkpoint), a checkpoint step directory, or a weights file
(``.pt``/``.pth``); local paths or fsspec URLs. A checkpoint trained with ``ema.enabled`` is evaluated
with its averaged weights unless ``--weights raw``. Runs as one process or under torchrun: every rank predicts
its share of the val set, rank 0 gathers, scores and writes. Exit codes: 0 done, 2 bad input, 75 storage
outage (see ``elastic_det.errors``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import fsspec
import torch
from PIL import Image
from torch.distributed.elastic.multiprocessing.errors import record
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .config.schema import Config, load_config
from .data.build import build_dataset
from .data.loader import build_val_loader
from .data.masks import decode_rles
from .data.transforms import build_transforms
from .engine import dist
from .engine.run_files import setup_text_logging
from .engine.state import load_weights, weights_kind
from .errors import ElasticDetError, StorageError
from .evaluation.coco_eval import CocoReport, format_table, run_cocoeval
from .evaluation.inference import predict, predicts_masks
from .models.build import build_model

log = logging.getLogger(__name__)

_PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
            "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m elastic_det.test", description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config (the run's WORK_DIR/config.yaml works)")
    p.add_argument("checkpoint", help="work dir (newest checkpoint), checkpoint directory, or .pt weights")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. data.val_ann=other.json")
    p.add_argument("--show-dir", help="write each val image with its predicted boxes (and masks) as PNG here")
    p.add_argument("--score-thr", type=float, default=0.3, help="--show-dir: draw boxes scoring at least this")
    p.add_argument("--out", help="write the detections as a COCO results JSON file here (masks as RLE)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="auto: the averaged weights when the checkpoint has them (ema.enabled), else the raw ones")
    return p.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
        info = dist.init_distributed(cfg.dist)
        try:
            evaluate_checkpoint(cfg, args.checkpoint, info, show_dir=args.show_dir, score_thr=args.score_thr,
                                out=args.out, weights=args.weights)
        finally:
            dist.shutdown()
    except ElasticDetError as e:
        print(f"elastic_det: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    return 0


def evaluate_checkpoint(cfg: Config, checkpoint: str, info: dist.DistInfo, show_dir: str | None = None,
                        score_thr: float = 0.3, out: str | None = None, weights: str = "auto") -> CocoReport | None:
    """Evaluate ``checkpoint`` on the val split; the report on rank 0 (printed there), None elsewhere.
    ``weights``: auto (averaged when the checkpoint has them), ema or raw (see ``state.load_weights``)."""
    setup_text_logging(None, info.rank)
    dataset = dist.local_main_first(lambda: build_dataset(cfg.data, "val"), info.local_rank)
    model = build_model(cfg.model, dataset.num_classes)
    loaded = load_weights(model, checkpoint, cfg.checkpoint.storage_options, cfg.checkpoint.timeout_seconds,
                          weights=weights)
    model.to(info.device)
    log.info("Evaluating %s (step %d, %s weights) on %d val images, %d rank(s)", loaded.location,
             loaded.manifest.step, weights_kind(loaded, weights), len(dataset), info.world_size)

    loader = build_val_loader(dataset, build_transforms(cfg.data.val_transforms, train=False), info.rank,
                              info.world_size, cfg.data.val_batch_size, cfg.data.num_workers)
    coco_gt = dataset.coco_gt() if info.is_main else None
    results = predict(model, dataset, loader, info.device, cfg.train.amp, coco_gt=coco_gt)
    if results is None:
        return None
    report = run_cocoeval(coco_gt, results, dataset.image_ids, segm=predicts_masks(model) or None)
    print(format_table(report.metrics, report.per_class), flush=True)
    if out:
        _write(out, json.dumps(results).encode())
        log.info("Wrote %d detections to %s", len(results), out)
    if show_dir:
        names = {cat_id: cat["name"] for cat_id, cat in coco_gt.cats.items()}
        count = draw_predictions(dataset, results, names, show_dir, score_thr, coco_gt.imgs)
        log.info("Wrote %d images with boxes scoring >= %g to %s", count, score_thr, show_dir)
    return report


def draw_predictions(dataset: Any, results: Sequence[dict[str, Any]], category_names: dict[int, str],
                     out_dir: str, score_thr: float, image_info: dict[int, dict] | None = None) -> int:
    """Write every image of ``dataset`` with its detections scoring >= ``score_thr`` as PNG into ``out_dir``.

    ``results`` are COCO results in original image coordinates; a result's ``segmentation`` (RLE) is drawn
    as a translucent mask under its box. A file is named after the image's
    ``file_name`` in ``image_info`` (falling back to its id). Returns the number of images written.
    """
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r["score"] >= score_thr:
            by_image[r["image_id"]].append(r)
    colours = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(sorted(category_names))}
    used: set[str] = set()
    for index, image_id in enumerate(dataset.image_ids):
        image = _as_uint8_rgb(dataset[index][0])
        dets = by_image.get(image_id, [])
        masked = [r for r in dets if "segmentation" in r]
        if masked:
            height, width = image.shape[-2:]
            masks = torch.from_numpy(decode_rles([r["segmentation"] for r in masked], height, width)).bool()
            image = draw_segmentation_masks(image, masks, alpha=0.45,
                                            colors=[colours.get(r["category_id"], "white") for r in masked])
        if dets:
            boxes = torch.tensor([r["bbox"] for r in dets], dtype=torch.float32)
            boxes[:, 2:] += boxes[:, :2]
            labels = [f"{category_names.get(r['category_id'], r['category_id'])} {r['score']:.2f}" for r in dets]
            image = draw_bounding_boxes(image, boxes, labels=labels, width=2,
                                        colors=[colours.get(r["category_id"], "white") for r in dets])
        file_name = (image_info or {}).get(image_id, {}).get("file_name", "")
        stem = os.path.splitext(os.path.basename(file_name))[0] or str(image_id)
        name = f"{stem}.png" if stem not in used else f"{stem}_{image_id}.png"
        used.add(stem)
        _write(f"{out_dir.rstrip('/')}/{name}", _png(image))
    return len(dataset.image_ids)


def _as_uint8_rgb(image: Any) -> torch.Tensor:
    image = F.to_image(image)
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    image = image.as_subclass(torch.Tensor)
    return (image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)).contiguous()


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    """Write a whole file at a local path (parent folders created) or an fsspec URL."""
    try:
        if fsspec.core.split_protocol(path)[0] in (None, "file"):
            os.makedirs(os.path.dirname(os.path.abspath(fsspec.core.strip_protocol(path))), exist_ok=True)
        with fsspec.open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"Cannot write {path}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
