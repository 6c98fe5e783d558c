import contextlib
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from elastic_det.config.schema import DataConfig
from elastic_det.data import CocoDataset, build_dataset
from elastic_det.data.source import DataSource
from elastic_det.errors import DataError

# Category ids are not contiguous and not in order: labels follow the sorted ids (dog=1, cat=2, bird=3).
CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 9, "name": "bird"}]
IMAGES = [
    {"id": 1, "file_name": "a.png", "width": 40, "height": 20},
    {"id": 2, "file_name": "b.png", "width": 20, "height": 40},  # no annotations
    {"id": 3, "file_name": "c.png", "width": 30, "height": 30},  # only a crowd box
]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
    {"id": 11, "image_id": 1, "category_id": 9, "bbox": [20, 0, 30, 8], "area": 240, "iscrowd": 0},  # clipped
    {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 20], "area": 800, "iscrowd": 1},
    {"id": 13, "image_id": 1, "category_id": 2, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},  # degenerate
    {"id": 14, "image_id": 3, "category_id": 2, "bbox": [3, 3, 9, 9], "area": 81, "iscrowd": 1},
]


def make_coco(tmp_path, annotations=ANNOTATIONS, images=IMAGES):
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (img["id"] * 40, 0, 0)).save(image_root / img["file_name"])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return str(image_root), str(ann_file)


def test_labels_are_contiguous_and_map_back_to_category_ids(tmp_path):
    ds = CocoDataset(*make_coco(tmp_path))
    assert ds.class_names == ["dog", "cat", "bird"]
    assert ds.num_classes == 4
    assert [ds.label_to_category_id(label) for label in (1, 2, 3)] == [2, 5, 9]
    assert all(ds.category_id_to_label(ds.label_to_category_id(label)) == label for label in (1, 2, 3))
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 3]  # cat, bird
    with pytest.raises(ValueError):
        ds.label_to_category_id(0)


def test_targets_skip_crowd_and_degenerate_boxes_which_are_counted_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = CocoDataset(*make_coco(tmp_path))
    image, target = ds[ds.image_ids.index(1)]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 20, 40)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(target["boxes"].canvas_size) == (20, 40)
    assert target["boxes"].tolist() == [[1, 2, 11, 7], [20, 0, 40, 8]]  # the second clipped to the image
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1
    assert len(ds.degenerate_boxes) == 1 and "annotation 13" in ds.degenerate_boxes[0]
    warnings = [r for r in caplog.records if "degenerate" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 1 " in warnings[0].getMessage()
    # The ground truth for COCOeval is the file as given: crowd boxes stay there.
    gt = ds.coco_gt()
    assert sorted(gt.anns) == [10, 11, 12, 13, 14]
    assert gt.anns[12]["iscrowd"] == 1


def test_filter_empty_drops_images_without_training_boxes(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    kept = CocoDataset(image_root, ann_file, filter_empty=False)
    assert kept.image_ids == [1, 2, 3]
    assert kept.aspect_ratios() == [2.0, 0.5, 1.0]
    _, empty = kept[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    filtered = CocoDataset(image_root, ann_file, filter_empty=True)
    assert filtered.image_ids == [1]  # image 3 has only a crowd box
    assert len(filtered) == 1


def test_invalid_json_names_the_file(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    with open(ann_file, "w") as f:
        f.write('{"images": [')
    with pytest.raises(DataError, match="instances.json is not valid JSON"):
        CocoDataset(image_root, ann_file)


def test_missing_annotation_file_or_image_folder(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    with pytest.raises(DataError, match="annotation file not found: .*nope.json"):
        CocoDataset(image_root, str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="image folder not found: .*missing_dir"):
        CocoDataset(str(tmp_path / "missing_dir"), ann_file)


def test_malformed_annotation_names_the_file(tmp_path):
    bad = [{"id": 1, "image_id": 1, "category_id": 77, "bbox": [0, 0, 2, 2], "iscrowd": 0}]
    with pytest.raises(DataError, match=r"instances.json is malformed.*unknown category_id 77"):
        CocoDataset(*make_coco(tmp_path, annotations=bad))


def test_missing_image_names_the_file_when_loaded(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    ds = CocoDataset(image_root, ann_file)
    ds[0]
    with pytest.raises(DataError, match="Image file not found: .*b.png"):
        ds[1]


def test_corrupt_image_names_the_file(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    data = (tmp_path / "images" / "c.png").read_bytes()
    (tmp_path / "images" / "c.png").write_bytes(data[:40])  # truncated
    (tmp_path / "images" / "a.png").write_bytes(b"not an image at all")
    ds = CocoDataset(image_root, ann_file)
    with pytest.raises(DataError, match="Cannot read image .*a.png"):
        ds[0]
    with pytest.raises(DataError, match="Cannot read image .*c.png"):
        ds[2]


def test_image_of_another_size_than_annotated(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    Image.new("RGB", (41, 20)).save(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match=r"a.png is 41x20 pixels but its annotation says 40x20"):
        CocoDataset(image_root, ann_file)[0]


def test_build_dataset_coco_uses_val_root_and_keeps_empty_images_for_val(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    val_dir = tmp_path / "val_images"
    val_dir.mkdir()
    for img in IMAGES:
        Image.new("RGB", (img["width"], img["height"]), (0, 0, 255)).save(val_dir / img["file_name"])
    cfg = DataConfig(type="coco", root=image_root, train_ann=ann_file, val_ann=ann_file, val_root=str(val_dir),
                     filter_empty=True)
    train = build_dataset(cfg, "train")
    val = build_dataset(cfg, "val")
    assert train.image_ids == [1] and val.image_ids == [1, 2, 3]
    assert np.asarray(train[0][0])[2].max() == 0  # red image from root
    assert np.asarray(val[0][0])[2].min() == 255  # blue image from val_root
    with pytest.raises(DataError, match="data.val_ann is not set"):
        build_dataset(DataConfig(type="coco", root=image_root, train_ann=ann_file), "val")


def plugin_dataset(cfg, split):
    return CocoDataset(cfg.root, cfg.train_ann, filter_empty=split == "train")


def not_a_dataset(cfg, split):
    return [1, 2, 3]


def test_build_dataset_plugins(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    cfg = DataConfig(type=f"{__name__}:plugin_dataset", root=image_root, train_ann=ann_file)
    assert build_dataset(cfg, "train").image_ids == [1]
    assert build_dataset(cfg, "val").image_ids == [1, 2, 3]
    for bad, message in [("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
                         (f"{__name__}:missing_fn", "has no function 'missing_fn'"),
                         (f"{__name__}:not_a_dataset", "lacks image_ids"),
                         ("cocoo", "Did you mean 'coco'")]:
        with pytest.raises(DataError, match=message):
            build_dataset(DataConfig(type=bad), "train")


@pytest.mark.parametrize("bbox, message", [
    ([1, float("nan"), 10, 5], r"annotation 10 \(image 1\) has a non-finite box \[1.0, nan, 10.0, 5.0\]"),
    ([1, 2, float("inf"), 5], r"annotation 10 \(image 1\) has a non-finite box \[1.0, 2.0, inf, 5.0\]"),
    ([30, 10, -20, -5], r"annotation 10 \(image 1\) has a box with negative width or height "
                        r"\[30.0, 10.0, -20.0, -5.0\] \(boxes are \[x, y, width, height\]; a converter that wrote "
                        r"\[x1, y1, x2, y2\] produces this\)"),
])
def test_non_finite_and_negative_boxes_name_the_file_the_annotation_and_the_value(tmp_path, bbox, message):
    annotations = [dict(ANNOTATIONS[0], bbox=bbox), *ANNOTATIONS[1:]]
    with pytest.raises(DataError, match=rf"COCO annotation file .*instances.json: {message}"):
        CocoDataset(*make_coco(tmp_path, annotations=annotations))


def test_a_nan_box_stops_training_with_exit_2_and_one_paragraph(tmp_path):
    from helpers import FAST, base_env, run_train

    crowd_nan = dict(ANNOTATIONS[4], bbox=[3, 3, float("nan"), 9])  # crowd boxes are checked too
    image_root, ann_file = make_coco(tmp_path, annotations=[*ANNOTATIONS[:4], crowd_nan])
    result = run_train(["--work-dir", str(tmp_path / "work"), "--cfg-options", *FAST, "data.type=coco",
                        f"data.root={image_root}", f"data.train_ann={ann_file}", f"data.cache.dir={tmp_path / 'c'}"],
                       base_env(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "instances.json: annotation 14 (image 3) has a non-finite box [3.0, 3.0, nan, 9.0]" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_index_is_cached_by_the_files_identity_and_memory_mapped(tmp_path):
    image_root, ann_file = make_coco(tmp_path)
    cache = tmp_path / "cache"
    first = CocoDataset(image_root, ann_file, source=DataSource(str(cache)))
    assert not isinstance(first.index.ann_bbox, np.memmap)  # parsed
    again = CocoDataset(image_root, ann_file, source=DataSource(str(cache)))
    assert isinstance(again.index.ann_bbox, np.memmap)  # loaded from the cache
    assert again.image_ids == first.image_ids and again.coco_gt().dataset == first.coco_gt().dataset
    assert len([p for p in (cache / "index").iterdir() if p.is_dir()]) == 1

    # Same size, same mtime, different content (a copy with its times preserved): a new index.
    stat = os.stat(ann_file)
    text = open(ann_file).read().replace('"name": "bird"', '"name": "bord"')
    with open(ann_file, "w") as f:
        f.write(text)
    os.utime(ann_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(ann_file).st_size == stat.st_size
    changed = CocoDataset(image_root, ann_file, source=DataSource(str(cache)))
    assert changed.class_names == ["dog", "cat", "bord"] and not isinstance(changed.index.ann_bbox, np.memmap)


def test_a_bad_file_is_never_cached(tmp_path):
    annotations = [dict(ANNOTATIONS[0], bbox=[1, 2, -3, 4]), *ANNOTATIONS[1:]]
    image_root, ann_file = make_coco(tmp_path, annotations=annotations)
    for _ in range(2):
        with pytest.raises(DataError, match="negative width or height"):
            CocoDataset(image_root, ann_file, source=DataSource(str(tmp_path / "cache")))
    assert not [p for p in (tmp_path / "cache" / "index").iterdir() if p.is_dir()]


def test_evaluation_on_the_indexed_ground_truth_equals_pycocotools_on_the_file(tmp_path):
    from pycocotools.coco import COCO

    from elastic_det.evaluation.coco_eval import coco_evaluate

    image_root, ann_file = make_coco(tmp_path)
    dataset = CocoDataset(image_root, ann_file, source=DataSource(str(tmp_path / "cache")))
    dataset = CocoDataset(image_root, ann_file, source=DataSource(str(tmp_path / "cache")))  # from the index
    rng = np.random.default_rng(0)
    results = [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in rng.uniform(0, 15, 4)],
                "score": float(s)} for i, c, s in zip(rng.choice([1, 2, 3], 60), rng.choice([2, 5, 9], 60),
                                                      rng.uniform(0, 1, 60), strict=True)]
    results += [{"image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 5], "score": 0.99}]
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(ann_file)
    assert coco_evaluate(dataset.coco_gt(), results, dataset.image_ids) == coco_evaluate(reference, results,
                                                                                         dataset.image_ids)
