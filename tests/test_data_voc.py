import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from elastic_det.config.schema import DataConfig
from elastic_det.data import VocDataset, build_dataset
from elastic_det.errors import DataError

# The shared copy beside the repository (../shared/datasets/BCCD); these tests fail, not skip, without it.
BCCD = str(Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "BCCD")


@pytest.fixture(autouse=True, scope="module")
def bccd_present():
    assert os.path.isdir(BCCD), (f"The BCCD dataset is missing: expected it at {BCCD} (../shared/datasets/BCCD "
                                 f"relative to the repository; see docs/data.md).")


def split_ids(split):
    with open(f"{BCCD}/ImageSets/Main/{split}.txt") as f:
        return [line.strip() for line in f if line.strip()]


def count_objects(names):
    """Objects per the XML files, counted independently of the reader."""
    return sum(len(ET.parse(f"{BCCD}/Annotations/{n}.xml").getroot().findall("object")) for n in names)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_bccd_splits(split):
    ds = VocDataset(BCCD, split)
    names = split_ids(split)
    assert len(ds) == len(names)
    assert ds.class_names == ["Platelets", "RBC", "WBC"]
    assert ds.num_classes == 4
    assert ds.image_ids == [int(n.rsplit("_", 1)[1]) for n in names]
    assert ds.aspect_ratios() == [640 / 480] * len(names)


def test_bccd_zero_size_boxes_are_dropped_and_named():
    ds = VocDataset(BCCD, "trainval")
    assert len(ds.degenerate_boxes) == 2
    assert "BloodImage_00338.xml object 12" in ds.degenerate_boxes[0]
    assert "BloodImage_00343.xml object 3" in ds.degenerate_boxes[1]
    objects = count_objects(["BloodImage_00338"])
    _, target = ds[ds.image_ids.index(338)]
    assert len(target["boxes"]) == objects - 1
    widths = target["boxes"][:, 2] - target["boxes"][:, 0]
    heights = target["boxes"][:, 3] - target["boxes"][:, 1]
    assert bool((widths > 0).all() and (heights > 0).all())
    assert [len(VocDataset(BCCD, s).degenerate_boxes) for s in ("train", "val", "test")] == [1, 1, 0]


def test_bccd_coco_gt_has_every_valid_object():
    ds = VocDataset(BCCD, "trainval")
    gt = ds.coco_gt()
    assert len(gt.anns) == count_objects(split_ids("trainval")) - 2 == 3941
    assert sorted(gt.imgs) == sorted(ds.image_ids)
    assert {c["id"]: c["name"] for c in gt.cats.values()} == {1: "Platelets", 2: "RBC", 3: "WBC"}
    assert all(ds.label_to_category_id(label) == label for label in (1, 2, 3))


def test_bccd_image_and_target():
    ds = VocDataset(BCCD, "train")
    image, target = ds[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 480, 640)
    assert tuple(target["boxes"].canvas_size) == (480, 640)
    assert target["image_id"] == 1
    assert target["labels"].tolist().count(3) == 1  # BloodImage_00001 has one WBC


def copy_voc(tmp_path, names, split="train"):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for n in names:
        shutil.copy(f"{BCCD}/Annotations/{n}.xml", root / "Annotations")
        shutil.copy(f"{BCCD}/JPEGImages/{n}.jpg", root / "JPEGImages")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_malformed_xml_names_the_file(tmp_path):
    root = copy_voc(tmp_path, ["BloodImage_00001", "BloodImage_00003"])
    path = root / "Annotations" / "BloodImage_00003.xml"
    path.write_text(path.read_text()[:300])
    with pytest.raises(DataError, match="BloodImage_00003.xml is not valid XML"):
        VocDataset(str(root), "train")


def test_missing_split_or_annotation(tmp_path):
    root = copy_voc(tmp_path, ["BloodImage_00001"])
    with pytest.raises(DataError, match=r"split file not found: .*val.txt \(splits found: train\)"):
        VocDataset(str(root), "val")
    (root / "Annotations" / "BloodImage_00001.xml").unlink()
    with pytest.raises(DataError, match="annotation file not found: .*BloodImage_00001.xml"):
        VocDataset(str(root), "train")
    with pytest.raises(DataError, match="root not found"):
        VocDataset(str(tmp_path / "nowhere"), "train")


def test_difficult_objects_are_ignored_in_training_and_crowd_in_gt(tmp_path):
    root = copy_voc(tmp_path, ["BloodImage_00001"])
    path = root / "Annotations" / "BloodImage_00001.xml"
    tree = ET.parse(path)
    objects = tree.getroot().findall("object")
    objects[0].find("difficult").text = "1"
    tree.write(path)
    ds = VocDataset(str(root), "train")
    _, target = ds[0]
    assert len(target["boxes"]) == len(objects) - 1
    crowd = [a for a in ds.coco_gt().anns.values() if a["iscrowd"]]
    assert len(crowd) == 1 and len(ds.coco_gt().anns) == len(objects)


def test_unknown_class_with_explicit_classes(tmp_path):
    root = copy_voc(tmp_path, ["BloodImage_00001"])
    with pytest.raises(DataError, match=r"BloodImage_00001.xml: object \d+ has class 'WBC'"):
        VocDataset(str(root), "train", classes=["Platelets", "RBC"])


def test_build_dataset_val_uses_the_training_classes(tmp_path):
    # BloodImage_00001 has no platelets: discovered alone, its classes would shift the labels.
    root = copy_voc(tmp_path, ["BloodImage_00003"], split="train")
    shutil.copy(f"{BCCD}/Annotations/BloodImage_00001.xml", root / "Annotations")
    (root / "ImageSets" / "Main" / "val.txt").write_text("BloodImage_00001\n")
    assert VocDataset(str(root), "val").class_names == ["RBC", "WBC"]
    cfg = DataConfig(type="voc", root=str(root))
    assert build_dataset(cfg, "val").class_names == build_dataset(cfg, "train").class_names == [
        "Platelets", "RBC", "WBC"]


@pytest.mark.parametrize("corner, value, message", [
    ("xmin", "nan", r"has a non-finite box \[nan, "),
    ("xmax", "-inf", r"has a non-finite box \[\d+\.0, \d+\.0, -inf, "),
    ("xmax", "1", r"has a box with negative width or height \[\d+\.0, \d+\.0, 1\.0, \d+\.0\] "
                  r"\(boxes are xmin ymin xmax ymax\)"),
])
def test_non_finite_and_negative_boxes_name_the_file_the_object_and_the_value(tmp_path, corner, value, message):
    root = copy_voc(tmp_path, ["BloodImage_00001", "BloodImage_00003"])
    path = root / "Annotations" / "BloodImage_00003.xml"
    tree = ET.parse(path)
    tree.getroot().findall("object")[2].find("bndbox").find(corner).text = value
    tree.write(path)
    with pytest.raises(DataError, match=rf"VOC annotation .*BloodImage_00003.xml: object 2 {message}"):
        VocDataset(str(root), "train")


def test_bccd_index_is_cached_and_rebuilt_when_an_xml_changes(tmp_path):
    from elastic_det.data.source import DataSource

    root = copy_voc(tmp_path, ["BloodImage_00001", "BloodImage_00003"])
    source = DataSource(str(tmp_path / "cache"))
    first = VocDataset(str(root), "train", source=source)
    again = VocDataset(str(root), "train", source=DataSource(str(tmp_path / "cache")))
    assert again.image_ids == first.image_ids and again.coco_gt().dataset == first.coco_gt().dataset
    path = root / "Annotations" / "BloodImage_00003.xml"
    tree = ET.parse(path)
    tree.getroot().findall("object")[0].find("name").text = "Neutrophil"
    tree.write(path)
    changed = VocDataset(str(root), "train", source=DataSource(str(tmp_path / "cache")))
    assert "Neutrophil" in changed.class_names and "Neutrophil" not in first.class_names
