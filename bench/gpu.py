"""On a CUDA machine: the training loop against a plain torchvision-reference loop, the async-save stall
from CUDA tensors, and the start to the first step (cold and warm) on the CUDA node.

    python bench/gpu.py [--steps 40] [--warmup 10] [--batch 8] [--only throughput,save,start]

Without a CUDA GPU it says so and exits 0 (nothing is measured; the project never depends on a GPU).

1. Throughput: Faster R-CNN and Mask R-CNN R50-FPN (``faster_rcnn_r50_fpn``, ``maskrcnn_resnet50_fpn``) at
   COCO sizes (``model.min_size=800``, ``max_size=1333``; the shapes set at 800 px, masks for Mask R-CNN),
   fp16 AMP, one GPU. Ours is ``elastic_det.train`` in-process (checkpoints and evaluation off; its rate
   from the ``time`` of the train records between the end of warm-up and the last step). The plain loop
   is torchvision's ``references/detection`` ``train_one_epoch`` as a user writes it: a shuffled
   DataLoader over the same dataset, transforms, batch and workers, ``autocast`` + ``GradScaler``, SGD,
   the same model built the same way. Both in the same run, start-up excluded; the ratio ours / plain
   (target >= 0.95).
2. Async-save stall: a Faster R-CNN R50-FPN + SGD-momentum state on the GPU; what ``AsyncSaver.submit``
   blocks the loop for (the pinned-memory snapshot of the CUDA tensors) against a synchronous durable
   save of the same state (target <= 0.05), and the time to commit in the background.
3. Start on the CUDA node: launch -> first training step of Faster R-CNN under ``torchrun --standalone
   --nproc-per-node 1``, cold (plain torchrun) and warm (under the supervisor: workers forked ready by
   the warm server, as every launcher runs them), from the ledger (``process_start`` -> ``first_step``)
   and from the moment this script spawned the launcher.
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

import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("faster_rcnn_r50_fpn", "maskrcnn_resnet50_fpn")


def options(model: str, cache: Path, steps: int, batch: int, workers: int) -> list[str]:
    return [f"model.type={model}", "model.min_size=800", "model.max_size=1333", "train.amp=fp16",
            f"train.max_steps={steps}", "train.validate=false", "train.nonfinite=skip",
            "train.nonfinite_patience=1000", "checkpoint.interval=0", "log.interval=1", "log.progress_bar=never",
            "data.shapes.num_train=64", "data.shapes.num_val=8", "data.shapes.image_size=800",
            f"data.shapes.cache_dir={cache}", f"data.global_batch_size={batch}", f"data.num_workers={workers}",
            "optimizer.type=sgd", "optimizer.lr=0.005", "schedule.policy=constant", "schedule.warmup_steps=0"]


def plain_loop(cfg, steps: int, warmup: int) -> float:
    """torchvision's reference ``train_one_epoch`` (AMP): images/s over the steps after ``warmup``."""
    from elastic_det.data.build import build_dataset
    from elastic_det.data.loader import TrainSamples, detection_collate
    from elastic_det.data.transforms import build_transforms
    from elastic_det.engine.optim import build_optimizer
    from elastic_det.engine.runner import name_losses
    from elastic_det.models.build import build_model

    torch.manual_seed(cfg.seed)
    device = torch.device("cuda")
    dataset = build_dataset(cfg.data, "train")
    samples = TrainSamples(dataset, build_transforms(cfg.data.train_transforms, train=True), cfg.seed)
    batch = cfg.data.global_batch_size
    order = torch.randperm(len(dataset)).tolist()
    batches = [[(0, i) for i in order[k:k + batch]] for k in range(0, len(order) - batch + 1, batch)]
    batches = (batches * (steps // len(batches) + 1))[:steps]
    loader = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=cfg.data.num_workers,
                                         collate_fn=detection_collate, pin_memory=True)
    model = build_model(cfg.model, dataset.num_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.optimizer.lr)
    scaler = torch.amp.GradScaler("cuda")
    model.train()
    start = 0.0
    for i, (images, targets) in enumerate(loader):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        with torch.autocast("cuda", dtype=torch.float16):
            losses = name_losses(model(images, targets))
            loss = sum(v for k, v in losses.items() if "loss" in k)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return (steps - warmup) * batch / (time.perf_counter() - start)


def our_loop(opts: list[str], steps: int, warmup: int) -> float:
    from elastic_det.config.schema import load_config
    from elastic_det.engine.trainer import train

    with tempfile.TemporaryDirectory() as work_dir:
        cfg = load_config(None, [*opts, f"work_dir={work_dir}"])
        train(cfg)
        records = [json.loads(line) for line in Path(work_dir, "metrics.jsonl").read_text().splitlines()]
        times = {r["step"]: r["time"] for r in records if r.get("mode") == "train"}
        return (steps - warmup) * cfg.data.global_batch_size / (times[steps] - times[warmup])


def throughput(cache: Path, args: argparse.Namespace) -> None:
    from elastic_det.config.schema import load_config
    from elastic_det.data.build import build_dataset

    for model in MODELS:
        opts = options(model, cache, args.steps, args.batch, args.workers)
        cfg = load_config(None, opts)
        build_dataset(cfg.data, "train")  # generate the set before timing anything
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(cfg, args.steps, args.warmup))
            ours.append(our_loop(opts, args.steps, args.warmup))
        p, o = statistics.median(plain), statistics.median(ours)
        print(f"{model}: batch {args.batch} at 800 px, fp16, {args.steps - args.warmup} timed steps x {args.repeats}")
        print(f"  plain torchvision loop : {p:7.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in plain)})")
        print(f"  elastic_det loop       : {o:7.1f} images/s  (runs: {', '.join(f'{x:.1f}' for x in ours)})")
        print(f"  ratio elastic_det/plain: {o / p:.3f}  (target >= 0.95)", flush=True)


def save_stall(repeats: int) -> None:
    from elastic_det.checkpoint.async_save import AsyncSaver
    from elastic_det.checkpoint.store import CheckpointStore
    from elastic_det.config.schema import ModelConfig
    from elastic_det.models.build import build_model
    from elastic_det.storage import WorkDir

    model = build_model(ModelConfig(type="faster_rcnn_r50_fpn"), 91).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # momentum buffers on the GPU
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    size = sum(t.nbytes for t in state["model"].values()) + sum(
        t.nbytes for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t))
    stalls, syncs, commits = [], [], []
    with tempfile.TemporaryDirectory() as root:
        store = CheckpointStore(WorkDir(root), keep_last=2)
        saver = AsyncSaver(store)
        for i in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            store.save(2 * i + 1, state, {})
            syncs.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            start = time.perf_counter()
            saver.submit(2 * i + 2, state, {}, lambda manifest, error, seconds: None)
            stalls.append(time.perf_counter() - start)
            saver.wait()
            commits.append(time.perf_counter() - start)
    s, y = statistics.median(stalls), statistics.median(syncs)
    print(f"async save of a {size / 1e6:.0f} MB Faster R-CNN + SGD state on the GPU, {repeats} runs:")
    print(f"  loop blocked by the async save: {s:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in stalls)})")
    print(f"  synchronous durable save      : {y:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in syncs)})")
    print(f"  async commit in the background: {statistics.median(commits):.3f} s")
    print(f"  stall / sync save: {s / y:.3f}  (target <= 0.05)", flush=True)


def start_to_first_step(cache: Path, work: Path, supervised: bool) -> tuple[float, float]:
    """(seconds from spawning the launcher, seconds from the ledger's process_start) to the first step."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                "-m", "elastic_det.train", "--work-dir", str(work), "--cfg-options",
                *options("faster_rcnn_r50_fpn", cache, 3, 2, 2)]
    cmd = [sys.executable, "-m", "elastic_det.supervise", "--", *torchrun] if supervised else torchrun
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": str(REPO)}
    spawned = time.time()
    subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True,
                   timeout=600)
    ledger = [json.loads(line) for line in (work / "ledger.jsonl").read_text().splitlines() if line.strip()]
    marks = {r["kind"]: r for r in ledger if r.get("kind") in ("process_start", "first_step")}
    first, started = marks["first_step"]["time"], marks["process_start"]["time"]
    if supervised and not marks["process_start"].get("warm_start"):
        print("  (the supervised worker was not forked by the warm server)")
    return first - spawned, first - started


def start_times(cache: Path, repeats: int) -> None:
    from elastic_det.config.schema import load_config
    from elastic_det.data.build import build_dataset

    build_dataset(load_config(None, options("faster_rcnn_r50_fpn", cache, 3, 2, 2)).data, "train")
    print("launch -> first step, Faster R-CNN R50-FPN on 1 GPU (torchrun --standalone):")
    for supervised, name in ((False, "cold (plain torchrun)"), (True, "warm (supervisor + warm server)")):
        runs = []
        for i in range(repeats):
            with tempfile.TemporaryDirectory() as work:
                runs.append(start_to_first_step(cache, Path(work) / f"run{i}", supervised))
        spawn, ledger = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"  {name:32s}: {spawn:5.1f} s from spawn, {ledger:5.1f} s from process start "
              f"(runs: {', '.join(f'{r[0]:.1f}' for r in runs)})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="images per step (one GPU)")
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default="throughput,save,start", help="comma-separated: throughput, save, start")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU found (torch.cuda.is_available() is false); nothing measured.")
        return 0
    parts = set(args.only.split(","))
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        if "throughput" in parts:
            throughput(Path(cache), args)
        if "save" in parts:
            save_stall(max(args.repeats, 3))
        if "start" in parts:
            start_times(Path(cache), args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
