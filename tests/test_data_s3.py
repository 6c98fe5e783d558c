"""Datasets in an object store (the moto server), read through the node-local cache.

The COCO set is the synthetic shapes set exported as COCO files, uploaded to a fresh bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, PYTHON, REPO, base_env, read_jsonl, torchrun_cmd, wait_for
from PIL import Image
from s3 import MotoServer, free_port, s3_env

from elastic_det.config.schema import DataConfig, TransformConfig
from elastic_det.data import CocoDataset, build_dataset, build_train_loader, build_transforms, generate_shapes
from elastic_det.data.cache import ImageCache
from elastic_det.data.loader import TrainSamples
from elastic_det.data.remote import RemoteFiles
from elastic_det.data.source import DataSource
from elastic_det.errors import DataError, StorageUnavailableError


@pytest.fixture(scope="module")
def shapes_coco(tmp_path_factory) -> Path:
    """A small COCO-format set on local disk: train/, val/, annotations/{train,val}.json."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    generate_shapes(str(root), num_train=48, num_val=16, image_size=64, max_objects=3, seed=0)
    return root


def upload(bucket: str, local: Path, prefix: str = "shapes") -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"{bucket}/{prefix}"
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)
    return url


def coco_cfg(root: str, cache: Path, **more) -> DataConfig:
    cfg = DataConfig(type="coco", root=f"{root}/train", val_root=f"{root}/val",
                     train_ann=f"{root}/annotations/train.json", val_ann=f"{root}/annotations/val.json", **more)
    cfg.cache.dir = str(cache)
    return cfg


def test_remote_dataset_equals_its_local_copy_and_warm_reads_need_no_images_in_the_store(
        shapes_coco, s3_bucket, tmp_path):
    url = upload(s3_bucket, shapes_coco)
    local = build_dataset(coco_cfg(str(shapes_coco), tmp_path / "local-cache"), "train")
    remote = build_dataset(coco_cfg(url, tmp_path / "cache"), "train")
    assert remote.image_ids == local.image_ids and len(remote) == 48
    assert remote.aspect_ratios() == local.aspect_ratios()
    assert remote.image_path(0).startswith(url)
    for i in range(len(local)):
        (a, ta), (b, tb) = remote[i], local[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    cached = list((tmp_path / "cache" / "images" / "objects").rglob("*"))
    assert len([p for p in cached if p.is_file()]) == 48

    # The images are gone from the store (all but one, so that the folder still exists): a new process
    # (fresh source, same cache dir) still reads them all.
    import s3fs

    s3fs.S3FileSystem().rm([remote.image_path(i).removeprefix("s3://") for i in range(1, len(remote))])
    again = build_dataset(coco_cfg(url, tmp_path / "cache"), "train")
    assert isinstance(again.index.ann_bbox, np.memmap)  # the annotation index came from the cache
    assert all(torch.equal(again[i][0], local[i][0]) for i in range(len(local)))


def test_val_ground_truth_from_the_store_equals_the_local_one(shapes_coco, s3_bucket, tmp_path):
    url = upload(s3_bucket, shapes_coco)
    local = build_dataset(coco_cfg(str(shapes_coco), tmp_path / "a"), "val").coco_gt()
    remote = build_dataset(coco_cfg(url, tmp_path / "b"), "val").coco_gt()
    assert remote.dataset == local.dataset and len(remote.anns) > 16


def test_loader_prefetches_the_upcoming_batches_into_the_cache(shapes_coco, s3_bucket, tmp_path):
    url = upload(s3_bucket, shapes_coco)
    cfg = coco_cfg(url, tmp_path / "cache")
    cfg.cache.prefetch_steps = 3
    dataset = build_dataset(cfg, "train")
    samples = TrainSamples(dataset, build_transforms(TransformConfig(), train=True), seed=0)
    steps = [(0, list(range(k, k + 4))) for k in range(0, 48, 4)]
    loader = iter(build_train_loader(samples, iter(steps), num_workers=0))
    _, targets = next(loader)
    assert [t["image_id"] for t in targets] == [dataset.image_ids[i] for i in range(4)]
    # Handing out batch 0 submitted the images of batches 0..3 to the prefetch threads.
    upcoming = [dataset.files.images.entry_path(dataset.image_path(i)) for i in range(4, 16)]
    wait_for(lambda: all(os.path.exists(p) for p in upcoming), 30, "the prefetched images in the cache")
    assert not any(os.path.exists(dataset.files.images.entry_path(dataset.image_path(i))) for i in range(20, 48))
    assert len(list(loader)) == 11


# ----------------------------------------------------------------------------------------------------------
# The cache under kills, a size bound and a full disk


FILL_SCRIPT = """
import sys
from elastic_det.data.cache import ImageCache
from elastic_det.data.remote import RemoteFiles
ImageCache(sys.argv[1], 1 << 40, RemoteFiles()).fill(sys.argv[2])
print("filled", flush=True)
"""


def test_a_process_killed_mid_download_leaves_no_corrupt_entry(s3_bucket, tmp_path, procs):
    # A 64 MB image: its download takes long enough to be caught half-way, every time.
    pixels = np.random.default_rng(0).integers(0, 256, (4000, 5400, 3), dtype=np.uint8)
    big = tmp_path / "big.bmp"
    Image.fromarray(pixels).save(big)
    url = f"{s3_bucket}/images/big.bmp"
    import s3fs

    s3fs.S3FileSystem().put_file(str(big), url.removeprefix("s3://"))
    cache_dir = tmp_path / "cache"
    cache = ImageCache(str(cache_dir), 1 << 40, RemoteFiles())
    entry = Path(cache.entry_path(url))

    env = base_env(tmp_path, **s3_env(os.environ["AWS_ENDPOINT_URL"]))
    proc = procs.start([PYTHON, "-c", FILL_SCRIPT, str(cache_dir), url], env, tmp_path / "fill.log")

    def partial_temp():
        temps = list(entry.parent.glob(f".{entry.name}.*.tmp")) if entry.parent.exists() else []
        sizes = [t.stat().st_size for t in temps if t.exists()]
        return temps if sizes and 0 < max(sizes) < big.stat().st_size else None

    temps = wait_for(partial_temp, 60, "a half-downloaded cache entry", interval=0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not entry.exists()  # the entry's name never shows partial content
    assert temps[0].exists() and temps[0].stat().st_size < big.stat().st_size

    with cache.open(url) as f:  # the next read downloads it again, completely
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
    assert entry.stat().st_size == big.stat().st_size
    with Image.open(entry) as im:
        assert np.array_equal(np.asarray(im), pixels)
    # The killed process's temp file goes with the next eviction scan once it is stale.
    old = time.time() - 7200
    os.utime(temps[0], (old, old))
    cache.evict()
    assert not temps[0].exists() and entry.exists()


def test_eviction_keeps_the_cache_under_its_bound_and_open_readers_keep_reading(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    blobs = {f"{s3_bucket}/blobs/{i}.bin": os.urandom(100_000) for i in range(12)}
    for url, data in blobs.items():
        fs.pipe_file(url.removeprefix("s3://"), data)
    cache = ImageCache(str(tmp_path / "cache"), 500_000, RemoteFiles())
    cache.slack = 100_000  # scan after every fill
    urls = list(blobs)
    first = cache.open(urls[0])  # held open while its entry is evicted
    os.utime(cache.entry_path(urls[0]), (time.time() - 7200,) * 2)
    for i, url in enumerate(urls[1:], start=1):
        old = time.time() - 3600 + i  # fills in order: the oldest is the least recently used
        with cache.open(url) as f:
            assert f.read() == blobs[url]
        os.utime(cache.entry_path(url), (old, old))
    entries = [p for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in entries) <= 500_000
    assert not os.path.exists(cache.entry_path(urls[0])) and os.path.exists(cache.entry_path(urls[-1]))
    assert first.read() == blobs[urls[0]]  # an evicted entry stays readable to whoever opened it
    first.close()
    with cache.open(urls[0]) as f:  # and is fetched again when asked for
        assert f.read() == blobs[urls[0]]


FULL_DISK_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from elastic_det.data.cache import ImageCache
from elastic_det.data.remote import RemoteFiles
cache = ImageCache(sys.argv[1], 1 << 40, RemoteFiles())
for url in sys.argv[2:]:
    with cache.open(url) as f:
        print(url, len(f.read()), flush=True)
print("read-through:", not cache.enabled, flush=True)
"""


def test_a_full_cache_disk_degrades_to_reading_through_with_one_warning(s3_bucket, tmp_path):
    # A real full disk: a 256 KiB tmpfs in a private mount namespace holds the cache.
    import s3fs

    fs = s3fs.S3FileSystem()
    sizes = [100_000, 100_000, 150_000, 120_000, 80_000]
    urls = [f"{s3_bucket}/blobs/{i}.bin" for i in range(len(sizes))]
    for url, size in zip(urls, sizes, strict=True):
        fs.pipe_file(url.removeprefix("s3://"), os.urandom(size))
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    env = base_env(tmp_path, **s3_env(os.environ["AWS_ENDPOINT_URL"]))
    cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c",
           f'mount -t tmpfs -o size=256k tmpfs "{mount}" && exec "{PYTHON}" "{script}" "{mount}/cache" "$@"',
           "sh", *urls]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:-1] == [f"{url} {size}" for url, size in zip(urls, sizes, strict=True)]
    assert lines[-1] == "read-through: True"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "is full" in warnings[0] and "No space left on device" in warnings[0]


# ----------------------------------------------------------------------------------------------------------
# Bad input and outages name the URL


def test_missing_objects_name_the_url(shapes_coco, s3_bucket, tmp_path):
    url = upload(s3_bucket, shapes_coco)
    with pytest.raises(DataError, match=f"COCO annotation file not found: {url}/annotations/nope.json"):
        CocoDataset(f"{url}/train", f"{url}/annotations/nope.json", source=DataSource(str(tmp_path), 1 << 30))
    with pytest.raises(DataError, match=f"COCO image folder not found: {url}/nothing-here"):
        CocoDataset(f"{url}/nothing-here", f"{url}/annotations/train.json", source=DataSource(str(tmp_path), 1 << 30))
    with pytest.raises(DataError, match="not found: s3://no-such-bucket-here/ann.json"):
        CocoDataset(f"{url}/train", "s3://no-such-bucket-here/ann.json", source=DataSource(str(tmp_path), 1 << 30))
    dataset = CocoDataset(f"{url}/train", f"{url}/annotations/train.json", source=DataSource(str(tmp_path), 1 << 30))
    import s3fs

    s3fs.S3FileSystem().rm_file(dataset.image_path(3).removeprefix("s3://"))
    with pytest.raises(DataError, match=f"Image file not found: {dataset.image_path(3)}"):
        dataset[3]


def test_a_denied_bucket_is_bad_input_naming_the_url(tmp_path, monkeypatch):
    # A moto server that checks permissions after its first 50 requests: a user without any policy is denied.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "50")
    server = MotoServer.start()
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        import boto3
        from botocore.exceptions import ClientError

        client = server.client()
        client.create_bucket(Bucket="private")
        client.put_object(Bucket="private", Key="coco/ann.json", Body=b"{}")
        iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id="testing",
                           aws_secret_access_key="testing", region_name="us-east-1")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        for _ in range(50):  # use up the unchecked requests: from here on every request is checked
            try:
                client.list_buckets()
            except ClientError:
                break
        else:
            pytest.fail("the moto server never started checking permissions")
        options = {"endpoint_url": server.endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        source = DataSource(str(tmp_path), 1 << 30, storage_options=options)
        with pytest.raises(DataError, match=r"Access denied to s3://private/coco/ann.json") as info:
            CocoDataset("s3://private/coco/images", "s3://private/coco/ann.json", source=source)
        assert key["SecretAccessKey"] not in str(info.value)
    finally:
        server.stop()


def test_an_unreachable_endpoint_is_an_outage_naming_the_url(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    source = DataSource(str(tmp_path), 1 << 30, storage_options={"endpoint_url": endpoint, "key": "k",
                                                                  "secret": "s"})
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError, match=f"Cannot reach s3://data/ann.json at {endpoint}"):
        CocoDataset("s3://data/images", "s3://data/ann.json", source=source)
    assert time.monotonic() - start < 30


def test_cli_exit_codes_for_a_missing_object_and_an_unreachable_endpoint(s3_server, tmp_path):
    bucket = s3_server.create_bucket()
    opts = ["data.type=coco", f"data.root=s3://{bucket}/coco/train", f"data.train_ann=s3://{bucket}/coco/ann.json",
            f"data.cache.dir={tmp_path / 'cache'}", "train.validate=false"]
    for endpoint, code, message in [(s3_server.endpoint, 2, f"not found: s3://{bucket}/coco/ann.json"),
                                    (f"http://127.0.0.1:{free_port()}", 75, f"Cannot reach s3://{bucket}/coco/ann.json")]:
        env = base_env(tmp_path, **s3_env(endpoint))
        result = subprocess.run([PYTHON, "-m", "elastic_det.train", "--work-dir", str(tmp_path / f"work{code}"),
                                 "--cfg-options", *FAST, *opts], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == code, result.stderr[-3000:]
        assert message in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------
# End to end under torchrun


@pytest.mark.slow
def test_torchrun_from_the_store_trains_evaluates_and_traces_like_a_local_copy(shapes_coco, s3_server, tmp_path,
                                                                                procs):
    bucket = s3_server.create_bucket()
    env = base_env(tmp_path, **s3_env(s3_server.endpoint))
    subprocess.run([PYTHON, "-c", textwrap.dedent(f"""
        import s3fs
        s3fs.S3FileSystem().put({str(shapes_coco)!r}, "{bucket}/shapes", recursive=True)
    """)], env=env, check=True, timeout=120)
    runs = {}
    for name, root in [("s3", f"s3://{bucket}/shapes"), ("local", str(shapes_coco))]:
        work = tmp_path / name
        args = ["--work-dir", str(work), "--cfg-options", *FAST,
                "data.type=coco", f"data.root={root}/train", f"data.val_root={root}/val",
                f"data.train_ann={root}/annotations/train.json", f"data.val_ann={root}/annotations/val.json",
                f"data.cache.dir={tmp_path / name / 'cache'}", "data.num_workers=1", "data.trace=true",
                "train.max_steps=8", "train.validate=true", "data.val_batch_size=4"]
        proc = procs.start(torchrun_cmd(2, args, rdzv_port=free_port(), run_id=name), env, tmp_path / f"{name}.log")
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
        runs[name] = work
    traces = {n: read_jsonl(w / "trace" / "attempt-0.jsonl") for n, w in runs.items()}
    assert len(traces["s3"]) == 8 and traces["s3"] == traces["local"]
    assert all(t["world_size"] == 2 and len(t["ids"]) == 2 for t in traces["s3"])
    metrics = {n: read_jsonl(w / "metrics.jsonl") for n, w in runs.items()}
    losses = {n: [r["loss"] for r in m if r.get("mode") == "train"] for n, m in metrics.items()}
    assert losses["s3"] == pytest.approx(losses["local"], rel=1e-5)  # same samples, same augmentation
    vals = {n: [r for r in m if r.get("mode") == "val"] for n, m in metrics.items()}
    assert len(vals["s3"]) == 1 and vals["s3"][0]["bbox_mAP"] == pytest.approx(vals["local"][0]["bbox_mAP"], abs=1e-6)
    cached = [p for p in (tmp_path / "s3" / "cache" / "images").rglob("objects/*/*") if not p.name.startswith(".")]
    assert len(cached) >= 48  # every training image at least once through the node-local cache
    assert json.loads((runs["s3"] / "trace" / "attempt-0.jsonl").read_text().splitlines()[0])["step"] == 0


def test_a_voc_set_in_the_store_equals_its_local_copy(s3_bucket, tmp_path):
    import shutil

    bccd = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "BCCD"
    assert bccd.is_dir(), f"The BCCD dataset is missing: expected it at {bccd}"
    names = ["BloodImage_00001", "BloodImage_00003", "BloodImage_00338"]  # 00338 has a zero-size box
    local = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (local / sub).mkdir(parents=True)
    for n in names:
        shutil.copy(bccd / "Annotations" / f"{n}.xml", local / "Annotations")
        shutil.copy(bccd / "JPEGImages" / f"{n}.jpg", local / "JPEGImages")
    (local / "ImageSets/Main/train.txt").write_text("\n".join(names) + "\n")
    url = upload(s3_bucket, local, "voc")
    cfg = DataConfig(type="voc", root=url)
    cfg.cache.dir = str(tmp_path / "cache")
    remote = build_dataset(cfg, "train")
    reference = build_dataset(DataConfig(type="voc", root=str(local)), "train")
    assert remote.image_ids == reference.image_ids == [1, 3, 338]
    assert remote.class_names == reference.class_names
    dropped = [d.split("Annotations/")[1] for d in remote.degenerate_boxes]
    assert dropped == [d.split("Annotations/")[1] for d in reference.degenerate_boxes]
    assert len(dropped) == 1 and dropped[0].startswith("BloodImage_00338.xml object 12 ")
    assert remote.degenerate_boxes[0].startswith(f"{url}/Annotations/")
    for i in range(len(remote)):
        (a, ta), (b, tb) = remote[i], reference[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert remote.coco_gt().dataset["annotations"] == reference.coco_gt().dataset["annotations"]
    with pytest.raises(DataError, match=r"VOC split file not found: .*/val.txt \(splits found: train\)"):
        build_dataset(DataConfig(type="voc", root=url, val_split="val", classes=["RBC"]), "val")


def test_remote_read_errors_are_sorted_by_botocore_class():
    """No credentials is final and says which variables to set; a botocore connection error is an outage;
    both are caught as storage errors (botocore is loaded here, as s3fs loads it)."""
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from elastic_det.errors import DataError, StorageUnavailableError
    from elastic_det.storage import storage_errors

    files = RemoteFiles({"endpoint_url": "http://127.0.0.1:9"})
    assert any(issubclass(NoCredentialsError, c) for c in storage_errors())
    missing = files.error("s3://bucket/train.json", "Annotation file", NoCredentialsError())
    assert isinstance(missing, DataError) and "AWS_ACCESS_KEY_ID" in str(missing)
    down = files.error("s3://bucket/train.json", "Annotation file",
                       EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert isinstance(down, StorageUnavailableError) and "127.0.0.1:9" in str(down)
