"""Data from an object store and the annotation index, against local data and plain pycocotools.

    python bench/data.py [--images 384] [--image-size 320] [--repeats 3] [--coco-images 118287]
                         [--coco-boxes 860001] [--skip-loader] [--skip-index] [--masks]

1. **Loader images/s** (the training loader: decode + augmentation, ``data.num_workers`` workers, one epoch
   of a generated COCO-format set): the images on local disk, then the same images in a moto S3 bucket
   with a cold node-local cache (a new cache dir each run) and with a warm one. Runs alternate; medians
   are compared with local. Target: warm >= 0.95x local.
2. **Annotations at COCO scale**: a generated instances file with COCO train2017's counts (118k images,
   860k boxes, with polygons) is written to a temp dir; each case runs in its own process and reports the
   wall time of building the training dataset and the peak RSS it added over the interpreter after its
   imports (sampled every 5 ms; for a restart it is mostly the index's page-cache pages, which the
   processes of a node share): plain ``pycocotools.COCO(file)``, ours on a first start (parse + index
   written), ours on a restart (index memory-mapped). Target: restart <= 1 s. ``--masks`` indexes the
   polygons too (``data.masks``, a Mask R-CNN's dataset) and times one sample's masks decoded after a restart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from s3 import MotoServer, s3_env  # noqa: E402

from elastic_det.config.schema import DataConfig, TransformConfig  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# 1. Loader throughput


def loader_rate(cfg: DataConfig, batch: int, workers: int) -> float:
    """Images/s of one epoch through the training loader (dataset built before the clock starts)."""
    from elastic_det.data import TrainSamples, build_dataset, build_train_loader, build_transforms

    dataset = build_dataset(cfg, "train")
    samples = TrainSamples(dataset, build_transforms(TransformConfig(flip_prob=0.5, color_jitter=0.1), True), 0)
    steps = [(0, list(range(k, k + batch))) for k in range(0, len(dataset) - batch + 1, batch)]
    start = time.perf_counter()
    count = sum(len(images) for images, _ in build_train_loader(samples, iter(steps), num_workers=workers))
    elapsed = time.perf_counter() - start
    dataset.files.prefetcher.close()
    return count / elapsed


def bench_loader(args: argparse.Namespace, tmp: Path) -> None:
    from elastic_det.data import generate_shapes

    local = tmp / "coco-small"
    generate_shapes(str(local), args.images, 0, args.image_size, 6, seed=0)
    megabytes = sum(p.stat().st_size for p in (local / "train").iterdir()) / 1e6
    server = MotoServer.start()
    try:
        os.environ.update(s3_env(server.endpoint))
        import s3fs

        bucket = server.create_bucket("bench")
        s3fs.S3FileSystem(skip_instance_cache=True).put(str(local), f"{bucket}/coco-small", recursive=True)

        def cfg(root: str, cache: Path) -> DataConfig:
            c = DataConfig(type="coco", root=f"{root}/train", train_ann=f"{root}/annotations/train.json")
            c.cache.dir = str(cache)
            return c

        url = f"s3://{bucket}/coco-small"
        rates: dict[str, list[float]] = {"local": [], "s3 cold cache": [], "s3 warm cache": []}
        for k in range(args.repeats):
            cache = tmp / f"cache-{k}"
            rates["local"].append(loader_rate(cfg(str(local), tmp / "local-cache"), args.batch, args.workers))
            rates["s3 cold cache"].append(loader_rate(cfg(url, cache), args.batch, args.workers))
            rates["s3 warm cache"].append(loader_rate(cfg(url, cache), args.batch, args.workers))
    finally:
        server.stop()
    print(f"Loader: {args.images} JPEGs of {args.image_size} px ({megabytes:.1f} MB), batch {args.batch}, "
          f"{args.workers} workers, flip + colour jitter, {args.repeats} runs each (moto S3 on 127.0.0.1)")
    base = statistics.median(rates["local"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:<14} {med:8.1f} images/s   x{med / base:.3f} of local   "
              f"(runs: {', '.join(f'{v:.1f}' for v in values)})")
    print(f"  target: warm >= 0.95x local -> {statistics.median(rates['s3 warm cache']) / base:.3f}")


# ----------------------------------------------------------------------------------------------------------
# 2. The annotation index at COCO scale


def write_coco(path: Path, num_images: int, num_boxes: int) -> None:
    """An instances file shaped like COCO train2017's: 80 categories with ids in 1..90, polygons, crowds."""
    import numpy as np

    rng = np.random.default_rng(0)
    cat_ids = sorted(rng.choice(np.arange(1, 91), 80, replace=False).tolist())
    widths = rng.integers(200, 641, num_images)
    heights = rng.integers(200, 641, num_images)
    image_ids = rng.choice(np.arange(1, 600_000), num_images, replace=False)
    owner = rng.integers(0, num_images, num_boxes)
    x = rng.uniform(0, 0.8, num_boxes) * widths[owner]
    y = rng.uniform(0, 0.8, num_boxes) * heights[owner]
    w = rng.uniform(0.01, 0.2, num_boxes) * widths[owner]
    h = rng.uniform(0.01, 0.2, num_boxes) * heights[owner]
    cats = rng.choice(cat_ids, num_boxes)
    crowd = rng.random(num_boxes) < 0.01
    with open(path, "w") as f:
        f.write('{"info": {"description": "generated"}, "licenses": [], "images": [')
        f.write(",".join(json.dumps({"license": 1, "file_name": f"{int(i):012d}.jpg", "coco_url": "",
                                     "height": int(hh), "width": int(ww), "date_captured": "", "id": int(i)})
                         for i, ww, hh in zip(image_ids, widths, heights, strict=True)))
        f.write('], "annotations": [')
        for start in range(0, num_boxes, 100_000):
            end = min(start + 100_000, num_boxes)
            chunk = []
            for j in range(start, end):
                x1, y1, x2, y2 = x[j], y[j], x[j] + w[j], y[j] + h[j]
                polygon = [round(v, 2) for v in (x1, y1, x2, y1, x2, y2, (x1 + x2) / 2, y2 + 0.0, x1, y2)]
                chunk.append(json.dumps({"segmentation": [polygon], "area": round(float(w[j] * h[j]), 2),
                                         "iscrowd": int(crowd[j]), "image_id": int(image_ids[owner[j]]),
                                         "bbox": [round(float(v), 2) for v in (x[j], y[j], w[j], h[j])],
                                         "category_id": int(cats[j]), "id": j + 1}))
            f.write(("," if start else "") + ",".join(chunk))
        f.write('], "categories": [')
        f.write(",".join(json.dumps({"supercategory": "thing", "id": c, "name": f"class{c}"}) for c in cat_ids))
        f.write("]}")


CASE_SCRIPT = """
import contextlib, io, json, os, sys, threading, time
case, ann, images, cache, masks = sys.argv[1:6]
if case == "pycocotools":
    from pycocotools.coco import COCO
else:
    from elastic_det.data import CocoDataset
    from elastic_det.data.source import DataSource

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

peak, done = [0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        done.wait(0.005)

base = rss()
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
start = time.perf_counter()
if case == "pycocotools":
    with contextlib.redirect_stdout(io.StringIO()):
        n = len(COCO(ann).imgs)
else:
    dataset = CocoDataset(images, ann, filter_empty=True, source=DataSource(cache), masks=masks == "1")
    n = len(dataset)
elapsed = time.perf_counter() - start
done.set()
watcher.join()
decode = 0.0
if case != "pycocotools" and masks == "1":
    from elastic_det.data.masks import decode_masks
    index, j = dataset.index, int(dataset._keep[0])
    t = time.perf_counter()
    decode_masks(index, range(index.ann_start[j], index.ann_start[j + 1]), int(index.height[j]), int(index.width[j]))
    decode = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "added_mb": (max(peak[0], rss()) - base) / 2**20, "images": n,
                  "decode_s": decode}))
"""


def run_case(case: str, ann: Path, images: Path, cache: Path, masks: bool = False) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CASE_SCRIPT, case, str(ann), str(images), str(cache), str(int(masks))],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_index(args: argparse.Namespace, tmp: Path) -> None:
    ann = tmp / "instances_generated.json"
    start = time.perf_counter()
    write_coco(ann, args.coco_images, args.coco_boxes)
    written = time.perf_counter() - start
    images, cache = tmp / "images", tmp / "index-cache"
    images.mkdir()
    masks = args.masks
    results = {"pycocotools COCO(file)": run_case("pycocotools", ann, images, cache),
               "ours, first start": run_case("ours", ann, images, cache, masks),
               "ours, restart": run_case("ours", ann, images, cache, masks),
               "ours, restart again": run_case("ours", ann, images, cache, masks)}
    index_mb = sum(p.stat().st_size for p in (cache / "index").rglob("*.npy")) / 1e6
    print(f"Annotations: {args.coco_images} images, {args.coco_boxes} boxes, file {ann.stat().st_size / 1e6:.0f} MB "
          f"(written in {written:.0f} s); index on disk {index_mb:.0f} MB{' with polygons' if masks else ''}; one "
          f"process per case")
    base = results["pycocotools COCO(file)"]
    for name, r in results.items():
        print(f"  {name:<24} {r['seconds']:7.2f} s  x{r['seconds'] / base['seconds']:.3f}   "
              f"peak RSS +{r['added_mb']:6.0f} MB  x{r['added_mb'] / max(base['added_mb'], 1):.3f}   "
              f"({r['images']} images)")
    print(f"  target: restart <= 1 s -> {results['ours, restart']['seconds']:.2f} s")
    if masks:
        print(f"  masks of one image decoded after a restart in {results['ours, restart']['decode_s'] * 1e3:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--coco-images", type=int, default=118_287)
    p.add_argument("--coco-boxes", type=int, default=860_001)
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--masks", action="store_true", help="index the segmentations too (data.masks)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        if not args.skip_loader:
            bench_loader(args, Path(tmp))
        if not args.skip_index:
            bench_index(args, Path(tmp))


if __name__ == "__main__":
    main()
