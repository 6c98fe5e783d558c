"""Instance masks (issue 18): COCO segmentations through the annotation index, the transforms, the shapes
set and the config; each checked against pycocotools' own ``annToMask``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from elastic_det.config import Config, load_config
from elastic_det.config.schema import ModelConfig, TransformConfig
from elastic_det.data import CocoDataset, DataSource, TrainSamples, build_dataset, build_transforms
from elastic_det.data.shapes import ensure_shapes, render_image
from elastic_det.errors import ConfigError, DataError

SIZES = {1: (50, 40), 2: (33, 61), 3: (64, 64)}  # image id -> (width, height)


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd form: counts alternate 0s and 1s over the column-major pixels, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def annotations() -> list[dict]:
    """Polygons (one, several, coordinates at pycocotools' rounding points), compressed RLE and crowd
    uncompressed RLE, over three images; the boxes are the masks' extents."""
    rng = np.random.default_rng(3)
    out = []

    def add(image_id, segmentation, crowd=0):
        w, h = SIZES[image_id]
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
                                 if isinstance(segmentation, list) else
                                 mask_utils.frPyObjects(segmentation, h, w) if isinstance(segmentation["counts"], list)
                                 else {**segmentation, "counts": segmentation["counts"].encode()})
        ys, xs = np.nonzero(mask)
        out.append({"id": 100 + len(out), "image_id": image_id, "category_id": [5, 9][len(out) % 2],
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                    "area": float(mask.sum()), "iscrowd": crowd, "segmentation": segmentation})

    add(1, [[1.1, 1.3, 20.1, 2.5, 15.5, 21.1]])
    add(1, [[30, 20, 45, 20, 45, 35], [31.1, 30.3, 40.7, 30.1, 35.5, 38.9, 31.9, 38.1]])  # two parts
    block = np.zeros((40, 50), dtype=np.uint8)
    block[5:20, 10:30] = 1
    add(1, rle_of(block))
    crowd = np.zeros((40, 50), dtype=np.uint8)
    crowd[25:40, 0:12] = 1
    add(1, uncompressed_rle(crowd), crowd=1)
    for _ in range(6):  # random polygons with 2-decimal coordinates, as in COCO files
        points = rng.uniform([0, 0], [33, 61], size=(int(rng.integers(3, 9)), 2)).round(2)
        add(2, [points.flatten().tolist()])
    noise = (rng.random((64, 64)) < 0.3).astype(np.uint8)
    add(3, rle_of(noise))
    add(3, uncompressed_rle(np.pad(np.ones((10, 10), dtype=np.uint8), ((3, 51), (40, 14)))))
    return out


def write_coco(folder, anns) -> str:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for image_id, (w, h) in SIZES.items():
        Image.new("RGB", (w, h), (image_id * 40, 90, 20)).save(images / f"{image_id}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, (w, h) in SIZES.items()],
            "categories": [{"id": 9, "name": "b"}, {"id": 5, "name": "a"}], "annotations": anns}
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("cache", [False, True])
def test_masks_round_trip_through_the_index_equal_ann_to_mask(tmp_path, cache):
    anns = annotations()
    ann_file = write_coco(tmp_path, anns)
    reference = COCO(ann_file)
    source = DataSource(str(tmp_path / "cache") if cache else "")
    for attempt in range(2 if cache else 1):  # the second opens the memory-mapped index written by the first
        dataset = CocoDataset(str(tmp_path / "images"), ann_file, source=source, masks=True)
        if cache:
            assert isinstance(dataset.index.poly_xy, np.memmap) == (attempt == 1)
        assert len(dataset) == 3
        for i, image_id in enumerate(dataset.image_ids):
            image, target = dataset[i]
            trained = [a for a in anns if a["image_id"] == image_id and not a["iscrowd"]]
            assert isinstance(target["masks"], tv_tensors.Mask) and target["masks"].dtype == torch.uint8
            assert target["masks"].shape == (len(trained), *image.shape[-2:])
            assert len(target["boxes"]) == len(trained)
            for mask, ann in zip(target["masks"], trained, strict=True):
                assert np.array_equal(mask.numpy(), reference.annToMask(ann)), ann["id"]
        # the ground truth for COCOeval holds every segmentation (crowd ones included) as the file does
        gt = dataset.coco_gt()
        for ann in anns:
            assert np.array_equal(gt.annToMask(gt.anns[ann["id"]]), reference.annToMask(ann)), ann["id"]
            assert gt.anns[ann["id"]]["iscrowd"] == ann["iscrowd"]


def test_an_index_of_boxes_only_is_not_reused_for_masks(tmp_path):
    ann_file = write_coco(tmp_path, annotations())
    source = DataSource(str(tmp_path / "cache"))
    boxes = CocoDataset(str(tmp_path / "images"), ann_file, source=source)
    assert "masks" not in boxes[0][1] and not boxes.index.has_masks
    masks = CocoDataset(str(tmp_path / "images"), ann_file, source=source, masks=True)
    assert masks[0][1]["masks"].shape[0] == 3
    assert len(list((tmp_path / "cache" / "index").glob("coco-*"))) == 2 + 2  # two indexes and their locks


@pytest.mark.parametrize("segmentation, message", [
    ([[1, 2, 3, 4, 5, 6, 7]], "odd number of coordinates (7)"),
    ([[1, 2, 3, float("nan"), 5, 6]], "nan"),
    ([[1, 2, 3, float("inf"), 5, 6]], "inf"),
    ([[1, 2, 3, "x", 5, 6]], "'x'"),
    ([], "empty polygon list"),
    ([[]], "no coordinates"),
    ([[1, 2, 3, 4]], "2 point(s)"),
    (None, "has no segmentation"),
    ({"size": [10, 10], "counts": "abc"}, "RLE of size [10, 10]"),
    ({"size": [40, 50], "counts": [5, 6]}, "sum to 11"),
])
def test_a_bad_segmentation_is_one_error_naming_the_annotation(tmp_path, segmentation, message):
    anns = annotations()
    anns[2] = {**anns[2], "segmentation": segmentation}
    if segmentation is None:
        del anns[2]["segmentation"]
    ann_file = write_coco(tmp_path, anns)
    with pytest.raises(DataError) as e:
        CocoDataset(str(tmp_path / "images"), ann_file, masks=True)
    text = str(e.value)
    assert message in text and f"annotation {anns[2]['id']} (image 1)" in text and ann_file in text
    assert "at least 3 points" in text and e.value.exit_code == 2
    CocoDataset(str(tmp_path / "images"), ann_file)  # boxes only: the segmentation is not read


def test_masks_follow_the_image_through_flip_resize_and_multi_scale(tmp_path):
    ann_file = write_coco(tmp_path, annotations())
    dataset = CocoDataset(str(tmp_path / "images"), ann_file, masks=True)
    image, target = dataset[1]  # 33 x 61 with six random polygons
    for min_size in ([], [90], [40, 70, 122]):
        transforms = build_transforms(TransformConfig(min_size=min_size, max_size=1000, flip_prob=1.0), train=True)
        for seed in range(3):
            samples = TrainSamples(dataset, transforms, seed)
            out_image, out = samples[(0, 1)]
            h, w = out_image.shape[-2:]
            assert out["masks"].shape == (len(out["boxes"]), h, w) and out["masks"].dtype == torch.uint8
            expected = torch.nn.functional.interpolate(target["masks"][:, None].float(), size=(h, w),
                                                       mode="nearest")[:, 0].to(torch.uint8).flip(-1)
            assert torch.equal(out["masks"], expected)
            for mask, box in zip(out["masks"], out["boxes"], strict=True):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                extent = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                assert torch.allclose(extent, box, atol=2 * max(h / 61, 1.0)), (extent, box)


def test_masks_leave_with_the_boxes_the_transforms_drop():
    image = tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8))
    masks = torch.zeros(3, 20, 30, dtype=torch.uint8)
    masks[0, 2:8, 2:9] = 1
    masks[2, 10:20, 20:30] = 1
    target = {"boxes": tv_tensors.BoundingBoxes([[2, 2, 9, 8], [5, 5, 5.5, 5.5], [20, 10, 30, 20]], format="XYXY",
                                                canvas_size=(20, 30)),
              "labels": torch.tensor([1, 2, 3]), "masks": tv_tensors.Mask(masks), "image_id": 1}
    _, out = build_transforms(TransformConfig(), train=False)(image, target)
    assert out["labels"].tolist() == [1, 3]
    assert torch.equal(out["masks"], masks[[0, 2]])


def test_shapes_masks_are_the_pixels_each_shape_shows():
    for seed in range(5):
        image, background, boxes, labels, areas, masks = render_image(np.random.default_rng(seed), 96, 6,
                                                                      with_masks=True)
        assert masks.shape == (len(boxes), 96, 96) and masks.dtype == np.uint8
        assert masks.sum(0).max() <= 1  # disjoint: a pixel shows one shape
        painted = (image != background).any(-1)
        assert np.array_equal(masks.any(0), painted)
        for mask, (x1, y1, x2, y2), area in zip(masks, boxes, areas, strict=True):
            ys, xs = np.nonzero(mask)
            assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
            assert 0 < mask.sum() <= area


def test_the_shapes_set_yields_masks_when_the_model_predicts_them(tmp_path):
    cfg = load_config(None, ["model.type=tiny_mask_rcnn", f"data.shapes.cache_dir={tmp_path}",
                             "data.shapes.num_train=4", "data.shapes.num_val=2", "data.shapes.image_size=64"])
    assert cfg.data.masks is True
    dataset = build_dataset(cfg.data, "train")
    root = ensure_shapes(cfg.data.shapes)
    reference = COCO(f"{root}/annotations/train.json")
    for i, image_id in enumerate(dataset.image_ids):
        _, target = dataset[i]
        anns = reference.loadAnns(reference.getAnnIds(imgIds=[image_id]))
        assert [np.array_equal(m.numpy(), reference.annToMask(a)) for m, a in zip(target["masks"], anns,
                                                                                  strict=True)] == [True] * len(anns)
    boxes_only = build_dataset(load_config(None, [f"data.shapes.cache_dir={tmp_path}", "data.shapes.num_train=4",
                                                  "data.shapes.num_val=2", "data.shapes.image_size=64"]).data, "val")
    assert "masks" not in boxes_only[0][1]


def test_data_masks_follows_the_model_type_unless_set():
    assert Config().data.masks is False
    assert Config(model=ModelConfig(type="maskrcnn_resnet50_fpn_v2")).data.masks is True
    assert load_config(None, ["model.type=maskrcnn_resnet50_fpn"]).data.masks is True
    assert load_config(None, ["data.masks=true"]).data.masks is True  # e.g. a plug-in model that predicts masks
    with pytest.raises(ConfigError, match="data.masks is false"):
        load_config(None, ["model.type=tiny_mask_rcnn", "data.masks=false"])
    with pytest.raises(ConfigError, match="voc has boxes only"):
        load_config(None, ["data.type=voc", "data.masks=true"])
    with pytest.raises(ConfigError, match="data.masks"):
        load_config(None, ["data.masks=3"])

