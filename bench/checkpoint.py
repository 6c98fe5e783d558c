"""Checkpoint cost: plain torch.save vs CheckpointStore.save vs AsyncSaver, on local disk and on S3 (moto).

    python bench/checkpoint.py               # Faster R-CNN R50-FPN + SGD momentum state (~335 MB)
    python bench/checkpoint.py --size-mb 50  # a synthetic state of that size, for a quick run

Targets: store.save / plain torch.save <= 1.2, async blocking / store.save <= 0.10. The S3 endpoint is a
moto server started here on a free loopback port (it shares this machine's CPUs with the client).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from s3 import MotoServer, s3_env  # noqa: E402

from elastic_det.checkpoint import AsyncSaver, CheckpointStore  # noqa: E402
from elastic_det.storage import WorkDir  # noqa: E402

META = {"config_hash": "bench", "world_size": 1, "reason": "interval", "metrics": {}}


def detector_state() -> dict:
    """Faster R-CNN R50-FPN weights plus SGD momentum buffers (after one fake step), no downloads."""
    import torchvision

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": {"epoch": 0, "step_in_epoch": 1, "global_step": 1}, "seed": 0}


def synthetic_state(size_mb: int) -> dict:
    chunk = 16 * 2**20 // 4  # 16 MB tensors
    total = size_mb * 2**20 // 4
    sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    return {"model": {f"t{i}": torch.randn(n) for i, n in enumerate(sizes)}, "progress": {"global_step": 1}}


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def measure(wd: WorkDir, state: dict, repeats: int, plain_save) -> dict[str, list[float]]:
    """Each timed operation starts from the same state: nothing left for the kernel to write back
    (``os.sync()``), so no operation pays for the dirty pages of the one before it."""
    out: dict[str, list[float]] = {"plain": [], "sync": [], "async_block": [], "async_total": []}
    store = CheckpointStore(wd, keep_last=2)
    saver = AsyncSaver(CheckpointStore(wd, keep_last=2))
    done: list[tuple[BaseException | None, float]] = []
    for i in range(repeats):
        os.sync()
        start = time.perf_counter()
        plain_save(f"plain-{i}.pt")
        out["plain"].append(time.perf_counter() - start)
        wd.delete(f"plain-{i}.pt")
        os.sync()
        start = time.perf_counter()
        store.save(2 * i + 1, state, META)
        out["sync"].append(time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        saver.submit(2 * i + 2, state, META, lambda manifest, error, seconds: done.append((error, seconds)))
        out["async_block"].append(time.perf_counter() - start)
        saver.wait()
        error, seconds = done[-1]
        if error is not None:
            raise error
        out["async_total"].append(seconds)
    return out


def local_plain(root: str, state: dict):
    return lambda name: torch.save(state, os.path.join(root, name))


def s3_plain(wd: WorkDir, state: dict):
    def save(name: str) -> None:
        with wd.fs.open(wd._fs_path(name), "wb") as f:
            torch.save(state, f)
    return save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=0, help="synthetic state of this size (0 = detector)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="local disk only")
    args = parser.parse_args()

    state = synthetic_state(args.size_mb) if args.size_mb else detector_state()
    what = f"synthetic {args.size_mb} MB" if args.size_mb else "fasterrcnn_resnet50_fpn + SGD momentum"
    print(f"state: {what}, {nbytes(state) / 1e6:.1f} MB of tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of {args.repeats}")

    results: dict[str, dict[str, list[float]]] = {}
    root = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        results["local"] = measure(WorkDir(root), state, args.repeats, local_plain(root, state))
        references = local_references(root, state, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_s3:
        server = MotoServer.start()
        try:
            os.environ.update(s3_env(server.endpoint))
            wd = WorkDir(f"s3://{server.create_bucket('bench')}/run")
            results["s3 (moto)"] = measure(wd, state, args.repeats, s3_plain(wd, state))
        finally:
            server.stop()
    report(results)
    print("local references (median): " + ", ".join(f"{k} {v:.3f} s" for k, v in references.items()))


def local_references(root: str, state: dict, repeats: int) -> dict[str, float]:
    """What durability and integrity cost by themselves: plain save + fsync, and sha256 of the bytes."""
    path = os.path.join(root, "reference.pt")
    fsynced, hashed = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsynced.append(time.perf_counter() - start)
        with open(path, "rb") as f:
            data = f.read()
        start = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        hashed.append(time.perf_counter() - start)
        os.remove(path)
    return {"torch.save + fsync": statistics.median(fsynced), "sha256 of the bytes": statistics.median(hashed)}


def report(results: dict[str, dict[str, list[float]]]) -> None:
    columns = [("plain", "plain torch.save"), ("sync", "store.save sync"),
               ("async_block", "async blocking"), ("async_total", "async to commit")]
    header = f"{'backend':<10}" + "".join(f"{title:>18}" for _, title in columns)
    header += f"{'sync/plain':>12}{'block/sync':>12}"
    print("\nseconds (median; all runs in brackets)")
    print(header)
    print("-" * len(header))
    for backend, runs in results.items():
        med = {key: statistics.median(values) for key, values in runs.items()}
        row = f"{backend:<10}" + "".join(f"{med[key]:>18.3f}" for key, _ in columns)
        row += f"{med['sync'] / med['plain']:>12.2f}{med['async_block'] / med['sync']:>12.3f}"
        print(row)
        print(f"{'':<10}" + "".join(f"{'[' + ' '.join(f'{v:.2f}' for v in runs[key]) + ']':>18}"
                                    for key, _ in columns))
    print("targets: sync/plain <= 1.2, block/sync <= 0.10")


if __name__ == "__main__":
    main()
