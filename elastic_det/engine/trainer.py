"""``train(cfg)``: config -> build -> restore -> Runner + hooks. The one place where the parts meet.

The stages, in order, each a function below: open the work dir, build the data (and the batch policy at
this world size), build the model and optimizer, restore (or start), build the loader from the cursor
on, build the hooks, announce the run, run. Nothing is written to the work dir but the attempt's own logs
(``train.log`` and its ``ledger.jsonl`` records) until the restore has succeeded: a rejected launch leaves
the run's files (``config.yaml``, ``metrics.jsonl``, checkpoints) as they were.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.node_copy import NodeCopies
from ..checkpoint.store import Checkpoint, CheckpointStore
from ..config.schema import Config, config_hash, diff, to_dict, to_yaml
from ..data.build import build_dataset
from ..data.loader import TrainSamples, build_train_loader, build_val_loader
from ..data.plan import ElasticBatchPlan, Progress, StepSchedule, aspect_groups, split_share
from ..data.transforms import build_transforms
from ..errors import ConfigError, InfrastructureError
from ..evaluation.coco_eval import format_table
from ..evaluation.inference import evaluate
from ..models import amp
from ..models.build import batch_dependent_layers, build_model
from ..records import METRICS
from ..storage import WorkDir, is_shared_path
from . import dist, env_info, state
from .checkpointer import Checkpointer
from .ema import build_ema
from .events import EventStream, Writer
from .grace import GraceMonitor, GraceWriter, grace_from_env
from .hook import Hook
from .hooks.checkpoint import CheckpointHook
from .hooks.evaluation import EvalHook
from .hooks.logger import LoggerHook
from .hooks.trace import TraceHook, next_attempt_path
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .optim import build_optimizer, build_scheduler
from .preemption import PreemptionFlag
from .run_files import RunFiles, setup_text_logging
from .runner import Runner
from .writers import ConsoleWriter, MetricsWriter, TensorBoardWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """What ``elastic.batch_policy`` makes of the config at the current world size."""

    name: str
    global_batch_size: int
    lr: float

    def describe(self, cfg: Config, world_size: int) -> str:
        if self.name == "fixed_global":
            return (f"batch policy fixed_global: global batch {self.global_batch_size} at world size "
                    f"{world_size} (about {self.global_batch_size / world_size:.2f} samples per rank), "
                    f"lr {self.lr:g}; sample order and schedule do not depend on the world size")
        return (f"batch policy scale_lr: {cfg.data.samples_per_device} samples per rank x {world_size} ranks = "
                f"global batch {self.global_batch_size}; lr {cfg.optimizer.lr:g} x {self.global_batch_size}/"
                f"{cfg.data.global_batch_size} = {self.lr:g}")


def batch_policy(cfg: Config, world_size: int) -> BatchPolicy:
    if cfg.elastic.batch_policy == "fixed_global":
        if cfg.data.global_batch_size < world_size:
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} is smaller than the world "
                              f"size {world_size}: every rank needs at least one sample per step.")
        return BatchPolicy("fixed_global", cfg.data.global_batch_size, cfg.optimizer.lr)
    if cfg.data.samples_per_device <= 0:
        raise ConfigError("elastic.batch_policy=scale_lr needs data.samples_per_device > 0 (the per-rank batch; "
                          "data.global_batch_size is then the batch that optimizer.lr was tuned for).")
    if cfg.train.max_epochs and not cfg.train.max_steps:
        raise ConfigError("elastic.batch_policy=scale_lr needs train.max_steps: its steps change size with the "
                          "world size, so train.max_epochs cannot be turned into a fixed number of steps.")
    size = cfg.data.samples_per_device * world_size
    return BatchPolicy("scale_lr", size, cfg.optimizer.lr * size / cfg.data.global_batch_size)


WriterFactory = Callable[[RunFiles, dist.DistInfo], Writer]
"""Builds a writer of the event stream for this run (the entry point passes the goodput ledger's)."""


@dataclass
class RunOutput:
    """Where a run writes: the work dir, rank 0's files, the event stream and its ``metrics.jsonl`` writer."""

    work_dir: WorkDir
    files: RunFiles
    events: EventStream
    metrics: MetricsWriter


@dataclass
class TrainData:
    dataset: Any
    plan: ElasticBatchPlan
    policy: BatchPolicy
    steps_per_epoch: int
    max_steps: int


def train(cfg: Config, resume: str = "auto", writers: Sequence[WriterFactory] = ()) -> bool:
    """Train to ``train.max_steps``; returns True when stopped by a preemption (after its checkpoint).
    ``writers`` subscribe to the run's event stream before anything is published (the ledger)."""
    entered = time.time()
    preempt = PreemptionFlag()
    preempt.install()
    info = dist.init_distributed(cfg.dist)
    dist.start_parent_watchdog()
    dist.set_watch(preempt.watch if info.distributed else None)  # a rank stuck on a lost peer stops
    try:
        return _train(cfg, resume, info, preempt, writers, {"imports_done": entered, "dist_ready": time.time()})
    except Exception as e:
        if info.distributed and dist.is_peer_lost(e):  # one line, not a traceback; exit now, no teardown
            preempt.stop_peer_lost(preempt.where(), dist.peer_lost_detail(e))
        raise
    finally:
        dist.shutdown()


def _train(cfg: Config, resume: str, info: dist.DistInfo, preempt: PreemptionFlag,
           writers: Sequence[WriterFactory], marks: dict[str, float]) -> bool:
    out = open_work_dir(cfg, info, writers)
    for phase, when in marks.items():
        out.events.publish(phase, at=when)
    try:
        env = env_info.collect(info.world_size)
        log.info("Environment:\n%s", env_info.format_env(env))
        _seed_and_determinism(cfg)
        data = build_data(cfg, info)
        parts = build_training_parts(cfg, info, data)
        store = CheckpointStore(work_dir=out.work_dir, keep_last=cfg.checkpoint.keep_last,
                                keep_every=cfg.checkpoint.keep_every, keep_best=cfg.checkpoint.keep_best,
                                on_event=lambda e: out.events.publish(e.pop("event"), e.pop("step", -1), **e),
                                node_copies=node_copies(cfg))
        load_start = time.time()
        checkpoint = state.find_checkpoint(store, resume)
        progress, hook_states = Progress(seed=cfg.seed), {}
        if checkpoint is not None:
            progress, hook_states = state.restore(checkpoint, parts, data.policy.lr, cfg.seed, cfg.optimizer.type)
        out.events.publish("restore_done", progress.global_step, load_seconds=round(time.time() - load_start, 3))
        out.metrics.open()  # the run is valid from here on: its files may change
        model = _wrap_ddp(parts.model, cfg, info)
        schedule, batches = build_batches(cfg, info, data, progress)
        hooks = build_hooks(cfg, info, out, store, preempt, data, parts)
        runner = Runner(parts=parts, model=model, schedule=schedule, batches=batches, hooks=hooks,
                        events=out.events, dist_info=info,
                        progress=progress, max_steps=data.max_steps, micro_batch_size=cfg.data.micro_batch_size,
                        amp_mode=cfg.train.amp, clip_grad_norm=cfg.optimizer.clip_grad_norm,
                        meta={"config": to_yaml(cfg), "env": env}, nonfinite=_nonfinite_guard(cfg, out))
        runner.load_hook_states(hook_states)
        announce(cfg, info, out, data, progress, checkpoint)
        try:
            runner.train()
        except NonFiniteLossError as e:  # every rank, at the same step; the hooks are closed (saves done)
            raise e.with_checkpoint(_newest_checkpoint(store)) from None
        if runner.stop_reason is None:
            out.events.publish("done", runner.progress.global_step, world_size=info.world_size)
        return runner.stop_reason == "preempt"
    except BaseException as e:  # before the loop (the loop publishes its own end; a second one is ignored)
        out.events.publish("run_end", -1, how="failed", error=type(e).__name__)
        raise
    finally:
        out.files.close()


def node_copies(cfg: Config) -> NodeCopies | None:
    """Where a checkpoint on an object store is copied for the other ranks of the node: beside the data
    cache (``data.cache.dir``; "" = every rank reads it from the store)."""
    return NodeCopies(os.path.join(cfg.data.cache.dir, "checkpoints")) if cfg.data.cache.dir else None


def open_work_dir(cfg: Config, info: dist.DistInfo, writers: Sequence[WriterFactory] = ()) -> RunOutput:
    """The work dir, rank 0's files, and the event stream with the given writers, ``metrics.jsonl`` (held
    until the restore succeeded), the console and TensorBoard subscribed, in that order."""
    work_dir = WorkDir(cfg.work_dir, cfg.checkpoint.storage_options, timeout=cfg.checkpoint.timeout_seconds)
    if info.is_main:
        work_dir.check_writable()
    files = RunFiles(work_dir, enabled=info.is_main)
    setup_text_logging(files, info.rank)
    _warn_if_not_shared(cfg.work_dir, info)
    events = EventStream()
    for make in writers:
        events.subscribe(make(files, info))
    metrics = events.subscribe(MetricsWriter(files))
    events.subscribe(ConsoleWriter(cfg.log.progress_bar, info.is_main))
    if cfg.log.tensorboard and info.is_main:
        events.subscribe(TensorBoardWriter(files.local_path("tensorboard")))
    return RunOutput(work_dir, files, events, metrics)


def build_data(cfg: Config, info: dist.DistInfo) -> TrainData:
    """The training set (each node's local rank 0 first: it may generate the data), its global order, and
    the batch policy at this world size."""
    dataset = dist.local_main_first(lambda: build_dataset(cfg.data, "train"), info.local_rank)
    policy = batch_policy(cfg, info.world_size)
    group_ids = aspect_groups(dataset.aspect_ratios()) if cfg.data.group_by_aspect_ratio else None
    plan = ElasticBatchPlan(len(dataset), cfg.seed, cfg.data.drop_last, group_ids=group_ids,
                            group_batch_size=policy.global_batch_size if group_ids else None)
    steps_per_epoch = StepSchedule(plan, policy.global_batch_size, Progress()).steps_per_epoch
    max_steps = cfg.train.max_steps or cfg.train.max_epochs * steps_per_epoch
    return TrainData(dataset, plan, policy, steps_per_epoch, max_steps)


def build_training_parts(cfg: Config, info: dist.DistInfo, data: TrainData) -> state.TrainingParts:
    if cfg.model.norm == "sync_bn" and info.distributed and info.device.type == "cpu":
        raise ConfigError("model.norm=sync_bn needs CUDA (SyncBatchNorm does not run on CPU/gloo); use "
                          "group_norm or frozen_bn on CPU.")
    model = build_model(cfg.model, data.dataset.num_classes).to(info.device)
    if cfg.model.load_from:
        state.load_weights(model, cfg.model.load_from, cfg.checkpoint.storage_options, cfg.checkpoint.timeout_seconds)
        log.info("Loaded weights from %s (load_from: weights only, training starts at step 0)", cfg.model.load_from)
    bn = batch_dependent_layers(model)
    if bn:
        level = logging.WARNING if info.distributed else logging.INFO
        log.log(level, "%d BatchNorm layers train on per-rank statistics (%s, ...): results depend on the "
                "per-device batch, so they change with the world size. Use model.norm=frozen_bn, sync_bn or "
                "group_norm for a world-size-invariant run.", len(bn), bn[0])
    optimizer = build_optimizer(cfg.optimizer, model, data.policy.lr)
    scheduler = build_scheduler(cfg.schedule, optimizer, data.max_steps)
    return state.TrainingParts(model, optimizer, scheduler, amp.grad_scaler(cfg.train.amp, info.device),
                               ema=build_ema(cfg.ema, model))


def build_batches(cfg: Config, info: dist.DistInfo, data: TrainData, progress: Progress):
    """This rank's share of every global step from the cursor on, loaded by the data-loader workers."""
    schedule = StepSchedule(data.plan, data.policy.global_batch_size, progress)
    samples = TrainSamples(data.dataset, build_transforms(cfg.data.train_transforms, train=True), cfg.seed)
    shares = ((s.epoch, split_share(s.indices, info.rank, info.world_size))
              for s in map(schedule.at, range(progress.global_step, data.max_steps)))
    return schedule, build_train_loader(samples, shares, cfg.data.num_workers)


def build_hooks(cfg: Config, info: dist.DistInfo, out: RunOutput, store: CheckpointStore,
                preempt: PreemptionFlag, data: TrainData, parts: state.TrainingParts) -> list[Hook]:
    """Logger, data trace, evaluation, checkpoint: evaluation before the checkpoint, so a checkpoint at
    step *s* carries the metrics of the evaluation at *s*. The writers that follow the saves subscribe
    here, after the ledger and ``metrics.jsonl``: the grace check, the preemption flag's record of the
    newest commit, and the upload of the run's files to an object store at every commit."""
    hooks: list[Hook] = [LoggerHook(out.events, cfg.log.interval, info.is_main)]
    if cfg.data.trace and info.is_main:
        hooks.append(TraceHook(out.files, next_attempt_path(out.work_dir.listdir("trace")), data.dataset.image_ids))
    if cfg.train.validate:
        hooks.append(EvalHook(_evaluator(cfg, info), cfg.train.eval_interval, out.events, format_table))
    checkpointer = Checkpointer(store, out.events, meta={"config_hash": config_hash(cfg)}, is_main=info.is_main,
                                async_save=cfg.checkpoint.async_save)
    hooks.append(CheckpointHook(checkpointer, cfg.checkpoint, preempt, out.events))
    grace = grace_from_env()  # on every rank: a bad value stops them all
    copies = 2 if parts.ema is not None else 1  # the averaged weights are saved beside the raw ones
    model_bytes = lambda: copies * sum(v.nbytes for v in parts.model.state_dict().values())  # noqa: E731
    out.events.subscribe(GraceWriter(GraceMonitor(grace if info.is_main else None), out.files.local_path(METRICS),
                                     remote=not out.work_dir.is_local, model_state_bytes=model_bytes,
                                     step_seconds=preempt.step_time))
    out.events.subscribe(preempt.record_checkpoints(info.is_main))
    out.events.subscribe(lambda e: out.files.sync() if e.kind == "checkpoint" else None)
    return hooks


def announce(cfg: Config, info: dist.DistInfo, out: RunOutput, data: TrainData, progress: Progress,
             checkpoint: Checkpoint | None) -> None:
    """Log where the run starts; rank 0 writes config.yaml and the ``start`` or ``resume`` event."""
    log.info("%s", data.policy.describe(cfg, info.world_size))
    log.info("Start at global step %d (epoch %d, step %d of %d in it), world size %d, restart %d",
             progress.global_step, progress.epoch, progress.step_in_epoch, data.steps_per_epoch, info.world_size,
             info.restart_count)
    if not info.is_main:
        return
    out.work_dir.write_bytes_atomic("config.yaml", to_yaml(cfg).encode())
    fields = {"world_size": info.world_size, "restart_count": info.restart_count,
              "batch_policy": data.policy.name, "global_batch_size": data.policy.global_batch_size,
              "lr": data.policy.lr, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
              "max_steps": data.max_steps}
    if checkpoint is None:
        out.events.publish("start", progress.global_step, **fields)
        return
    changes = diff(state.saved_config(checkpoint), to_dict(cfg))
    for line in changes:
        log.info("Config changed since the checkpoint: %s", line)
    out.events.publish("resume", progress.global_step, checkpoint=checkpoint.location, config_changes=changes,
                       **fields)


def _nonfinite_guard(cfg: Config, out: RunOutput) -> NonFiniteGuard:
    def on_skip(step: int, terms: list[str], in_a_row: int, total: int) -> None:
        log.warning("Global step %d: non-finite %s on some rank; its update is dropped on every rank "
                    "(train.nonfinite=skip, %d in a row, %d in all)", step, ", ".join(terms), in_a_row, total)
        out.events.publish("nonfinite_skip", step, terms=terms, in_a_row=in_a_row, skipped=total)

    return NonFiniteGuard(cfg.train.nonfinite, cfg.train.nonfinite_patience, on_skip)


def _newest_checkpoint(store: CheckpointStore) -> str | None:
    """The newest committed checkpoint, as rank 0 sees it (after its last save), on every rank."""
    location = None
    if dist.is_main():
        try:
            step = store.newest_committed_step()
            location = store.location(step) if step is not None else None
        except (InfrastructureError, OSError) as e:
            location = f"(not known: listing {store.work_dir.url} failed: {e})"
    with dist.watched("sharing the newest checkpoint"):
        return dist.broadcast_object(location)


def _seed_and_determinism(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _wrap_ddp(model: torch.nn.Module, cfg: Config, info: dist.DistInfo) -> torch.nn.Module:
    if not info.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   find_unused_parameters=cfg.model.find_unused_parameters)


def _evaluator(cfg: Config, info: dist.DistInfo):
    """``evaluate(model)`` for the EvalHook. The val set and its loader are built at the first evaluation,
    not before the first step: a restart reaches training sooner."""
    built: dict[str, Any] = {}

    def run(model: torch.nn.Module) -> dict[str, float] | None:
        if not built:
            val_set = dist.local_main_first(lambda: build_dataset(cfg.data, "val"), info.local_rank)
            built["set"] = val_set
            built["loader"] = build_val_loader(val_set, build_transforms(cfg.data.val_transforms, train=False),
                                               info.rank, info.world_size, cfg.data.val_batch_size,
                                               cfg.data.num_workers)
        return evaluate(model, built["set"], built["loader"], info.device, cfg.train.amp)

    return run


def _warn_if_not_shared(url: str, info: dist.DistInfo) -> None:
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(info.world_size)))
    if (nodes > 1 or info.world_size > local_world) and not is_shared_path(url):
        log.warning("work_dir %s looks like a node-local path, but this run spans several nodes: every node "
                    "must see the same work dir (a shared file system or an object store such as s3://), or "
                    "resume will not find the other nodes' checkpoints.", url)
