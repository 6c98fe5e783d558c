"""Checkpoint cost: a durable save against torch.save + fsync, the async block, and steps during a save.

    python bench/checkpoint.py               # Faster R-CNN R50-FPN + SGD momentum state (~335 MB)
    python bench/checkpoint.py --size-mb 50  # a synthetic state of that size, for a quick run
    python bench/checkpoint.py --s3          # also through a moto S3 server started here

Printed, each as a ratio against a baseline measured in the same run (runs interleaved, medians):

* sync save: ``CheckpointStore.save`` (temp file, digest, fsync, rename, manifest, retention) against
  ``torch.save`` into a file + ``fsync`` of the same state. Target <= 1.15.
* async block: what ``AsyncSaver.submit`` blocks the loop for, against the sync save. Target <= 0.05.
* steps during a background save: the time of training steps (a small CNN's forward, backward and SGD step)
  while an async save writes, against the same steps without one. Target <= 1.05. Also printed: how long
  that save took to commit while the loop ran (a writer that yields the CPU to training takes longer).

Each timed save starts from a settled page cache (``os.sync()``), so no save pays for the one before it.
The target figure is the median of the per-run ratios (each run's save against the baseline measured right
before or with it), which cancels the load drift of a shared machine between runs; the ratio of the medians
is printed beside it.
"""

from __future__ import annotations

import argparse
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


# ----------------------------------------------------------------------------------------------------------
# Saves


def measure_saves(wd: WorkDir, state: dict, repeats: int, reference) -> dict[str, list[float]]:
    """Interleaved: reference save, sync store save, async submit (its block) and its time to commit."""
    out: dict[str, list[float]] = {"reference": [], "sync": [], "async_block": [], "async_total": []}
    store = CheckpointStore(wd, keep_last=2)
    saver = AsyncSaver(CheckpointStore(wd, keep_last=2))
    done: list[tuple[BaseException | None, float]] = []
    for i in range(repeats):
        os.sync()
        start = time.perf_counter()
        reference(f"reference-{i}.pt")
        out["reference"].append(time.perf_counter() - start)
        wd.delete(f"reference-{i}.pt")
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


def local_reference(root: str, state: dict):
    """What a user writes for a durable save: torch.save into a file, then fsync it."""
    def save(name: str) -> None:
        with open(os.path.join(root, name), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    return save


def s3_reference(wd: WorkDir, state: dict):
    def save(name: str) -> None:
        with wd.fs.open(wd.fs_path(name), "wb") as f:
            torch.save(state, f)
    return save


# ----------------------------------------------------------------------------------------------------------
# Steps while a save runs


def step_workload():
    """A small CNN training step (forward, backward, SGD): the work an async save must not slow down."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start
    return step


def measure_steps_during_save(wd: WorkDir, state: dict, repeats: int) -> dict[str, list[float]]:
    """Median step time without a save, and while an async save writes (same number of steps, interleaved)."""
    step = step_workload()
    saver = AsyncSaver(CheckpointStore(wd, keep_last=1))
    for _ in range(5):
        step()
    out: dict[str, list[float]] = {"without": [], "during": [], "commit": []}
    for i in range(repeats):
        os.sync()
        during = []
        start = time.perf_counter()
        saver.submit(1000 + i, state, META, lambda *args: None)
        while saver.in_flight():
            during.append(step())
        saver.wait()
        out["commit"].append(time.perf_counter() - start)
        os.sync()
        without = [step() for _ in range(max(len(during), 5))]
        out["during"].append(statistics.median(during) if during else float("nan"))
        out["without"].append(statistics.median(without))
    return out


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=0, help="synthetic state of this size (0 = detector)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--s3", action="store_true", help="also through a moto S3 server (slow)")
    args = parser.parse_args()

    state = synthetic_state(args.size_mb) if args.size_mb else detector_state()
    what = f"synthetic {args.size_mb} MB" if args.size_mb else "fasterrcnn_resnet50_fpn + SGD momentum"
    print(f"state: {what}, {nbytes(state) / 1e6:.1f} MB of tensors; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; medians of {args.repeats}")

    root = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        saves = {"local": measure_saves(WorkDir(root), state, args.repeats, local_reference(root, state))}
        steps = measure_steps_during_save(WorkDir(os.path.join(root, "steps")), state, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.s3:
        server = MotoServer.start()
        try:
            os.environ.update(s3_env(server.endpoint))
            wd = WorkDir(f"s3://{server.create_bucket('bench')}/run")
            saves["s3 (moto)"] = measure_saves(wd, state, args.repeats, s3_reference(wd, state))
        finally:
            server.stop()
    report(saves, steps)


def _runs(values: list[float]) -> str:
    return "[" + " ".join(f"{v:.3f}" for v in values) + "]"


def report(saves: dict[str, dict[str, list[float]]], steps: dict[str, list[float]]) -> None:
    for backend, runs in saves.items():
        med = {key: statistics.median(values) for key, values in runs.items()}
        reference = "torch.save + fsync" if backend == "local" else "torch.save into fs.open"
        print(f"\n{backend}: seconds, median {_runs(list(med.values()))[1:-1]} for "
              f"reference / sync / async block / async to commit")
        print(f"  {reference:<24} {med['reference']:.3f} s {_runs(runs['reference'])}")
        print(f"  {'store.save (sync)':<24} {med['sync']:.3f} s {_runs(runs['sync'])}")
        print(f"  {'async: loop blocked':<24} {med['async_block']:.3f} s {_runs(runs['async_block'])}")
        print(f"  {'async: to commit':<24} {med['async_total']:.3f} s {_runs(runs['async_total'])}")
        ratios = [s / r for s, r in zip(runs["sync"], runs["reference"], strict=True)]
        blocks = [b / s for b, s in zip(runs["async_block"], runs["sync"], strict=True)]
        target = " (target <= 1.15)" if backend == "local" else ""
        print(f"  sync save / {reference}: {statistics.median(ratios):.2f}{target}, ratio of medians "
              f"{med['sync'] / med['reference']:.2f}; per run {_runs(ratios)}")
        print(f"  async block / sync save: {statistics.median(blocks):.3f} (target <= 0.05), ratio of medians "
              f"{med['async_block'] / med['sync']:.3f}; per run {_runs(blocks)}")
    during, without = statistics.median(steps["during"]), statistics.median(steps["without"])
    per_run = [d / w for d, w in zip(steps["during"], steps["without"], strict=True)]
    print(f"\nstep time during a background save / without: {statistics.median(per_run):.3f} (target <= 1.05), "
          f"ratio of medians {during / without:.3f}; {during * 1000:.1f} vs {without * 1000:.1f} ms; "
          f"per run {_runs(per_run)}")
    print(f"  that save committed after {statistics.median(steps['commit']):.2f} s while the loop ran; "
          f"per run {_runs(steps['commit'])}")


if __name__ == "__main__":
    main()
