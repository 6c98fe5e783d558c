"""Images/s of elastic_det's training loop against a plain PyTorch loop, same model, data and batch.

    python bench/throughput.py [--steps 60] [--warmup 10] [--repeats 2]

The plain loop is what a user would write: a shuffled DataLoader with the same dataset, transforms,
batch size and workers, forward, backward, SGD step. Ours is ``python -m elastic_det.train`` in-process on
the embedded default (checkpoints and evaluation off); its rate is taken from the ``time`` of the
train records in metrics.jsonl between the end of warm-up and the last step, so start-up is excluded from
both. Runs alternate and the median of each is compared. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elastic_det.config.schema import load_config
from elastic_det.data.build import build_dataset
from elastic_det.data.loader import TrainSamples, detection_collate
from elastic_det.data.transforms import build_transforms
from elastic_det.engine.optim import build_optimizer
from elastic_det.engine.runner import name_losses
from elastic_det.engine.trainer import train
from elastic_det.models.build import build_model


def overrides(steps: int, work_dir: str) -> list[str]:
    return [f"train.max_steps={steps}", "train.validate=false", "checkpoint.interval=0", "log.interval=1",
            "log.progress_bar=never", f"work_dir={work_dir}"]


def plain_loop(cfg, steps: int, warmup: int) -> float:
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.data, "train")
    samples = TrainSamples(dataset, build_transforms(cfg.data.train_transforms, train=True), cfg.seed)
    batch = cfg.data.global_batch_size
    order = torch.randperm(len(dataset)).tolist()
    batches = [[(0, i) for i in order[k:k + batch]] for k in range(0, len(order) - batch + 1, batch)]
    batches = (batches * (steps // len(batches) + 1))[:steps]
    loader = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=cfg.data.num_workers,
                                         collate_fn=detection_collate)
    model = build_model(cfg.model, dataset.num_classes)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.optimizer.lr)
    model.train()
    start = 0.0
    for i, (images, targets) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        losses = name_losses(model(images, targets))
        loss = sum(v for k, v in losses.items() if "loss" in k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.clip_grad_norm)
        optimizer.step()
    return (steps - warmup) * batch / (time.perf_counter() - start)


def our_loop(steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as work_dir:
        cfg = load_config(None, overrides(steps, work_dir))
        train(cfg)
        records = [json.loads(line) for line in Path(work_dir, "metrics.jsonl").read_text().splitlines()]
        times = {r["step"]: r["time"] for r in records if r.get("mode") == "train"}
        return (steps - warmup) * cfg.data.global_batch_size / (times[steps] - times[warmup])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(None)
    build_dataset(cfg.data, "train")  # generate the shapes set before timing anything
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(cfg, args.steps, args.warmup))
        ours.append(our_loop(args.steps, args.warmup))
    p_med, o_med = statistics.median(plain), statistics.median(ours)
    print(f"model {cfg.model.type}, global batch {cfg.data.global_batch_size}, {cfg.data.num_workers} workers, "
          f"{torch.get_num_threads()} threads, {args.steps - args.warmup} timed steps x {args.repeats} runs")
    print(f"plain PyTorch loop : {p_med:8.1f} images/s   (runs: {', '.join(f'{x:.1f}' for x in plain)})")
    print(f"elastic_det loop   : {o_med:8.1f} images/s   (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"ratio elastic_det/plain: {o_med / p_med:.3f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
