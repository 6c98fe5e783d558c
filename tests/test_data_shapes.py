import json
import os
import threading
import time

import numpy as np
import pytest

from elastic_det.config.schema import ShapesConfig
from elastic_det.data import CocoDataset, ensure_shapes, generate_shapes
from elastic_det.data import shapes as shapes_module
from elastic_det.data.shapes import render_image


def read_tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_other_set(tmp_path):
    generate_shapes(str(tmp_path / "a"), 6, 2, 64, 3, seed=7)
    generate_shapes(str(tmp_path / "b"), 6, 2, 64, 3, seed=7)
    generate_shapes(str(tmp_path / "c"), 6, 2, 64, 3, seed=8)
    a, b, c = (read_tree(tmp_path / d) for d in "abc")
    assert len(a) == 6 + 2 + 2
    assert a == b
    assert a.keys() == c.keys()
    assert a["annotations/train.json"] != c["annotations/train.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_generated_set_is_a_valid_coco_set(tmp_path):
    generate_shapes(str(tmp_path / "s"), 12, 4, 96, 5, seed=0)
    ds = CocoDataset(str(tmp_path / "s" / "train"), str(tmp_path / "s" / "annotations" / "train.json"))
    assert len(ds) == 12 and ds.class_names == ["rectangle", "ellipse", "triangle"]
    counts = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert tuple(image.shape) == (3, 96, 96)
        boxes = target["boxes"]
        assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 96).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        counts.append(len(boxes))
    assert 1 <= min(counts) and max(counts) <= 5 and len(set(counts)) > 1
    with open(tmp_path / "s" / "annotations" / "val.json") as f:
        assert len(json.load(f)["images"]) == 4


@pytest.mark.parametrize("seed", range(5))
def test_boxes_are_tight_around_the_drawn_shapes(seed):
    size = 128
    image, background, boxes, labels, areas = render_image(np.random.default_rng(seed), size, max_objects=6)
    changed = (image != background).any(axis=-1)
    covered = np.zeros_like(changed)
    for (x1, y1, x2, y2), area in zip(boxes, areas, strict=True):
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        assert max(x2 - x1, y2 - y1) <= 0.6 * size + 1
        covered[y1:y2, x1:x2] = True
        region = changed[y1:y2, x1:x2]
        # Each edge of the box touches a drawn pixel, and the shape fills a good part of it.
        assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
        assert region.mean() > 0.3
        assert area <= (x2 - x1) * (y2 - y1)
    assert not (changed & ~covered).any()  # nothing drawn outside the boxes
    assert set(labels) <= {1, 2, 3}


def test_generating_the_default_set_is_fast(tmp_path):
    start = time.perf_counter()
    generate_shapes(str(tmp_path / "s"), 2000, 200, 128, 4, seed=0)
    print(f"generated 2200 shapes images of 128 px in {time.perf_counter() - start:.2f} s")
    assert len(os.listdir(tmp_path / "s" / "train")) == 2000


def test_ensure_shapes_reuses_the_set_and_names_it_by_its_parameters(tmp_path):
    cfg = ShapesConfig(num_train=4, num_val=2, image_size=64, max_objects=2, seed=3, cache_dir=str(tmp_path))
    path = ensure_shapes(cfg)
    assert os.path.dirname(path) == str(tmp_path)
    stamp = os.stat(os.path.join(path, "annotations", "train.json")).st_mtime_ns
    assert ensure_shapes(cfg) == path
    assert os.stat(os.path.join(path, "annotations", "train.json")).st_mtime_ns == stamp
    other = ensure_shapes(ShapesConfig(num_train=4, num_val=2, image_size=64, max_objects=2, seed=4,
                                       cache_dir=str(tmp_path)))
    assert other != path


def test_a_crash_mid_generation_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    cfg = ShapesConfig(num_train=6, num_val=2, image_size=64, max_objects=2, seed=0, cache_dir=str(tmp_path))
    real_render = shapes_module.render_image
    calls = []

    def crash_on_fourth(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed mid-generation")
        return real_render(*args)

    monkeypatch.setattr(shapes_module, "render_image", crash_on_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_shapes(cfg)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(shapes_module, "render_image", real_render)
    path = ensure_shapes(cfg)
    assert len(os.listdir(os.path.join(path, "train"))) == 6


def test_a_stale_half_generated_temp_dir_is_not_reused(tmp_path):
    cfg = ShapesConfig(num_train=3, num_val=1, image_size=64, max_objects=2, seed=0, cache_dir=str(tmp_path))
    name = os.path.basename(ensure_shapes(cfg))
    (tmp_path / name).rename(tmp_path / "first")
    # What a SIGKILLed generator leaves: a temp folder with part of the set, hours old.
    stale = tmp_path / f".{name}.tmp-dead"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "000001.jpg").write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    path = ensure_shapes(cfg)
    assert read_tree(path) == read_tree(tmp_path / "first")
    assert not stale.exists()


def test_concurrent_generators_both_succeed(tmp_path):
    out = str(tmp_path / "s")
    errors = []

    def run():
        try:
            generate_shapes(out, 40, 5, 64, 3, seed=1)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    generate_shapes(out, 40, 5, 64, 3, seed=1)  # the loser's path, deterministically: the set exists
    assert sorted(os.listdir(tmp_path)) == ["s"]  # no temp folders left behind
    assert len(os.listdir(os.path.join(out, "train"))) == 40
